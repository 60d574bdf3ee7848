"""The patch sampler's heads F (METHOD.md 1.2; CUT's PatchSampleF, built eagerly).

Picks the same random positions in every image of a batch, runs one Linear-ReLU-Linear MLP per
encoder tap, and L2-normalises the rows to unit length. Patch ids are drawn on the CPU (CUT issues
#81/#83: randperm on CUDA produced garbage) and can be passed back in, so generated and ground-truth
branches share them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pccnet.blocks import assert_shape, init_weights
from pccnet.config import SamplerConfig

# CUT's Normalize is x / (||x|| + 1e-7). With CUT's 0.02-gain init the MLP outputs have norms of
# ~1e-5 at init, where that eps shortens the rows by up to ~1 %; dividing by max(||x||, 1e-7) keeps the
# direction and makes the rows exactly unit, which the losses assume (METHOD.md 8.1).
NORM_EPS = 1e-7


class PatchSampler(nn.Module):
    """F: encoder taps [B,C_l,H_l,W_l] -> per tap [B,K_l,dim] unit rows, K_l = min(num_patches, H_l*W_l)."""

    def __init__(self, tap_channels: list[int], cfg: SamplerConfig = SamplerConfig()) -> None:
        super().__init__()
        if not tap_channels or any(c < 1 for c in tap_channels):
            raise ValueError(f"tap_channels must be a non-empty list of positive ints, got {tap_channels!r}")
        self.cfg = cfg
        self.tap_channels = list(tap_channels)
        # Eager (CUT builds these at the first forward): the optimiser and checkpoint loading can
        # then be set up before any data has been seen.
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(c, cfg.dim), nn.ReLU(inplace=True), nn.Linear(cfg.dim, cfg.dim))
            for c in tap_channels
        )
        init_weights(self, gain=0.02)

    def draw_patch_ids(self, feats: list[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
        """One CPU random permutation per tap, cut to K_l = min(num_patches, H_l*W_l) -> int64 [K_l]."""
        ids = []
        for f in feats:
            positions = f.shape[-2] * f.shape[-1]
            perm = torch.randperm(positions, generator=generator, device="cpu")
            ids.append(perm[: min(self.cfg.num_patches, positions)])
        return ids

    def forward(
        self,
        feats: list[Tensor],
        patch_ids: list[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Taps -> (per tap [B,K_l,dim] unit rows, the CPU patch ids [K_l] used); ids drawn when None."""
        if len(feats) != len(self.mlps):
            raise ValueError(f"expected {len(self.mlps)} taps, got {len(feats)}")
        for i, (f, c) in enumerate(zip(feats, self.tap_channels, strict=True)):
            assert_shape(f, (feats[0].shape[0], c, None, None), f"tap {i}")
        if patch_ids is None:
            patch_ids = self.draw_patch_ids(feats, generator)
        elif len(patch_ids) != len(feats):
            raise ValueError(f"expected {len(feats)} patch id tensors, got {len(patch_ids)}")
        out = []
        for i, (f, ids, mlp) in enumerate(zip(feats, patch_ids, self.mlps, strict=True)):
            positions = f.shape[-2] * f.shape[-1]
            if ids.dim() != 1 or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= positions)):
                raise ValueError(f"tap {i}: patch ids must be a 1-d tensor in [0, {positions}), got shape "
                                 f"{tuple(ids.shape)}")
            flat = f.flatten(2)  # [B, C, H*W]
            picked = flat[:, :, ids.to(f.device)].transpose(1, 2)  # [B, K, C]
            x = mlp(picked)
            out.append(x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS))  # [B, K, dim]
        return out, patch_ids
