"""When a run stops before its last iteration: SIGTERM/SIGUSR1, ``--exit-duration-in-mins``, ``--exit-interval``.

Why all ranks vote after every iteration: SLURM signals every task, but the signals (and the wall clock) reach the
ranks at different iterations; a rank that stopped alone would leave the others waiting in a collective. After each
iteration the ranks all-reduce their flags (MAX), so all of them stop after the same iteration, save it, and exit 0.
A signal only sets a flag: the iteration and a checkpoint save in progress are never interrupted.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Optional

import psutil
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitConditions:
    def __init__(self, duration_mins: Optional[float] = None, interval: Optional[int] = None):
        self.duration_s = None if duration_mins is None else duration_mins * 60.0
        self.interval = interval
        # the job's time includes start-up (imports, rendezvous, checkpoint loading): count from process start
        self.start = psutil.Process().create_time()
        self.received: Optional[int] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for sig in EXIT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.received is None:
            logger.warning("received %s: stopping after this iteration (checkpoint, then exit 0)",
                           signal.Signals(signum).name)
        self.received = signum

    def check(self, iteration: int) -> Optional[str]:
        """Why to stop after ``iteration`` (the same answer on every rank), or None. Every rank must call it."""
        flags = torch.tensor([
            float(self.received or 0),
            float(self.duration_s is not None and time.time() - self.start > self.duration_s),
        ], device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        sig, late = int(flags[0].item()), flags[1].item() > 0
        if sig:
            return f"{signal.Signals(sig).name} received"
        if late:
            return f"--exit-duration-in-mins {self.duration_s / 60.0:g} reached"
        if self.interval and iteration % self.interval == 0:
            return f"--exit-interval {self.interval} reached"
        return None

    def restore(self) -> None:
        """Give the signals back to the handlers that were installed before (tests build several trainers)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
