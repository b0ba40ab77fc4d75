"""Shared behaviour of every command: rank-0 logging, known third-party warnings quieted, user errors as one
line + exit code 2."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from megatron_var.runtime.logs import quiet_known_warnings, setup_logging


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call ``main(argv)``; a ValueError (a user error: bad flag, file or row) prints ``error: ...`` and returns 2."""
    setup_logging()  # INFO on global rank 0 (torchrun's RANK), warnings only on the others
    quiet_known_warnings()
    try:
        return main(argv) or 0
    except (ValueError, OSError) as e:  # OSError: unreadable input, no space or permission for the output
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _terminate(signum, frame):
    raise KeyboardInterrupt


def run_cli_cleaning_up(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """``run_cli`` for commands that stage a large output (the converters): SIGTERM (SLURM's scancel, a timeout)
    becomes KeyboardInterrupt, which unwinds through ``common.atomic.atomic_directory`` and removes the partial
    output instead of leaving it behind."""
    signal.signal(signal.SIGTERM, _terminate)
    return run_cli(main, argv)
