"""The conditional 70x70 PatchGAN D(lab, c) (METHOD.md 1.4) and receptive-field arithmetic.

pix2pix/CUT 'basic' body with instance norm; the colour feature is tiled and concatenated to the Lab
image (MemoPainter-PT's conditioning). Each stride-1 conv is preceded by ZeroPad2d((1,2,1,2)) ('same'
padding), so a 256x256 input gives the paper's 32x32 map with the receptive field unchanged (70).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from pccnet.blocks import assert_shape, conv_block, init_weights, standardize_color_feature
from pccnet.config import DiscriminatorConfig

_SAME_PAD_4 = (1, 2, 1, 2)  # (left, right, top, bottom) for a 4x4 stride-1 conv: output = input


class PatchDiscriminator(nn.Module):
    """lab [B,3,H,W] (light in [-1,1], ab/110) + c [B,color_dim] -> logits [B,1,H/2^n,W/2^n]."""

    def __init__(self, cfg: DiscriminatorConfig = DiscriminatorConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        layers: list[nn.Module] = [conv_block(3 + cfg.color_dim, w, 4, 2, 1, norm=False, act="lrelu")]
        mult = 1
        for n in range(1, cfg.n_layers):
            prev, mult = mult, min(2**n, 8)
            layers.append(conv_block(w * prev, w * mult, 4, 2, 1, act="lrelu"))
        prev, mult = mult, min(2**cfg.n_layers, 8)
        layers += [
            nn.ZeroPad2d(_SAME_PAD_4),
            conv_block(w * prev, w * mult, 4, 1, 0, act="lrelu"),
            nn.ZeroPad2d(_SAME_PAD_4),
            nn.Conv2d(w * mult, 1, 4, 1, 0),  # raw logits: LSGAN applies no activation
        ]
        self.body = nn.Sequential(*layers)
        init_weights(self, gain=0.02)

    def forward(self, lab: Tensor, color_feature: Tensor) -> Tensor:
        """lab [B,3,H,W], c [B,color_dim] -> logits [B,1,H/2^n_layers,W/2^n_layers] (sizes floored)."""
        assert_shape(lab, (None, 3, None, None), "lab")
        assert_shape(color_feature, (lab.shape[0], self.cfg.color_dim), "color_feature")
        height, width = lab.shape[-2:]
        c = standardize_color_feature(color_feature)  # unit scale, like the Lab channels
        tiled = c[:, :, None, None].to(lab.dtype).expand(-1, -1, height, width)
        return self.body(torch.cat((lab, tiled), dim=1))


def _spatial_layers(module_or_layers: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    mods = module_or_layers.modules() if isinstance(module_or_layers, nn.Module) else module_or_layers
    return [m for m in mods if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d))]


def _pair(v: int | tuple[int, ...]) -> int:
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise ValueError(f"only square kernels/strides are supported, got {v}")
        return v[0]
    return v


def receptive_field(module_or_layers: nn.Module | Iterable[nn.Module]) -> int:
    """Receptive field (pixels, one side) of one output unit of a plain chain of convs/pools.

    Walks the layers backwards: r <- (r - 1) * stride + kernel (dilation counted). Padding shifts the
    window but does not change its size. Valid for sequential stacks only (no skips or branches).
    """
    r = 1
    for m in reversed(_spatial_layers(module_or_layers)):
        if isinstance(m, nn.ZeroPad2d):
            continue
        kernel, stride = _pair(m.kernel_size), _pair(m.stride)
        dilation = _pair(getattr(m, "dilation", 1))
        r = (r - 1) * stride + dilation * (kernel - 1) + 1
    return r


def output_size(module_or_layers: nn.Module | Iterable[nn.Module], size: int) -> int:
    """Output side length for an input side `size` through a plain chain of pads/convs/pools."""
    for m in _spatial_layers(module_or_layers):
        if isinstance(m, nn.ZeroPad2d):
            left, right = m.padding[0], m.padding[1]
            size += left + right
            continue
        kernel, stride = _pair(m.kernel_size), _pair(m.stride)
        if isinstance(m.padding, str):
            raise ValueError(f"output_size needs numeric padding, got {m.padding!r} in {m}")
        pad = _pair(m.padding)
        dilation = _pair(getattr(m, "dilation", 1))
        size = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    return size
