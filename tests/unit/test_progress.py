"""Run length, LR schedule position and data order are all functions of consumed groups (training/progress.py,
batching/steps.py), so a resume may change --global-batch-size, --train-iters, --train-samples or --epochs; and
the LR schedule follows Megatron-LM's (--lr-warmup-iters / --lr-warmup-fraction, --lr-decay-iters), checked
against hand-computed values."""

import math

import pytest
import torch

from megatron_var.batching.steps import global_order, step_groups, step_start
from megatron_var.training.config import DataConfig, OptimizerConfig
from megatron_var.training.progress import build_scheduler, plan_run


class _Opt:
    """What OptimizerParamScheduler touches: param_groups with lr / weight_decay."""

    def __init__(self):
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]


def _optim(warmup=1, **kw) -> OptimizerConfig:
    return OptimizerConfig(lr=1.0, min_lr=0.1, weight_decay=0.0, lr_warmup_iters=warmup, **kw)


def _data(gbs, train_iters=None, epochs=None, train_samples=None) -> DataConfig:
    return DataConfig(data_path="unused", global_batch_size=gbs, train_iters=train_iters, epochs=epochs,
                      train_samples=train_samples)


def _lrs(plan, consumed, steps, gbs, optim=None):
    opt = _Opt()
    sched = build_scheduler(opt, plan, consumed, optim or _optim())
    out = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        sched.step(increment=gbs)
        out.append(opt.param_groups[0]["lr"])
    return out


def _plan(iteration, consumed, gbs, train_iters=None, epochs=None, train_samples=None, n=10, warmup=1,
          warmup_groups=None, **optim):
    return plan_run(iteration=iteration, consumed=consumed, num_groups=n,
                    data=_data(gbs, train_iters, epochs, train_samples), optimizer=_optim(warmup, **optim),
                    warmup_groups=warmup_groups)


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
    plan = _plan(2, 4, 4, train_iters=3, warmup_groups=2)
    assert (plan.end_iteration, plan.total_groups, plan.warmup_groups) == (3, 8, 2)
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


# ---- Megatron-LM's schedule options, LR values computed by hand (lr 1.0, min-lr 0.1) -------------------------------
@pytest.mark.parametrize("style,expected", [
    # warmup 1 iteration = 2 groups; decay from 2 to --lr-decay-iters 4 x 2 = 8 groups; min-lr held after
    # linear: 1 - (p - 2) / 6 -> p = 4: 0.1 + 0.9 * 2/3 = 0.7, p = 6: 0.1 + 0.9 * 1/3 = 0.4
    ("linear", [0.0, 1.0, 0.7, 0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]),
    # cosine: (1 + cos(pi (p - 2) / 6)) / 2 -> p = 4: 0.1 + 0.9 * 0.75 = 0.775, p = 6: 0.1 + 0.9 * 0.25 = 0.325
    ("cosine", [0.0, 1.0, 0.775, 0.325, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]),
])
def test_lr_decay_iters_decays_early_then_holds_min_lr(style, expected):
    plan = _plan(0, 0, 2, train_iters=10, n=100, lr_decay_iters=4, lr_decay_style=style)
    assert (plan.end_iteration, plan.total_groups, plan.warmup_groups, plan.decay_groups) == (10, 20, 2, 8)
    assert _lrs(plan, 0, 10, 2, _optim(lr_decay_iters=4, lr_decay_style=style)) == pytest.approx(expected, abs=1e-12)


def test_lr_warmup_fraction_is_a_fraction_of_the_run():
    """--lr-warmup-fraction 0.25 of a 5 x 4 = 20-group run: warmup over 5 groups (p = 4: 4/5), then linear decay
    over the remaining 15: p = 8: 0.1 + 0.9 * 12/15 = 0.82, p = 12: 0.1 + 0.9 * 8/15 = 0.58, p = 16: 0.34."""
    optim = dict(warmup=0, lr_warmup_fraction=0.25, lr_decay_style="linear")
    plan = _plan(0, 0, 4, train_iters=5, n=100, **optim)
    assert (plan.warmup_groups, plan.decay_groups) == (5.0, 20)
    lrs = _lrs(plan, 0, 5, 4, _optim(0, lr_warmup_fraction=0.25, lr_decay_style="linear"))
    assert lrs == pytest.approx([0.0, 0.8, 0.82, 0.58, 0.34, 0.1], abs=1e-12)


def test_lr_warmup_fraction_of_lr_decay_iters_as_megatron_lm():
    """Megatron-LM: warmup = fraction x the decay length, which --lr-decay-iters sets: 0.25 x 3 x 4 = 3 groups;
    p = 4: 0.1 + 0.9 * (1 - 1/9) = 0.9, p = 8: 0.1 + 0.9 * 4/9 = 0.5, min-lr from 12 groups on."""
    kw = dict(warmup=0, lr_warmup_fraction=0.25, lr_decay_iters=3, lr_decay_style="linear")
    plan = _plan(0, 0, 4, train_iters=5, n=100, **kw)
    assert (plan.warmup_groups, plan.decay_groups) == (3.0, 12)
    lrs = _lrs(plan, 0, 5, 4, _optim(0, lr_warmup_fraction=0.25, lr_decay_iters=3, lr_decay_style="linear"))
    assert lrs == pytest.approx([0.0, 0.9, 0.5, 0.1, 0.1, 0.1], abs=1e-12)


def test_lr_warmup_fraction_is_fixed_when_the_run_starts():
    """A resumed, longer run keeps the 5-group warmup it started with (not 0.25 of its new 40 groups)."""
    plan = _plan(2, 8, 4, train_iters=10, n=100, warmup=0, lr_warmup_fraction=0.25, warmup_groups=5.0)
    assert (plan.end_iteration, plan.total_groups, plan.warmup_groups, plan.decay_groups) == (10, 40, 5.0, 40)


def test_warmup_must_end_before_lr_decay_iters():
    with pytest.raises(ValueError, match=r"must end before --lr-decay-iters 2 x --global-batch-size 2 = 4 groups"):
        _plan(0, 0, 2, train_iters=10, n=100, warmup=2, lr_decay_iters=2)


def test_train_samples_counts_groups_of_the_stream():
    # 12 groups, batches of 4: no epoch tail, so Megatron-LM's train_samples // global_batch_size iterations
    plan = _plan(0, 0, 4, train_samples=20, n=12)
    assert (plan.end_iteration, plan.total_groups, plan.decay_groups) == (5, 20, 20)
    assert _plan(0, 0, 4, train_samples=23, n=12).end_iteration == 5  # no step ends past --train-samples
    # 10 groups: epoch 0 ends with a skipped tail of 2 (positions 8, 9), which counts as consumed: steps end at
    # 4, 8, 14, 18; the next would end at 24
    plan = _plan(0, 0, 4, train_samples=20, n=10)
    assert (plan.end_iteration, plan.total_groups) == (4, 18)
    # resumed at 8 groups with batches of 2: the run still ends at group 20
    plan = _plan(2, 8, 2, train_samples=20, n=12)
    assert (plan.end_iteration, plan.total_groups) == (8, 20)
    lrs = _lrs(_plan(0, 0, 4, train_samples=20, n=12), 0, 5, 4)
    assert lrs[-1] == pytest.approx(0.1) and lrs[-2] > 0.1 + 1e-3  # the schedule decays over exactly those groups


def test_train_samples_below_one_global_batch_is_refused():
    with pytest.raises(ValueError, match="--train-samples 3 is less than one --global-batch-size"):
        _data(4, train_samples=3)
