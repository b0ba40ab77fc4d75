"""Run an ``examples/*.sh`` launcher as one torchrun rank: ``torchrun [...] examples/var_llama13b.sh [flags]``.

torchrun executes the file it is given with Python in every rank, so each launcher is a bash/Python polyglot: bash
runs its top part (which starts torchrun itself), Python sees that part as a string and runs the tail, which calls
:func:`run_rank`. The settings live once, in the bash part: this asks it for the trainer's argv
(``MEGATRON_VAR_PRINT_ARGS=1`` makes ``examples/_launch.sh`` print the argv instead of starting torchrun) and
becomes the trainer. No nested torchrun, and the same resume and override rules in both modes.
"""

from __future__ import annotations

import os
import subprocess
import sys


def trainer_argv(script: str, user_args: list[str]) -> list[str]:
    """The argv the launcher ``script`` would give ``megatron_var.cli.train`` (bash decides, as in bash mode)."""
    env = dict(os.environ, MEGATRON_VAR_PRINT_ARGS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", script, *user_args], env=env, stdout=subprocess.PIPE)
    if proc.returncode != 0:  # the script already said why on stderr (e.g. "error: set DATA_DIR")
        raise SystemExit(proc.returncode)
    return [a.decode() for a in proc.stdout.split(b"\0")[:-1]]


def run_rank(script: str) -> None:
    """Entry point of a launcher's Python tail: become ``python -m megatron_var.cli.train <the script's argv>``.

    exec, not a call: the trainer must be this process's ``__main__``, because multiprocessing's "spawn" children
    (megatron's checkpoint writer) re-run the main module, and re-running the launcher would train again in them.
    torchrun's rank variables and the process id carry over.
    """
    argv = trainer_argv(script, sys.argv[1:])
    os.execv(sys.executable, [sys.executable, "-m", "megatron_var.cli.train", *argv])
