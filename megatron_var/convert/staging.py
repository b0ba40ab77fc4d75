"""The converters' output directory: checked against the flags, then written atomically.

Why: an interrupted or failed conversion must never leave something at OUT that looks like a valid checkpoint
(a later ``--load OUT`` would silently train from half a model). The staging itself (``OUT.tmp-<pid>`` renamed at
the very end, removed on any exception, KeyboardInterrupt or SIGTERM, which the CLIs turn into
KeyboardInterrupt) is ``megatron_var.common.atomic.atomic_directory``; this module adds the converters' checks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from megatron_var.common.atomic import atomic_directory


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
    """``check_output``, then yield a staging directory that replaces ``out`` on success and is removed on
    failure (``atomic_directory``)."""
    with atomic_directory(check_output(out, sources, overwrite), overwrite=overwrite) as tmp:
        yield tmp
