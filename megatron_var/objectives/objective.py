"""What the trainer needs from an objective, in one interface: which reference values it reads, how they become
per-sample tensors on the policy's micro-batches, and how the policy's token log-probs become a loss.

Why an interface: the trainer's step is the same for every objective (reference values -> attach -> megatron
schedule -> optimizer step); only these three answers differ. A new objective is a subclass registered in
``OBJECTIVES``, with no branch in the trainer. The math stays in the pure modules (var.py, dpo.py, alol.py, sft.py).

Reference values arrive per group and only where the loss runs (the last pipeline stage; ``None`` elsewhere):
a [B, B] matrix log pi_ref(y_j | x_i) for ``reference_kind == "cross"``, a [B] vector log pi_ref(y_i | x_i) for
``"diagonal"``.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from megatron_var.batching.steps import rewards_tensor
from megatron_var.objectives.alol import alol_advantages
from megatron_var.objectives.reducers import alol_reduce, dpo_reduce, sft_reduce, var_reduce
from megatron_var.objectives.var import var_metrics, var_weights


class Objective:
    """Base: no reference, nothing attached (SFT)."""

    name: ClassVar[str] = "sft"
    reference_kind: ClassVar[Optional[str]] = None
    """"cross", "diagonal" or None (no reference)."""
    needs_rewards: ClassVar[bool] = False
    metric_prefixes: ClassVar[tuple[str, ...]] = ()
    """Metrics of this objective shown in the log line and kept for validation."""
    per_sample_prefixes: ClassVar[tuple[str, ...]] = ()
    """Metrics reported as sums over samples (divided by the global unit count when logged)."""

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        """The objective with the hyper-parameters of ``cfg`` (a ``training.config.ObjectiveConfig``)."""
        return cls()

    def reduce_fn(self):
        """``reduce_fn(token_logps [b, s], batch) -> (loss_sum, units, report)`` for ``make_forward_step``."""
        return sft_reduce

    def attach(self, batches: list[dict], micro_groups: list[list], ref_values: Optional[list[torch.Tensor]]
               ) -> dict[str, float]:
        """Put what the loss reads on each micro-batch (``batches[k]`` holds ``micro_groups[k]``); return step
        metrics that are means over this rank's groups. ``ref_values`` is None off the last pipeline stage."""
        return {}


class VarObjective(Objective):
    """VAR: w_i = softmax_j(log pi_ref(y_j|x_i) + r_ij / λ)[i]; loss -sum_i w_i log pi_θ(y_i|x_i)."""

    name = "var"
    reference_kind = "cross"
    needs_rewards = True
    metric_prefixes = ("var/",)

    def __init__(self, var_lambda: float, reduction: str = "sum"):
        self.var_lambda, self.reduction = var_lambda, reduction

    @classmethod
    def from_config(cls, cfg) -> "VarObjective":
        return cls(cfg.var_lambda, cfg.logp_reduction)

    def reduce_fn(self):
        return var_reduce(self.reduction)

    def attach(self, batches, micro_groups, ref_values):
        if ref_values is None:
            return {}
        ref_bb = torch.stack(ref_values)  # [G, B, B]
        rewards = rewards_tensor([g for mg in micro_groups for g in mg])
        weights = var_weights(ref_bb, rewards, self.var_lambda)  # [G, B]
        sizes = [len(mg) for mg in micro_groups]
        diagonal = torch.diagonal(ref_bb, dim1=1, dim2=2)
        for batch, w, d in zip(batches, weights.split(sizes), diagonal.split(sizes)):
            # ref_diag: log pi_ref(y_i|x_i) of the policy's own pairs, for the step-1 check (ref_gap.py)
            batch["weights"], batch["ref_diag"] = w.reshape(-1), d.reshape(-1)
        return var_metrics(ref_bb, rewards, self.var_lambda, weights)


class DpoObjective(Objective):
    """Sigmoid DPO over groups [chosen, rejected] against the reference's diagonal log-probs."""

    name = "dpo"
    reference_kind = "diagonal"
    metric_prefixes = ("rewards/",)
    per_sample_prefixes = ("rewards/", "logps/")

    def __init__(self, beta: float, reduction: str = "sum"):
        self.beta, self.reduction = beta, reduction

    @classmethod
    def from_config(cls, cfg) -> "DpoObjective":
        return cls(cfg.dpo_beta, cfg.logp_reduction)

    def reduce_fn(self):
        return dpo_reduce(self.beta, self.reduction)

    def attach(self, batches, micro_groups, ref_values):
        if ref_values is not None:
            sizes = [len(mg) for mg in micro_groups]
            for batch, v in zip(batches, torch.stack(ref_values).split(sizes)):
                batch["ref_logps"] = v.reshape(-1)
        return {}


class AlolObjective(Objective):
    """A-LoL / R-LoL (Baheti et al.): -A_i clip(pi_θ/pi_ref) log pi_θ(y_i|x_i), see alol.py."""

    name = "alol"
    reference_kind = "diagonal"
    needs_rewards = True
    metric_prefixes = ("alol/",)
    per_sample_prefixes = ("alol/",)

    def __init__(self, clip: float, variant: str = "alol", reduction: str = "sum"):
        self.clip, self.variant, self.reduction = clip, variant, reduction

    @classmethod
    def from_config(cls, cfg) -> "AlolObjective":
        return cls(cfg.alol_clip, cfg.alol_variant, cfg.logp_reduction)

    def reduce_fn(self):
        return alol_reduce(self.clip, self.variant == "alol", self.reduction)

    def attach(self, batches, micro_groups, ref_values):
        if ref_values is None:
            return {}
        sizes = [len(mg) for mg in micro_groups]
        advantages = alol_advantages(rewards_tensor([g for mg in micro_groups for g in mg]), self.variant)
        for batch, v, a in zip(batches, torch.stack(ref_values).split(sizes), advantages.split(sizes)):
            batch["ref_logps"], batch["advantages"] = v.reshape(-1), a.reshape(-1)
        return {}


OBJECTIVES: dict[str, type[Objective]] = {"sft": Objective, "var": VarObjective, "dpo": DpoObjective,
                                          "alol": AlolObjective}


def build_objective(cfg) -> Objective:
    """The objective named by ``cfg.name`` (``cfg``: a ``training.config.ObjectiveConfig``)."""
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {cfg.name!r}")
    return OBJECTIVES[cfg.name].from_config(cfg)
