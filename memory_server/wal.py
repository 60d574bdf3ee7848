"""Write-ahead log segments: length + CRC32 framed records of mutation effects.

Record layout (little-endian): u32 payload length, u32 crc32(payload), payload; payload = u32 header
length, msgpack header map (its `arrays` list gives name, dtype, shape), raw array bytes. A torn final
record (short, or failing its checksum at the end of the last segment) is detected and cut off;
a bad record followed by valid data is corruption and stops recovery.
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

_PREFIX = struct.Struct("<II")
_HLEN = struct.Struct("<I")
MAX_RECORD_BYTES = (1 << 32) - 1


class WalCorrupt(RuntimeError):
    """A log segment holds a damaged record that is not a torn tail."""


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
    return [_PREFIX.pack(length, crc), *parts]


class WalWriter:
    """Append-only writer of one segment; `sync()` makes everything appended durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = os.fstat(self.fd).st_size

    def append(self, header: dict[str, Any], arrays: list[tuple[str, np.ndarray]]) -> int:
        """Write one record (no fsync); returns its size in bytes."""
        parts = encode_record(header, arrays)
        total = sum(memoryview(p).nbytes for p in parts)
        written = os.writev(self.fd, parts)
        if written != total:
            # A short write (disk full): cut the partial record so the log stays well-formed.
            os.ftruncate(self.fd, self.size)
            raise OSError(f"short write to {self.path}: {written} of {total} bytes")
        self.size += total
        return total

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


def read_segment(path: Path, allow_torn_tail: bool) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Yield (header, arrays) per valid record. A torn tail is truncated (if allowed) and ends the scan."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            torn_reason = None
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                torn_reason = f"{len(prefix)}-byte fragment of a record prefix"
                payload = b""
            else:
                length, crc = _PREFIX.unpack(prefix)
                end = pos + _PREFIX.size + length
                if length == 0 or end > size:
                    torn_reason = f"record of {length} bytes runs past the end ({size - pos} left)"
                    payload = b""
                else:
                    payload = bytearray(length)
                    f.readinto(payload)
                    if zlib.crc32(payload) != crc:
                        if end == size or _rest_is_zero(f):
                            torn_reason = "checksum mismatch in the final record"
                        else:
                            raise WalCorrupt(f"{path}: checksum mismatch in the record at byte {pos}, "
                                             f"followed by more data (not a torn tail)")
            if torn_reason is not None:
                if not allow_torn_tail:
                    raise WalCorrupt(f"{path}: {torn_reason} at byte {pos} in a closed segment")
                with open(path, "r+b") as w:
                    w.truncate(pos)
                    w.flush()
                    os.fsync(w.fileno())
                raise TornTail(pos, torn_reason)
            view = memoryview(payload)
            try:
                (hlen,) = _HLEN.unpack_from(view, 0)
                header = msgpack.unpackb(view[_HLEN.size:_HLEN.size + hlen], raw=False, strict_map_key=False)
                arrays = decode_record_arrays(header.get("arrays", []), view, _HLEN.size + hlen)
            except (ValueError, KeyError, TypeError, struct.error, msgpack.UnpackException) as exc:
                raise WalCorrupt(f"{path}: record at byte {pos} passes its checksum but does not parse: {exc}") from exc
            yield header, arrays
            pos += _PREFIX.size + len(payload)


class TornTail(Exception):
    """Raised by read_segment after truncating a torn final record at byte `offset`."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"torn final WAL record at byte {offset} ({reason}); truncated")
        self.offset = offset
        self.reason = reason
