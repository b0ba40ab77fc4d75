"""Run length, LR schedule position and data order are all functions of consumed groups (training/progress.py,
training/batches.py), so a resume may change --global-batch-size, --train-iters or --epochs."""

import math

import pytest
import torch

from megatron_var.batching.steps import global_order, step_groups, step_start
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
    (the checkpoint's own 2-iteration schedule must not win: the run would stay at min-lr)."""
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
    plan = _plan(0, 0, 4, epochs=2, n=10)  # 2 steps per epoch; each epoch's last 2 groups are skipped
    assert (plan.end_iteration, plan.total_groups) == (4, 18)
    plan = _plan(0, 0, 4, epochs=0.5, n=10)  # a fraction covers at least that part of an epoch
    assert (plan.end_iteration, plan.total_groups) == (2, 8)
    plan = _plan(0, 0, 4, train_iters=3, n=10)  # the third step starts epoch 1 after the skipped tail
    assert (plan.end_iteration, plan.total_groups) == (3, 14)
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
    replayed or skipped, split contiguously over DP ranks, except an epoch's tail shorter than the next step's
    batch (skipped, so that no step spans two epochs)."""
    n, seed, consumed, seen = 7, 3, 0, []
    for gbs in (2, 2, 4, 6):
        start = step_start(consumed, gbs, n)
        step = []
        for rank in range(dp):
            step += step_groups(n, seed, consumed, gbs, rank, dp)
        seen += step
        consumed = start + gbs
    # positions 0-3 of epoch 0, its tail 4-6 skipped (4 > 3 left), 0-3 of epoch 1, tail skipped again, 0-5 of epoch 2
    expected = [int(global_order(n, seed, e)[k]) for e, ks in ((0, range(4)), (1, range(4)), (2, range(6)))
                for k in ks]
    assert seen == expected
    assert consumed == 2 * n + 6


def test_a_global_batch_larger_than_an_epoch_is_refused():
    with pytest.raises(ValueError, match="--global-batch-size 8 is larger than the 7 training groups of one epoch"):
        _plan(0, 0, 8, epochs=1, n=7)


def test_weight_decay_and_lr_are_finite_for_a_run_with_nothing_left():
    """Resuming a finished run (nothing left to train) still builds a valid scheduler."""
    plan = _plan(4, 8, 2, train_iters=4)
    assert plan.end_iteration == 4
    lrs = _lrs(plan, 8, 0, 2)
    assert all(math.isfinite(x) for x in lrs) and torch.tensor(lrs).min() >= 0.1 - 1e-12
