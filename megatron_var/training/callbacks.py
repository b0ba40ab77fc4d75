"""The Trainer's hooks: everything around the step (metrics, validation, checkpoints, stopping, fault injection)
is a ``Callback`` instead of a branch in the loop, so the loop reads as the step and a run's extras are a list."""

from __future__ import annotations


class Callback:
    """A hook the Trainer calls at fixed points of the run; every method is optional (no-op here)."""

    def on_train_start(self, trainer) -> None:
        """After the Trainer is built, before the first step."""

    def on_batches(self, trainer, batches: list, forward_only: bool) -> None:
        """Before the schedule runs on this rank's micro-batches (which may be changed in place)."""

    def on_step_end(self, trainer, record: dict) -> None:
        """Every rank, after each optimizer step; ``record`` holds the step's global values."""

    def on_validation_end(self, trainer, record: dict) -> None:
        """Every rank, after a validation pass."""

    def should_stop(self, trainer) -> "str | None":
        """A reason to stop after this iteration (with a checkpoint), or None."""
        return None

    def on_train_end(self, trainer, stop_reason: "str | None") -> None:
        """After the last step; called in reverse list order (teardown)."""
