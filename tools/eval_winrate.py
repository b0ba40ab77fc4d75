#!/usr/bin/env python
"""Pairwise win rate against reference answers with an LLM judge (OpenAI-compatible endpoint). Run with --help for the flags.

The same command as `megatron-var-eval-winrate`; the code is megatron_var/cli/eval_winrate.py."""

from megatron_var.cli.eval_winrate import cli

if __name__ == "__main__":
    cli()
