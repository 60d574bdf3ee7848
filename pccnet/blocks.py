"""Layers shared by the generator and the discriminator: conv/norm/act, ResBlock (IN or AdaIN),
CUT's anti-aliased BlurPool down and [1,3,3,1] up sampling, AdaIN, CUT's init, and `assert_shape`.

Written from the formulas in METHOD.md 1.1 and 1.4. Pure torch; imports nothing from the project.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IN_EPS = 1e-5  # F.instance_norm's default; AdaIN uses the same statistics


def assert_shape(x: Tensor, shape: Sequence[int | None], name: str = "tensor") -> None:
    """Raise ValueError unless `x` has len(shape) dims and matches every non-None entry."""
    ok = x.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape, strict=True))
    if not ok:
        want = "[" + ",".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """CUT's default init: xavier-normal(gain) on conv/linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def instance_norm(x: Tensor) -> Tensor:
    """Per (sample, channel) normalisation with the biased std and eps 1e-5, no affine."""
    return F.instance_norm(x, eps=IN_EPS)


def adain(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """AdaIN (PCCNet Eq. 8): scale * (x - mu(x)) / sigma(x) + shift; x [B,C,H,W], scale/shift [B,C]."""
    return instance_norm(x) * scale[:, :, None, None] + shift[:, :, None, None]


def conv_block(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    norm: bool = True,
    act: str = "relu",
) -> nn.Sequential:
    """Conv -> [IN] -> act ('relu', 'lrelu' (slope 0.2) or 'none').

    A conv that feeds an affine-free IN gets no bias: IN subtracts every per-channel constant, so the
    bias would be a parameter with an exactly-zero gradient.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=not norm)]
    if norm:
        layers.append(nn.InstanceNorm2d(out_ch, affine=False, eps=IN_EPS))
    if act == "relu":
        layers.append(nn.ReLU(inplace=True))
    elif act == "lrelu":
        layers.append(nn.LeakyReLU(0.2, inplace=True))
    elif act != "none":
        raise ValueError(f"act must be 'relu', 'lrelu' or 'none', got {act!r}")
    return nn.Sequential(*layers)


def _binomial_2d(taps: Sequence[float]) -> Tensor:
    k = torch.tensor(taps, dtype=torch.float32)
    k2 = k[:, None] * k[None, :]
    return k2 / k2.sum()


class BlurDown(nn.Module):
    """Anti-aliased x2 downsampling (CUT Downsample): reflect pad 1, [1,2,1]x[1,2,1]/16, stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        # A fixed filter, not a parameter; non-persistent so checkpoints hold learned weights only.
        filt = _binomial_2d([1, 2, 1]).expand(channels, 1, 3, 3).clone()
        self.register_buffer("filt", filt, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.filt.to(x.dtype), stride=2, groups=self.channels)  # [B,C,ceil(H/2),ceil(W/2)]


class BlurUp(nn.Module):
    """Anti-aliased x2 upsampling (CUT Upsample): zero-insertion, [1,3,3,1]x[1,3,3,1] * 4/64.

    With replicate padding this is exactly bilinear x2 with half-pixel centres: y[2i] = .25 x[i-1] +
    .75 x[i], y[2i+1] = .75 x[i] + .25 x[i+1] (tests check it against F.interpolate).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        filt = _binomial_2d([1, 3, 3, 1]) * 4.0  # x stride^2: zero-insertion keeps 1 sample in 4
        self.register_buffer("filt", filt.expand(channels, 1, 4, 4).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        # The full transposed conv of the padded input has 2H + 6 samples; output m is full[m + 3].
        return F.conv_transpose2d(x, self.filt.to(x.dtype), stride=2, padding=3, groups=self.channels)


class ResBlock(nn.Module):
    """RP1-Conv3-norm-ReLU-RP1-Conv3-norm, plus identity; norm is IN, or AdaIN when `adaptive`."""

    def __init__(self, channels: int, adaptive: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.adaptive = adaptive
        # No conv bias: both convs feed an instance normalisation (see conv_block).
        self.conv1 = nn.Conv2d(channels, channels, 3, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, bias=False)

    def forward(self, x: Tensor, style: Tensor | None = None) -> Tensor:
        """x [B,C,H,W]; style [B,2,2,C] = (norm layer, (shift, scale), channel), needed iff adaptive."""
        if self.adaptive != (style is not None):
            given = "None" if style is None else "a tensor"
            raise ValueError(f"ResBlock(adaptive={self.adaptive}) got style={given}")
        h = self.conv1(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        h = adain(h, style[:, 0, 1], style[:, 0, 0]) if style is not None else instance_norm(h)
        h = F.relu(h)
        h = self.conv2(F.pad(h, (1, 1, 1, 1), mode="reflect"))
        h = adain(h, style[:, 1, 1], style[:, 1, 0]) if style is not None else instance_norm(h)
        return x + h


def standardize_color_feature(color_feature: Tensor) -> Tensor:
    """c [B,K] on the simplex -> per-sample zero-mean, unit-variance rows (the uniform c maps to 0).

    Raw c has entries of order 1/K (norm ~0.1), so MLP or conv layers at their usual init see almost
    nothing of it: measured, a generator fed raw c learned to ignore it (outputs changed by < 0.1 ab
    units when c came from another image). Standardised, c enters at unit scale. The floor on the
    variance, 1e-2/K^2, is far below any real image's (>= 1e-5 for K = 313) and keeps the exactly
    uniform c of the "without M" ablation at 0.
    """
    k = color_feature.shape[-1]
    c = color_feature.float()
    centred = c - c.mean(dim=-1, keepdim=True)
    var = centred.square().mean(dim=-1, keepdim=True)
    return (centred / torch.sqrt(var + 1e-2 / k**2)).to(color_feature.dtype)
