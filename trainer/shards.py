"""Writing WebDataset shards, and everything about their manifest and sample identity.

Image folders, image files or list files -> standard tar shards plus `<prefix>-manifest.json`. Each
sample is `<key>.<ext>` (the original image bytes) and `<key>.json` ({"source", "width", "height",
"mode"}). Output is deterministic for the same inputs (input order, sorted folders, fixed tar metadata).
Undecodable or missing images are reported by name and skipped; it fails only if none is left. The
manifest is read back here too (`manifest_counts`), and `item_id` names a sample in the memory.
No torch: launch/make_shards.py and launch/prepare_shared_data.py call `write_shards`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

# What trainer.data reads as a sample's image, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TAR_BLOCK = 512
TAR_END = 2 * TAR_BLOCK  # two zero blocks end an archive ...
TAR_RECORD = 20 * TAR_BLOCK  # ... which Python's tarfile then pads to a whole record
MANIFEST_FORMAT = "pccnet-shards/1"
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-/]")


class ShardError(RuntimeError):
    """Nothing usable to write, or a bad argument; the message names the value."""


@dataclass(frozen=True)
class Source:
    path: Path | None  # None: the name could not be resolved to a file
    name: str  # how the image is named in the json and the key: relative to its folder or list


@dataclass(frozen=True)
class Inspected:
    source: Source
    data: bytes | None = None
    ext: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    error: str = ""


def _is_image(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def _list_candidates(name: str, list_dir: Path, root: Path | None) -> list[Path]:
    # An explicit --root wins; then the list's own folder, then an images/ folder beside it (the
    # layout of the shared split lists).
    out = [root / name] if root is not None else []
    return out + [list_dir / name, list_dir / "images" / name]


def collect_sources(inputs: Iterable[str], root: str | None = None) -> list[Source]:
    """Expand --input values (folders recursively, image files, .txt lists) into named sources."""
    root_path = Path(root).expanduser() if root else None
    if root_path is not None and not root_path.is_dir():
        raise ShardError(f"--root {root!r} is not a folder")
    sources: list[Source] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file() and _is_image(p)]
            for p in sorted(files, key=lambda p: p.relative_to(path).as_posix()):
                sources.append(Source(p, p.relative_to(path).as_posix()))
        elif path.is_file() and path.suffix.lower() == ".txt":
            for line in path.read_text().splitlines():
                name = line.strip()
                if not name or name.startswith("#"):
                    continue
                if Path(name).is_absolute():
                    found = Path(name) if Path(name).is_file() else None
                    sources.append(Source(found, Path(name).name))
                    continue
                found = next((c for c in _list_candidates(name, path.parent, root_path) if c.is_file()), None)
                sources.append(Source(found, name))
        elif path.is_file() and _is_image(path):
            sources.append(Source(path, path.name))
        elif path.is_file():
            raise ShardError(f"--input {item!r} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a .txt list")
        else:
            raise ShardError(f"--input {item!r} does not exist")
    return sources


def inspect(source: Source) -> Inspected:
    """Read and fully decode one image: its bytes and size, or the reason it is unusable."""
    if source.path is None:
        return Inspected(source, error="file not found")
    try:
        data = source.path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: truncated files fail here, not in training
            width, height, mode = img.width, img.height, img.mode
    # Pillow raises many types for bad data (OSError, SyntaxError, zlib.error, DecompressionBombError...).
    except Exception as exn:  # noqa: BLE001
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "it", str(exn))  # keep the manifest stable
        return Inspected(source, error=f"{type(exn).__name__}: {detail}")
    if width < 1 or height < 1:
        return Inspected(source, error=f"image has no pixels ({width}x{height})")
    return Inspected(source, data, source.path.suffix.lower().lstrip("."), width, height, mode)


def sample_key(name: str, taken: set[str]) -> str:
    """A tar-safe, unique key from a source name: no extension, no dots, only [A-Za-z0-9_-/]."""
    stem = name.rsplit(".", 1)[0] if "." in Path(name).name else name
    key = _UNSAFE_KEY_CHARS.sub("_", stem).strip("/")
    key = re.sub(r"/+", "/", key) or "image"
    if key.startswith("__"):
        key = "x" + key  # webdataset skips members named like __meta__
    unique, n = key, 1
    while unique in taken:
        unique, n = f"{key}_{n}", n + 1
    taken.add(unique)
    return unique


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def _member_bytes(name: str, data_len: int) -> int:
    # A name that does not fit the 100-byte ustar field gets a pax header: budget 3 blocks for it.
    header = TAR_BLOCK if len(name.encode("utf-8")) < 100 and name.isascii() else 4 * TAR_BLOCK
    return header + -(-data_len // TAR_BLOCK) * TAR_BLOCK


def _final_size(offset: int) -> int:
    return -(-(offset + TAR_END) // TAR_RECORD) * TAR_RECORD


class ShardWriter:
    """Writes `<prefix>-000000.tar`, ... closing a shard at `samples` samples or `max_bytes` bytes."""

    def __init__(self, output: Path, prefix: str, samples: int, max_bytes: int) -> None:
        self.output, self.prefix, self.samples, self.max_bytes = output, prefix, samples, max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _path(self, index: int) -> Path:
        return self.output / f"{self.prefix}-{index:06d}.tar"

    def add(self, key: str, ext: str, data: bytes, meta: dict) -> None:
        meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
        image_name, meta_name = f"{key}.{ext}", f"{key}.json"
        size = _member_bytes(image_name, len(data)) + _member_bytes(meta_name, len(meta_bytes))
        # A sample larger than max_bytes on its own still gets written, alone in its shard.
        if self._tar is not None and (
            self._count >= self.samples or _final_size(self._tar.offset + size) > self.max_bytes
        ):
            self._close()
        if self._tar is None:
            tmp = self._path(len(self.shards)).with_suffix(".tar.tmp")
            self._tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
            self._count = 0
        self._tar.addfile(*_tar_member(image_name, data))
        self._tar.addfile(*_tar_member(meta_name, meta_bytes))
        self._count += 1

    def _close(self) -> None:
        assert self._tar is not None
        self._tar.close()
        final = self._path(len(self.shards))
        os.replace(final.with_suffix(".tar.tmp"), final)
        self.shards.append({"name": final.name, "samples": self._count, "bytes": final.stat().st_size})
        self._tar = None

    def finish(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        return self.shards


def _remove_old_shards(output: Path, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?$")
    old = [p for p in output.iterdir() if pattern.match(p.name)]
    for p in old:
        p.unlink()
    return len(old)


def _inspected(sources: list[Source], workers: int) -> Iterator[Inspected]:
    if workers <= 1:
        yield from map(inspect, sources)
        return
    with Pool(workers) as pool:
        # imap keeps input order, so the shards are the same whatever the worker count.
        yield from pool.imap(inspect, sources, chunksize=8)


def write_shards(
    inputs: Iterable[str],
    output: str | Path,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    workers: int = 0,
    root: str | None = None,
    progress: bool = True,
) -> dict:
    """Write the shards and `<prefix>-manifest.json`; returns the manifest. ShardError if nothing is usable."""
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ShardError(f"--prefix must be a plain file name prefix, got {prefix!r}")
    if samples_per_shard < 1:
        raise ShardError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if max_shard_bytes < 4 * TAR_BLOCK:
        raise ShardError(f"--max-shard-bytes must be >= {4 * TAR_BLOCK}, got {max_shard_bytes}")
    inputs = list(inputs)
    sources = collect_sources(inputs, root)
    seen: set[Path] = set()
    unique: list[Source] = []
    for s in sources:  # the same file listed twice is written once
        resolved = s.path.resolve() if s.path is not None else None
        if resolved is None or resolved not in seen:
            unique.append(s)
            if resolved is not None:
                seen.add(resolved)
    if not unique:
        raise ShardError(f"no image found in --input {inputs!r}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    removed = _remove_old_shards(out, prefix)
    if removed:
        logger.info("removed %d old %s-*.tar shards from %s", removed, prefix, out)
    writer = ShardWriter(out, prefix, samples_per_shard, max_shard_bytes)
    skipped: list[dict] = []
    taken: set[str] = set()
    bar = tqdm(total=len(unique), unit="img", desc=f"{prefix} shards", disable=not progress, file=sys.stderr)
    for item in _inspected(unique, workers):
        bar.update(1)
        if item.error:
            skipped.append({"source": item.source.name, "reason": item.error})
            bar.write(f"skipped {item.source.name}: {item.error}", file=sys.stderr)
            continue
        meta = {"source": item.source.name, "width": item.width, "height": item.height, "mode": item.mode}
        writer.add(sample_key(item.source.name, taken), item.ext, item.data, meta)
    bar.close()
    shards = writer.finish()
    total = sum(s["samples"] for s in shards)
    if total == 0:
        raise ShardError(f"none of the {len(unique)} images could be used ({len(skipped)} skipped)")
    manifest = {
        "format": MANIFEST_FORMAT,
        "prefix": prefix,
        "pattern": f"{prefix}-{{000000..{len(shards) - 1:06d}}}.tar",
        "total": total,
        "shards": shards,
        "skipped": skipped,
    }
    (out / f"{prefix}-manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest



def manifest_counts(directory: str | Path) -> dict[str, tuple[int, int]]:
    """{shard file name: (samples, bytes)} from every *manifest.json in a folder (write_shards' format)."""
    out: dict[str, tuple[int, int]] = {}
    for path in sorted(Path(directory).glob("*manifest.json")):
        try:
            manifest = json.loads(path.read_text())
            for entry in manifest["shards"]:
                out[entry["name"]] = (int(entry["samples"]), int(entry["bytes"]))
        except (OSError, ValueError, KeyError, TypeError) as exn:
            logger.warning("ignoring unreadable manifest %s: %s", path, exn)
    return out


def item_id(key: str) -> int:
    """Stable non-negative 63-bit id (blake2b) of a sample key or an image path, for the memory's item_ids."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def make_shards_command(inputs: list[str], output: str | Path, prefix: str = "train", samples_per_shard: int = 1000,
                        max_shard_bytes: int = 1 << 30, workers: int = 0, root: str | None = None) -> dict:
    """launch/make_shards.py: write_shards with a progress bar, then one summary line."""
    m = write_shards(inputs, output, prefix, samples_per_shard, max_shard_bytes, workers, root, progress=True)
    size = sum(s["bytes"] for s in m["shards"])
    print(f"wrote {m['total']} samples in {len(m['shards'])} shards ({size / 1e6:.1f} MB) to "
          f"{output}/{m['pattern']}; skipped {len(m['skipped'])} unusable image(s)")
    return m
