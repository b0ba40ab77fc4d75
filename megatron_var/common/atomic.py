"""Atomic writes: a reader (or a crash) sees the old file or directory or the complete new one, never a part.

Why one module: checkpoints, their tracker and manifest, prepared data, converter outputs, reward matrices, the
reference cache and the tools' reports were each written through their own temporary name and rename, with
different names, some without fsync, some leaving the temporary behind on an error. Here it is done once:

- files: ``atomic_write(path)`` writes ``path.tmp-<pid>-<random>`` in the same directory (same filesystem, so the
  rename is atomic), fsyncs it, ``os.replace``s it over ``path`` and fsyncs the directory; on any error,
  KeyboardInterrupt included, the temporary is removed and ``path`` is untouched. The name is unique per call, so
  processes (on any node of a shared filesystem) may write the same file at once: the last rename wins.
- directories: ``atomic_directory(dest)`` yields a staging directory ``dest.tmp-<pid>`` next to ``dest`` and
  renames it into place when the block ends; on any error it is removed and an existing ``dest`` is kept.
  ``replace_directory`` is that last step alone, for a directory staged by several ranks (a checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Iterator, Optional

logger = logging.getLogger(__name__)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: some filesystems cannot fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", encoding: Optional[str] = "utf-8") -> Iterator[IO]:
    """``with atomic_write(p) as f: f.write(...)``: ``p`` is replaced by what was written when the block ends
    without an error; otherwise ``p`` is left as it was and no temporary file remains. ``mode``: "w" or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open(path, "w")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` by ``text`` atomically."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)


def atomic_write_bytes(path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_torch_save(obj, path) -> None:
    """``torch.save(obj, path)``, atomically."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def replace_directory(staged, dest) -> None:
    """Move the complete directory ``staged`` to ``dest``; an existing ``dest`` is moved aside first and deleted
    only once ``staged`` is in place (if that rename fails, it is put back)."""
    staged, dest = Path(staged), Path(dest)
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(dest, old)
    try:
        os.replace(staged, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    _fsync_dir(dest.parent)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def atomic_directory(dest, overwrite: bool = True, staging=None) -> Iterator[Path]:
    """Yield an empty staging directory next to ``dest`` (``dest.tmp-<pid>`` unless ``staging`` names one); when
    the block ends without an error it replaces ``dest``. On any error, KeyboardInterrupt included (the CLIs turn
    SIGTERM into one), the staging directory is removed and ``dest`` is left as it was.

    ``overwrite=False`` refuses (FileExistsError, before anything is written) a ``dest`` that exists and is not an
    empty directory; callers check their flags first and give the user the message naming them.
    """
    dest = Path(dest)
    if not overwrite and (dest.is_symlink() or dest.exists()) and not (dest.is_dir() and not any(dest.iterdir())):
        raise FileExistsError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(staging) if staging is not None else dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, dest)
    except BaseException:
        _remove(tmp)
        logger.error("%s not written: removed the partial output %s", dest, tmp)
        raise
