"""WebDataset shards in, batches of network-scaled Lab tensors out, for training and evaluation.

Owns shard discovery (`expand_pattern`, `count_samples`), the worker pipeline (shard choice -> tar
reading with a counting error handler -> shuffle -> decode/composite/crop/resize -> batched Lab and
colour features) and the two loaders. Per-image transforms live in trainer.images, the shard format
(manifest, sample ids) in trainer.shards; nothing here imports the training loop, and batches stay on
the CPU (the trainer moves them to its device). Building a loader reads no shard: the training stream
is endless and resampled, so nothing needs the data set's size up front.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re
import tarfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from trainer.config import DataConfig
from trainer.images import (
    ImageDecodeError,
    center_crop_resize,
    lab_batch,
    load_rgb,
    parse_background,
)
from trainer.shards import IMAGE_EXTENSIONS, item_id, manifest_counts

logger = logging.getLogger(__name__)

LOG_FIRST = 5  # skipped samples logged one by one per worker, then at most one summary line ...
LOG_EVERY_S = 30.0  # ... every this many seconds
# A training worker that meets this many failed samples / empty shards in a row (and at least twice the
# shard count) raises instead of spinning forever on a data set with nothing usable in it.
MAX_CONSECUTIVE_FAILURES = 500
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")  # two letters at least: not a drive letter
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class DataError(ValueError):
    """A data pattern, shard or data set is unusable; the message names the bad value."""


# --- shard discovery -------------------------------------------------------------------------------
def expand_pattern(pattern: str) -> list[str]:
    """Shard pattern -> list of shard URLs (local paths are checked to exist and to be tar files).

    Accepts a path, a brace pattern (`train-{000000..000127}.tar`), a glob, a folder (its *.tar),
    `pipe:` or other URLs (not checked), and several of these joined by `::`.
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise DataError(f"data pattern must be a non-empty string, got {pattern!r}")
    urls: list[str] = []
    missing: list[str] = []
    for part in pattern.strip().split("::"):
        for url in braceexpand.braceexpand(part.strip()):
            if url.startswith("file:"):
                url = re.sub(r"^file:(//)?", "", url)
            elif _SCHEME.match(url):
                urls.append(url)  # pipe:, http:, s3: ... are opened by webdataset's gopen
                continue
            path = os.path.expanduser(url)
            if any(c in path for c in "*?["):
                matches = sorted(glob.glob(path))
                urls.extend(m for m in matches if os.path.isfile(m))
                if not matches:
                    missing.append(path)
            elif os.path.isdir(path):
                found = sorted(str(p) for p in Path(path).iterdir() if p.name.endswith(_TAR_SUFFIXES))
                urls.extend(found)
                if not found:
                    missing.append(os.path.join(path, "*.tar"))
            elif os.path.isfile(path):
                urls.append(path)
            else:
                missing.append(path)
    if not urls:
        raise DataError(f"no shard matches the data pattern {pattern!r} (looked for {missing[0]!r})")
    if missing:
        raise DataError(
            f"{len(missing)} shard(s) of the data pattern {pattern!r} do not exist, e.g. {missing[0]!r}"
        )
    for url in urls:
        if not _SCHEME.match(url) and not tarfile.is_tarfile(url):
            raise DataError(f"shard {url!r} (from the data pattern {pattern!r}) is not a tar file")
    return urls


def shard_name(url: str) -> str:
    """A shard's short, location-independent name: the basename without the tar suffix."""
    last = url.split()[-1] if url.startswith("pipe:") else url
    name = os.path.basename(last.rstrip("/"))
    for suffix in _TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _scan_shard(url: str) -> int:
    """Number of samples with an image in one shard, from its tar headers."""
    count, last_key = 0, None
    if _SCHEME.match(url):
        stream = gopen(url, "rb")
        tar = tarfile.open(fileobj=stream, mode="r|*")
    else:
        stream, tar = None, tarfile.open(url, mode="r:*")  # seekable: reads headers, skips data
    try:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = base_plus_ext(member.name)
            if key is not None and ext.lower() in IMAGE_EXTENSIONS and key != last_key:
                count, last_key = count + 1, key
    finally:
        tar.close()
        if stream is not None:
            stream.close()
    return count


def count_samples(pattern: str) -> int:
    """Samples holding an image in the shards of `pattern`: from make_shards' manifest, else by scanning."""
    total = 0
    manifests: dict[str, dict[str, tuple[int, int]]] = {}
    for url in expand_pattern(pattern):
        if not _SCHEME.match(url):
            directory, name = os.path.split(os.path.abspath(url))
            if directory not in manifests:
                manifests[directory] = manifest_counts(directory)
            entry = manifests[directory].get(name)
            # A manifest entry is trusted only while the shard still has the size it recorded.
            if entry is not None and entry[1] == os.path.getsize(url):
                total += entry[0]
                continue
        total += _scan_shard(url)
    return total


# --- the worker pipeline ---------------------------------------------------------------------------
class _Reporter:
    """Per-worker count of skipped samples, with rate-limited logging and a guard against spinning."""

    def __init__(self, rank: int, worker: int, limit: int | None) -> None:
        self.where = f"rank {rank} worker {worker}"
        self.limit = limit
        self.count = 0  # corrupt samples (and unreadable shard parts) skipped so far
        self.consecutive = 0
        self.logged = 0
        self.suppressed = 0
        self.last_log = 0.0

    def failure(self, message: str, corrupt: bool = True) -> None:
        self.count += int(corrupt)
        self.consecutive += 1
        now = time.monotonic()
        if self.logged < LOG_FIRST or now - self.last_log >= LOG_EVERY_S:
            more = f" (+{self.suppressed} more not logged)" if self.suppressed else ""
            logger.warning("data %s: skipped %s%s; %d skipped so far", self.where, message, more, self.count)
            self.logged, self.last_log, self.suppressed = self.logged + 1, now, 0
        else:
            self.suppressed += 1
        if self.limit is not None and self.consecutive >= self.limit:
            raise DataError(
                f"data {self.where}: {self.consecutive} samples or shards in a row were unusable "
                f"(last: {message}); is the data set readable at all?"
            )

    def success(self) -> None:
        self.consecutive = 0

    def handler(self, exn: BaseException) -> bool:
        """webdataset error handler: count, log and continue."""
        self.failure(f"{type(exn).__name__}: {str(exn)[:300]}")
        return True


class _CountingReader:
    """A read-only stream that counts its bytes: Python's tarfile silently stops at a truncated header."""

    _COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: sizes say nothing

    def __init__(self, stream: Any, url: str) -> None:
        self.stream, self.url, self.n_bytes, self.head = stream, url, 0, b""

    def __repr__(self) -> str:  # webdataset puts the stream into its error messages
        return f"<shard {self.url}>"

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.n_bytes == 0:
            self.head = data[:6]
        self.n_bytes += len(data)
        return data

    def truncated(self) -> bool:
        """After tarfile is done: drain the rest (a pipe may deliver any chunk sizes), then check that
        an uncompressed tar was a whole number of 512-byte blocks."""
        while self.read(1 << 16):
            pass
        return self.n_bytes % 512 != 0 and not self.head.startswith(self._COMPRESSED)

    def close(self) -> None:
        self.stream.close()


def _shard_samples(url: str, reporter: _Reporter) -> Iterator[dict[str, Any]]:
    """Raw samples {'__key__', '__url__', ext: bytes, ...} of one shard; errors are counted, not raised."""
    try:
        stream = _CountingReader(gopen(url, "rb"), url)
    except Exception as exn:  # noqa: BLE001 - any open failure (missing file, bad pipe) skips the shard
        reporter.failure(f"cannot open shard {url}: {type(exn).__name__}: {exn}")
        return
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=reporter.handler)
        yield from group_by_keys(files, handler=reporter.handler)
        if stream.truncated():
            reporter.failure(f"shard {url} is truncated after {stream.n_bytes} bytes")
    finally:
        try:
            stream.close()
        except Exception as exn:  # noqa: BLE001 - a pipe: command's non-zero exit status lands here
            reporter.failure(f"shard {url}: {type(exn).__name__}: {exn}")


class _SampleCache:
    """LRU of (pixels uint8 [H,W,3], colour feature [313]) by sample key, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, tuple[np.ndarray, torch.Tensor]] = OrderedDict()
        self.bytes = 0

    def get(self, key: str) -> tuple[np.ndarray, torch.Tensor] | None:
        hit = self.items.get(key)
        if hit is not None:
            self.items.move_to_end(key)
        return hit

    def put(self, key: str, pixels: np.ndarray, feature: torch.Tensor) -> None:
        size = pixels.nbytes + feature.numel() * feature.element_size()
        if size > self.max_bytes or key in self.items:
            return
        self.items[key] = (pixels, feature)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (p, f) = self.items.popitem(last=False)
            self.bytes -= p.nbytes + f.numel() * f.element_size()


def one_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors (contiguous copies) as views of one shared byte buffer.

    A worker hands each storage of a batch to the main process by its own file-descriptor round trip
    (torch's default sharing strategy), which needs the worker's resource-sharer thread, and so the
    worker's GIL, at the moment the trainer asks for the batch; one storage per batch instead of four
    halved the trainer's wait for a batch (docs/PERFORMANCE.md).
    """
    align = 16
    spans, total = [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        spans.append((name, t, total, nbytes))
        total += -(-nbytes // align) * align
    buf = torch.empty(total, dtype=torch.uint8)
    out = {}
    for name, t, start, nbytes in spans:
        view = buf[start:start + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        out[name] = view
    return out


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle: fill `size` items, then emit a random one for each new one."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class _ShardStream(IterableDataset):
    """One rank's pipeline; each DataLoader worker runs its own copy of __iter__."""

    def __init__(self, shards: list[str], cfg: DataConfig, rank: int, train: bool, seed: int) -> None:
        super().__init__()
        self.shards, self.rank, self.train, self.seed = shards, rank, train, seed
        self.image_size, self.batch_size = cfg.image_size, cfg.batch_size
        self.background, self.flip = cfg.background, cfg.flip and train
        self.shuffle_buffer = cfg.shuffle_buffer
        # Per training worker: decoded, resized pixels and colour features by sample key (both are the
        # same on every visit; only the flip is random). Few-shot sets fit whole, so later epochs skip
        # decode, resize and the colour feature. data.cache_mb is the only switch; 0 disables it.
        self.cache_mb = cfg.cache_mb

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        limit = max(MAX_CONSECUTIVE_FAILURES, 2 * len(self.shards)) if self.train else None
        reporter = _Reporter(self.rank, worker, limit)
        # str seeds are hashed with sha512: the same on every run, whatever PYTHONHASHSEED says.
        rng = random.Random(f"pccnet-data:{self.seed}:{self.rank}:{worker}")
        if self.train:
            samples = _shuffled(self._resampled(rng, reporter), self.shuffle_buffer, rng)
        else:
            samples = (s for url in self.shards[worker::n_workers] for s in _shard_samples(url, reporter))
        yield from self._batches(samples, rng, reporter, worker)
        # End of a finite (evaluation) stream: report this worker's final count to the main process.
        yield {"__stats__": True, "worker": worker, "n_corrupt": reporter.count}

    def _resampled(self, rng: random.Random, reporter: _Reporter) -> Iterator[dict[str, Any]]:
        # Shards drawn with replacement, independently per rank and worker: every rank can always
        # produce another batch, so DDP ranks never disagree on the number of steps.
        while True:
            url = rng.choice(self.shards)
            n = 0
            for sample in _shard_samples(url, reporter):
                n += 1
                yield sample
            if n == 0:
                reporter.failure(f"shard {url} yielded no samples", corrupt=False)

    def _batches(
        self, samples: Iterator[dict[str, Any]], rng: random.Random, reporter: _Reporter, worker: int
    ) -> Iterator[dict[str, Any]]:
        cache = _SampleCache(self.cache_mb << 20 if self.train else 0)
        pixels: list[np.ndarray] = []
        features: list[torch.Tensor | None] = []
        keys: list[str] = []
        for sample in samples:
            key = f"{shard_name(sample.get('__url__', ''))}/{sample['__key__']}"
            hit = cache.get(key)
            if hit is not None:
                pixels.append(hit[0])
                features.append(hit[1])
            else:
                data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
                if data is None:
                    fields = sorted(k for k in sample if not k.startswith("__"))
                    reporter.failure(f"{key}: no image field (has {fields})")
                    continue
                try:
                    img = load_rgb(data, self.background, draft_size=self.image_size)
                    pixels.append(np.asarray(center_crop_resize(img, self.image_size)))
                except (ImageDecodeError, ValueError) as exn:
                    reporter.failure(f"{key}: {exn}")
                    continue
                features.append(None)
            reporter.success()
            keys.append(key)
            if len(keys) == self.batch_size:
                yield self._collate(pixels, features, keys, rng, reporter, worker, cache)
                pixels, features, keys = [], [], []
        if keys and not self.train:
            yield self._collate(pixels, features, keys, rng, reporter, worker, cache)

    def _collate(
        self,
        pixels: list[np.ndarray],
        features: list[torch.Tensor | None],
        keys: list[str],
        rng: random.Random,
        reporter: _Reporter,
        worker: int,
        cache: _SampleCache,
    ) -> dict[str, Any]:
        flip = torch.tensor([rng.random() < 0.5 for _ in keys]) if self.flip else None
        batch: dict[str, Any] = lab_batch(np.stack(pixels), flip, features)  # light, ab, color_feature
        if cache.max_bytes > 0:
            for i, known in enumerate(features):
                if known is None:  # a clone: the batch's storage moves to shared memory when sent
                    cache.put(keys[i], pixels[i], batch["color_feature"][i].clone())
        batch["item_id"] = torch.tensor([item_id(k) for k in keys], dtype=torch.int64)
        if get_worker_info() is not None:
            batch.update(one_storage({k: batch[k] for k in ("light", "ab", "color_feature", "item_id")}))
        batch["key"] = list(keys)
        batch["n_corrupt"] = reporter.count
        batch["worker"] = worker
        return batch


# --- loaders ---------------------------------------------------------------------------------------
def _check_cfg(cfg: DataConfig, rank: int, world_size: int) -> None:
    # Sizes and counts are DataConfig's to check (it validates itself); the background is checked here.
    parse_background(cfg.background)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank {rank!r} of world_size {world_size!r}")


def _data_loader(dataset: _ShardStream, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())


class _CorruptTally:
    """Sums per-worker maxima of the cumulative `n_corrupt` each batch carries."""

    def __init__(self) -> None:
        self.per_worker: dict[int, int] = {}

    def see(self, batch: dict[str, Any]) -> None:
        w = batch["worker"]
        self.per_worker[w] = max(self.per_worker.get(w, 0), batch["n_corrupt"])

    @property
    def total(self) -> int:
        return sum(self.per_worker.values())


class TrainLoader:
    """An endless iterator of training batches.

    Every rank draws shards with replacement, so every rank can always produce the next batch: a
    trainer that calls next() once per step never sees StopIteration and DDP ranks stay in step.
    """

    def __init__(self, dataset: _ShardStream, workers: int) -> None:
        self.shards = dataset.shards
        self.num_workers = workers
        self._loader = _data_loader(dataset, workers)
        self._it: Iterator[dict[str, Any]] | None = None
        self._tally = _CorruptTally()

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self._loader)
        try:
            batch = next(self._it)
        except StopIteration:
            raise DataError("the resampled training stream ended; this should never happen") from None
        self._tally.see(batch)
        return batch

    @property
    def n_corrupt(self) -> int:
        """Corrupt samples skipped so far on this rank (as reported by the batches received)."""
        return self._tally.total

    def close(self) -> None:
        """Stop the worker processes (also done when the loader is garbage collected)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EvalLoader:
    """A finite iterable: each pass yields this rank's share of every sample exactly once."""

    def __init__(self, dataset: _ShardStream, workers: int) -> None:
        self.shards = dataset.shards
        self.num_workers = workers
        self._dataset = dataset
        self._tally = _CorruptTally()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._tally = _CorruptTally()
        if not self.shards:
            return  # a rank without a shard contributes nothing
        for batch in _data_loader(self._dataset, self.num_workers):
            self._tally.see(batch)
            if "__stats__" not in batch:
                yield batch

    @property
    def n_corrupt(self) -> int:
        """Corrupt samples skipped on this rank in the current (or last finished) pass."""
        return self._tally.total


def make_train_loader(cfg: DataConfig, rank: int, world_size: int, seed: int) -> TrainLoader:
    """Endless, resampled training batches for one rank (see TrainLoader); deterministic given seed.

    Only the shard list is checked here (local shards must exist and be tar files); no shard is read.
    """
    _check_cfg(cfg, rank, world_size)
    dataset = _ShardStream(expand_pattern(cfg.train), cfg, rank, train=True, seed=seed)
    return TrainLoader(dataset, cfg.workers)


def make_eval_loader(pattern: str, cfg: DataConfig, rank: int, world_size: int) -> EvalLoader:
    """Every sample of `pattern` exactly once across ranks and workers: rank r reads shards r, r+W, ..."""
    _check_cfg(cfg, rank, world_size)
    shards = expand_pattern(pattern)[rank::world_size]
    dataset = _ShardStream(shards, cfg, rank, train=False, seed=0)
    # A worker without a shard would yield nothing, so never start more workers than shards.
    return EvalLoader(dataset, min(cfg.workers, len(shards)))
