"""Imported by the Python tail of an ``examples/*.sh`` launcher when torchrun runs that file in a rank.

The tail is a bare ``import`` line because the file must stay valid bash for shellcheck as well as valid Python;
importing this module replaces the process with the trainer, run with the settings of the script ``sys.argv[0]``.
"""

import sys

from megatron_var.cli.example_launch import run_rank

run_rank(sys.argv[0])
