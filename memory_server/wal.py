"""Write-ahead log segments: a checksummed segment header, then length + CRC framed records.

Segment layout (little-endian): 20-byte header = magic `PCCWAL`, u16 format, u64 segment seq, u32
crc32 of those 16 bytes. Record = u32 payload length, u32 crc32(payload), u32 crc32 of those 8 bytes,
then the payload = u32 header length, msgpack header map (its `arrays` list gives name, dtype, shape),
raw array bytes. The prefix checksum is what tells a corrupted length from a torn write.

Only a *torn tail* of the last segment is cut (PROTOCOL.md "Recovery"): the file ends inside a record
whose prefix is intact, or everything from a record's start to the end of the file is zero bytes. Any
other damage (a prefix or payload checksum mismatch with the file going on, a damaged closed segment)
is WalCorrupt, and recovery refuses to start.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from .effects import array_specs, decode_record_arrays
from .protocol import wire_array

WAL_FORMAT = 2
_MAGIC = b"PCCWAL"
_SEG_HEAD = struct.Struct("<6sHQ")  # magic, format, seq
SEGMENT_HEADER_BYTES = _SEG_HEAD.size + 4
_PREFIX = struct.Struct("<III")  # payload length, payload crc32, crc32 of the first 8 bytes
_HLEN = struct.Struct("<I")
PREFIX_BYTES = _PREFIX.size
MAX_RECORD_BYTES = (1 << 32) - 1


class WalCorrupt(RuntimeError):
    """A log segment holds damage that is not a torn tail."""


class TornTail(Exception):
    """Raised by read_segment after truncating a torn final record at byte `offset`."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"torn final WAL record at byte {offset} ({reason}); truncated")
        self.offset = offset
        self.reason = reason


def segment_name(seq: int) -> str:
    """File name of WAL segment `seq`."""
    return f"wal-{seq:08d}.log"


def segment_seq(path: Path) -> int | None:
    """Sequence number of a segment file name, or None if it is not one."""
    name = path.name
    if name.startswith("wal-") and name.endswith(".log") and name[4:-4].isdigit():
        return int(name[4:-4])
    return None


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames and creations in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def segment_header(seq: int) -> bytes:
    """The 20 header bytes of segment `seq`."""
    head = _SEG_HEAD.pack(_MAGIC, WAL_FORMAT, seq)
    return head + struct.pack("<I", zlib.crc32(head))


def encode_record(header: dict[str, Any], arrays: list[tuple[str, np.ndarray]]) -> list[Any]:
    """The buffers of one record, prefix first, ready for os.writev."""
    bufs = [wire_array(a) for _, a in arrays]
    head = msgpack.packb(dict(header, arrays=array_specs(arrays)), use_bin_type=True)
    parts: list[Any] = [_HLEN.pack(len(head)), head]
    parts += [memoryview(b).cast("B") for b in bufs if b.nbytes]
    length = sum(memoryview(p).nbytes for p in parts)
    if length >= MAX_RECORD_BYTES:
        raise ValueError(f"WAL record of {length} bytes exceeds the 4 GiB record limit")
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    first = struct.pack("<II", length, crc)
    return [first + struct.pack("<I", zlib.crc32(first)), *parts]


class WalWriter:
    """Append-only writer of one segment; `sync()` makes everything appended durable.

    `create=True` writes and fsyncs the segment header (the caller fsyncs the directory); otherwise the
    segment exists, its header was checked by recovery, and appends go after its last valid record.
    """

    def __init__(self, path: Path, seq: int, create: bool = False) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(path, flags, 0o644)
        try:
            if create:
                os.write(self.fd, segment_header(seq))
                os.fdatasync(self.fd)
        except BaseException:
            os.close(self.fd)
            path.unlink(missing_ok=True)
            raise
        self.size = os.fstat(self.fd).st_size

    def append(self, header: dict[str, Any], arrays: list[tuple[str, np.ndarray]]) -> int:
        """Write one record (no fsync); returns its size in bytes."""
        parts = encode_record(header, arrays)
        total = sum(memoryview(p).nbytes for p in parts)
        try:
            written = os.writev(self.fd, parts)
        except OSError:
            os.ftruncate(self.fd, self.size)  # a failed write (disk full) must not leave a partial record
            raise
        if written != total:
            os.ftruncate(self.fd, self.size)
            raise OSError(f"short write to {self.path}: {written} of {total} bytes")
        self.size += total
        return total

    def truncate(self, size: int) -> None:
        """Cut the segment back to `size` bytes (undo the last record) and make the cut durable."""
        os.ftruncate(self.fd, size)
        os.fdatasync(self.fd)
        self.size = size

    def sync(self) -> None:
        """fdatasync the segment."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        """Close the file descriptor (after a final sync by the caller)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _rest_is_zero(f: Any) -> bool:
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False


def _cut(path: Path, pos: int, reason: str) -> TornTail:
    with open(path, "r+b") as w:
        w.truncate(pos)
        w.flush()
        os.fsync(w.fileno())
    return TornTail(pos, reason)


def check_segment_header(path: Path, seq: int, last: bool) -> bool:
    """True when the segment has its header; False for the torn creation of the last segment.

    The last segment may be shorter than its header or hold only zeros there (the server died while
    creating it); it is then rewritten empty. Any other mismatch is WalCorrupt.
    """
    with open(path, "rb") as f:
        head = f.read(SEGMENT_HEADER_BYTES)
        if last and (len(head) < SEGMENT_HEADER_BYTES or head.count(0) == len(head)) and _rest_is_zero(f):
            return False
    if len(head) < SEGMENT_HEADER_BYTES:
        raise WalCorrupt(f"{path}: {len(head)}-byte segment header (expected {SEGMENT_HEADER_BYTES})")
    if head != segment_header(seq):
        magic, fmt, got = _SEG_HEAD.unpack(head[:_SEG_HEAD.size])
        if magic != _MAGIC or fmt != WAL_FORMAT:
            raise WalCorrupt(f"{path}: not a format-{WAL_FORMAT} WAL segment (magic {magic!r}, format {fmt})")
        raise WalCorrupt(f"{path}: segment header names segment {got} or fails its checksum")
    return True


def reset_segment(path: Path, seq: int) -> None:
    """Rewrite the torn creation of the last segment as an empty segment."""
    with open(path, "wb") as f:
        f.write(segment_header(seq))
        f.flush()
        os.fsync(f.fileno())


def read_segment(path: Path, last: bool) -> Iterator[tuple[int, dict[str, Any], dict[str, np.ndarray]]]:
    """Yield (offset, header, arrays) per record after the segment header.

    A torn tail of the last segment is truncated and raises TornTail after the records before it; any
    other damage raises WalCorrupt naming the file and byte.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos = SEGMENT_HEADER_BYTES
        f.seek(pos)
        while pos < size:
            prefix = f.read(PREFIX_BYTES)
            if len(prefix) < PREFIX_BYTES:
                if last:
                    raise _cut(path, pos, f"{len(prefix)}-byte fragment of a record prefix")
                raise WalCorrupt(f"{path}: {len(prefix)}-byte fragment of a record at byte {pos} of a closed segment")
            length, crc, prefix_crc = _PREFIX.unpack(prefix)
            if zlib.crc32(prefix[:8]) != prefix_crc:
                if last and prefix.count(0) == PREFIX_BYTES and _rest_is_zero(f):
                    raise _cut(path, pos, "zero bytes from a record's start to the end of the file")
                raise WalCorrupt(f"{path}: the record prefix at byte {pos} fails its checksum (a damaged length "
                                 f"or checksum, not a torn tail)")
            end = pos + PREFIX_BYTES + length
            if length < _HLEN.size:
                raise WalCorrupt(f"{path}: the record at byte {pos} declares {length} bytes")
            if end > size:
                if last:
                    raise _cut(path, pos, f"record of {length} bytes, the file ends {end - size} bytes short")
                raise WalCorrupt(f"{path}: the record at byte {pos} runs past the end of a closed segment")
            payload = bytearray(length)
            f.readinto(payload)
            if zlib.crc32(payload) != crc:
                raise WalCorrupt(f"{path}: checksum mismatch in the record at byte {pos} (not a torn tail: the "
                                 f"file does not end inside it)")
            view = memoryview(payload)
            try:
                (hlen,) = _HLEN.unpack_from(view, 0)
                header = msgpack.unpackb(view[_HLEN.size:_HLEN.size + hlen], raw=False, strict_map_key=False)
                if not isinstance(header, dict):
                    raise ValueError(f"record header is a {type(header).__name__}, not a map")
                arrays = decode_record_arrays(header.get("arrays", []), view, _HLEN.size + hlen)
            except (ValueError, KeyError, TypeError, struct.error, msgpack.UnpackException) as exc:
                raise WalCorrupt(f"{path}: record at byte {pos} passes its checksum but does not parse: {exc}") from exc
            yield pos, header, arrays
            pos = end
