"""Memory packs: one safetensors file holding a memory (keys, values, ages, item ids) and where it came from.

A pack records the identity of the extractor that wrote its keys (a sha256 of the extractor's config,
the image size it sees and every tensor of its state, frozen backbone included), the checkpoint, the
creation time, the source image names and the counts. Keys from another extractor are meaningless, so
import and `colorize --memory X.pack` refuse a pack whose identity differs from the checkpoint's and
warn when it is unknown. Export and import round-trip the server's arrays bit for bit (import checks).

    pack = export_pack(client, "flowers", identity=checkpoint_identity("runs/x"))
    write_pack(pack, "flowers.pack");  import_pack(client, read_pack("flowers.pack"), expected_identity=...)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
from torch import nn

from memory_server.rules import normalize_distributions, normalize_rows

FORMAT = "pccnet-memory-pack"
FORMAT_VERSION = 1
UNKNOWN = "unknown"
ARRAYS = {"keys": np.float32, "values": np.float32, "ages": np.float32, "item_ids": np.int64}
# Rows per put on import: keeps each request well under the server's message limit (as trainer/memory.py).
PUT_CHUNK = 4096
# Tolerances of the invariants the server keeps (unit keys, values summing to 1), for validating a file.
_NORM_TOL = 1e-3
# Scales tried, nearest to 1 first, when a row must be sent as a pre-image of itself (see _preimages).
_SCALES = 1.0 + np.concatenate([[0.0], *([j, -j] for j in range(1, 1 << 14))]) * 2.0**-30


class PackError(ValueError):
    """A pack file is unreadable or invalid, or does not fit the memory or extractor it is used with."""


class PackWarning(UserWarning):
    """Something about a pack worth telling, that does not stop its use."""


class PackIdentityWarning(PackWarning):
    """A pack's extractor identity is unknown, so whether its keys fit this extractor cannot be checked."""


@dataclass
class Pack:
    """A memory's arrays plus the metadata of a pack file."""

    name: str
    keys: np.ndarray  # [m, dk] float32, unit rows
    values: np.ndarray  # [m, dv] float32, rows sum to 1
    ages: np.ndarray  # [m] float32
    item_ids: np.ndarray  # [m] int64, -1 = unwritten
    identity: str = UNKNOWN  # "sha256:<hex>" of the extractor that wrote the keys
    extractor: dict[str, Any] = field(default_factory=dict)  # its config, for people reading the file
    checkpoint: str = ""  # the checkpoint the extractor came from
    created: str = ""  # ISO 8601 UTC
    sources: list[dict[str, Any]] = field(default_factory=list)  # [{slot, item_id, name}] where a name is known

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    @property
    def written(self) -> int:
        return int((self.item_ids >= 0).sum())

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ARRAYS}

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (strings only)."""
        return {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "name": self.name,
            "extractor_identity": self.identity, "extractor": json.dumps(self.extractor, sort_keys=True),
            "checkpoint": self.checkpoint, "created": self.created, "sources": json.dumps(self.sources),
            "capacity": str(self.capacity), "key_dim": str(self.keys.shape[1]),
            "value_dim": str(self.values.shape[1]), "written": str(self.written),
        }


# --- extractor identity ------------------------------------------------------------------------------
def extractor_identity(extractor: nn.Module, image_size: int) -> str:
    """sha256 over the extractor's config, the image size it sees, and every tensor of its state_dict."""
    h = hashlib.sha256()
    cfg = getattr(extractor, "cfg", None)
    described = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}
    h.update(json.dumps({"config": described, "image_size": int(image_size)}, sort_keys=True).encode())
    for name, tensor in sorted(extractor.state_dict().items()):
        arr = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return f"sha256:{h.hexdigest()}"


def extractor_description(extractor: nn.Module, image_size: int) -> dict[str, Any]:
    cfg = getattr(extractor, "cfg", None)
    return {**(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}), "image_size": int(image_size)}


def checkpoint_identity(checkpoint: str | Path) -> tuple[str, dict[str, Any], str]:
    """(identity, extractor description, resolved checkpoint path) of a checkpoint's extractor."""
    from trainer.checkpoint import load_for_inference
    from trainer.inference import load_extractor

    state = load_for_inference(checkpoint, map_location="cpu")
    extractor = load_extractor(state)
    size = state["config"].data.image_size
    return extractor_identity(extractor, size), extractor_description(extractor, size), str(state["path"])


def check_identity(pack: Pack, expected: str | None, where: str) -> None:
    """Refuse a pack written by another extractor; warn when its identity is unknown. expected None: no check."""
    if expected is None:
        return
    if pack.identity == UNKNOWN:
        warnings.warn(f"pack {where} does not say which extractor wrote its keys; they are used as they are "
                      "(export it with --checkpoint to record one)", PackIdentityWarning, stacklevel=2)
        return
    if pack.identity != expected:
        raise PackError(f"pack {where} was written by another extractor ({pack.identity[:19]}... from "
                        f"{pack.checkpoint or 'an unnamed checkpoint'}); this checkpoint's is {expected[:19]}...: "
                        "its keys would retrieve the wrong colours")


# --- files ---------------------------------------------------------------------------------------------
def pack_bytes(pack: Pack) -> bytes:
    """The pack as the bytes of a safetensors file."""
    validate(pack, "(in memory)")
    return safetensors.numpy.save(pack.arrays(), metadata=pack.metadata())


def write_pack(pack: Pack, path: str | Path) -> Path:
    """Write atomically (temporary file, fsync, rename); returns the path."""
    path = Path(path)
    data = pack_bytes(pack)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_pack(path: str | Path) -> Pack:
    """Read and validate a pack file; PackError naming the file and the problem otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PackError(f"pack file {str(path)!r} does not exist")
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise PackError(f"{path} is a safetensors file but not a memory pack (format "
                                f"{meta.get('format')!r})")
            names = set(f.keys())
            missing = sorted(set(ARRAYS) - names)
            if missing:
                raise PackError(f"pack {path} lacks the arrays {missing} (it holds {sorted(names)})")
            arrays = {k: f.get_tensor(k) for k in ARRAYS}
    except PackError:
        raise
    # safetensors raises its own error type (and others for a damaged header): all mean "not a pack".
    except Exception as e:  # noqa: BLE001
        raise PackError(f"{path} is not a readable pack (safetensors file): {type(e).__name__}: {e}") from e
    return _from_parts(meta, arrays, str(path))


def _from_parts(meta: dict[str, str], arrays: dict[str, np.ndarray], where: str) -> Pack:
    if meta.get("format") != FORMAT:
        raise PackError(f"{where} is a safetensors file but not a memory pack (format {meta.get('format')!r})")
    try:
        version = int(meta.get("format_version", ""))
        extractor = json.loads(meta.get("extractor", "{}"))
        sources = json.loads(meta.get("sources", "[]"))
    except (TypeError, ValueError) as e:
        raise PackError(f"pack {where}: unreadable metadata: {e}") from e
    if version > FORMAT_VERSION:
        raise PackError(f"pack {where} has format version {version}; this code reads up to {FORMAT_VERSION}")
    if not isinstance(extractor, dict) or not isinstance(sources, list):
        raise PackError(f"pack {where}: metadata 'extractor' must be an object and 'sources' a list")
    pack = Pack(name=meta.get("name", ""), identity=meta.get("extractor_identity", UNKNOWN) or UNKNOWN,
                extractor=extractor, checkpoint=meta.get("checkpoint", ""), created=meta.get("created", ""),
                sources=sources, **arrays)
    validate(pack, where)
    for key in ("capacity", "written"):
        if key in meta and meta[key] != str(getattr(pack, key)):
            raise PackError(f"pack {where}: metadata says {key} {meta[key]}, its arrays hold {getattr(pack, key)}")
    return pack


def validate(pack: Pack, where: str) -> None:
    """The invariants the server keeps: dtypes, consistent shapes, finite, unit keys, distributions, ages >= 0."""
    for key, dtype in ARRAYS.items():
        arr = getattr(pack, key)
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
            raise PackError(f"pack {where}: {key} must be a {np.dtype(dtype).name} array, got "
                            f"{getattr(arr, 'dtype', type(arr).__name__)}")
    m = pack.keys.shape[0] if pack.keys.ndim == 2 else -1
    if (m < 1 or pack.keys.shape[1] < 1 or pack.values.ndim != 2 or pack.values.shape[0] != m
            or pack.values.shape[1] < 1 or pack.ages.shape != (m,) or pack.item_ids.shape != (m,)):
        raise PackError(f"pack {where}: inconsistent shapes keys {pack.keys.shape}, values {pack.values.shape}, "
                        f"ages {pack.ages.shape}, item_ids {pack.item_ids.shape}")
    if not pack.name or not isinstance(pack.name, str):
        raise PackError(f"pack {where}: no memory name in its metadata")
    for key in ("keys", "values", "ages"):
        if not np.isfinite(getattr(pack, key)).all():
            raise PackError(f"pack {where}: {key} holds NaN or Inf")
    norms = np.linalg.norm(pack.keys.astype(np.float64), axis=1)
    if np.abs(norms - 1).max() > _NORM_TOL:
        raise PackError(f"pack {where}: keys must have unit norm (row {int(np.abs(norms - 1).argmax())} has "
                        f"{norms[np.abs(norms - 1).argmax()]:.4f})")
    sums = pack.values.astype(np.float64).sum(axis=1)
    if (pack.values < 0).any() or np.abs(sums - 1).max() > _NORM_TOL:
        raise PackError(f"pack {where}: every value row must be a distribution (non-negative, summing to 1)")
    if (pack.ages < 0).any():
        raise PackError(f"pack {where}: ages must be >= 0")


# --- server side ----------------------------------------------------------------------------------------
def export_pack(client, name: str, identity: str = UNKNOWN, extractor: dict[str, Any] | None = None,
                checkpoint: str = "", source_names: dict[int, str] | None = None) -> Pack:
    """Memory `name` on the server as a Pack; `source_names` {slot: image name} for the written slots known."""
    state = client.export(memory=name)
    item_ids = state["item_ids"]
    sources = [{"slot": int(s), "item_id": int(item_ids[s]), "name": str(n)}
               for s, n in sorted((source_names or {}).items()) if 0 <= s < item_ids.size and item_ids[s] >= 0]
    return Pack(name=name, keys=state["keys"], values=state["values"], ages=state["ages"], item_ids=item_ids,
                identity=identity, extractor=dict(extractor or {}), checkpoint=checkpoint,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), sources=sources)


def import_pack(client, pack: Pack, name: str | None = None, replace: bool = False,
                expected_identity: str | None = None, key_dim: int | None = None, verify: bool = True) -> dict:
    """Create memory `name` (default: the pack's) on the server holding exactly the pack's arrays.

    Everything is checked before the server is touched: the identity (expected_identity None: not
    checked), the key size, and that no memory of that name exists unless `replace`. With `verify`,
    the memory is exported again and compared bit for bit. Returns {name, capacity, written, version}.
    """
    name = name or pack.name
    validate(pack, f"{pack.name!r}")
    check_identity(pack, expected_identity, f"{pack.name!r}")
    if key_dim is not None and pack.keys.shape[1] != key_dim:
        raise PackError(f"pack {pack.name!r} has {pack.keys.shape[1]}-d keys; this checkpoint's extractor makes "
                        f"{key_dim}-d keys")
    exists = name in client.info().get("memories", [])
    if exists and not replace:
        raise PackError(f"memory {name!r} already exists on the server; choose another name or replace it")
    if exists:
        client.drop(memory=name)
    m, dk = pack.keys.shape
    keys = _preimages(pack.keys, normalize_rows)
    values = _preimages(pack.values, lambda v: normalize_distributions(v).astype(np.float32))
    client.create(capacity=m, key_dim=dk, value_dim=pack.values.shape[1], memory=name)
    version = -1
    for start in range(0, m, PUT_CHUNK):
        stop = min(m, start + PUT_CHUNK)
        reply = client.put(np.arange(start, stop, dtype=np.int64), keys[start:stop], values[start:stop],
                           ages=pack.ages[start:stop], item_ids=pack.item_ids[start:stop], memory=name)
        version = int(reply["version"])
    if verify:
        back = client.export(memory=name)
        differ = [k for k in ARRAYS if back[k].dtype != getattr(pack, k).dtype
                  or back[k].tobytes() != getattr(pack, k).tobytes()]
        if differ:
            warnings.warn(f"memory {name!r} differs from pack {pack.name!r} in {differ} in the last bits: the "
                          "server normalised rows that the file did not hold exactly normalised", PackWarning,
                          stacklevel=2)
    return {"name": name, "capacity": m, "written": pack.written, "version": version}


def _preimages(rows: np.ndarray, normalize) -> np.ndarray:
    """Rows that the server's normalisation (`put` normalises keys and values) maps exactly onto `rows`.

    float32 normalisation is not idempotent: for a few rows (measured: 1 of 16 keys at 32-d from a
    tiny extractor; none of the demo's 384 keys at 512-d) normalising an exported row moves a last bit.
    Such a row is sent as fl32(row * s) for the first scale s near 1 that normalises back onto the row
    exactly (scale changes nothing else: both normalisations are scale-invariant). A row with no such
    s among _SCALES is sent as it is, and import's verification warns.
    """
    out = np.array(rows, dtype=np.float32, copy=True)
    moved = np.flatnonzero((normalize(out) != out).any(axis=1))
    for i in moved:
        target = out[i][None]
        for lo in (0, 64, 1024):  # most rows are fixed within the first few scales
            hi = {0: 64, 64: 1024, 1024: _SCALES.size}[lo]
            cand = (target.astype(np.float64) * _SCALES[lo:hi, None]).astype(np.float32)
            hit = np.flatnonzero((normalize(cand) == target).all(axis=1))
            if hit.size:
                out[i] = cand[hit[0]]
                break
    return out
