"""One step's loss, units and metrics summed over the whole world, from the ranks that hold them.

Why a reduction of its own: the loss reports exist only on the last pipeline stage (once per data-parallel
replica, TP rank 0 counts), objective metrics computed from the reference values are means per replica, and the
token count lives on the first stage; every rank must take part in the same all-reduce and see the same result.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_var.runtime.parallel import holds_results


def global_stats(summed: dict, extra: dict, counts: dict[str, float], per_sample_prefixes: tuple[str, ...]) -> dict:
    """Sum ``summed`` (loss_sum, units, per-sample metric sums) over the last-stage TP-rank-0 ranks of every DP
    replica, average ``extra`` (per-replica means) over those replicas, and sum ``counts`` (token counts of this
    rank's micro-batches) over the first-stage TP-rank-0 ranks. Metrics under ``per_sample_prefixes`` are turned
    from sums into means per unit."""
    holder = holds_results()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # only last-stage ranks have reports: every rank must all-reduce the same keys (and know which are means)
        summed, extra = _with_last_stage_keys(summed, extra)
    keys = sorted(set(summed) | set(extra))
    vals = [summed.get(k, 0.0) + extra.get(k, 0.0) if holder else 0.0 for k in keys]
    first_mp = parallel_state.get_tensor_model_parallel_rank() == 0 and \
        parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    count_keys = sorted(counts)
    t = torch.tensor(vals + [1.0 if holder else 0.0] + [float(counts[k]) if first_mp else 0.0 for k in count_keys],
                     dtype=torch.float64)
    dist.all_reduce(t)
    out = dict(zip(keys, t[:len(keys)].tolist()))
    n_holders = max(t[len(keys)].item(), 1.0)
    for k in extra:
        out[k] = out[k] / n_holders
    units = max(out.get("units", 1.0), 1.0)
    for k in list(out):
        if k.startswith(per_sample_prefixes):
            out[k] = out[k] / units
    out.update(zip(count_keys, t[len(keys) + 1:].tolist()))
    return out


def _with_last_stage_keys(summed: dict, extra: dict) -> tuple[dict, dict]:
    """``summed`` and ``extra`` with every key a last-stage rank reports (0.0 where this rank has none)."""
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, (sorted(summed), sorted(extra)))
    all_summed = {k for s, _ in names for k in s}
    all_extra = {k for _, e in names for k in e}
    return {k: summed.get(k, 0.0) for k in all_summed}, {k: extra.get(k, 0.0) for k in all_extra}
