#!/usr/bin/env python
"""Score [B,B] cross-pair reward matrices for prepared VAR groups. Run with --help for the flags.

The same command as `megatron-var-score-rewards`; the code is megatron_var/cli/score_rewards.py."""

from megatron_var.cli.score_rewards import cli

if __name__ == "__main__":
    cli()
