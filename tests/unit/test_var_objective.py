"""VAR weights/loss against a float64 brute force that follows Algorithm 1 line by line, mpmath and hand values."""

import math

import mpmath
import pytest
import torch

from megatron_var.objectives.var import (
    sequence_logps,
    var_loss,
    var_loss_sum,
    var_metrics,
    var_weights,
)

torch.set_num_threads(1)


def algorithm1_weights(ref_logps, rewards, lam):
    """Algorithm 1 with plain python math: Z_i = sum_j pi_ref(y_j|x_i) exp(r_ij/lam); w_i = pi_ref(y_i|x_i) ..."""
    ref, r = ref_logps.tolist(), rewards.tolist()
    b = len(ref)
    w = []
    for i in range(b):
        z_i = 0.0
        for j in range(b):
            z_i += math.exp(ref[i][j]) * math.exp(r[i][j] / lam)
        w.append(math.exp(ref[i][i]) * math.exp(r[i][i] / lam) / z_i)
    return torch.tensor(w, dtype=torch.float64)


def mp_weights(ref, r, lam):
    """The same in 60-digit mpmath: exact enough for log-probs of -1e4 and r/lam of +-1e4."""
    mpmath.mp.dps = 60
    out = []
    for i in range(len(ref)):
        terms = [mpmath.exp(mpmath.mpf(ref[i][j]) + mpmath.mpf(r[i][j]) / lam) for j in range(len(ref))]
        out.append(float(terms[i] / mpmath.fsum(terms)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("b", [1, 2, 5, 8])
def test_weights_match_algorithm1(b, lam):
    g = torch.Generator().manual_seed(b * 100 + int(lam * 10))
    ref = -torch.rand(b, b, generator=g, dtype=torch.float64) * 40 - 1  # log-probs in [-41, -1]
    rew = torch.randn(b, b, generator=g, dtype=torch.float64) * 2
    w = var_weights(ref, rew, lam)
    assert w.dtype == torch.float64 and w.shape == (b,)
    torch.testing.assert_close(w, algorithm1_weights(ref, rew, lam), rtol=1e-12, atol=1e-300)


def test_float32_inputs_return_float32_close_to_float64():
    g = torch.Generator().manual_seed(0)
    ref = -torch.rand(6, 6, generator=g) * 30
    rew = torch.randn(6, 6, generator=g)
    w = var_weights(ref, rew, 0.5)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), algorithm1_weights(ref.double(), rew.double(), 0.5), rtol=1e-6, atol=0)
    w16 = var_weights(ref.bfloat16(), rew.bfloat16(), 0.5)
    assert w16.dtype == torch.float32  # upcast, never a bf16 softmax


def test_group_batch_matches_per_group():
    g = torch.Generator().manual_seed(1)
    ref = -torch.rand(3, 4, 4, generator=g, dtype=torch.float64) * 20
    rew = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    w = var_weights(ref, rew, 2.0)
    assert w.shape == (3, 4)
    for k in range(3):
        torch.testing.assert_close(w[k], algorithm1_weights(ref[k], rew[k], 2.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_inputs_against_mpmath(dtype):
    lam = 0.5
    ref = [
        [-1e4, -1e4 + 1.0, -1e4, -1e4],
        [-1e4, -1e4, -1e4, -1e4],
        [-2.0, -1e4, -1e4, -1e4],
        [-1e4, -1e4, -1e4, -1e4],
    ]
    # r / lam in {+-1e4}: plain exp() overflows to inf or underflows to 0 here (all values exact in float32)
    r = [
        [5e3, 5e3 - 0.25, -5e3, 5e3 - 1.5],  # logits [0, 0.5, -2e4, -3]
        [5e3, -5e3, 5e3, 5e3],  # logits [0, -2e4, 0, 0]
        [-5e3, 5e3, 5e3, 5e3],  # logits [-10002, 0, 0, 0]
        [-5e3, -5e3, -5e3, -5e3],  # logits all -2e4
    ]
    w = var_weights(torch.tensor(ref, dtype=dtype), torch.tensor(r, dtype=dtype), lam)
    assert w.dtype == dtype and torch.isfinite(w).all()
    expected = mp_weights(ref, r, lam)
    # exact up to rounding the true value to the output dtype
    rtol = 1e-13 if dtype == torch.float64 else 6e-8
    torch.testing.assert_close(w.double(), expected, rtol=rtol, atol=0)
    # hand-derived
    assert w[0].item() == pytest.approx(1.0 / (1.0 + math.exp(0.5) + math.exp(-3.0)), rel=rtol)
    assert w[1].item() == 0.0  # e^-2e4 / 3 underflows, as float(mpmath) does
    assert w[2].item() == pytest.approx(1.0 / 3.0, rel=rtol)
    assert w[3].item() == pytest.approx(0.25, rel=rtol)
    # negative control: the textbook formula with exp() is not finite on these inputs
    ref64, r64 = torch.tensor(ref, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)
    naive = ref64.exp() * (r64 / lam).exp()
    assert not torch.isfinite(naive.diagonal() / naive.sum(-1)).all()


def test_no_gradient_through_weights_and_loss_gradient():
    g = torch.Generator().manual_seed(2)
    b = 5
    ref = (-torch.rand(b, b, generator=g, dtype=torch.float64) * 10).requires_grad_()
    rew = torch.randn(b, b, generator=g, dtype=torch.float64).requires_grad_()
    policy = (-torch.rand(b, generator=g, dtype=torch.float64) * 10).requires_grad_()
    w = var_weights(ref, rew, 1.0)
    assert not w.requires_grad
    loss = var_loss(policy, w)
    loss.backward()
    torch.testing.assert_close(policy.grad, -w / b, rtol=1e-14, atol=0)
    assert ref.grad is None and rew.grad is None
    # even weights that carry a graph are treated as constants by the loss
    w_graph = w * (1 + 0 * ref.sum())
    policy.grad = None
    var_loss(policy, w_graph).backward()
    assert ref.grad is None
    assert loss.item() == pytest.approx(-sum(wi * pi for wi, pi in zip(w.tolist(), policy.tolist())) / b, rel=1e-14)


def test_loss_sum_invariant_to_micro_batch_split():
    g = torch.Generator().manual_seed(3)
    groups, b = 4, 3
    ref = -torch.rand(groups, b, b, generator=g) * 10
    rew = torch.randn(groups, b, b, generator=g)
    policy = (-torch.rand(groups, b, generator=g) * 10).requires_grad_()
    w = var_weights(ref, rew, 0.7)
    full = var_loss(policy, w)
    (full_grad,) = torch.autograd.grad(full, policy)
    for split in (1, 2, 4):  # micro-batch of `split` groups, 4 // split accumulation steps
        total = torch.zeros(())
        count = torch.zeros((), dtype=torch.int)  # the schedule's accumulator type
        for start in range(0, groups, split):
            neg_sum, n = var_loss_sum(policy[start : start + split], w[start : start + split])
            assert n.dtype == torch.int
            total, count = total + neg_sum, count + n
        assert count.item() == groups * b
        loss = total / count
        torch.testing.assert_close(loss, full, rtol=1e-6, atol=0)
        (grad,) = torch.autograd.grad(loss, policy)
        torch.testing.assert_close(grad, full_grad, rtol=1e-6, atol=0)


def test_loss_normalisation_negative_control():
    """Averaging per-micro-batch means with unequal sizes is NOT the global mean: the check above can fail."""
    policy = torch.tensor([-1.0, -2.0, -3.0])
    w = torch.tensor([0.9, 0.1, 0.5])
    wrong = (var_loss(policy[:1], w[:1]) + var_loss(policy[1:], w[1:])) / 2
    assert abs(wrong.item() - var_loss(policy, w).item()) > 1e-3


def test_sequence_logps_sum_and_mean():
    tok = torch.tensor([[-1.0, -2.0, float("-inf"), -4.0], [-0.5, float("nan"), -1.5, -2.5]])
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 1]])
    torch.testing.assert_close(sequence_logps(tok, mask), torch.tensor([-7.0, -4.0]))
    torch.testing.assert_close(sequence_logps(tok, mask, "mean"), torch.tensor([-7.0 / 3, -2.0]))
    with pytest.raises(ValueError):
        sequence_logps(tok, mask, "max")


def test_mean_reduction_softens_length_bias():
    """Responses of very different lengths: summed log-probs give near one-hot rows, means do not."""
    lengths = [10, 200]
    tok = torch.full((2, 200), -2.0)
    mask = torch.zeros(2, 200)
    for k, n in enumerate(lengths):
        mask[k, :n] = 1
    for reduction, lo, hi in (("sum", 0.0, 1e-100), ("mean", 0.4, 0.6)):
        per_resp = sequence_logps(tok, mask, reduction)  # same per-token quality, different lengths
        ref = per_resp.expand(2, 2).double()  # row i: log pi_ref(y_j | x_i), same for both prompts
        w = var_weights(ref, torch.zeros(2, 2), 1.0)
        assert lo <= w[1].item() <= hi, (reduction, w)


def test_input_validation():
    ref, rew = torch.zeros(3, 3), torch.zeros(3, 3)
    with pytest.raises(ValueError, match="lambda"):
        var_weights(ref, rew, 0.0)
    with pytest.raises(ValueError, match="lambda"):
        var_weights(ref, rew, float("nan"))
    with pytest.raises(ValueError, match="reward"):
        var_weights(ref, torch.tensor([[0.0, float("nan"), 0], [0, 0, 0], [0, 0, 0]]), 1.0)
    with pytest.raises(ValueError, match="no reward matrix"):
        var_weights(ref, None, 1.0)
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        var_weights(torch.tensor([[0.0, float("inf")], [0.0, 0.0]]), torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="B, B"):
        var_weights(torch.zeros(3, 2), torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="all -inf"):
        var_weights(torch.full((2, 2), float("-inf")), torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        var_loss(torch.zeros(3), torch.zeros(1, 3))
    # -inf off the diagonal is a legal zero-mass pair
    ref_inf = torch.tensor([[0.0, float("-inf")], [0.0, 0.0]])
    torch.testing.assert_close(var_weights(ref_inf, torch.zeros(2, 2), 1.0), torch.tensor([1.0, 0.5]))


def test_metrics_hand_values():
    # uniform group: every row softmax is uniform
    b = 4
    m = var_metrics(torch.zeros(b, b), torch.zeros(b, b), 1.0)
    assert m["var/weight_mean"] == pytest.approx(1 / b)
    assert m["var/weight_entropy"] == pytest.approx(math.log(b))
    assert m["var/row_entropy"] == pytest.approx(math.log(b))
    assert m["var/ess"] == pytest.approx(b) and m["var/ess_frac"] == pytest.approx(1.0)
    # one dominant sample: rewards make only (0,0) large; rows 1..3 stay uniform
    rew = torch.zeros(b, b)
    rew[0, 0] = 100.0
    ref = torch.tensor([[-1.0, -2.0, -3.0, -4.0]] * b)
    w = var_weights(ref, rew, 1.0)
    m = var_metrics(ref, rew, 1.0, w)
    w64 = algorithm1_weights(ref.double(), rew.double(), 1.0)
    q = w64 / w64.sum()
    assert m["var/weight_mean"] == pytest.approx(w64.mean().item(), rel=1e-9)
    assert m["var/weight_min"] == pytest.approx(w64.min().item(), rel=1e-9)
    assert m["var/ess"] == pytest.approx(1.0 / (q * q).sum().item(), rel=1e-9)
    assert m["var/weight_entropy"] == pytest.approx(-(q * q.log()).sum().item(), rel=1e-9)
    assert m["var/reward_diag_mean"] == pytest.approx(25.0)
    assert m["var/reward_offdiag_mean"] == pytest.approx(0.0)
    assert m["var/ref_logp_diag_mean"] == pytest.approx(-2.5)
    assert m["var/ref_logp_diag_min"] == -4.0 and m["var/ref_logp_diag_max"] == -1.0
    # groups are averaged
    mg = var_metrics(torch.stack([torch.zeros(b, b), ref]), torch.stack([torch.zeros(b, b), rew]), 1.0)
    assert mg["var/ess"] == pytest.approx((b + m["var/ess"]) / 2, rel=1e-9)
    assert all(isinstance(v, float) for v in mg.values())
