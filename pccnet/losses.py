"""PCCNet's losses as pure functions of tensors (METHOD.md section 2 and 8.1).

Every loss upcasts half/bfloat16 inputs to float32 (float64 inputs stay float64, for gradcheck), runs
with autocast disabled, and returns a 0-d tensor. None renormalises its inputs. Per-image similarity
matrices are batched [B,K,K]; patches of different images never meet. Imports only torch.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "patch_contrastive_loss",
    "intra_correlation_loss",
    "circle_loss",
    "neighbour_mix_loss",
    "smooth_l1_loss",
    "lsgan_d_loss",
    "lsgan_g_loss",
    "kl_divergence",
]

# How far below the smallest logit a masked entry is put. exp(-1000) is 0 in float64 too, and the
# value stays finite, so a row with nothing left in it gives a finite (discarded) value, never NaN.
_MASK_MARGIN = 1.0e3


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, otherwise float32 (half and bfloat16 are upcast)."""
    for t in tensors:
        if not t.is_floating_point():
            raise ValueError(f"expected a floating-point tensor, got dtype {t.dtype}")
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _no_autocast(device: torch.device):
    """A context that turns autocast off on `device` (a no-op where autocast does not exist)."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _check_patches(w: Tensor, z: Tensor) -> None:
    if w.dim() != 3:
        raise ValueError(f"w must be [B,K,C], got shape {tuple(w.shape)}")
    if z.shape != w.shape:
        raise ValueError(f"z must have the shape of w {tuple(w.shape)}, got shape {tuple(z.shape)}")


def _off_diagonal(m: Tensor) -> Tensor:
    """[B,K,K] -> [B,K,K-1]: each row without its diagonal entry (no masking value needed)."""
    b, k, _ = m.shape
    keep = ~torch.eye(k, dtype=torch.bool, device=m.device)
    return m[:, keep].view(b, k, k - 1)


def patch_contrastive_loss(w: Tensor, z: Tensor, tau: float = 0.07, beta: float = 1.0) -> Tensor:
    """L_PC: hard-negative weighted decoupled InfoNCE per image, mean over images and patches.

    w, z: [B,K,C] unit rows (generated / ground-truth patch features; z is detached). Per patch i:
    l_i = -s_ii + log(K-1) + lse_{j!=i}(s_ij + beta z_i.z_j) - lse_{j!=i}(beta z_i.z_j), s = w.z / tau.
    """
    _check_patches(w, z)
    if w.shape[1] < 2:
        raise ValueError(f"patch_contrastive_loss needs K >= 2 patches per image, got shape {tuple(w.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    dtype = _float_dtype(w, z)
    with _no_autocast(w.device):
        w = w.to(dtype)
        z = z.detach().to(dtype)
        k = w.shape[1]
        logits = torch.bmm(w, z.transpose(1, 2)) / tau  # [B,K,K], s_ij
        positive = torch.diagonal(logits, dim1=1, dim2=2)  # [B,K], s_ii
        # Importance weights omega_ij = exp(beta z_i.z_j) from the ground truth, self-normalised.
        log_weight = _off_diagonal(beta * torch.bmm(z, z.transpose(1, 2)))  # [B,K,K-1]
        negatives = _off_diagonal(logits)  # [B,K,K-1]
        per_patch = (
            -positive
            + math.log(k - 1)
            + torch.logsumexp(negatives + log_weight, dim=-1)
            - torch.logsumexp(log_weight, dim=-1)
        )
        return per_patch.mean()


def intra_correlation_loss(w: Tensor, z: Tensor) -> Tensor:
    """L_IC: per image, sum over rows k of JSD(P_k || Q_k); mean over images.

    P_k = softmax_j(z_k.z_j) (z detached), Q_k = softmax_j(w_k.w_j); no temperature, diagonal kept,
    natural log. w, z: [B,K,C].
    """
    _check_patches(w, z)
    dtype = _float_dtype(w, z)
    with _no_autocast(w.device):
        w = w.to(dtype)
        z = z.detach().to(dtype)
        log_p = torch.log_softmax(torch.bmm(z, z.transpose(1, 2)), dim=-1)  # [B,K,K]
        log_q = torch.log_softmax(torch.bmm(w, w.transpose(1, 2)), dim=-1)  # [B,K,K]
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        # Computed in log space: a probability that underflows to 0 contributes 0, never 0 * -inf.
        jsd = 0.5 * (log_p.exp() * (log_p - log_m)).sum(-1) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1)
        return jsd.sum(dim=1).mean()


def _masked_logsumexp(x: Tensor, mask: Tensor, fill: Tensor) -> Tensor:
    """logsumexp over the last dim of the entries where mask is True; rows without any are finite junk."""
    return torch.logsumexp(torch.where(mask, x, fill), dim=-1)


def circle_loss(sims: Tensor, positive: Tensor, gamma: float = 256.0, margin: float = 0.25) -> Tensor:
    """L_M: circle loss with margins and detached weights, mean over queries with both kinds of pair.

    sims: [B,k] query-key cosine similarities; positive: bool [B,k]. Per query:
    softplus(lse_n gamma a_n (s_n - m) + lse_p -gamma a_p (s_p - 1 + m)), a_p = [1+m-s_p]+, a_n = [s_n+m]+.
    A query without a positive or without a negative is left out; with none left the result is 0.
    """
    if sims.dim() != 2:
        raise ValueError(f"sims must be [B,k], got shape {tuple(sims.shape)}")
    if positive.shape != sims.shape:
        raise ValueError(
            f"positive must have the shape of sims {tuple(sims.shape)}, got {tuple(positive.shape)}"
        )
    if positive.dtype != torch.bool:
        if positive.is_floating_point() or positive.is_complex():
            raise ValueError(f"positive must be a bool (or integer 0/1) mask, got dtype {positive.dtype}")
        if ((positive != 0) & (positive != 1)).any():
            raise ValueError("positive must hold only 0 and 1 when it is not bool")
        positive = positive.bool()
    dtype = _float_dtype(sims)
    if sims.numel() == 0:
        return sims.to(dtype).sum()  # no query or no neighbour: 0, with a gradient path
    with _no_autocast(sims.device):
        s = sims.to(dtype)
        negative = ~positive
        # Weights are constants (Sun et al.): the gradient flows only through s in (s - delta).
        alpha_p = torch.clamp_min(1.0 + margin - s.detach(), 0.0)
        alpha_n = torch.clamp_min(s.detach() + margin, 0.0)
        logit_p = -gamma * alpha_p * (s - (1.0 - margin))  # [B,k]
        logit_n = gamma * alpha_n * (s - margin)  # [B,k]
        # Finite masking: an all-masked row must not become lse = -inf (NaN gradients); a fill far
        # below every logit of the batch contributes exactly 0 to the rows that do have entries.
        with torch.no_grad():
            fill = torch.minimum(logit_p.min(), logit_n.min()) - _MASK_MARGIN
        per_query = F.softplus(
            _masked_logsumexp(logit_n, negative, fill) + _masked_logsumexp(logit_p, positive, fill)
        )  # [B]
        valid = positive.any(dim=1) & negative.any(dim=1)  # [B]
        total = torch.where(valid, per_query, per_query.new_zeros(())).sum()
        # No valid query: total is a 0 that still depends on sims, so backward() works and gives 0.
        return total / valid.sum().clamp_min(1).to(dtype)


def neighbour_mix_loss(sims: Tensor, divergence: Tensor, temperature: float = 0.1) -> Tensor:
    """Expected divergence of a neighbour drawn by softmax(sims / temperature): mean over queries of
    sum_j w_j d_j. Not in the paper; trains the key space for the similarity-weighted mix of values that
    test-time retrieval returns, since KL is jointly convex: KL(sum_j w_j v_j || own) <= sum_j w_j KL(v_j || own).

    sims: [B,k] query-key cosine similarities (the gradient flows through these); divergence: [B,k]
    constants, e.g. the memory's KL(value_j || own colour feature).
    """
    if sims.dim() != 2 or divergence.shape != sims.shape:
        raise ValueError(f"sims and divergence must both be [B,k], got {tuple(sims.shape)} and "
                         f"{tuple(divergence.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = _float_dtype(sims)
    with _no_autocast(sims.device):
        w = torch.softmax(sims.to(dtype) / temperature, dim=1)
        return (w * divergence.detach().to(dtype)).sum(dim=1).mean()


def smooth_l1_loss(pred: Tensor, target: Tensor, delta: float = 1.0) -> Tensor:
    """L_smooth: the Huber loss of Eq. 11 (torch HuberLoss(delta), not SmoothL1Loss(beta)), mean."""
    if pred.shape != target.shape:
        raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    dtype = _float_dtype(pred, target)
    with _no_autocast(pred.device):
        return F.huber_loss(pred.to(dtype), target.to(dtype), reduction="mean", delta=delta)


def lsgan_d_loss(real_out: Tensor, fake_out: Tensor) -> Tensor:
    """L_D of Eq. 12: 1/2 mean (D(real) - 1)^2 + 1/2 mean D(fake)^2. Detaches nothing."""
    dtype = _float_dtype(real_out, fake_out)
    with _no_autocast(real_out.device):
        return 0.5 * (real_out.to(dtype) - 1.0).square().mean() + 0.5 * fake_out.to(dtype).square().mean()


def lsgan_g_loss(fake_out: Tensor) -> Tensor:
    """L_G^adv of Eq. 12: 1/2 mean (D(fake) - 1)^2."""
    dtype = _float_dtype(fake_out)
    with _no_autocast(fake_out.device):
        return 0.5 * (fake_out.to(dtype) - 1.0).square().mean()


def kl_divergence(p: Tensor, q: Tensor, eps: float = 1e-8) -> Tensor:
    """Row-wise KL(p || q) over the last dim, natural log, 0 log 0 = 0, eps added to q only.

    p, q: [..., D], broadcastable (e.g. memory values [B,k,313] against targets [B,1,313]) -> [...].
    """
    if p.dim() == 0 or q.dim() == 0 or p.shape[-1] != q.shape[-1]:
        raise ValueError(f"p and q need the same last dim, got shapes {tuple(p.shape)} and {tuple(q.shape)}")
    dtype = _float_dtype(p, q)
    with _no_autocast(p.device):
        p = p.to(dtype)
        q = q.to(dtype)
        # xlogy gives 0 where p == 0: real colour distributions hold ~200 exact zeros (METHOD.md 6).
        return (torch.xlogy(p, p) - torch.xlogy(p, q + eps)).sum(dim=-1)
