"""Whether ``--save D`` may be written to: never silently into another run.

A new run (``--finetune``, ``--model-arch``, or ``--load`` of another directory) into a directory that already holds
a run would truncate that run's metrics.jsonl, overwrite some of its iterations and leave others stale. It is
refused unless it is the resume of that run (``--load D`` without ``--finetune``) or ``--overwrite`` is given; then
the old run's files (and only files megatron_var writes) are deleted first, so no stale iteration survives.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_var.checkpoint.layout import ARCH_FILE, HF_SUBDIR, TRACKER

logger = logging.getLogger(__name__)

_RUN_FILES = (TRACKER, "metrics.jsonl", "valid_metrics.jsonl", ARCH_FILE, "ref_cache.pt")
# names the run writes through common.atomic (leftovers of a crash mid-write: "<name>.tmp-<pid>-<random>")
_RUN_PREFIXES = ("iter_", "ref_cache.pt", "metrics.jsonl.tmp-", "valid_metrics.jsonl.tmp-", TRACKER + ".tmp-")


def run_files(save) -> list[Path]:
    """The entries of ``save`` that belong to a training run (checkpoints, metrics, reference cache)."""
    root = Path(save)
    if not root.is_dir():
        return []
    out = [root / n for n in _RUN_FILES if (root / n).exists()]
    out += sorted(p for p in root.iterdir() if p.name.startswith(_RUN_PREFIXES))
    if (root / HF_SUBDIR).is_dir():
        out.append(root / HF_SUBDIR)
    return sorted(set(out))


def holds_run(save) -> bool:
    """A checkpoint (tracker or iteration directory) or the metrics of a run that has not checkpointed yet."""
    root = Path(save)
    if not root.is_dir():
        return False
    return (root / TRACKER).exists() or (root / "metrics.jsonl").exists() or \
        any(p.name.startswith("iter_") for p in root.iterdir())


def _same(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def check_save_dir(save: Optional[str], load: Optional[str], finetune: bool, overwrite: bool,
                   ref_load: Optional[str] = None) -> bool:
    """ValueError when this run may not write to ``save``; True when the old run there must be deleted first.

    Every rank calls it before anything is written (the answer depends only on the flags and files on disk).
    """
    if save is None:
        if overwrite:
            raise ValueError("--overwrite needs --save")
        return False
    resume = _same(load, save) and not finetune
    if resume:
        if overwrite:
            raise ValueError(f"--overwrite with --load {load} = --save {save} would delete the checkpoint being "
                             "resumed; drop --overwrite to resume, or --save elsewhere for a new run")
        return False
    if not holds_run(save):
        return False
    for flag, path in (("--load", load), ("--ref-load", ref_load)):
        if path is not None and (_same(path, save) or Path(save).resolve() in Path(path).resolve().parents):
            raise ValueError(f"--save {save} holds {flag} {path}: a new run cannot replace the checkpoint it "
                             "starts from; --save to another directory")
    if not overwrite:
        raise ValueError(f"--save {save} already holds a training run ({_describe(save)}); resume it with "
                         f"--load {save} (without --finetune), choose another --save, or add --overwrite to "
                         "delete it first")
    return True


def _describe(save) -> str:
    tracker = Path(save) / TRACKER
    return f"checkpoint at iteration {tracker.read_text().strip()}" if tracker.exists() else "metrics.jsonl"


def clear_run(save) -> None:
    """Delete the old run's files in ``save`` (rank 0 deletes, every rank waits)."""
    if dist.get_rank() == 0:
        doomed = run_files(save)
        logger.warning("--overwrite: deleting the previous run in %s (%s)", save,
                       ", ".join(p.name for p in doomed))
        for p in doomed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    dist.barrier()
