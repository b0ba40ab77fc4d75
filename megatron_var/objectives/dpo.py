"""Sigmoid DPO loss (Rafailov et al. 2023), with TRL's conservative label smoothing and TRL's metric names.

    z      = (log pi(y+|x) - log pi(y-|x)) - (log pi_ref(y+|x) - log pi_ref(y-|x))
    loss_n = -(1 - eps) * log sigmoid(beta * z) - eps * log sigmoid(-beta * z)      (eps = label_smoothing)
    rewards/chosen = beta * (log pi(y+|x) - log pi_ref(y+|x)),  rewards/rejected likewise (detached)
Inputs are per-pair sequence log-probs, shape [N]. logsigmoid keeps large |beta * z| finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["dpo_loss"]


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [N] (float32+) and detached 0-d metric tensors (means over the N pairs).

    Metrics (TRL names): rewards/chosen, rewards/rejected, rewards/accuracies (fraction with chosen reward strictly
    greater), rewards/margins, logps/chosen, logps/rejected (policy). They stay tensors so the trainer can average
    them over micro-batches and DP ranks without a host sync here.
    """
    shape = policy_chosen.shape
    for name, t in (("policy_rejected", policy_rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        if t.shape != shape:
            raise ValueError(f"{name} {tuple(t.shape)} does not match policy_chosen {tuple(shape)}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"DPO beta (--dpo-beta) must be > 0, got {beta!r}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"DPO label smoothing (--dpo-label-smoothing) must be in [0, 0.5], got {label_smoothing!r}")
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
    rc, rr = ref_chosen.detach().to(dtype), ref_rejected.detach().to(dtype)
    logits = (pc - pr) - (rc - rr)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * logits)
    if label_smoothing > 0:
        losses = losses - label_smoothing * F.logsigmoid(-beta * logits)
    with torch.no_grad():
        chosen_rewards = beta * (pc - rc)
        rejected_rewards = beta * (pr - rr)
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(dtype).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
        }
    return losses, metrics
