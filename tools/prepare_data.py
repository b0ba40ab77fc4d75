#!/usr/bin/env python
"""Prepare VAR groups from local preference/instruction data. Run with --help for the flags.

The same command as `megatron-var-prepare-data`; the code is megatron_var/cli/prepare_data.py."""

from megatron_var.cli.prepare_data import cli

if __name__ == "__main__":
    cli()
