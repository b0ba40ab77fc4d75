"""Shared CLI behaviour for the data tools: logging set-up and user errors as one line + exit code 2."""

from __future__ import annotations

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
