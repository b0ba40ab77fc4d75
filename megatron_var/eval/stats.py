"""Statistics shared by the evaluations (kept free of torch so the judge tools start fast)."""

from __future__ import annotations

import math

import numpy as np


def mean_se(per_seed: list[float]) -> tuple[float, float | None]:
    """Mean of the per-seed means and its standard error std(ddof=1)/sqrt(n); SE is None for one seed."""
    x = np.asarray(per_seed, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return float(x.mean()), se
