"""setup_logging: INFO on global rank 0, warnings only elsewhere (a fresh interpreter each: pytest owns this one's
root logger)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rank", [0, 1])
def test_setup_logging_quiet_off_rank_0(rank):
    code = ("import logging; from megatron_var.runtime.logs import setup_logging; setup_logging(); "
            "logging.getLogger('lib').setLevel(logging.INFO); logging.getLogger('lib').info('lib info'); "
            "logging.getLogger('a').info('progress'); logging.getLogger('a').warning('trouble')")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, RANK=str(rank), PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, check=True).stderr.splitlines()
    if rank == 0:
        assert [ln.split(" ", 2)[2] for ln in out] == ["INFO lib: lib info", "INFO a: progress", "WARNING a: trouble"]
    else:
        assert [ln.split(" ", 2)[2] for ln in out] == ["WARNING [rank 1] a: trouble"]


def test_cli_tools_log_on_rank_0_only():
    """The data/eval/convert tools set logging up through run_cli: a rank other than 0 keeps its INFO to itself."""
    code = ("import logging; from megatron_var.cli.common import run_cli; "
            "run_cli(lambda argv: logging.getLogger('tool').info('wrote 10 rows'))")
    for rank, expected in (("0", ["INFO tool: wrote 10 rows"]), ("3", [])):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, RANK=rank, PYTHONPATH=str(ROOT)),
                             capture_output=True, text=True, check=True).stderr.splitlines()
        assert [ln.split(" ", 2)[2] for ln in out] == expected


def test_quiet_known_warnings_is_targeted():
    """megatron-core's no-apex notice is hidden; the same text from elsewhere and any other warning still show."""
    import warnings

    from megatron_var.runtime.logs import quiet_known_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        text = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
        warnings.warn_explicit(text, UserWarning, "optimizer.py", 1, module="megatron.core.optimizer")
        warnings.warn_explicit(text, UserWarning, "mine.py", 1, module="mine")
        warnings.warn_explicit("something else", UserWarning, "optimizer.py", 2, module="megatron.core.optimizer")
        warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning,
                               "c10d_logger.py", 3, module="torch.distributed.c10d_logger")
    assert [(w.filename, str(w.message)) for w in seen] == [("mine.py", text), ("optimizer.py", "something else")]
