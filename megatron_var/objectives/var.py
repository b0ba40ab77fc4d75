"""VAR objective: in-batch re-weighting weights and the weighted SFT loss (pure functions).

Paper (Variational Alignment with Re-weighting), Algorithm 1, for a group of B samples (x_i, y_i):

    Z_i = sum_j pi_ref(y_j | x_i) * exp(r(x_i, y_j) / lambda)
    w_i = pi_ref(y_i | x_i) * exp(r(x_i, y_i) / lambda) / Z_i
        = softmax_j(log pi_ref(y_j | x_i) + r(x_i, y_j) / lambda)[i]
    L   = -1/B * sum_i w_i * log pi_theta(y_i | x_i)

Shapes legend: G groups, B samples per group, S sequence length.
  ref_logps_GBB[g, i, j] = log pi_ref(y_j | x_i)     rewards_GBB[g, i, j] = r(x_i, y_j)
  weights_GB[g, i] = w_i                             policy_logps_GB[g, i] = log pi_theta(y_i | x_i)
A leading group dimension is optional everywhere ([B, B] -> [B]).

Why log space and float64: summed sequence log-probs are O(-1e3..-1e4) and r/lambda can be O(+-1e4);
exp() of either over/underflows, so the weights are a log-softmax of the logits above, evaluated in float64 (the
[B, B] matrix is tiny) and returned in float32 (or float64 if that is what came in).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "sequence_logps",
    "var_log_weights",
    "var_weights",
    "var_loss",
    "var_loss_sum",
    "var_metrics",
]

Reduction = Literal["sum", "mean"]


def sequence_logps(
    token_logps: torch.Tensor, mask: torch.Tensor, reduction: Reduction = "sum"
) -> torch.Tensor:
    """Per-sequence log-probs [...] from per-token ones [..., S] and a response mask [..., S].

    reduction="sum" is the paper's log pi(y|x). reduction="mean" (per-token mean over the response) is the
    documented option for groups whose responses differ a lot in length: with raw sums the longer response's
    log-prob is far smaller, so the softmax weights become near one-hot whatever the reward says. Use the same
    reduction for pi_ref and pi_theta. Masked positions are ignored even if they hold -inf/NaN.
    An all-zero mask gives 0 for either reduction.
    """
    if token_logps.shape != mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} differ in shape")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    dtype = torch.promote_types(token_logps.dtype, torch.float32)
    keep = mask != 0
    total = torch.where(keep, token_logps.to(dtype), 0.0).sum(dim=-1)
    if reduction == "sum":
        return total
    return total / keep.sum(dim=-1).clamp(min=1).to(dtype)


def _check_group_inputs(ref_logps: torch.Tensor, rewards: torch.Tensor | None, lam: float) -> float:
    if rewards is None:
        raise ValueError("the group has no reward matrix; VAR needs r(x_i, y_j) for every cross pair")
    if ref_logps.dim() < 2 or ref_logps.shape[-1] != ref_logps.shape[-2]:
        raise ValueError(f"ref_logps must be [..., B, B], got {tuple(ref_logps.shape)}")
    if rewards.shape != ref_logps.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} must match ref_logps {tuple(ref_logps.shape)}")
    try:
        lam_f = float(lam)
    except (TypeError, ValueError):
        lam_f = math.nan
    if not (math.isfinite(lam_f) and lam_f > 0):
        raise ValueError(f"lambda (--var-lambda) must be a finite number > 0, got {lam!r}")
    # One host sync per call: cheap next to the B*B reference forward, and a bad group must not train silently.
    bad_reward, bad_ref, dead_row = torch.stack(
        [
            ~torch.isfinite(rewards).all(),
            torch.isnan(ref_logps).any() | torch.isposinf(ref_logps).any(),
            torch.isneginf(ref_logps).all(dim=-1).any(),
        ]
    ).tolist()
    if bad_reward:
        raise ValueError("reward matrix contains NaN/inf; every cross pair (x_i, y_j) needs a finite reward")
    if bad_ref:
        raise ValueError("reference log-prob matrix contains NaN or +inf")
    if dead_row:
        raise ValueError("a row of the reference log-prob matrix is all -inf: its softmax is undefined")
    return lam_f


def var_log_weights(ref_logps: torch.Tensor, rewards: torch.Tensor | None, lam: float) -> torch.Tensor:
    """log w_i in float64, [..., B, B] -> [..., B], detached. See var_weights."""
    lam = _check_group_inputs(ref_logps, rewards, lam)
    with torch.no_grad():
        logits = ref_logps.detach().to(torch.float64) + rewards.detach().to(torch.float64) / lam
        # Shift by the row max first: log Z_i of logits near -2e4 would otherwise round at the ulp of 2e4 (4e-12).
        logits = logits - logits.amax(dim=-1, keepdim=True)
        log_norm = torch.logsumexp(logits, dim=-1)  # [..., B]: log Z_i - max_j
        return torch.diagonal(logits, dim1=-2, dim2=-1) - log_norm


def var_weights(ref_logps: torch.Tensor, rewards: torch.Tensor | None, lam: float) -> torch.Tensor:
    """w[..., i] = softmax_j(ref_logps[..., i, j] + rewards[..., i, j] / lam)[i]; [..., B, B] -> [..., B].

    Detached (no gradient reaches ref_logps or rewards). Raises ValueError for non-finite rewards, NaN/+inf
    reference log-probs (-inf is allowed: that pair gets zero mass) or lam <= 0.
    """
    log_w = var_log_weights(ref_logps, rewards, lam)
    out_dtype = torch.promote_types(torch.promote_types(ref_logps.dtype, rewards.dtype), torch.float32)
    return log_w.exp().to(out_dtype)


def _check_loss_inputs(policy_logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if policy_logps.shape != weights.shape:
        raise ValueError(
            f"policy_logps {tuple(policy_logps.shape)} and weights {tuple(weights.shape)} must have the same "
            "shape ([B] or [G, B])"
        )
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    return weights.detach().to(dtype) * policy_logps.to(dtype)


def var_loss(policy_logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The paper's loss -mean(w * log pi_theta(y_i | x_i)) over all samples of [B] or [G, B]; 0-d tensor.

    The gradient w.r.t. policy_logps is -w / numel; weights are treated as constants.
    """
    return -_check_loss_inputs(policy_logps, weights).mean()


def var_loss_sum(policy_logps: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(-sum(w * log pi_theta), number of samples) for megatron's loss_func contract.

    With calculate_per_token_loss the schedule adds the counts of all micro-batches (and the trainer all-reduces
    them over DP) and divides the summed loss once, so a global batch gives the same loss and gradient however it is
    split: sum over splits of neg_sum / sum of counts == var_loss(all groups). The count is an int32 0-d tensor
    (the type the schedule accumulates) on the loss's device.
    """
    weighted = _check_loss_inputs(policy_logps, weights)
    count = torch.tensor(weighted.numel(), dtype=torch.int, device=weighted.device)
    return -weighted.sum(), count


@torch.no_grad()
def var_metrics(
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    lam: float,
    weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per-step diagnostics of the re-weighting, averaged over groups ([B, B] or [G, B, B] inputs).

    The w_i of one group come from B different softmaxes (row i's softmax over responses j), so they do not sum
    to 1. We report both views:
      var/weight_mean   mean self-probability w_i: 1/B when the reference+reward cannot tell responses apart,
                        -> 1 when each row's own response dominates its row.
      var/weight_min, var/weight_max
      var/weight_entropy  entropy (nats) of q_i = w_i / sum_k w_k, the share of the group's gradient each sample
                        gets; log B = uniform, 0 = one sample takes all.
      var/ess           Kish effective sample size of the same q: (sum w)^2 / sum w^2 = 1 / sum q^2, in [1, B].
      var/ess_frac      var/ess / B, in [1/B, 1].
      var/row_entropy   mean entropy (nats) of the row softmaxes (how peaked each Z_i is).
      var/reward_diag_mean, var/reward_offdiag_mean (NaN when B == 1)
      var/ref_logp_diag_mean, var/ref_logp_diag_min, var/ref_logp_diag_max
    `weights` is accepted to keep the call site uniform; the metrics are recomputed from log weights in float64
    (robust even when every w_i underflows), and an inconsistent `weights` shape is rejected.
    """
    log_w = var_log_weights(ref_logps, rewards, lam)  # [..., B] float64
    lam = float(lam)
    if weights is not None and weights.shape != log_w.shape:
        raise ValueError(f"weights {tuple(weights.shape)} do not match the groups' shape {tuple(log_w.shape)}")
    b = ref_logps.shape[-1]
    logits = ref_logps.to(torch.float64) + rewards.to(torch.float64) / lam
    row_p = torch.softmax(logits, dim=-1)  # [..., B, B]
    q = torch.softmax(log_w, dim=-1)  # [..., B]
    w = log_w.exp()
    ess = 1.0 / (q * q).sum(dim=-1)
    r64 = rewards.to(torch.float64)
    diag_r = torch.diagonal(r64, dim1=-2, dim2=-1)
    off_mask = ~torch.eye(b, dtype=torch.bool, device=rewards.device)
    off_r = r64[..., off_mask] if b > 1 else r64.new_full((1,), math.nan)
    diag_ref = torch.diagonal(ref_logps.to(torch.float64), dim1=-2, dim2=-1)
    stats = torch.stack(
        [
            w.mean(),
            w.min(),
            w.max(),
            torch.special.entr(q).sum(dim=-1).mean(),
            ess.mean(),
            ess.mean() / b,
            torch.special.entr(row_p).sum(dim=-1).mean(),
            diag_r.mean(),
            off_r.mean(),
            diag_ref.mean(),
            diag_ref.min(),
            diag_ref.max(),
        ]
    ).tolist()  # one host sync
    names = [
        "var/weight_mean",
        "var/weight_min",
        "var/weight_max",
        "var/weight_entropy",
        "var/ess",
        "var/ess_frac",
        "var/row_entropy",
        "var/reward_diag_mean",
        "var/reward_offdiag_mean",
        "var/ref_logp_diag_mean",
        "var/ref_logp_diag_min",
        "var/ref_logp_diag_max",
    ]
    return dict(zip(names, stats))
