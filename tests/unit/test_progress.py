"""Run length, LR schedule position and data order are all functions of consumed groups (training/progress.py,
training/batches.py), so a resume may change --global-batch-size, --train-iters or --epochs."""

import math

import pytest
import torch

from megatron_var.training.batches import global_order, step_groups
from megatron_var.training.progress import build_scheduler, plan_run


class _Opt:
    """What OptimizerParamScheduler touches: param_groups with lr / weight_decay."""

    def __init__(self):
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]


def _lrs(plan, consumed, steps, gbs):
    opt = _Opt()
    sched = build_scheduler(opt, plan, consumed, lr=1.0, min_lr=0.1, weight_decay=0.0, decay_style="cosine")
    out = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        sched.step(increment=gbs)
        out.append(opt.param_groups[0]["lr"])
    return out


def _plan(iteration, consumed, gbs, train_iters=None, epochs=None, n=10, warmup=1):
    return plan_run(iteration=iteration, consumed=consumed, global_batch_size=gbs, num_groups=n,
                    train_iters=train_iters, epochs=epochs, lr_warmup_iters=warmup)


def test_longer_resumed_run_decays_over_its_new_length():
    """A run of 2 iterations resumed with --train-iters 4 continues exactly as an uninterrupted 4-iteration run
    (the old bug: the saved 2-iteration schedule overrode it and the run stayed at min-lr)."""
    full = _lrs(_plan(0, 0, 2, train_iters=4), 0, 4, 2)
    resumed = _lrs(_plan(2, 4, 2, train_iters=4), 4, 2, 2)
    assert resumed == pytest.approx(full[2:], abs=0)
    assert resumed[0] > 0.1 + 1e-3  # not at min-lr
    assert full[-1] == pytest.approx(0.1)


def test_changed_global_batch_size_keeps_the_schedule_in_groups():
    """Saved after 2 iterations of 2 groups, resumed with 4 groups per iteration and --train-iters 3: the schedule
    ends after the same 8 groups as the uninterrupted run and passes the same positions."""
    full = _lrs(_plan(0, 0, 2, train_iters=4), 0, 4, 2)  # positions 0, 2, 4, 6, 8 groups
    plan = plan_run(iteration=2, consumed=4, global_batch_size=4, num_groups=10, train_iters=3, epochs=None,
                    lr_warmup_iters=1, warmup_groups=2)
    assert (plan.end_iteration, plan.total_groups) == (3, 8)
    resumed = _lrs(plan, 4, 1, 4)  # positions 4, 8
    assert resumed == pytest.approx([full[2], full[4]], abs=0)


def test_epochs_count_the_groups_left():
    plan = _plan(0, 0, 4, epochs=2, n=10)
    assert (plan.end_iteration, plan.total_groups) == (5, 20)
    plan = _plan(3, 12, 2, epochs=2, n=10)  # 8 groups left at 2 per iteration
    assert (plan.end_iteration, plan.total_groups) == (7, 20)
    plan = _plan(5, 20, 2, epochs=3, n=10)  # one more epoch on resume
    assert (plan.end_iteration, plan.total_groups) == (10, 30)


def test_warmup_must_fit_the_run():
    with pytest.raises(ValueError, match="--lr-warmup-iters 4 must be below the 4 training iterations"):
        _plan(0, 0, 2, train_iters=4, warmup=4)


@pytest.mark.parametrize("dp", [1, 2])
def test_changed_global_batch_size_continues_the_global_order(dp):
    """Consumed-groups bookkeeping: batch sizes 2, 2, 4, 6 (over epochs) read the global order without a group
    replayed or skipped, split contiguously over DP ranks."""
    n, seed, consumed, seen = 7, 3, 0, []
    for gbs in (2, 2, 4, 6):
        step = []
        for rank in range(dp):
            step += step_groups(n, seed, consumed, gbs, rank, dp)
        seen += step
        consumed += gbs
    expected = [int(global_order(n, seed, k // n)[k % n]) for k in range(consumed)]
    assert seen == expected
    assert sorted(seen[:n]) == list(range(n))  # the first epoch is a permutation


def test_weight_decay_and_lr_are_finite_for_a_run_with_nothing_left():
    """Resuming a finished run (nothing left to train) still builds a valid scheduler."""
    plan = _plan(4, 8, 2, train_iters=4)
    assert plan.end_iteration == 4
    lrs = _lrs(plan, 8, 0, 2)
    assert all(math.isfinite(x) for x in lrs) and torch.tensor(lrs).min() >= 0.1 - 1e-12
