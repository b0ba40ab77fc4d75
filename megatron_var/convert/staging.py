"""Atomic output directories: write into ``OUT.tmp-<pid>`` and rename at the very end.

Why: an interrupted or failed conversion must never leave something at OUT that looks like a valid checkpoint
(a later ``--load OUT`` would silently train from half a model). On any exception, KeyboardInterrupt or SIGTERM
(turned into KeyboardInterrupt by the CLIs) the temporary directory is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies below b."""
    return a == b or b in a.parents


def check_output(out, sources: list, overwrite: bool) -> Path:
    """Refuse an existing OUT without ``overwrite`` and an OUT that would destroy an input."""
    out = Path(out).resolve()
    for src in sources:
        src = Path(src).resolve()
        if _inside(src, out):  # replacing OUT would delete the source
            raise ValueError(f"--out {out} would overwrite the input {src}; choose another directory")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    return out


@contextlib.contextmanager
def staged_output(out, sources: list, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success it replaces ``out``, on failure it is removed."""
    out = check_output(out, sources, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        logger.error("conversion failed; removed the partial output %s", tmp)
        raise
