class Callback:
    """A hook the Trainer calls at fixed points of the run; every method is optional (no-op here)."""
    def on_train_start(self, trainer) -> None: ...
    def on_batches(self, trainer, batches: list, forward_only: bool) -> None: ...   # before the schedule runs
    def on_step_end(self, trainer, record: dict) -> None: ...        # every rank, after each optimizer step
    def on_validation_end(self, trainer, record: dict) -> None: ...  # every rank
    def should_stop(self, trainer) -> "str | None": return None      # a reason to stop after this iteration
    def on_train_end(self, trainer, stop_reason: "str | None") -> None: ...
