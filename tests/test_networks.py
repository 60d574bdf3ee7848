"""Generator, patch sampler, discriminator, their blocks and configs: shapes, sizes, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pccnet.blocks import BlurDown, BlurUp, adain, assert_shape, instance_norm
from pccnet.config import DiscriminatorConfig, ExtractorConfig, GeneratorConfig, SamplerConfig
from pccnet.discriminator import PatchDiscriminator, output_size, receptive_field
from pccnet.generator import Generator
from pccnet.sampler import PatchSampler

SIZES = (32, 64, 128, 256)
B = 2


def small_g(size: int, **kw) -> GeneratorConfig:
    return GeneratorConfig(width=4 if size >= 256 else 8, **kw)


def color_feature(batch: int = B, seed: int = 0) -> torch.Tensor:
    c = torch.rand(batch, 313, generator=torch.Generator().manual_seed(seed))
    return c / c.sum(dim=1, keepdim=True)  # on the simplex, like the real feature


def one_hot_feature(bin_id: int, batch: int = B) -> torch.Tensor:
    return F.one_hot(torch.full((batch,), bin_id), 313).float()  # all pixels in one ab bin


def light(size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (GeneratorConfig, "width", 0),
        (GeneratorConfig, "n_blocks_encoder", 0),
        (GeneratorConfig, "n_blocks_decoder", -1),
        (GeneratorConfig, "mlp_dim", 2.5),
        (GeneratorConfig, "color_dim", True),
        (GeneratorConfig, "antialias", "yes"),
        (GeneratorConfig, "adain_scale_offset", 1),
        (SamplerConfig, "num_patches", 0),
        (SamplerConfig, "dim", 0),
        (DiscriminatorConfig, "width", 0),
        (DiscriminatorConfig, "n_layers", 0),
        (ExtractorConfig, "backbone", "resnet50"),
        (ExtractorConfig, "dim", 0),
        (ExtractorConfig, "resnet_width", -8),
    ],
)
def test_config_validation_names_field_and_value(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}.*{value!r}"):
        cls(**{field: value})


def test_config_defaults_are_the_papers():
    assert GeneratorConfig() == GeneratorConfig(64, 5, 4, True, 256, 313, True)
    assert SamplerConfig() == SamplerConfig(256, 256)
    assert DiscriminatorConfig() == DiscriminatorConfig(64, 3, 313)
    assert ExtractorConfig().backbone == "alexnet-imagenet" and ExtractorConfig().dim == 512


# --- blocks --------------------------------------------------------------------------------------
def test_assert_shape():
    assert_shape(torch.zeros(2, 3, 4), (2, None, 4))
    with pytest.raises(ValueError, match=r"x must have shape \[2,\*,5\], got \[2, 3, 4\]"):
        assert_shape(torch.zeros(2, 3, 4), (2, None, 5), "x")
    with pytest.raises(ValueError):
        assert_shape(torch.zeros(2, 3), (2, 3, 1))


def test_blur_down_matches_the_formula():
    x = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(0))
    k = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    want = np.zeros((1, 2, 3, 4))
    for i in range(3):
        for j in range(4):
            want[:, :, i, j] = (padded[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3] * k).sum(axis=(2, 3))
    np.testing.assert_allclose(BlurDown(2)(x).numpy(), want, atol=1e-6)


def test_blur_up_is_bilinear_x2():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    want = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(BlurUp(3)(x), want, atol=1e-6, rtol=0)


def test_adain_sets_instance_statistics():
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 3 + 1
    scale = torch.tensor([[0.5, 1.0, 2.0, 3.0], [1.5, 0.1, 1.0, 4.0]])
    shift = torch.tensor([[0.0, -1.0, 2.0, 0.5], [1.0, 0.0, -2.0, 3.0]])
    y = adain(x, scale, shift)
    torch.testing.assert_close(y.mean(dim=(2, 3)), shift, atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(2, 3), unbiased=False), scale, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(adain(x, torch.ones(2, 4), torch.zeros(2, 4)), instance_norm(x))


# --- generator -----------------------------------------------------------------------------------
@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_generator_shapes_and_taps(size, antialias):
    g = Generator(small_g(size, antialias=antialias))
    w = g.cfg.width
    fake_ab, taps = g(light(size), color_feature(), return_taps=True)
    assert fake_ab.shape == (B, 2, size, size)
    assert fake_ab.abs().max() < 1  # tanh range = ab/110
    first = size if antialias else size // 2  # Variant B taps the strided conv outputs
    want = [
        (B, 2, size + 6, size + 6),
        (B, 2 * w, first, first),
        (B, 4 * w, first // 2, first // 2),
        (B, 4 * w, size // 4, size // 4),
        (B, 4 * w, size // 4, size // 4),
    ]
    assert [tuple(t.shape) for t in taps] == want
    assert [t.shape[1] for t in taps] == g.tap_channels


def test_encode_is_per_sample_and_matches_forward_taps():
    g = Generator(GeneratorConfig(width=8))
    x = light(32)
    _, taps = g(x, color_feature(), return_taps=True)
    again = g.encode(torch.cat((x, x), dim=1))
    for a, b in zip(taps, again, strict=True):
        torch.testing.assert_close(a, b)
    ab = torch.rand(B, 2, 32, 32) * 2 - 1
    joint = g.encode(torch.cat((ab, -ab)))  # batching generated and real ab together is exact
    for a, b in zip(joint, g.encode(ab), strict=True):
        torch.testing.assert_close(a[:B], b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [(30, 32), (32, 34), (4, 4)])
def test_generator_rejects_bad_sizes(size):
    g = Generator(GeneratorConfig(width=4))
    with pytest.raises(ValueError, match=rf"{size[0]}x{size[1]}"):
        g(torch.zeros(B, 1, *size), color_feature())


def test_generator_rejects_bad_inputs():
    g = Generator(GeneratorConfig(width=4))
    with pytest.raises(ValueError, match="light"):
        g(torch.zeros(B, 2, 32, 32), color_feature())
    with pytest.raises(ValueError, match="color_feature"):
        g(torch.zeros(B, 1, 32, 32), torch.zeros(B, 312))
    with pytest.raises(ValueError, match="batch"):
        g(torch.zeros(B, 1, 32, 32), color_feature(batch=3))


def test_default_parameter_counts():
    g = Generator(GeneratorConfig())
    d = PatchDiscriminator(DiscriminatorConfig())
    s = PatchSampler(g.tap_channels, SamplerConfig())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(g) - 12.6e6) / 12.6e6 < 0.02
    assert abs(count(d) - 3.09e6) / 3.09e6 < 0.02
    assert count(g.mlp) == 313 * 256 + 256 + 256 * 256 + 256 + 256 * 4096 + 4096  # MLP 313-256-256-4096
    assert g.n_adain_params == 4096
    assert count(s) == 66_560 + 98_816 + 3 * 131_584  # 0.56 M: Linear(C,256)-Linear(256,256) per tap
    assert count(Generator(GeneratorConfig(antialias=False))) == count(g)  # blur filters are buffers


def test_scale_offset_starts_as_plain_instance_norm():
    g = Generator(GeneratorConfig(width=8))
    x = light(32)
    # Zero-initialised last MLP layer: y1 = 1, y2 = 0, so c has no effect yet...
    torch.testing.assert_close(g(x, color_feature(seed=1)), g(x, color_feature(seed=2)))
    styles = g.adain_styles(color_feature())
    assert torch.equal(styles[:, :, :, 1], torch.ones_like(styles[:, :, :, 1]))
    assert torch.equal(styles[:, :, :, 0], torch.zeros_like(styles[:, :, :, 0]))
    # ...until the last layer moves; then the output follows c.
    with torch.no_grad():
        g.mlp[-1].weight.normal_(0, 0.1)
    assert (g(x, one_hot_feature(10)) - g(x, one_hot_feature(200))).abs().max() > 1e-3


def test_no_scale_offset_conditions_from_the_start():
    g = Generator(GeneratorConfig(width=8, adain_scale_offset=False))
    x = light(32)
    assert (g(x, one_hot_feature(10)) - g(x, one_hot_feature(200))).abs().max() > 1e-3


def _generator_and_sampler_loss(g: Generator, s: PatchSampler) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    real_ab = torch.rand(B, 2, 32, 32, generator=gen) * 2 - 1
    fake_ab = g(light(32), color_feature())
    w, ids = s(g.encode(fake_ab), generator=gen)
    with torch.no_grad():
        z, _ = s(g.encode(real_ab), ids)  # the ground-truth branch is a constant, as in the losses
    loss = (fake_ab - real_ab).abs().mean()
    for wl, zl in zip(w, z, strict=True):
        loss = loss - (wl * zl).sum(-1).mean()
    return loss


def test_every_generator_and_sampler_parameter_gets_a_gradient():
    torch.manual_seed(0)
    g = Generator(GeneratorConfig(width=8))
    s = PatchSampler(g.tap_channels, SamplerConfig(num_patches=32, dim=16))
    params = dict(g.named_parameters()) | {f"sampler.{k}": v for k, v in s.named_parameters()}
    _generator_and_sampler_loss(g, s).backward()
    dead = {k for k, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0}
    # By design the zero-initialised last MLP layer blocks the first two layers at step 0 only.
    assert dead == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    torch.optim.SGD(params.values(), lr=0.1).step()
    for p in params.values():
        p.grad = None
    _generator_and_sampler_loss(g, s).backward()
    dead = [k for k, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


# --- sampler -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_sampler_shapes_unit_rows_and_shared_ids(size):
    g = Generator(small_g(size))
    s = PatchSampler(g.tap_channels, SamplerConfig(num_patches=256, dim=16))
    taps = g.encode(torch.rand(B, 2, size, size) * 2 - 1)
    w, ids = s(taps, generator=torch.Generator().manual_seed(0))
    for t, wl, il in zip(taps, w, ids, strict=True):
        k = min(256, t.shape[-2] * t.shape[-1])  # every position when the tap is small
        assert wl.shape == (B, k, 16)
        assert il.shape == (k,) and il.device.type == "cpu" and len(set(il.tolist())) == k
        torch.testing.assert_close(wl.norm(dim=-1), torch.ones(B, k))
    z, ids2 = s(g.encode(torch.zeros(B, 2, size, size)), ids)
    assert ids2 is ids and [zl.shape for zl in z] == [wl.shape for wl in w]


def test_sampler_rows_are_the_mlp_of_the_chosen_positions():
    s = PatchSampler([3, 5], SamplerConfig(num_patches=4, dim=8))
    feats = [torch.randn(B, 3, 6, 6), torch.randn(B, 5, 2, 2)]
    out, ids = s(feats, generator=torch.Generator().manual_seed(4))
    assert [i.numel() for i in ids] == [4, 4]
    for f, o, i, mlp in zip(feats, out, ids, s.mlps, strict=True):
        for b in range(B):  # the same ids in every image of the batch
            rows = mlp(f[b].flatten(1)[:, i].T)
            torch.testing.assert_close(o[b], rows / rows.norm(dim=-1, keepdim=True))


def test_sampler_ids_are_deterministic_given_a_generator():
    s = PatchSampler([2], SamplerConfig(num_patches=8))
    feats = [torch.randn(1, 2, 10, 10)]
    a = s.draw_patch_ids(feats, torch.Generator().manual_seed(7))
    b = s.draw_patch_ids(feats, torch.Generator().manual_seed(7))
    c = s.draw_patch_ids(feats, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_sampler_rejects_mismatched_taps():
    s = PatchSampler([2, 4])
    with pytest.raises(ValueError, match="expected 2 taps"):
        s([torch.zeros(1, 2, 4, 4)])
    with pytest.raises(ValueError, match="tap 1"):
        s([torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4)])
    with pytest.raises(ValueError, match="patch ids"):
        s([torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, 4)], [torch.tensor([0]), torch.tensor([16])])


# --- discriminator -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_discriminator_shapes(size):
    d = PatchDiscriminator(DiscriminatorConfig(width=8))
    out = d(torch.rand(B, 3, size, size) * 2 - 1, color_feature())
    assert out.shape == (B, 1, size // 8, size // 8)
    assert output_size(d, size) == size // 8


def test_discriminator_default_receptive_field_and_map():
    d = PatchDiscriminator(DiscriminatorConfig())
    assert receptive_field(d) == 70
    assert output_size(d, 256) == 32  # the paper's 32x32 map ('same' padding on the stride-1 convs)
    assert receptive_field(PatchDiscriminator(DiscriminatorConfig(n_layers=2))) == 34


def test_receptive_field_matches_the_gradient_support():
    d = PatchDiscriminator(DiscriminatorConfig(width=4))
    for name, m in list(d.body.named_modules()):  # IN couples all pixels; remove it to see locality
        if isinstance(m, nn.InstanceNorm2d):
            parent = d.body.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], nn.Identity())
    lab = torch.randn(1, 3, 128, 128, requires_grad=True)
    out = d(lab, color_feature(batch=1))
    out[0, 0, 8, 8].backward()
    rows = lab.grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
    cols = lab.grad.abs().sum(dim=(0, 1, 2)).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == receptive_field(d) == 70
    assert cols.max() - cols.min() + 1 == 70


def test_receptive_field_of_simple_stacks():
    assert receptive_field([nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3)]) == 5
    assert receptive_field([nn.Conv2d(1, 1, 3, stride=2), nn.Conv2d(1, 1, 3)]) == 7
    assert receptive_field([nn.Conv2d(1, 1, 3, dilation=2)]) == 5
    assert output_size([nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(1, 1, 4)], 9) == 9


def test_discriminator_is_conditioned_on_c():
    d = PatchDiscriminator(DiscriminatorConfig(width=8))
    lab = torch.rand(B, 3, 32, 32)
    assert not torch.allclose(d(lab, color_feature(seed=1)), d(lab, color_feature(seed=2)))
    with pytest.raises(ValueError, match="color_feature"):
        d(lab, torch.zeros(B, 300))
