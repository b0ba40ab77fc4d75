#!/usr/bin/env python
"""Sample from HF models on a prompt set and score with a reward model or function. Run with --help;
logic in megatron_var/evaluation.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_var.data.cli import run_cli  # noqa: E402
from megatron_var.evaluation_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
