"""A-LoL and R-LoL (Baheti et al., "Leftover Lunch: Advantage-based Offline RL for Language Models"), pure functions.

Offline policy gradient on fixed data, with the frozen reference as the behaviour policy:

    grad J = E_data[ A(x, y) * r * grad log pi_theta(y|x) ],     r = pi_theta(y|x) / pi_ref(y|x)   (sequence level)

Written as a loss over N samples, with the importance weight clipped to [1 - eps, 1 + eps] and held constant:

    L = -1/N * sum_i keep_i * A_i * clip(r_i, 1 - eps, 1 + eps) * log pi_theta(y_i|x_i)

so dL/d log pi_theta(y_i|x_i) = -keep_i * A_i * clip(r_i) / N: exactly the estimator above with the clipped weight;
no gradient flows through r itself (clipping bounds the step size, it does not switch the gradient off).
- A-LoL: A_i = r(x_i, y_i) - V(x_i), and samples with A_i <= 0 are dropped (keep_i = A_i > 0), as in the paper.
- R-LoL: A_i = r(x_i, y_i), every sample kept.
V(x_i) is the mean reward of x_i over its group's B responses (row i of the [B, B] cross-pair reward matrix that
VAR already needs): a Monte-Carlo value of x_i under the data's responses, where the paper trains a value head on
the reference. It costs nothing extra and is exact for the group at hand; with random groups, where most responses
were written for other prompts, it is a low baseline, so A-LoL keeps mostly on-prompt responses.

Shapes: G groups, B samples per group; rewards_GBB[g, i, j] = r(x_i, y_j); per-sample vectors are [N] = [G*B].
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["alol_advantages", "alol_loss_sum"]

Variant = Literal["alol", "rlol"]


def alol_advantages(rewards_GBB: torch.Tensor, variant: Variant = "alol") -> torch.Tensor:
    """A_i per sample, [G, B] (float64): r(x_i, y_i) - mean_j r(x_i, y_j) for A-LoL, r(x_i, y_i) for R-LoL."""
    if rewards_GBB.dim() != 3 or rewards_GBB.size(-1) != rewards_GBB.size(-2):
        raise ValueError(f"rewards must be [G, B, B], got {tuple(rewards_GBB.shape)}")
    if variant not in ("alol", "rlol"):
        raise ValueError(f"A-LoL variant must be 'alol' or 'rlol', got {variant!r}")
    r = rewards_GBB.double()
    own = torch.diagonal(r, dim1=-2, dim2=-1)
    return own - r.mean(dim=-1) if variant == "alol" else own


def alol_loss_sum(policy_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
                  positive_only: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(sum_i of the loss terms, N, detached metric sums) for samples [N]; the caller divides by the global N.

    ``positive_only``: A-LoL's filter (drop A <= 0). Metric sums (divide by N): alol/ratio (unclipped r),
    alol/clipped (fraction outside the clip range), alol/kept, alol/advantage.
    """
    if not 0.0 < clip_eps < 1.0:
        raise ValueError(f"--alol-clip must be in (0, 1), got {clip_eps!r}")
    for name, t in (("ref_logps", ref_logps), ("advantages", advantages)):
        if t.shape != policy_logps.shape:
            raise ValueError(f"{name} {tuple(t.shape)} does not match policy_logps {tuple(policy_logps.shape)}")
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    logp = policy_logps.to(dtype)
    with torch.no_grad():
        # log-space ratio: sequence log-probs are O(-1e3), their exp alone would underflow
        ratio = torch.exp((logp - ref_logps.to(dtype)).clamp(max=30.0))
        weight = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        adv = advantages.to(dtype)
        keep = (adv > 0).to(dtype) if positive_only else torch.ones_like(adv)
        coef = keep * adv * weight
        metrics = {"alol/ratio": ratio.sum(), "alol/kept": keep.sum(), "alol/advantage": adv.sum(),
                   "alol/clipped": ((ratio < 1.0 - clip_eps) | (ratio > 1.0 + clip_eps)).to(dtype).sum()}
    loss_sum = -(coef * logp).sum()
    return loss_sum, torch.tensor(logp.numel(), dtype=torch.int, device=logp.device), metrics
