"""How long a run is and where its LR schedule stands, both counted in consumed groups.

Why groups, not iterations: a resumed run may change ``--global-batch-size`` or extend ``--train-iters`` /
``--train-samples`` / ``--epochs``. The data order (``batching.steps.step_groups``) is a function of the groups consumed so
far, and so is the position in the LR schedule (as Megatron-LM's sample-based schedule: ``lr_decay_steps`` in
samples, one ``step(increment=global_batch_size)`` per iteration). The schedule's length is always recomputed from
the flags of the current run, never taken from the checkpoint: a longer resumed run then decays over its new length
instead of staying at ``--min-lr``. The warmup is fixed in groups when a run starts (``--lr-warmup-iters`` x its
batch size, or ``--lr-warmup-fraction`` x the decay length) and kept on resume, so a changed batch size or run
length does not move a warmup that already happened.

LR schedule (Megatron-LM's ``get_optimizer_param_scheduler``): linear warmup from 0 over ``warmup_groups``, then
``--lr-decay-style`` from ``--lr`` to ``--min-lr`` until ``decay_groups`` (the whole run, or ``--lr-decay-iters`` x
``--global-batch-size``), then ``--min-lr`` held. ``--lr-warmup-fraction`` is a fraction of the decay length, as
in Megatron-LM (= of the run when ``--lr-decay-iters`` is not given).

Consumed groups are a position in the stream of epochs: an epoch tail shorter than a global batch is skipped
(``batching.steps.step_start``), and the schedule advances over it too, so a resumed run positioned at ``consumed`` is
where the uninterrupted run was. ``--train-samples`` is a position in the same stream (the run stops before a step
that would end past it); with no skipped tails it is Megatron-LM's ``train_samples // global_batch_size``
iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_var.batching.steps import check_batch_fits, step_start
from megatron_var.training.config import DataConfig, OptimizerConfig


@dataclass(frozen=True)
class RunPlan:
    end_iteration: int
    """The run stops after this iteration (``--train-iters``, or the last iteration of ``--train-samples`` /
    ``--epochs``)."""
    total_groups: int
    """Groups consumed at ``end_iteration``."""
    warmup_groups: float
    """Linear LR warmup over this many groups (fixed when the run starts; a fraction of the decay length with
    ``--lr-warmup-fraction``, so not always whole)."""
    decay_groups: int
    """The LR reaches ``--min-lr`` here and stays there: ``total_groups``, or ``--lr-decay-iters`` x
    ``--global-batch-size``."""


def plan_run(*, iteration: int, consumed: int, num_groups: int, data: DataConfig, optimizer: OptimizerConfig,
             warmup_groups: Optional[float] = None) -> RunPlan:
    """The plan of a run that is at ``iteration`` having consumed ``consumed`` groups (0, 0 for a fresh run).

    ``--train-iters`` counts iterations (Megatron-LM's meaning); ``--epochs`` counts passes over the data, so the
    remaining iterations are those that cover the groups still to train on at the current batch size;
    ``--train-samples`` is a position in the stream of groups (module docstring).
    ``warmup_groups``: the warmup of the run being resumed (None: a fresh run, from ``--lr-warmup-iters`` or
    ``--lr-warmup-fraction``).
    """
    gbs = data.global_batch_size
    check_batch_fits(num_groups, gbs)
    if data.train_iters is not None:
        remaining, total = walk(consumed, gbs, num_groups, max_steps=max(0, data.train_iters - iteration))
    elif data.train_samples is not None:
        remaining, total = walk(consumed, gbs, num_groups, end_limit=data.train_samples)
    else:
        remaining, total = walk(consumed, gbs, num_groups, limit=data.epochs * num_groups)
        if iteration == 0 and remaining == 0:
            remaining, total = walk(consumed, gbs, num_groups, max_steps=1)
    decay = optimizer.lr_decay_iters * gbs if optimizer.lr_decay_iters is not None else total
    if warmup_groups is not None:
        warmup = warmup_groups
    elif optimizer.lr_warmup_fraction is not None:
        warmup = optimizer.lr_warmup_fraction * decay
    else:
        warmup = optimizer.lr_warmup_iters * gbs
    if remaining and warmup >= max(decay, 1):
        if optimizer.lr_decay_iters is not None:
            raise ValueError(f"the LR warmup ({warmup:g} groups) must end before --lr-decay-iters "
                             f"{optimizer.lr_decay_iters} x --global-batch-size {gbs} = {decay} groups")
        if warmup_groups is None:
            raise ValueError(f"--lr-warmup-iters {optimizer.lr_warmup_iters} must be below the "
                             f"{iteration + remaining} training iterations")
        raise ValueError(f"the resumed run's LR warmup ({warmup:g} groups) must end before the run does "
                         f"({decay} groups)")
    return RunPlan(end_iteration=iteration + remaining, total_groups=total, warmup_groups=warmup,
                   decay_groups=decay)


def walk(consumed: int, global_batch_size: int, num_groups: int, *, max_steps: Optional[int] = None,
         limit: Optional[float] = None, end_limit: Optional[int] = None) -> tuple[int, int]:
    """(steps, position after them) from ``consumed``: at most ``max_steps`` steps, only steps starting before
    ``limit`` groups (so ``--epochs 0.5`` covers at least half an epoch, as before), and only steps ending at or
    before ``end_limit`` (``--train-samples``). Epoch by epoch, not step by step, so long runs cost nothing to
    plan."""
    steps, pos = 0, consumed
    while True:
        start = step_start(pos, global_batch_size, num_groups)
        n = (num_groups - start % num_groups) // global_batch_size  # steps left in this epoch
        if max_steps is not None:
            n = min(n, max_steps - steps)
        if limit is not None:
            n = min(n, max(0, math.ceil((limit - start) / global_batch_size)))
        if end_limit is not None:
            n = min(n, max(0, (end_limit - start) // global_batch_size))
        if n <= 0:
            return steps, pos
        steps, pos = steps + n, start + n * global_batch_size


def build_scheduler(optimizer, plan: RunPlan, consumed: int, cfg: OptimizerConfig) -> OptimizerParamScheduler:
    """megatron's LR/WD scheduler for ``plan`` (warmup, decay to ``plan.decay_groups``, then ``--min-lr``),
    positioned at ``consumed`` groups."""
    decay = max(plan.decay_groups, math.floor(plan.warmup_groups) + 1)  # a resume with nothing left: still valid
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=plan.warmup_groups,
        lr_decay_steps=decay, lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=max(plan.total_groups, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    if consumed:
        scheduler.step(increment=consumed)
    return scheduler
