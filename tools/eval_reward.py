#!/usr/bin/env python
"""Sample from HF models on a prompt set and score with a reward model or function. Run with --help for the flags.

The same command as `megatron-var-eval-reward`; the code is megatron_var/cli/eval_reward.py."""

from megatron_var.cli.eval_reward import cli

if __name__ == "__main__":
    cli()
