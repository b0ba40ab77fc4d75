"""Shared CLI behaviour of the converters: one-line user errors (exit 2) and SIGTERM -> clean-up."""

from __future__ import annotations

import signal
import sys
from typing import Callable

from megatron_var.cli.common import run_cli


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds through atomic_directory (convert/staging.py), which removes the partial output


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    return run_cli(main, argv)


def exit_with(main: Callable[[list[str] | None], int | None]) -> None:
    sys.exit(run(main))
