"""Objective adapters for ``make_forward_step``: reduce the policy's token log-probs into (loss_sum, units, report).

Why adapters: the reference quantities (VAR weights, DPO reference log-probs) are computed for the whole step
before the policy's forward/backward (``objective.Objective.attach``) and attached to each micro-batch, so the loss
is a pure function of its micro-batch: no reference forward, and none of its TP/PP communication, runs inside the
policy's schedule.
Units: VAR and DPO normalise per sample / pair, SFT per token (see engine.py for the global normalisation).
"""

from __future__ import annotations

import torch

from megatron_var.objectives.alol import alol_loss_sum
from megatron_var.objectives.dpo import dpo_loss
from megatron_var.objectives.sft import sft_loss_sum
from megatron_var.objectives.var import var_loss_sum
from megatron_var.objectives import ref_gap


def _units(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(n, dtype=torch.int, device=like.device)


def var_reduce(reduction: str = "sum"):
    """-sum_i w_i log pi_theta(y_i|x_i); ``batch['weights']`` [G*B] from the reference pass."""

    def reduce_fn(token_logps: torch.Tensor, batch: dict):
        seq_logps = batch["cross"].reduce(token_logps, reduction)  # [G*B]
        weights = batch["weights"].to(seq_logps.device)
        loss_sum, count = var_loss_sum(seq_logps, weights)
        report = {"loss_sum": loss_sum.detach().clone(), "units": count.clone(),
                  "policy_logp_sum": seq_logps.detach().sum()}
        if "ref_diag" in batch:  # log pi_ref(y_i|x_i) of the same pairs: see objectives/ref_gap.py
            report[ref_gap.KEY] = ref_gap.logp_gap(batch["ref_diag"], seq_logps)
        return loss_sum, count, report

    return reduce_fn


def dpo_reduce(beta: float, reduction: str = "sum"):
    """Sigmoid DPO over groups [chosen, rejected]; ``batch['ref_logps']`` [G*2] from the reference pass."""

    def reduce_fn(token_logps: torch.Tensor, batch: dict):
        seq = batch["cross"].reduce(token_logps, reduction)
        ref = batch["ref_logps"].to(seq.device)
        losses, metrics = dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=beta)
        loss_sum = losses.sum()
        n = losses.numel()
        report = {"loss_sum": loss_sum.detach().clone(), "units": _units(n, seq)}
        report.update({k: v.detach() * n for k, v in metrics.items()})  # summed; divided by units when logged
        return loss_sum, _units(n, seq), report

    return reduce_fn



def alol_reduce(clip_eps: float, positive_only: bool, reduction: str = "sum"):
    """A-LoL / R-LoL: -A_i clip(r_i) log pi_theta(y_i|x_i); ``batch['ref_logps']`` and ``batch['advantages']`` [G*B]
    from the reference pass (see objectives/alol.py)."""

    def reduce_fn(token_logps: torch.Tensor, batch: dict):
        seq = batch["cross"].reduce(token_logps, reduction)  # [G*B]
        loss_sum, count, metrics = alol_loss_sum(seq, batch["ref_logps"].to(seq.device),
                                                 batch["advantages"].to(seq.device), clip_eps, positive_only)
        report = {"loss_sum": loss_sum.detach().clone(), "units": count.clone()}
        report.update(metrics)  # sums; divided by units when logged
        return loss_sum, count, report

    return reduce_fn


def sft_reduce(token_logps: torch.Tensor, batch: dict):
    """Token-level negative log-likelihood over response tokens; unit = token."""
    loss_sum, num_tokens = sft_loss_sum(token_logps, batch["loss_mask"])
    num_tokens = torch.as_tensor(num_tokens, dtype=torch.int, device=token_logps.device)
    return loss_sum, num_tokens, {"loss_sum": loss_sum.detach().clone(), "units": num_tokens.clone()}
