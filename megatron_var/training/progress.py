"""How long a run is and where its LR schedule stands, both counted in consumed groups.

Why groups, not iterations: a resumed run may change ``--global-batch-size`` or extend ``--train-iters`` /
``--epochs``. The data order (``batches.step_groups``) is a function of the groups consumed so far, and so is the
position in the LR schedule (as Megatron-LM's sample-based schedule: ``lr_decay_steps`` in samples, one
``step(increment=global_batch_size)`` per iteration). The schedule's length is always recomputed from the flags of
the current run, never taken from the checkpoint: a longer resumed run then decays over its new length instead of
staying at ``--min-lr``. The warmup is fixed in groups when a run starts (``--lr-warmup-iters`` x its batch size) and
kept on resume, so a changed batch size does not move a warmup that already happened.

Consumed groups are a position in the stream of epochs: an epoch tail shorter than a global batch is skipped
(``batches.step_start``), and the schedule advances over it too, so a resumed run positioned at ``consumed`` is
where the uninterrupted run was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_var.batching.steps import check_batch_fits, step_start


@dataclass(frozen=True)
class RunPlan:
    end_iteration: int
    """The run stops after this iteration (``--train-iters``, or the last iteration of ``--epochs``)."""
    total_groups: int
    """Groups consumed at ``end_iteration``: the LR schedule decays over these."""
    warmup_groups: int


def plan_run(*, iteration: int, consumed: int, global_batch_size: int, num_groups: int,
             train_iters: Optional[int], epochs: Optional[float], lr_warmup_iters: int,
             warmup_groups: Optional[int] = None) -> RunPlan:
    """The plan of a run that is at ``iteration`` having consumed ``consumed`` groups (0, 0 for a fresh run).

    ``--train-iters`` counts iterations (Megatron-LM's meaning); ``--epochs`` counts passes over the data, so the
    remaining iterations are those that cover the groups still to train on at the current batch size.
    ``warmup_groups``: the warmup of the run being resumed (None: a fresh run, from ``lr_warmup_iters``).
    """
    check_batch_fits(num_groups, global_batch_size)
    if train_iters is not None:
        remaining, total = walk(consumed, global_batch_size, num_groups, max_steps=max(0, train_iters - iteration))
    else:
        remaining, total = walk(consumed, global_batch_size, num_groups, limit=epochs * num_groups)
        if iteration == 0 and remaining == 0:
            remaining, total = walk(consumed, global_batch_size, num_groups, max_steps=1)
    warmup = lr_warmup_iters * global_batch_size if warmup_groups is None else warmup_groups
    if warmup >= max(total, 1) and remaining:
        raise ValueError(f"--lr-warmup-iters {lr_warmup_iters} must be below the {iteration + remaining} training "
                         "iterations")
    return RunPlan(end_iteration=iteration + remaining, total_groups=total, warmup_groups=warmup)


def walk(consumed: int, global_batch_size: int, num_groups: int, *, max_steps: Optional[int] = None,
         limit: Optional[float] = None) -> tuple[int, int]:
    """(steps, position after them) from ``consumed``: at most ``max_steps`` steps, and only steps starting before
    ``limit`` groups (so ``--epochs 0.5`` covers at least half an epoch, as before). Epoch by epoch, not step by
    step, so long runs cost nothing to plan."""
    steps, pos = 0, consumed
    while True:
        start = step_start(pos, global_batch_size, num_groups)
        n = (num_groups - start % num_groups) // global_batch_size  # steps left in this epoch
        if max_steps is not None:
            n = min(n, max_steps - steps)
        if limit is not None:
            n = min(n, max(0, math.ceil((limit - start) / global_batch_size)))
        if n <= 0:
            return steps, pos
        steps, pos = steps + n, start + n * global_batch_size


def build_scheduler(optimizer, plan: RunPlan, consumed: int, *, lr: float, min_lr: float, weight_decay: float,
                    decay_style: str) -> OptimizerParamScheduler:
    """megatron's LR/WD scheduler over ``plan.total_groups`` groups, positioned at ``consumed`` groups."""
    total = max(plan.total_groups, plan.warmup_groups + 1)  # a resume with nothing left still needs a valid one
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=lr, min_lr=min_lr, lr_warmup_steps=plan.warmup_groups,
        lr_decay_steps=total, lr_decay_style=decay_style, start_wd=weight_decay, end_wd=weight_decay,
        wd_incr_steps=total, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    if consumed:
        scheduler.step(increment=consumed)
    return scheduler
