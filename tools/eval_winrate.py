#!/usr/bin/env python
"""Pairwise win rate against reference answers with an LLM judge (OpenAI-compatible endpoint). Run with --help;
logic in megatron_var/winrate.py (verdicts), megatron_var/judge.py (client, cache) and megatron_var/winrate_cli.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_var.data.cli import run_cli  # noqa: E402
from megatron_var.winrate_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
