"""CIE Lab colour science in torch: sRGB <-> Lab, the 313 ab bins, the soft-encoded colour distribution.

The scaling constants that map Lab to network ranges live only here (METHOD.md section 0).
Imports nothing from the rest of the project.
"""

from __future__ import annotations

import torch
from torch import Tensor

# --- network scaling (METHOD.md section 0) -------------------------------------------------------
# The encoder sees L/50 - 1 in [-1, 1]; the generator predicts ab/110 through tanh. The sRGB gamut
# spans a in [-86.2, 98.2] and b in [-107.9, 94.5], so /110 never saturates tanh.
L_CENTER = 50.0
L_SCALE = 50.0
AB_SCALE = 110.0

# --- scikit-image's constants (skimage.color.colorconv), so both agree to 1e-3 -------------------
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)
# Its inverse, computed once in float64 (a constant, so exported graphs (ONNX) need no matrix inverse).
_RGB_FROM_XYZ = torch.linalg.inv(torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64))
_LAB_EPS = 0.008856  # (6/29)^3, skimage's rounding
_LAB_KAPPA = 7.787
_LAB_DELTA = 16.0 / 116.0

# --- the 313 in-gamut ab bins (METHOD.md section 0.1) --------------------------------------------
# Every grid point of 10Z^2 whose square [g-10, g+10]^2 meets the convex hull of the sRGB ab gamut.
# Each column a holds a contiguous run of b, so the table is stored as (a, b_min, b_max); the test
# suite regenerates the set from first principles and asserts equality.
_AB_COLUMNS = (
    (-90, 50, 90),
    (-80, 20, 90),
    (-70, 0, 90),
    (-60, -20, 90),
    (-50, -30, 100),
    (-40, -40, 100),
    (-30, -50, 100),
    (-20, -50, 100),
    (-10, -60, 100),
    (0, -70, 100),
    (10, -80, 90),
    (20, -80, 90),
    (30, -90, 90),
    (40, -100, 90),
    (50, -100, 80),
    (60, -110, 80),
    (70, -110, 80),
    (80, -110, 70),
    (90, -110, 70),
    (100, -90, 0),
)
AB_BINS: Tensor = torch.tensor(
    [(a, b) for a, lo, hi in _AB_COLUMNS for b in range(lo, hi + 1, 10)], dtype=torch.int64
)  # [313, 2], rows sorted by (a, b)
NUM_BINS = 313
assert AB_BINS.shape == (NUM_BINS, 2)


def _matrix(rows, like: Tensor) -> Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _apply_3x3(m: Tensor, x: Tensor) -> Tensor:
    # [3,3] x [B,3,H,W] -> [B,3,H,W]
    return torch.einsum("ij,bjhw->bihw", m, x)


def _check_image(x: Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be [B,3,H,W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0,1] [B,3,H,W] -> Lab (L in [0,100], raw a, b), skimage's D65 conversion."""
    _check_image(rgb, "rgb")
    dtype = rgb.dtype
    x = rgb.float() if dtype in (torch.float16, torch.bfloat16) else rgb
    # Both branches are evaluated by torch.where; clamping the pow input keeps its gradient finite.
    linear = torch.where(
        x > 0.04045, ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4, x / 12.92
    )
    xyz = _apply_3x3(_matrix(_XYZ_FROM_RGB, x), linear)
    xyz = xyz / _matrix(_WHITE_D65, x).view(1, 3, 1, 1)
    f = torch.where(
        xyz > _LAB_EPS, xyz.clamp(min=_LAB_EPS) ** (1.0 / 3.0), _LAB_KAPPA * xyz + _LAB_DELTA
    )
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    lab = torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)
    return lab.to(dtype)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """Lab [B,3,H,W] -> sRGB clipped to [0,1], skimage's D65 conversion (negative z clipped as skimage does)."""
    _check_image(lab, "lab")
    dtype = lab.dtype
    x = lab.float() if dtype in (torch.float16, torch.bfloat16) else lab
    fy = (x[:, 0] + 16.0) / 116.0
    fx = x[:, 1] / 500.0 + fy
    fz = (fy - x[:, 2] / 200.0).clamp(min=0.0)
    f = torch.stack((fx, fy, fz), dim=1)
    thresh = 0.2068966  # cube root of _LAB_EPS, skimage's constant
    xyz = torch.where(f > thresh, f.clamp(min=thresh) ** 3, (f - _LAB_DELTA) / _LAB_KAPPA)
    xyz = xyz * _matrix(_WHITE_D65, x).view(1, 3, 1, 1)
    rgb_from_xyz = _RGB_FROM_XYZ.to(x.device, x.dtype)
    linear = _apply_3x3(rgb_from_xyz, xyz)
    rgb = torch.where(
        linear > 0.0031308,
        1.055 * linear.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055,
        12.92 * linear,
    )
    return rgb.clamp(0.0, 1.0).to(dtype)


# --- network scaling helpers ---------------------------------------------------------------------
def normalize_light(light: Tensor) -> Tensor:
    """L in [0,100] -> [-1,1]."""
    return light / L_SCALE - L_CENTER / L_SCALE


def denormalize_light(light: Tensor) -> Tensor:
    """[-1,1] -> L in [0,100]."""
    return light * L_SCALE + L_CENTER


def normalize_ab(ab: Tensor) -> Tensor:
    """Raw ab -> ab/110 (the generator's tanh range)."""
    return ab / AB_SCALE


def denormalize_ab(ab: Tensor) -> Tensor:
    """ab/110 -> raw ab."""
    return ab * AB_SCALE


def lab_from_network(light: Tensor, ab: Tensor) -> Tensor:
    """Network-scaled light [B,1,H,W] and ab [B,2,H,W] -> Lab [B,3,H,W]."""
    return torch.cat((denormalize_light(light), denormalize_ab(ab)), dim=1)


def gray_rgb(light: Tensor) -> Tensor:
    """Network-scaled light [B,1,H,W] -> the grayscale image as sRGB [B,3,H,W] (Lab with a = b = 0)."""
    lab = torch.cat((denormalize_light(light), torch.zeros_like(light).expand(-1, 2, -1, -1)), dim=1)
    return lab_to_rgb(lab)


# --- soft-encoded colour distribution (METHOD.md section 0) --------------------------------------
# Exact k-NN over the 313 bins without a [pixels, 313] distance matrix: the bins sit on a 10-grid, so
# for each 10x10 cell of ab space we precompute the few bins that can be among any of its points'
# `neighbors` nearest (a Lipschitz bound on the k-th neighbour distance), and each pixel only scores
# its own cell's candidates. Pixels outside the tabulated range fall back to the full search.
_CELL = 10.0
_GRID_LO = -130.0  # table covers a, b in [-130, 130)
_GRID_N = 26
_PAD_COORD = 1.0e4  # padding candidates sit far away, so they are never among the nearest
_candidate_cache: dict[tuple[int, str], tuple[Tensor, Tensor, Tensor]] = {}


def _cell_candidates(neighbors: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-cell candidate bin ids [cells, C] (padding: bin 0) and their a and b coordinates [cells, C]."""
    key = (neighbors, str(device))
    if key in _candidate_cache:
        return _candidate_cache[key]
    bins = AB_BINS.double()
    lo = _GRID_LO + _CELL * torch.arange(_GRID_N, dtype=torch.float64)
    ca, cb = torch.meshgrid(lo + _CELL / 2, lo + _CELL / 2, indexing="ij")
    centres = torch.stack((ca.reshape(-1), cb.reshape(-1)), dim=1)  # [cells, 2]
    d = torch.cdist(centres, bins)  # [cells, 313]
    kth = d.topk(neighbors, dim=1, largest=False).values[:, -1:]
    # Any point p of the cell is within h = 5*sqrt(2) of its centre c, so d_k(p) <= d_k(c) + h, and a
    # bin q can be among p's k nearest only if |c - q| <= d_k(p) + h <= d_k(c) + 2h.
    half_diag = _CELL / 2 * 2**0.5
    mask = d <= kth + 2 * half_diag + 1e-6
    width = int(mask.sum(1).max())
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = mask.gather(1, order)
    coords = AB_BINS.double()[order]  # [cells, C, 2]
    coords = torch.where(valid.unsqueeze(-1), coords, torch.full_like(coords, _PAD_COORD))
    cand = torch.where(valid, order, torch.zeros_like(order))
    out = tuple(t.to(device) for t in (cand, coords[..., 0].float(), coords[..., 1].float()))
    _candidate_cache[key] = out
    return out


def _knn_weights_full(ab: Tensor, bins: Tensor, neighbors: int) -> tuple[Tensor, Tensor]:
    d2 = torch.cdist(ab, bins).square()  # [P, 313]
    dk, idx = d2.topk(neighbors, dim=1, largest=False)
    return idx, dk


def color_distribution(ab: Tensor, neighbors: int = 10, sigma: float = 5.0) -> Tensor:
    """Raw ab [B,2,H,W] -> [B,313]: per pixel Gaussian weights on its `neighbors` nearest bins, averaged."""
    if ab.dim() != 4 or ab.shape[1] != 2:
        raise ValueError(f"ab must be [B,2,H,W], got shape {tuple(ab.shape)}")
    if not 1 <= neighbors <= NUM_BINS:
        raise ValueError(f"neighbors must be in 1..{NUM_BINS}, got {neighbors}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    batch = ab.shape[0]
    pix = ab.detach().float().permute(0, 2, 3, 1).reshape(-1, 2)  # [P, 2]
    n_pix = pix.shape[0] // max(batch, 1)
    cand, cand_a, cand_b = _cell_candidates(neighbors, pix.device)
    cell_ij = torch.floor((pix - _GRID_LO) / _CELL).long()
    inside = ((cell_ij >= 0) & (cell_ij < _GRID_N)).all(dim=1)
    cell = (cell_ij[:, 0] * _GRID_N + cell_ij[:, 1]).clamp(0, _GRID_N * _GRID_N - 1)
    d2 = (pix[:, :1] - cand_a[cell]).square() + (pix[:, 1:] - cand_b[cell]).square()  # [P, C]
    dk, pos = d2.topk(neighbors, dim=1, largest=False)
    idx = cand[cell].gather(1, pos)
    if not bool(inside.all()):
        bins = AB_BINS.to(device=pix.device, dtype=torch.float32)
        out_idx, out_d = _knn_weights_full(pix[~inside], bins, neighbors)
        idx[~inside], dk[~inside] = out_idx, out_d
    # Subtracting the smallest distance before exp keeps far-out-of-gamut pixels from underflowing to 0/0.
    w = torch.exp(-(dk - dk[:, :1]) / (2.0 * sigma * sigma))
    w = w / w.sum(dim=1, keepdim=True)
    sample = torch.arange(batch, device=pix.device).repeat_interleave(n_pix)
    flat = (sample.unsqueeze(1) * NUM_BINS + idx).reshape(-1)
    hist = torch.zeros(batch * NUM_BINS, device=pix.device, dtype=torch.float32)
    hist.index_add_(0, flat, w.reshape(-1))
    return hist.view(batch, NUM_BINS) / float(n_pix)
