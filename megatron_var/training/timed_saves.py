"""``--save-interval-mins``: checkpoint every M minutes of wall time, whatever an iteration costs.

Why a clock and not only ``--save-interval``: a useful save interval in iterations depends on the data size and the
step time, which a launcher cannot know (with ~1k groups and a global batch of 16, ``--save-interval 200`` never
saves before the end). Rank 0's clock decides and is broadcast, so every rank saves after the same iteration.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist


class TimedSaves:
    def __init__(self, minutes: Optional[float]):
        self.interval_s = None if minutes is None else minutes * 60.0
        self.last = time.monotonic()

    def due(self) -> bool:
        """True on every rank when rank 0's last save is ``minutes`` old. Every rank must call it."""
        if self.interval_s is None:
            return False
        flag = torch.tensor([float(time.monotonic() - self.last >= self.interval_s)],
                            device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def saved(self) -> None:
        self.last = time.monotonic()
