"""A checksum manifest in every checkpoint directory, and its verification before a load.

Why: a truncated, emptied or bit-flipped ``.distcp`` either crashed the load with an unrelated traceback or,
worse, resumed silently with garbage weights (loss 1e13). Each checkpoint gets ``checksums.json`` (relative path,
size and xxh3-64 hash of every file), written after all its files and before the directory is renamed into place,
so a final ``iter_*`` directory always carries one. Hashing runs at page-cache speed (~8 GB/s per core); with a
process group the files are split over the ranks and the results gathered, so every rank sees the same verdict.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import xxhash

from megatron_var.checkpoint import safe_unpickle
from megatron_var.common.atomic import atomic_write_text

logger = logging.getLogger(__name__)

MANIFEST = "checksums.json"
ALGORITHM = "xxh3_64"
_BLOCK = 8 << 20


def file_hash(path) -> str:
    """xxh3-64 hex digest of a file, read in 8 MiB blocks."""
    h = xxhash.xxh3_64()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _checkpoint_files(ckpt_dir: Path) -> list[str]:
    """Relative paths of every file of the checkpoint but the manifest (and its temporary)."""
    return sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*")
                  if p.is_file() and not p.name.startswith(MANIFEST))


def _dist(collective: bool):
    """(rank, world size) of the default process group when ``collective``, else (0, 1): this process alone."""
    import torch.distributed as dist

    if collective and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj, collective: bool) -> list:
    """Every rank's ``obj`` on every rank (just ``[obj]`` for one process)."""
    import torch.distributed as dist

    if _dist(collective)[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def write_manifest(ckpt_dir, collective: bool = False) -> dict:
    """Hash the files of ``ckpt_dir`` and write the manifest (atomically); returns the manifest.

    ``collective``: every rank of the process group calls it after all have finished writing; the files are split
    over the ranks and rank 0 writes the manifest.
    """
    ckpt_dir = Path(ckpt_dir)
    rank, world = _dist(collective)
    t0 = time.perf_counter()
    files = _checkpoint_files(ckpt_dir)
    mine = {rel: {"size": (ckpt_dir / rel).stat().st_size, "hash": file_hash(ckpt_dir / rel)}
            for rel in files[rank::world]}
    entries: dict = {}
    for part in _gather(mine, collective):
        entries.update(part)
    manifest = {"algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}
    if rank == 0:
        atomic_write_text(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        dt = time.perf_counter() - t0
        total = sum(e["size"] for e in entries.values())
        logger.info("checksums of %s: %d files, %.3f GB in %.2f s (%.2f GB/s over %d rank(s))", ckpt_dir.name,
                    len(entries), total / 1e9, dt, total / 1e9 / max(dt, 1e-9), world)
    return manifest


def _check_file(ckpt_dir: Path, rel: str, entry: dict) -> Optional[str]:
    path = ckpt_dir / rel
    try:
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path}: size mismatch ({size} bytes, manifest says {entry['size']})"
        if file_hash(path) != entry["hash"]:
            return f"{path}: hash mismatch (content changed since it was saved)"
    except FileNotFoundError:
        return f"{path}: missing file"
    except OSError as e:
        return f"{path}: unreadable ({e})"
    return None


def _read_manifest(ckpt_dir: Path):
    """(manifest, problem): (None, None) when there is none."""
    path = ckpt_dir / MANIFEST
    if not path.exists():
        return None, None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("hash"), str)
                for e in files.values()):
            raise ValueError(f"unknown algorithm or entries (algorithm {manifest.get('algorithm')!r})")
        return manifest, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{path}: unreadable manifest ({type(e).__name__}: {e})"


def verify(ckpt_dir, collective: bool = False) -> tuple[bool, list[str]]:
    """(has a manifest, problems) of ``ckpt_dir``; problems name the damaged files, none for an intact one.

    ``collective``: every rank of the process group calls it, the hashing is split over the ranks and the verdict
    is the same everywhere. A checkpoint without a manifest (older, or written elsewhere) has no problems here.
    """
    ckpt_dir = Path(ckpt_dir)
    rank, world = _dist(collective)
    manifest, problem = _read_manifest(ckpt_dir)
    mine = []
    if problem:
        mine = [problem] if rank == 0 else []
    elif manifest is not None:
        items = sorted(manifest["files"].items())
        mine = [p for rel, e in items[rank::world] if (p := _check_file(ckpt_dir, rel, e))]
    problems = [p for part in _gather(mine, collective) for p in part]
    return manifest is not None or problem is not None, problems


def check(ckpt_dir, collective: bool = False) -> list[str]:
    """Problems that make ``ckpt_dir`` unusable: damaged files (by the manifest) or unreadable metadata.

    Raises ``UnsafeCheckpointError`` (on every rank) for metadata or objects that would run code when unpickled:
    that is refused outright, never skipped over. Warns once for a checkpoint without a manifest.
    """
    ckpt_dir = Path(ckpt_dir)
    rank, _ = _dist(collective)
    has_manifest, problems = verify(ckpt_dir, collective)
    mine = None
    if not problems and rank == 0:
        try:
            safe_unpickle.check_checkpoint(ckpt_dir)
        except safe_unpickle.UnsafeCheckpointError as e:
            mine = ("unsafe", str(e))
        except ValueError as e:
            mine = ("damaged", str(e))
        except Exception as e:  # any other reader failure is damage too, and must reach every rank (no hang)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            mine = ("damaged", f"{ckpt_dir}: unreadable ({type(e).__name__}: {first})")
    verdicts = [v for v in _gather(mine, collective) if v]
    for kind, msg in verdicts:
        if kind == "unsafe":
            raise safe_unpickle.UnsafeCheckpointError(msg)
    problems += [msg for _, msg in verdicts]
    if not has_manifest and not problems and rank == 0:
        logger.warning("%s has no %s: not verified (written before checksums existed?)", ckpt_dir, MANIFEST)
    return problems


def ensure_intact(ckpt_dir, collective: bool = False) -> None:
    """``check`` that raises a one-line ValueError naming the damage."""
    problems = check(ckpt_dir, collective)
    if problems:
        raise ValueError(f"checkpoint {ckpt_dir} is damaged: {'; '.join(problems)}")
