"""The colourisation generator G = encoder E + AdaIN decoder (METHOD.md 1.1).

CUT's resnet_9blocks layout split after ResBlock 5: E (stem, two down-samplings, plain-IN ResBlocks)
also encodes ab images for the patch sampler, so it is condition-free; the decoder's ResBlocks are
modulated by AdaIN parameters that an MLP computes from the colour feature c (MUNIT's decoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pccnet.blocks import (
    BlurDown,
    BlurUp,
    ResBlock,
    assert_shape,
    conv_block,
    init_weights,
    instance_norm,
    standardize_color_feature,
)
from pccnet.config import GeneratorConfig

MIN_SIDE = 8  # after two x2 down-samplings the ResBlocks' reflect pad 1 needs at least 2 x 2


class _Down(nn.Module):
    """Conv3 (tap: its pre-norm output) -> IN -> ReLU -> x2 down (BlurPool, or the conv's stride 2)."""

    def __init__(self, in_ch: int, out_ch: int, antialias: bool) -> None:
        super().__init__()
        # Bias kept although IN follows: this pre-norm output is a sampler tap (f1/f2), where it shows.
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=1 if antialias else 2, padding=1, bias=True)
        self.blur = BlurDown(out_ch) if antialias else nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tap = self.conv(x)
        return self.blur(F.relu(instance_norm(tap))), tap


def _up(in_ch: int, out_ch: int, antialias: bool) -> nn.Sequential:
    if antialias:  # CUT: [1,3,3,1] upsample -> Conv3 (zero pad) -> IN -> ReLU
        return nn.Sequential(BlurUp(in_ch), conv_block(in_ch, out_ch, 3, padding=1))
    return nn.Sequential(  # Variant B: ConvTranspose 3x3 s2 p1 op1 -> IN -> ReLU
        nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.InstanceNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class Generator(nn.Module):
    """G(light, c) -> fake_ab: light [B,1,H,W] in [-1,1], c [B,color_dim] -> ab/110 [B,2,H,W] (tanh)."""

    def __init__(self, cfg: GeneratorConfig = GeneratorConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        body = 4 * w
        # --- encoder E: every module here is shared with the patch sampler's ab passes ---
        self.stem = conv_block(2, w, 7)  # after RP3
        self.down1 = _Down(w, 2 * w, cfg.antialias)
        self.down2 = _Down(2 * w, body, cfg.antialias)
        self.enc_blocks = nn.ModuleList(ResBlock(body) for _ in range(cfg.n_blocks_encoder))
        # --- decoder ---
        self.dec_blocks = nn.ModuleList(ResBlock(body, adaptive=True) for _ in range(cfg.n_blocks_decoder))
        # MUNIT's MLP: 3 linear layers, ReLU between, no output activation.
        self.mlp = nn.Sequential(
            nn.Linear(cfg.color_dim, cfg.mlp_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.mlp_dim, cfg.mlp_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.mlp_dim, self.n_adain_params),
        )
        self.up1 = _up(body, 2 * w, cfg.antialias)
        self.up2 = _up(2 * w, w, cfg.antialias)
        self.out_conv = nn.Conv2d(w, 2, 7)  # after RP3; tanh follows
        init_weights(self, gain=0.02)  # CUT's xavier 0.02 on the convs
        # The MLP takes MUNIT's kaiming-normal (fan_in) init instead: c lies on the simplex (norm ~0.1),
        # and three gain-0.02 layers would shrink it to ~1e-6, leaving the conditioning dead at init.
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, a=0.0, mode="fan_in")
                nn.init.zeros_(layer.bias)
        if cfg.adain_scale_offset:
            # y1 = 1 + delta, delta = 0 at init: every AdaIN starts as plain IN (y1 = 1, y2 = 0), so
            # the decoder starts as CUT's. The zero weight also blocks gradient to the MLP's first two
            # layers until the first optimiser step has moved it (then all of G trains).
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    # --- sizes ------------------------------------------------------------------------------------
    @property
    def tap_channels(self) -> list[int]:
        """Channels of the 5 encoder taps f0..f4: [2, 2w, 4w, 4w, 4w]."""
        w = self.cfg.width
        return [2, 2 * w, 4 * w, 4 * w, 4 * w]

    @property
    def n_adain_layers(self) -> int:
        """AdaIN layers in the decoder: two per ResBlock."""
        return 2 * self.cfg.n_blocks_decoder

    @property
    def n_adain_params(self) -> int:
        """Length of the MLP output: (shift, scale) per AdaIN layer and channel (4,096 at default)."""
        return self.n_adain_layers * 4 * self.cfg.width * 2

    # --- passes -----------------------------------------------------------------------------------
    def forward(
        self, light: Tensor, color_feature: Tensor, return_taps: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """light [B,1,H,W], c [B,color_dim] -> fake_ab [B,2,H,W] (and the taps of the [L,L] pass)."""
        _check_image(light, 1, "light")
        taps = self.encode(torch.cat((light, light), dim=1))
        fake_ab = self.decode(taps[-1], color_feature)  # [B, 2, H, W]
        return (fake_ab, taps) if return_taps else fake_ab

    def encode(self, x2: Tensor) -> list[Tensor]:
        """Run E on a 2-channel image ([L,L] or ab/110) [B,2,H,W] -> taps f0..f4 (METHOD.md 1.1).

        f0 padded input [B,2,H+6,W+6], f1 down-1 conv pre-norm [B,2w,H,W] (H/2 without antialias),
        f2 down-2 conv pre-norm [B,4w,H/2,W/2] (H/4), f3 ResBlock 1 and f4 the last encoder ResBlock
        [B,4w,H/4,W/4]; f4 is E's output. Every norm is per sample, so concatenating the generated
        and ground-truth ab along the batch into one call gives exactly the two separate results.
        """
        _check_image(x2, 2, "encoder input")
        f0 = F.pad(x2, (3, 3, 3, 3), mode="reflect")
        h, f1 = self.down1(self.stem(f0))
        h, f2 = self.down2(h)
        h = self.enc_blocks[0](h)
        f3 = h
        for block in self.enc_blocks[1:]:
            h = block(h)
        return [f0, f1, f2, f3, h]

    def adain_styles(self, color_feature: Tensor) -> Tensor:
        """c [B,color_dim] -> AdaIN parameters [B, n_blocks_decoder, 2 norms, (shift, scale), 4w]."""
        assert_shape(color_feature, (None, self.cfg.color_dim), "color_feature")
        channels = 4 * self.cfg.width
        # MUNIT's slicing: per layer, the first `channels` outputs are the shift y2, the next the scale y1.
        params = self.mlp(standardize_color_feature(color_feature)).view(-1, self.n_adain_layers, 2, channels)
        if self.cfg.adain_scale_offset:
            params = torch.stack((params[:, :, 0], 1.0 + params[:, :, 1]), dim=2)
        return params.view(-1, self.cfg.n_blocks_decoder, 2, 2, channels)

    def decode(self, content: Tensor, color_feature: Tensor) -> Tensor:
        """E's output [B,4w,H/4,W/4] and c [B,color_dim] -> fake_ab [B,2,H,W] in (-1,1)."""
        assert_shape(content, (None, 4 * self.cfg.width, None, None), "content")
        if color_feature.shape[0] != content.shape[0]:
            raise ValueError(
                f"color_feature batch {color_feature.shape[0]} != image batch {content.shape[0]}"
            )
        styles = self.adain_styles(color_feature)
        h = content
        for i, block in enumerate(self.dec_blocks):
            h = block(h, styles[:, i])
        h = self.up2(self.up1(h))
        return torch.tanh(self.out_conv(F.pad(h, (3, 3, 3, 3), mode="reflect")))


def _check_image(x: Tensor, channels: int, name: str) -> None:
    assert_shape(x, (None, channels, None, None), name)
    height, width = x.shape[-2:]
    if height % 4 or width % 4 or min(height, width) < MIN_SIDE:
        raise ValueError(
            f"{name}: height and width must be multiples of 4 and at least {MIN_SIDE} "
            f"(two x2 down-samplings), got {height}x{width}"
        )
