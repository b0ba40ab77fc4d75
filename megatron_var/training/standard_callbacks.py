"""The callbacks every training run gets (``default_callbacks``): validation, checkpoints, stopping on signals or
time, the step-1 reference check, and fault injection when a test asks for it."""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch.distributed as dist

from megatron_var.objectives import ref_gap
from megatron_var.training.callbacks import Callback
from megatron_var.training.exit_conditions import ExitConditions
from megatron_var.training.timed_saves import TimedSaves

logger = logging.getLogger(__name__)


class PeriodicValidation(Callback):
    """Validate every ``--eval-interval`` iterations, and at the end of a run that was not stopped early."""

    def __init__(self, interval: Optional[int]):
        self.interval = interval

    def on_step_end(self, trainer, record):
        if self.interval and trainer.iteration % self.interval == 0:
            trainer.validate()

    def on_train_end(self, trainer, stop_reason):
        if self.interval and stop_reason is None and trainer.iteration % self.interval:
            trainer.validate()


class Checkpointing(Callback):
    """Save every ``--save-interval`` iterations, when ``--save-interval-mins`` have passed, and at the end."""

    def __init__(self, save: Optional[str], interval: Optional[int], interval_mins: Optional[float]):
        self.save, self.interval, self.timed = save, interval, TimedSaves(interval_mins)

    def on_step_end(self, trainer, record):
        if self.save and ((self.interval and trainer.iteration % self.interval == 0) or self.timed.due()):
            trainer.save()
            self.timed.saved()

    def on_train_end(self, trainer, stop_reason):
        if self.save and trainer.saved_iteration != trainer.iteration:
            trainer.save()


class ExitOnSignalOrTime(Callback):
    """SIGTERM / SIGUSR1, ``--exit-duration-in-mins`` and ``--exit-interval`` stop the run after the current
    iteration (the checkpoint is written by ``Checkpointing`` at the end). Signal handlers are installed when this
    is built, so a signal during set-up is not lost."""

    def __init__(self, duration_mins: Optional[float], interval: Optional[int]):
        self.exit = ExitConditions(duration_mins, interval)

    def should_stop(self, trainer):
        return self.exit.check(trainer.iteration)

    def on_train_end(self, trainer, stop_reason):
        self.exit.restore()


class ReferenceIdentityCheck(Callback):
    """At step 1 of a run whose reference is the policy's start weights, the reference's diagonal must equal the
    policy's own log-probs (``objectives/ref_gap.py``): warn loudly when it does not."""

    def on_step_end(self, trainer, record):
        fresh_start = trainer.start_iteration == 0 and trainer.iteration == 1
        if fresh_start and not trainer.cfg.reference.ref_load and dist.get_rank() == 0:
            ref_gap.check_identity(record.get(ref_gap.KEY), trainer.model[0].config.params_dtype)


class InjectNaN(Callback):
    """Fault injection for tests: a NaN loss (and NaN gradients through the whole backward) at ``iterations``."""

    ENV = "MEGATRON_VAR_INJECT_NAN_ITERS"
    """Comma-separated iterations, e.g. ``"3,4"``; read by ``from_env``."""

    def __init__(self, iterations: set[int]):
        self.iterations = iterations

    @classmethod
    def from_env(cls) -> Optional["InjectNaN"]:
        raw = os.environ.get(cls.ENV, "")
        iterations = {int(x) for x in raw.split(",") if x.strip()}
        return cls(iterations) if iterations else None

    def on_batches(self, trainer, batches, forward_only):
        if not forward_only and trainer.iteration + 1 in self.iterations:
            for b in batches:
                b["loss_mask"] = b["loss_mask"] * float("nan")


def default_callbacks(cfg) -> list[Callback]:
    """The callbacks of a run configured by ``cfg`` (a ``TrainConfig``), in dispatch order."""
    from megatron_var.training.metrics_logger import MetricsLogger

    ck, lg = cfg.checkpoint, cfg.logging
    callbacks = [InjectNaN.from_env(), MetricsLogger(), ReferenceIdentityCheck(),
                 PeriodicValidation(lg.eval_interval), ExitOnSignalOrTime(ck.exit_duration_in_mins, ck.exit_interval),
                 Checkpointing(ck.save, ck.save_interval, ck.save_interval_mins)]
    return [c for c in callbacks if c is not None]
