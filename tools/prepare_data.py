#!/usr/bin/env python
"""Prepare VAR groups from local preference/instruction data. Run with --help; logic in megatron_var/data/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_var.data.cli import run_cli  # noqa: E402
from megatron_var.data.prepare_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
