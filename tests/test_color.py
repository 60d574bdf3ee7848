"""pccnet.color against scikit-image, the 313 bins regenerated from first principles, the colour feature."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch

from pccnet import color

skcolor = pytest.importorskip("skimage.color")


def _to_hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _from_hwc(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def test_rgb_to_lab_matches_skimage_random_colours():
    rng = np.random.default_rng(0)
    rgb = rng.random((4, 40, 50, 3))  # 8,000 random colours
    ours = color.rgb_to_lab(_from_hwc(rgb).float())
    ref = skcolor.rgb2lab(rgb)
    assert np.abs(_to_hwc(ours) - ref).max() < 1e-3


def test_rgb_to_lab_matches_skimage_gamut_corners_and_edges():
    levels = [0.0, 0.04045, 0.5, 1.0]
    corners = np.array(list(itertools.product(levels, repeat=3)))[None, None]  # [1,1,64,3]
    ours = color.rgb_to_lab(_from_hwc(corners).float())
    assert np.abs(_to_hwc(ours) - skcolor.rgb2lab(corners)).max() < 1e-3
    white = color.rgb_to_lab(torch.ones(1, 3, 1, 1))
    assert torch.allclose(white.flatten(), torch.tensor([100.0, 0.0, 0.0]), atol=1e-2)  # skimage: a=-0.0024


def test_lab_to_rgb_matches_skimage_including_out_of_gamut():
    rng = np.random.default_rng(1)
    lab = np.stack(
        [rng.uniform(0, 100, (2, 30, 30)), rng.uniform(-128, 128, (2, 30, 30)), rng.uniform(-128, 128, (2, 30, 30))],
        axis=-1,
    )
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skimage warns about negative Z values it clips
            ref = skcolor.lab2rgb(lab)
    ours = color.lab_to_rgb(_from_hwc(lab).float())
    assert np.abs(_to_hwc(ours) - ref).max() < 1e-3
    assert ours.min() >= 0 and ours.max() <= 1


def test_round_trip_and_differentiable():
    rgb = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 0.9 + 0.05
    back = color.lab_to_rgb(color.rgb_to_lab(rgb))
    assert (back - rgb).abs().max() < 1e-6
    x = rgb.clone().requires_grad_(True)
    color.lab_to_rgb(color.rgb_to_lab(x)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_half_input_and_shape_errors():
    lab = color.rgb_to_lab(torch.rand(1, 3, 4, 4).half())
    assert lab.dtype == torch.float16
    with pytest.raises(ValueError, match=r"\[B,3,H,W\].*\(3, 4, 4\)"):
        color.rgb_to_lab(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="ab must be"):
        color.color_distribution(torch.rand(1, 3, 4, 4))


def test_network_scaling_round_trip():
    light = torch.linspace(0, 100, 11).view(1, 1, 1, 11)
    assert torch.allclose(color.denormalize_light(color.normalize_light(light)), light)
    assert color.normalize_light(torch.tensor([0.0, 100.0])).tolist() == [-1.0, 1.0]
    assert color.normalize_ab(torch.tensor([110.0])).item() == 1.0


def _regenerate_bins() -> np.ndarray:
    """METHOD.md 0.1: grid points of 10Z^2 whose square [g-10, g+10]^2 meets the sRGB ab convex hull."""
    from scipy.spatial import ConvexHull

    t = np.linspace(0.0, 1.0, 257)
    u, v = np.meshgrid(t, t, indexing="ij")
    faces = []
    for axis in range(3):
        others = [i for i in range(3) if i != axis]
        for level in (0.0, 1.0):
            face = np.empty(u.shape + (3,))
            face[..., axis] = level
            face[..., others[0]] = u
            face[..., others[1]] = v
            faces.append(face.reshape(-1, 3))
    ab = skcolor.rgb2lab(np.concatenate(faces)[None])[0][:, 1:]
    hull = ab[ConvexHull(ab).vertices]
    edges = np.roll(hull, -1, axis=0) - hull
    axes = np.concatenate([np.eye(2), np.stack([-edges[:, 1], edges[:, 0]], axis=1)])
    hull_proj = hull @ axes.T  # [V, n_axes]
    kept = []
    for a in range(-150, 151, 10):
        for b in range(-150, 151, 10):
            square = np.array([[a - 10, b - 10], [a + 10, b - 10], [a + 10, b + 10], [a - 10, b + 10]])
            sq_proj = square @ axes.T
            # Separating axis theorem: two convex shapes are disjoint iff some axis separates them.
            separated = (hull_proj.max(0) < sq_proj.min(0)) | (sq_proj.max(0) < hull_proj.min(0))
            if not separated.any():
                kept.append((a, b))
    return np.array(sorted(kept), dtype=np.int64)


def test_ab_bins_regenerated_from_first_principles():
    regenerated = _regenerate_bins()
    assert regenerated.shape == (313, 2)
    assert color.AB_BINS.dtype == torch.int64
    assert np.array_equal(color.AB_BINS.numpy(), regenerated)


def _naive_distribution(ab: torch.Tensor, neighbors: int = 10, sigma: float = 5.0) -> torch.Tensor:
    """Reference: per pixel, brute-force distances to all 313 bins, in float64 loops over the batch."""
    bins = color.AB_BINS.double()
    out = []
    for img in ab.double():
        pix = img.reshape(2, -1).T
        d2 = ((pix[:, None, :] - bins[None]) ** 2).sum(-1)
        dk, idx = d2.topk(neighbors, dim=1, largest=False)
        w = torch.exp(-dk / (2 * sigma**2))
        w = w / w.sum(1, keepdim=True)
        hist = torch.zeros(313, dtype=torch.float64)
        hist.index_add_(0, idx.reshape(-1), w.reshape(-1))
        out.append(hist / pix.shape[0])
    return torch.stack(out)


def test_color_distribution_matches_naive_reference_on_real_colours():
    rgb = torch.rand(3, 3, 24, 24)
    ab = color.rgb_to_lab(rgb)[:, 1:]
    ours = color.color_distribution(ab)
    ref = _naive_distribution(ab)
    assert ours.shape == (3, 313)
    assert torch.allclose(ours.double(), ref, atol=1e-6)
    assert torch.allclose(ours.sum(1), torch.ones(3), atol=1e-5)


def test_color_distribution_far_out_of_gamut_pixels_stay_finite_and_match():
    ab = torch.tensor([[-300.0, 250.0], [140.0, -140.0], [1.3, 2.7]]).T.reshape(1, 2, 1, 3)  # no distance ties
    ours = color.color_distribution(ab)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours.sum(1), torch.ones(1), atol=1e-5)
    # The middle pixel is close enough for the naive weights not to underflow: compare those bins.
    near = color.color_distribution(ab[..., 1:])
    assert torch.allclose(near.double(), _naive_distribution(ab[..., 1:]), atol=1e-6)


def test_flat_image_puts_its_mass_on_the_ten_nearest_bins_with_gaussian_weights():
    a, b = 13.0, -27.0
    ab = torch.tensor([a, b]).view(1, 2, 1, 1).expand(2, 2, 8, 8).contiguous()
    hist = color.color_distribution(ab)
    assert torch.equal(hist[0], hist[1])
    d2 = ((color.AB_BINS.double() - torch.tensor([a, b], dtype=torch.float64)) ** 2).sum(1)
    nearest = d2.argsort()[:10]
    expected = torch.exp(-d2[nearest] / 50.0)
    expected = expected / expected.sum()
    assert set(torch.nonzero(hist[0]).flatten().tolist()) == set(nearest.tolist())
    assert torch.allclose(hist[0, nearest].double(), expected, atol=1e-6)


def _python_calls(fn, *args) -> int:
    """Number of Python and builtin calls made while running fn(*args)."""
    count = 0

    def profiler(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profiler)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return count


def test_color_distribution_is_vectorised():
    """No per-pixel Python: the number of Python-level calls does not depend on the pixel count."""
    small = color.rgb_to_lab(torch.rand(1, 3, 8, 8))[:, 1:]
    big = color.rgb_to_lab(torch.rand(2, 3, 128, 128))[:, 1:]
    color.color_distribution(small)  # build the candidate table outside the count
    assert _python_calls(color.color_distribution, big) == _python_calls(color.color_distribution, small)


def test_color_distribution_argument_errors():
    ab = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="neighbors"):
        color.color_distribution(ab, neighbors=0)
    with pytest.raises(ValueError, match="sigma"):
        color.color_distribution(ab, sigma=0.0)
