"""pccnet.losses against loop references written here in float64, gradients, edge cases, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pccnet import losses


def _unit(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def _lse(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


# --- loop references (float64 Python floats) ------------------------------------------------------


def _ref_patch_contrastive(w, z, tau, beta) -> float:
    b_count, k, _ = w.shape
    total = 0.0
    for b in range(b_count):
        for i in range(k):
            s = [float(w[b, i] @ z[b, j]) / tau for j in range(k)]
            zz = [float(z[b, i] @ z[b, j]) for j in range(k)]
            # N sum_j omega_ij e^{s_ij} / sum_j omega_ij, omega = e^{beta z_i.z_j}, j != i (METHOD 2.1)
            num = sum(math.exp(beta * zz[j] + s[j]) for j in range(k) if j != i)
            den = sum(math.exp(beta * zz[j]) for j in range(k) if j != i)
            total += -s[i] + math.log((k - 1) * num / den)
    return total / (b_count * k)


def _ref_intra_correlation(w, z) -> float:
    b_count, k, _ = w.shape
    total = 0.0
    for b in range(b_count):
        for r in range(k):
            ep = [math.exp(float(z[b, r] @ z[b, j])) for j in range(k)]
            eq = [math.exp(float(w[b, r] @ w[b, j])) for j in range(k)]
            p = [v / sum(ep) for v in ep]
            q = [v / sum(eq) for v in eq]
            m = [(pi + qi) / 2 for pi, qi in zip(p, q, strict=True)]
            total += 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m, strict=True))
            total += 0.5 * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m, strict=True))
    return total / b_count


def _ref_circle(sims, positive, gamma, margin) -> float:
    losses_per_query = []
    for row, pos_row in zip(sims.tolist(), positive.tolist(), strict=True):
        sp = [s for s, p in zip(row, pos_row, strict=True) if p]
        sn = [s for s, p in zip(row, pos_row, strict=True) if not p]
        if not sp or not sn:
            continue
        # log(1 + sum_n sum_p exp(gamma a_n (s_n - m) - gamma a_p (s_p - 1 + m))), the double sum
        terms = [
            gamma * max(s_n + margin, 0) * (s_n - margin)
            - gamma * max(1 + margin - s_p, 0) * (s_p - 1 + margin)
            for s_n in sn
            for s_p in sp
        ]
        x = _lse(terms)
        losses_per_query.append(x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x)))
    return sum(losses_per_query) / len(losses_per_query) if losses_per_query else 0.0


def _ref_huber(pred, target, delta) -> float:
    errs = (pred - target).flatten().tolist()
    vals = [0.5 * e * e if abs(e) <= delta else delta * abs(e) - 0.5 * delta * delta for e in errs]
    return sum(vals) / len(vals)


# --- values against the references ----------------------------------------------------------------


@pytest.mark.parametrize(
    "b,k,c,tau,beta", [(2, 6, 8, 0.07, 1.0), (3, 11, 5, 0.2, 0.5), (2, 16, 4, 0.07, 5.0)]
)
def test_patch_contrastive_matches_loop_reference(b, k, c, tau, beta):
    w, z = _unit(b, k, c, seed=1), _unit(b, k, c, seed=2)
    got = losses.patch_contrastive_loss(w.float(), z.float(), tau=tau, beta=beta)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(_ref_patch_contrastive(w, z, tau, beta), abs=1e-5, rel=1e-5)
    got64 = losses.patch_contrastive_loss(w, z, tau=tau, beta=beta)
    assert got64.dtype == torch.float64
    assert got64.item() == pytest.approx(_ref_patch_contrastive(w, z, tau, beta), abs=1e-10)


def test_patch_contrastive_beta0_is_decoupled_infonce():
    w, z = _unit(3, 9, 6, seed=3), _unit(3, 9, 6, seed=4)
    tau = 0.1
    s = torch.bmm(w, z.transpose(1, 2)) / tau
    dcl = []
    for b in range(3):
        for i in range(9):
            dcl.append(-s[b, i, i].item() + _lse([s[b, i, j].item() for j in range(9) if j != i]))
    got = losses.patch_contrastive_loss(w, z, tau=tau, beta=0.0)
    assert got.item() == pytest.approx(sum(dcl) / len(dcl), abs=1e-10)


def test_patch_contrastive_negatives_stay_within_each_image():
    w, z = _unit(2, 8, 5, seed=5), _unit(2, 8, 5, seed=6)
    both = losses.patch_contrastive_loss(w, z)
    alone = [losses.patch_contrastive_loss(w[i : i + 1], z[i : i + 1]) for i in range(2)]
    assert both.item() == pytest.approx(sum(a.item() for a in alone) / 2, abs=1e-12)


def test_patch_contrastive_detaches_z_and_gradchecks_w():
    w, z = _unit(2, 6, 4, seed=7), _unit(2, 6, 4, seed=8)
    w.requires_grad_(True)
    z_leaf = z.clone().requires_grad_(True)
    losses.patch_contrastive_loss(w, z_leaf).backward()
    assert z_leaf.grad is None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(
        lambda x: losses.patch_contrastive_loss(x, z, tau=0.2), (w.detach().requires_grad_(),)
    )


def test_patch_contrastive_tiny_tau_stays_finite():
    w, z = _unit(2, 12, 8, seed=9, dtype=torch.float32), _unit(2, 12, 8, seed=10, dtype=torch.float32)
    w.requires_grad_(True)
    loss = losses.patch_contrastive_loss(w, z, tau=1e-4, beta=1.0)  # logits ~ +-1e4
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all()
    # w = z: every positive is the largest logit by far, so the loss is very negative but finite
    same = losses.patch_contrastive_loss(z, z, tau=1e-4)
    assert torch.isfinite(same) and same.item() < -1000


@pytest.mark.parametrize("b,k,c", [(2, 6, 8), (3, 10, 4), (2, 16, 3)])
def test_intra_correlation_matches_loop_reference(b, k, c):
    w, z = _unit(b, k, c, seed=11), _unit(b, k, c, seed=12)
    got = losses.intra_correlation_loss(w.float(), z.float())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_ref_intra_correlation(w, z), abs=1e-6)
    assert losses.intra_correlation_loss(w, z).item() == pytest.approx(
        _ref_intra_correlation(w, z), abs=1e-12
    )


def test_intra_correlation_identical_is_zero_and_bounded():
    z = _unit(2, 12, 6, seed=13, dtype=torch.float32)
    assert abs(losses.intra_correlation_loss(z, z).item()) < 1e-6
    # each row's JSD is at most ln 2: sharp, opposite patterns stay below K ln 2
    w, zz = _unit(2, 12, 6, seed=14) * 50, _unit(2, 12, 6, seed=15) * 50
    assert 0 < losses.intra_correlation_loss(w, zz).item() <= 12 * math.log(2) + 1e-9


def test_intra_correlation_detaches_z_and_gradchecks_w():
    w, z = _unit(2, 7, 4, seed=16), _unit(2, 7, 4, seed=17)
    z_leaf = z.clone().requires_grad_(True)
    w_leaf = w.clone().requires_grad_(True)
    losses.intra_correlation_loss(w_leaf, z_leaf).backward()
    assert z_leaf.grad is None and w_leaf.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda x: losses.intra_correlation_loss(x, z), (w.requires_grad_(),))


def _circle_case(b: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    sims = torch.rand(b, k, generator=g, dtype=torch.float64) * 2 - 1
    positive = torch.rand(b, k, generator=g) < 0.4
    positive[:, 0], positive[:, 1] = True, False  # every row valid
    return sims, positive


@pytest.mark.parametrize("gamma,margin", [(256.0, 0.25), (32.0, 0.4), (1.0, 0.1)])
def test_circle_matches_loop_reference(gamma, margin):
    sims, positive = _circle_case(3, 12, seed=18)
    ref = _ref_circle(sims, positive, gamma, margin)
    got = losses.circle_loss(sims.float(), positive, gamma=gamma, margin=margin)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert losses.circle_loss(sims, positive, gamma=gamma, margin=margin).item() == pytest.approx(
        ref, rel=1e-12
    )


def test_circle_gradient_treats_weights_as_constants():
    # gradcheck cannot apply: the weights a_p, a_n are detached (Sun et al.), so the analytic gradient
    # is deliberately not the derivative of the value. Check it against the closed form instead:
    # dL/ds_n = sigma(x) softmax_n(l_n) gamma a_n, dL/ds_p = -sigma(x) softmax_p(l_p) gamma a_p.
    gamma, margin = 8.0, 0.25
    sims, positive = _circle_case(2, 9, seed=19)
    sims.requires_grad_(True)
    losses.circle_loss(sims, positive, gamma=gamma, margin=margin).backward()
    s = sims.detach()
    a_p, a_n = (1 + margin - s).clamp_min(0), (s + margin).clamp_min(0)
    l_p = (-gamma * a_p * (s - 1 + margin)).masked_fill(~positive, -math.inf)
    l_n = (gamma * a_n * (s - margin)).masked_fill(positive, -math.inf)
    x = torch.logsumexp(l_p, 1, keepdim=True) + torch.logsumexp(l_n, 1, keepdim=True)
    expected = torch.sigmoid(x) * gamma * (torch.softmax(l_n, 1) * a_n - torch.softmax(l_p, 1) * a_p) / 2
    torch.testing.assert_close(sims.grad, expected, atol=1e-12, rtol=1e-10)


def test_circle_rows_without_positives_or_negatives_are_excluded():
    sims, positive = _circle_case(4, 10, seed=20)
    positive[1] = True  # no negative
    positive[2] = False  # no positive
    sims.requires_grad_(True)
    got = losses.circle_loss(sims, positive)
    keep = [0, 3]
    assert got.item() == pytest.approx(
        _ref_circle(sims.detach()[keep], positive[keep], 256.0, 0.25), rel=1e-12
    )
    got.backward()
    assert torch.isfinite(sims.grad).all()
    assert (sims.grad[1] == 0).all() and (sims.grad[2] == 0).all() and sims.grad[0].abs().sum() > 0


@pytest.mark.parametrize("fill", [True, False])
def test_circle_all_rows_invalid_is_zero_with_finite_grad(fill):
    sims = (torch.rand(3, 7, dtype=torch.float32) * 2 - 1).requires_grad_(True)
    got = losses.circle_loss(sims, torch.full((3, 7), fill))
    assert got.item() == 0.0 and got.requires_grad
    got.backward()
    assert torch.isfinite(sims.grad).all() and (sims.grad == 0).all()


def test_circle_large_logits_stay_finite():
    # gamma 256, sims near 1 and near -1: logits of several hundred, float32
    sims = torch.tensor([[0.999, 0.998, -0.999, 0.997], [0.999, -0.999, -0.998, 0.9999]]).requires_grad_(True)
    positive = torch.tensor([[False, True, True, False], [True, False, True, False]])
    got = losses.circle_loss(sims, positive, gamma=256.0)
    got.backward()
    assert torch.isfinite(got) and got.item() > 100 and torch.isfinite(sims.grad).all()
    assert got.item() == pytest.approx(_ref_circle(sims.detach().double(), positive, 256.0, 0.25), rel=1e-5)


def test_circle_accepts_integer_mask_and_validates():
    sims, positive = _circle_case(2, 5, seed=21)
    assert losses.circle_loss(sims, positive.long()).item() == losses.circle_loss(sims, positive).item()
    with pytest.raises(ValueError, match=r"positive must have the shape of sims \(2, 5\)"):
        losses.circle_loss(sims, positive[:, :4])
    with pytest.raises(ValueError, match=r"sims must be \[B,k\]"):
        losses.circle_loss(sims[0], positive[0])
    with pytest.raises(ValueError, match="only 0 and 1"):
        losses.circle_loss(sims, positive.long() * 2)
    with pytest.raises(ValueError, match="bool"):
        losses.circle_loss(sims, positive.double())


def test_patch_losses_validate_shapes():
    w = _unit(2, 6, 4, seed=22)
    with pytest.raises(ValueError, match=r"z must have the shape of w \(2, 6, 4\)"):
        losses.patch_contrastive_loss(w, w[:, :5])
    with pytest.raises(ValueError, match=r"w must be \[B,K,C\]"):
        losses.intra_correlation_loss(w[0], w[0])
    with pytest.raises(ValueError, match="K >= 2"):
        losses.patch_contrastive_loss(w[:, :1], w[:, :1])


def test_smooth_l1_is_huber_not_smoothl1_beta():
    g = torch.Generator().manual_seed(23)
    pred, target = (
        torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64) * 3,
        torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64),
    )
    for delta in (1.0, 2.0, 0.3):
        got = losses.smooth_l1_loss(pred, target, delta=delta)
        assert got.item() == pytest.approx(_ref_huber(pred, target, delta), rel=1e-12)
        assert got.item() == pytest.approx(torch.nn.HuberLoss(delta=delta)(pred, target).item(), rel=1e-12)
    at2 = losses.smooth_l1_loss(pred, target, delta=2.0).item()
    assert at2 != pytest.approx(torch.nn.SmoothL1Loss(beta=2.0)(pred, target).item(), rel=1e-3)
    assert losses.smooth_l1_loss(pred, target).item() == pytest.approx(
        torch.nn.SmoothL1Loss()(pred, target).item()
    )
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        losses.smooth_l1_loss(pred, target[:1])
    p = pred.clone().requires_grad_(True)
    t = target.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: losses.smooth_l1_loss(a, b, delta=2.0), (p, t))


def test_lsgan_formulas_with_half_factors():
    zeros = torch.zeros(2, 1, 4, 4)
    ones = torch.ones(2, 1, 4, 4)
    assert losses.lsgan_d_loss(zeros, zeros).item() == pytest.approx(0.5)  # 1/2 (0-1)^2 + 1/2 0^2
    assert losses.lsgan_d_loss(ones, zeros).item() == 0.0  # the optimum
    assert losses.lsgan_d_loss(zeros, ones).item() == pytest.approx(1.0)
    assert losses.lsgan_g_loss(zeros).item() == pytest.approx(0.5)
    assert losses.lsgan_g_loss(ones).item() == 0.0
    g = torch.Generator().manual_seed(24)
    real, fake = (
        torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 1, 6, 6, generator=g, dtype=torch.float64),
    )
    ref_d = (
        0.5 * sum((v - 1) ** 2 for v in real.flatten().tolist()) / real.numel()
        + 0.5 * sum(v * v for v in fake.flatten().tolist()) / fake.numel()
    )
    assert losses.lsgan_d_loss(real, fake).item() == pytest.approx(ref_d, rel=1e-12)
    ref_g = 0.5 * sum((v - 1) ** 2 for v in fake.flatten().tolist()) / fake.numel()
    assert losses.lsgan_g_loss(fake).item() == pytest.approx(ref_g, rel=1e-12)
    # they detach nothing: the fake output gets a gradient from the D loss too
    fake_leaf = fake.clone().requires_grad_(True)
    losses.lsgan_d_loss(real, fake_leaf).backward()
    assert fake_leaf.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(losses.lsgan_d_loss, (real.requires_grad_(), fake.requires_grad_()))
    assert torch.autograd.gradcheck(losses.lsgan_g_loss, (fake,))


def test_kl_divergence_xlogy_and_eps_on_q_only():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5], [0.0, 0.5, 0.5]], dtype=torch.float64)
    got = losses.kl_divergence(p, q)
    assert got.shape == (2,) and torch.isfinite(got).all()
    assert got[0].item() == pytest.approx(math.log(2), rel=1e-7)  # the zero in p contributes 0
    expected1 = (
        0.2 * math.log(0.2 / 1e-8) + 0.3 * math.log(0.3 / (0.5 + 1e-8)) + 0.5 * math.log(0.5 / (0.5 + 1e-8))
    )
    assert got[1].item() == pytest.approx(expected1, rel=1e-12)
    assert losses.kl_divergence(q, q)[0].item() == pytest.approx(0.0, abs=1e-7)
    # broadcasting: memory values [B,k,D] against targets [B,1,D]
    vals = torch.softmax(torch.randn(2, 4, 3, dtype=torch.float64), -1)
    rowwise = losses.kl_divergence(vals, q[:, None, :])
    assert rowwise.shape == (2, 4)
    assert rowwise[1, 2].item() == pytest.approx(losses.kl_divergence(vals[1, 2], q[1]).item(), rel=1e-12)
    with pytest.raises(ValueError, match="same last dim"):
        losses.kl_divergence(p, q[:, :2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_return_float32(dtype):
    w, z = _unit(2, 8, 4, seed=25, dtype=dtype), _unit(2, 8, 4, seed=26, dtype=dtype)
    sims, positive = _circle_case(2, 6, seed=27)
    outs = [
        losses.patch_contrastive_loss(w, z),
        losses.intra_correlation_loss(w, z),
        losses.circle_loss(sims.to(dtype), positive),
        losses.smooth_l1_loss(w, z),
        losses.lsgan_d_loss(w, z),
        losses.lsgan_g_loss(w),
        losses.kl_divergence(torch.softmax(w, -1), torch.softmax(z, -1)),
    ]
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in outs)
    # the upcast happens before the maths: same value as float32 inputs of the same (rounded) numbers
    ref = losses.patch_contrastive_loss(w.float(), z.float())
    assert outs[0].item() == pytest.approx(ref.item(), abs=1e-6)


def test_losses_compute_in_float32_under_autocast():
    w, z = _unit(2, 8, 16, seed=28, dtype=torch.float32), _unit(2, 8, 16, seed=29, dtype=torch.float32)
    outside = losses.patch_contrastive_loss(w, z)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = losses.patch_contrastive_loss(w, z)
        inside_ic = losses.intra_correlation_loss(w, z)
    assert inside.dtype == torch.float32 and inside_ic.dtype == torch.float32
    # a bfloat16 bmm would be off by ~1e-2 here
    assert inside.item() == pytest.approx(outside.item(), abs=1e-6)
    assert inside_ic.item() == pytest.approx(losses.intra_correlation_loss(w, z).item(), abs=1e-7)


def test_method_magnitudes_at_random_init():
    # METHOD.md 2.1/2.2 [VERIFIED] figures: L_PC ~5.9 random, ~-8.3 when w = z; L_IC ~0.25 random, 0 when equal
    w, z = _unit(4, 256, 256, seed=30, dtype=torch.float32), _unit(4, 256, 256, seed=31, dtype=torch.float32)
    assert losses.patch_contrastive_loss(w, z).item() == pytest.approx(5.9, abs=0.1)
    assert losses.patch_contrastive_loss(z, z).item() == pytest.approx(-8.3, abs=0.1)
    assert losses.intra_correlation_loss(w, z).item() == pytest.approx(0.25, abs=0.02)
