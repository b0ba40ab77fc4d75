"""Reference cache (``--ref-cache``): score every group's reference quantities once, before training, and train
from the cache.

Why: the frozen reference never changes and group membership is fixed by data preparation, so each group's [B, B]
matrix log pi_ref(y_j | x_i) is the same in every epoch (with several groupings, ``prepare_data --regroup-epochs``,
the cache covers the groups of all of them). Scoring it once costs one forward-only pass over the data
(in the run's own TP/PP layout, through the same ``FrozenReference`` code as online scoring); after that a VAR
step costs about an SFT step, and the reference weights need no device memory during training.

The cache lives next to the run's checkpoints (``<save>/ref_cache.pt``) so a resumed run reuses it; its ``meta``
(data directory, split, group count, reduction, reference source) must match or the cache is rebuilt.
File layout: {"meta": dict, "group_ids": [G] long, "values": [G, B, B] float32 (cross) or [G, B] (diagonal)}.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
from tqdm import tqdm
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_var.common.atomic import atomic_torch_save
from megatron_var.runtime.parallel import holds_results
from megatron_var.reference.online import FrozenReference

logger = logging.getLogger(__name__)

CACHE_FILE = "ref_cache.pt"
FORMAT = 1
Kind = Literal["cross", "diagonal"]


def cache_meta(data_dir: str, split: str, num_groups: int, reduction: str, ref_source: dict, kind: Kind,
               groupings: int = 1) -> dict:
    """What a cache is valid for. The data directory is identified by its path and the hash of its meta.json.
    ``num_groups`` counts the groups of all ``groupings`` (``prepare_data --regroup-epochs``); ``groupings`` is
    recorded only when > 1, so a one-grouping cache's meta does not depend on the regrouping feature."""
    data_dir = Path(data_dir).resolve()
    meta_file = data_dir / "meta.json"
    digest = hashlib.sha256(meta_file.read_bytes()).hexdigest()[:16] if meta_file.is_file() else None
    root = ref_source.get("root")
    return {"format": FORMAT, "kind": kind, "data_dir": str(data_dir), "data_meta_sha256": digest, "split": split,
            "num_groups": int(num_groups), "reduction": reduction,
            "ref_root": str(Path(root).resolve()) if root else None, "ref_iteration": ref_source.get("iteration"),
            **({"groupings": int(groupings)} if groupings > 1 else {})}


def build_cache(ref: FrozenReference, dataset: Sequence, *, reduction: str = "sum", kind: Kind = "cross",
                groups_per_call: int = 8) -> dict[int, torch.Tensor]:
    """{group_id: [B, B] matrix (cross) or [B] vector (diagonal)} for every group of ``dataset``, on every rank.

    Every rank calls this. Each data-parallel replica scores a contiguous slice of the groups, ``groups_per_call``
    groups (micro-batches) per forward-only schedule call; the last pipeline stage holds the results and one
    all_gather_object gives every rank the whole cache (B² floats per group).
    """
    if kind not in ("cross", "diagonal"):
        raise ValueError(f"cache kind must be 'cross' or 'diagonal', got {kind!r}")
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = math.ceil(len(dataset) / dp)
    mine = range(dp_rank * per_rank, min(len(dataset), (dp_rank + 1) * per_rank))
    score = ref.score_cross_pairs if kind == "cross" else ref.score_diagonal
    local: dict[int, torch.Tensor] = {}
    bar = tqdm(total=len(mine), desc="reference cache", unit="group", disable=dist.get_rank() != 0)
    for start in range(mine.start, mine.stop, groups_per_call):
        groups = [dataset[k] for k in range(start, min(mine.stop, start + groups_per_call))]
        values = score([g.prompt_ids for g in groups], [g.response_ids for g in groups], reduction)
        if values is not None:
            local.update({int(g.group_id): v.float().cpu() for g, v in zip(groups, values)})
        bar.update(len(groups))
    bar.close()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local if holds_results() else {})
    cache: dict[int, torch.Tensor] = {}
    for part in gathered:
        cache.update(part)
    if len(cache) != len(dataset):
        raise ValueError(f"reference cache holds {len(cache)} groups for a dataset of {len(dataset)}: "
                         "group_ids are not unique")
    return cache


def save_cache(path: Path, cache: dict[int, torch.Tensor], meta: dict) -> None:
    """Write the cache atomically (rank 0; the others wait)."""
    if dist.get_rank() == 0:
        ids = sorted(cache)
        payload = {"meta": meta, "group_ids": torch.tensor(ids, dtype=torch.long),
                   "values": torch.stack([cache[i] for i in ids])}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(payload, path)
        logger.info("reference cache: %d groups written to %s", len(ids), path)
    dist.barrier()


def load_cache(path: Path, meta: dict) -> Optional[dict[int, torch.Tensor]]:
    """The cache at ``path`` if it exists and was built for ``meta``; else None (the caller rebuilds)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        logger.warning("reference cache %s unreadable (%s): rebuilding", path, e)
        return None
    if payload.get("meta") != meta:
        logger.warning("reference cache %s was built for %s, this run needs %s: rebuilding", path,
                       payload.get("meta"), meta)
        return None
    return {int(i): v for i, v in zip(payload["group_ids"].tolist(), payload["values"])}


def load_or_build(dirs: Sequence[Optional[str]], meta: dict, make_ref: Callable[[], FrozenReference],
                  dataset: Sequence, *, reduction: str, kind: Kind = "cross") -> dict[int, torch.Tensor]:
    """Reuse a matching cache from the first of ``dirs`` (the run's --save, then --load) that has one, or build one
    with ``make_ref()`` and save it to ``dirs[0]``. Collective: all ranks reuse, or all rebuild."""
    cache = None
    for d in dirs:
        if d and cache is None:
            cache = load_cache(Path(d) / CACHE_FILE, meta)
    if cache is not None and hasattr(dataset, "group_ids"):
        missing = set(dataset.group_ids()) - set(cache)
        if missing:  # e.g. a grouping added to the data: never train a group without its reference values
            logger.warning("reference cache lacks %d of the data's groups (e.g. group_id %d): rebuilding",
                           len(missing), min(missing))
            cache = None
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"  # NCCL reduces device tensors
    ok = torch.tensor([1 if cache is not None else 0], dtype=torch.int, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # a rank that cannot read the file makes every rank rebuild
    if ok.item():
        logger.info("reference cache: reusing %d groups", len(cache))
        return cache
    ref = make_ref()
    cache = build_cache(ref, dataset, reduction=reduction, kind=kind)
    del ref  # the reference weights are not needed again in this run
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if dirs and dirs[0]:
        save_cache(Path(dirs[0]) / CACHE_FILE, cache, meta)
    return cache
