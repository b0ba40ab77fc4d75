"""A-LoL / R-LoL objective against hand-computed float64 values: advantages, loss, and the clipped weight's
gradient behaviour (a constant multiplier of grad log pi, never zeroed by the clip)."""

import math

import pytest
import torch

from megatron_var.objectives.alol import alol_advantages, alol_loss_sum

REWARDS = torch.tensor([[[1.0, -1.0, 0.0],    # x_0: r(x_0, y_0..y_2)
                         [0.5, 0.2, -0.1],    # x_1
                         [2.0, 1.0, 0.0]]],   # x_2
                       dtype=torch.float64)


def test_advantages_by_hand():
    # A-LoL: own reward minus the row mean; R-LoL: own reward
    expected = [1.0 - 0.0, 0.2 - 0.2, 0.0 - 1.0]
    torch.testing.assert_close(alol_advantages(REWARDS, "alol")[0], torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(alol_advantages(REWARDS, "rlol")[0], torch.tensor([1.0, 0.2, 0.0], dtype=torch.float64))


def _loss(policy, ref, adv, eps, positive_only):
    p = torch.tensor(policy, dtype=torch.float64, requires_grad=True)
    loss_sum, n, metrics = alol_loss_sum(p, torch.tensor(ref, dtype=torch.float64),
                                         torch.tensor(adv, dtype=torch.float64), eps, positive_only)
    (loss_sum / n).backward()
    return loss_sum.item() / int(n), p.grad.tolist(), {k: v.item() for k, v in metrics.items()}


def test_loss_and_gradient_by_hand():
    # log ratios: +0.1 (inside [0.8, 1.2]), +1.0 (clipped to 1.2), -2.0 (clipped to 0.8), 0 (ratio 1)
    policy = [-10.0, -20.0, -30.0, -5.0]
    ref = [-10.1, -21.0, -28.0, -5.0]
    adv = [2.0, 0.5, 1.5, -1.0]
    w = [math.exp(0.1), 1.2, 0.8, 1.0]
    # A-LoL: the last sample (A < 0) is dropped
    keep = [1, 1, 1, 0]
    loss, grad, m = _loss(policy, ref, adv, 0.2, positive_only=True)
    assert loss == pytest.approx(-sum(k * a * wi * p for k, a, wi, p in zip(keep, adv, w, policy)) / 4, rel=1e-14)
    # the clipped samples still get a gradient, weighted by the clip bound
    assert grad == pytest.approx([-k * a * wi / 4 for k, a, wi in zip(keep, adv, w)], rel=1e-14)
    assert m["alol/kept"] == 3 and m["alol/clipped"] == 2
    assert m["alol/ratio"] == pytest.approx(math.exp(0.1) + math.e + math.exp(-2.0) + 1.0, rel=1e-14)
    # R-LoL keeps every sample (its "advantage" is the reward), negative ones push log pi down
    loss, grad, m = _loss(policy, ref, adv, 0.2, positive_only=False)
    assert grad == pytest.approx([-a * wi / 4 for a, wi in zip(adv, w)], rel=1e-14)
    assert grad[3] > 0 and m["alol/kept"] == 4


def test_ratio_is_a_constant_weight():
    """The ratio depends on pi_theta, but no gradient flows through it: moving the policy log-prob across the clip
    boundary changes the weight, not the form of the gradient (-A * w / N)."""
    for logp in (-9.0, -10.0, -11.0):
        _, grad, _ = _loss([logp], [-10.0], [1.0], 0.5, positive_only=True)
        w = min(max(math.exp(logp + 10.0), 0.5), 1.5)
        assert grad == pytest.approx([-w], rel=1e-14)


def test_float32_inputs_give_float32_loss_and_extreme_log_ratios_stay_finite():
    p = torch.tensor([-3000.0, -10.0], requires_grad=True)
    loss_sum, _, m = alol_loss_sum(p, torch.tensor([-10.0, -3000.0]), torch.tensor([1.0, 1.0]), 0.2, True)
    assert loss_sum.dtype == torch.float32 and torch.isfinite(loss_sum) and math.isfinite(m["alol/ratio"].item())


@pytest.mark.parametrize("kw,match", [(dict(clip_eps=0.0), "alol-clip"), (dict(clip_eps=1.0), "alol-clip")])
def test_bad_clip_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        alol_loss_sum(torch.zeros(2), torch.zeros(2), torch.zeros(2), positive_only=True, **kw)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="ref_logps"):
        alol_loss_sum(torch.zeros(2), torch.zeros(3), torch.zeros(2), 0.2, True)
    with pytest.raises(ValueError, match=r"\[G, B, B\]"):
        alol_advantages(torch.zeros(2, 3))
