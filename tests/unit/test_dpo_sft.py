"""SFT and sigmoid-DPO losses against float64 hand formulas and hand-computed TRL-style values."""

import math

import pytest
import torch

from megatron_var.objectives.dpo import dpo_loss
from megatron_var.objectives.sft import sft_loss, sft_loss_sum

torch.set_num_threads(1)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def hand_dpo(pc, pr, rc, rr, beta, eps):
    z = (pc - pr) - (rc - rr)
    return -(1 - eps) * _logsig(beta * z) - eps * _logsig(-beta * z)


def test_dpo_hand_values_trl_metrics():
    # pair 0: z = (-1 - -3) - (-2 - -2) = 2, beta*z = 1 -> log(1 + e^-1) = 0.31326168751822286
    # pair 1: z = (-5 - -4) - (-3 - -3) = -1, beta*z = -0.5 -> log(1 + e^0.5) = 0.9740769841801067
    pc = torch.tensor([-1.0, -5.0], dtype=torch.float64)
    pr = torch.tensor([-3.0, -4.0], dtype=torch.float64)
    rc = torch.tensor([-2.0, -3.0], dtype=torch.float64)
    rr = torch.tensor([-2.0, -3.0], dtype=torch.float64)
    losses, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.31326168751822286, 0.9740769841801067], dtype=torch.float64))
    # rewards/chosen = beta*(pc - rc) = [0.5, -1.0]; rewards/rejected = beta*(pr - rr) = [-0.5, -0.5]
    assert m["rewards/chosen"].item() == pytest.approx(-0.25)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margins"].item() == pytest.approx(0.25)  # mean of [1.0, -0.5]
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)  # pair 0 right, pair 1 wrong
    assert m["logps/chosen"].item() == pytest.approx(-3.0)
    assert m["logps/rejected"].item() == pytest.approx(-3.5)
    assert not any(v.requires_grad for v in m.values())


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_matches_float64_formula_and_gradient(beta, eps):
    g = torch.Generator().manual_seed(7)
    pc, pr, rc, rr = (-torch.rand(6, generator=g, dtype=torch.float64) * 50 for _ in range(4))
    pc.requires_grad_()
    losses, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    expected = [hand_dpo(*v, beta, eps) for v in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    losses.sum().backward()
    # d/dpc [-(1-eps) logsig(bz) - eps logsig(-bz)] = -beta (1-eps) sigmoid(-bz) + beta eps sigmoid(bz)
    z = (pc - pr - rc + rr).detach()
    grad = -beta * (1 - eps) * torch.sigmoid(-beta * z) + beta * eps * torch.sigmoid(beta * z)
    torch.testing.assert_close(pc.grad, grad, rtol=1e-12, atol=1e-15)


def test_dpo_extreme_logits_finite_and_validation():
    big = torch.tensor([1e4, -1e4])
    losses, _ = dpo_loss(big, -big, torch.zeros(2), torch.zeros(2), beta=0.1)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-30)
    assert losses[1].item() == pytest.approx(2000.0)  # -logsigmoid(-2000) = 2000
    assert losses.dtype == torch.float32
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(big, big, big, big, beta=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        dpo_loss(big, big, big, big, label_smoothing=0.7)
    with pytest.raises(ValueError, match="ref_chosen"):
        dpo_loss(big, big, big[:1], big)


def test_sft_loss_sum_hand_values():
    tok = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.25, float("nan")]])
    mask = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    neg_sum, n = sft_loss_sum(tok, mask)
    assert neg_sum.item() == pytest.approx(2.75) and n.item() == 3 and n.dtype == torch.int
    assert sft_loss(tok, mask).item() == pytest.approx(2.75 / 3)
    # token-mean over a split batch == token-mean of the whole batch
    s0, n0 = sft_loss_sum(tok[:1], mask[:1])
    s1, n1 = sft_loss_sum(tok[1:], mask[1:])
    assert ((s0 + s1) / (n0 + n1)).item() == pytest.approx(2.75 / 3)
    with pytest.raises(ValueError):
        sft_loss_sum(tok, mask[:, :2])
