"""``ref_policy_logp_gap``: does the frozen reference score what the policy computes?

With the reference loaded from the policy's start weights, the diagonal of the reference's [B, B] matrix,
log π_ref(y_i|x_i), must equal the policy's own log π_θ(y_i|x_i) at step 1 — whatever the scoring method
(shared-prefix rows with a segment mask, naive rows, a cached matrix) and layout. Wrong TP shards of the reference,
a dropped shared-prefix mask (models/mask_guard.py) or another checkpoint all show up as an O(1) gap. It is computed
every step from values the step already has (no extra forward): the reference diagonal rides on each VAR
micro-batch (``batch["ref_diag"]``), the loss compares it with the policy's sequence log-probs.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

KEY = "ref_policy_logp_gap"

STEP1_BOUND = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Largest acceptable step-1 gap per parameter dtype: CPU fp32 measures ≤ 1e-6 (summation order only); GPU fp32
kernels (FlexAttention vs SDPA flash) differ by ~1e-5; bf16's 8-bit mantissa (relative rounding 2^-9 ≈ 2e-3 per
op, through every layer) allows a few percent on a sequence log-prob — a wrong mask or wrong TP shards are O(1)."""


def logp_gap(ref_diag: torch.Tensor, policy_logps: torch.Tensor) -> torch.Tensor:
    """max_i |ref_i - pol_i| / max(|ref_i|, |pol_i|), in float64 (0 when both are 0); [] tensor."""
    ref, pol = ref_diag.detach().double().reshape(-1), policy_logps.detach().double().reshape(-1).to(ref_diag.device)
    if ref.shape != pol.shape:
        raise ValueError(f"reference diagonal {tuple(ref.shape)} and policy log-probs {tuple(pol.shape)} differ")
    scale = torch.maximum(ref.abs(), pol.abs()).clamp_min(torch.finfo(torch.float64).tiny)
    return ((ref - pol).abs() / scale).max()


def pop_global_gap(reports: Iterable[dict]) -> Optional[float]:
    """Remove ``KEY`` from this rank's loss reports and return its max over the whole world (a collective: every
    rank calls it once per step); None when no rank had one."""
    local = [float(r.pop(KEY)) for r in reports if KEY in r]
    t = torch.tensor(max(local) if local else float("-inf"), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    value = t.item()
    return None if value == float("-inf") else value


def check_identity(gap: Optional[float], dtype: torch.dtype) -> bool:
    """At the first step of a run whose reference is the policy's start weights: warn loudly when the gap exceeds
    the dtype's bound; True when it is within it (or unknown)."""
    bound = STEP1_BOUND.get(dtype, 5e-2)
    if gap is None or gap <= bound:
        return True
    logger.warning("!" * 100 + "\n%s = %.3g at step 1 exceeds %.0e (%s): the frozen reference does NOT score what "
                   "the policy computes from the same weights — VAR weights are wrong (check the attention mask / "
                   "layout / checkpoint of the reference)\n" + "!" * 100, KEY, gap, bound, dtype)
    return False
