"""The example launchers run both ways users type them: ``bash examples/X.sh`` (the script starts torchrun) and
``torchrun ... examples/X.sh`` (torchrun runs the file in each rank, which trains with the script's settings), with
the same trainer argv, so the same per-step losses; flags given after the script override its own."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_var.cli.train import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = sorted(p for p in (ROOT / "examples").glob("*.sh") if p.name not in ("_launch.sh", "demo_cpu.sh"))


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "ckpt" / "metrics.jsonl").read_text().splitlines()]


def _env(out: Path, **kw) -> dict:
    return dict(os.environ, OUT=str(out), TRAIN_ITERS="3", MASTER_PORT=_free_port(), OMP_NUM_THREADS="1",
                PYTHONWARNINGS="ignore", **kw)


def test_tiny_launcher_trains_the_same_from_bash_and_from_torchrun(tmp_path):
    by_bash, by_torchrun = tmp_path / "bash", tmp_path / "torchrun"
    r = subprocess.run(["bash", "examples/var_tiny_cpu.sh", "--log-interval", "2"], cwd=ROOT, env=_env(by_bash),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    env = _env(by_torchrun)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        env["MASTER_PORT"], str(ROOT / "examples" / "var_tiny_cpu.sh"), "--log-interval", "2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _losses(by_bash)
    assert len(ref) == 3 and _losses(by_torchrun) == ref


def _argv(script: Path, env: dict, *user) -> list[str]:
    r = subprocess.run(["bash", str(script), *user], env=dict(env, MEGATRON_VAR_PRINT_ARGS="1"),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return [a.decode() for a in r.stdout.split(b"\0")[:-1]]


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_every_launcher_is_bash_and_python(script):
    """torchrun needs valid Python, bash needs valid bash: both parse, and the Python tail trains this rank."""
    text = script.read_text()
    compile(text, str(script), "exec")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert text.rstrip().endswith("import megatron_var.cli.run_example_rank  # torchrun examples/X.sh: train in this rank")


@pytest.mark.parametrize("script", [p for p in LAUNCHERS if p.name != "var_tiny_cpu.sh"], ids=lambda p: p.name)
def test_launcher_argv_start_resume_and_overrides(script, tmp_path):
    """Start from LOAD_DIR (--finetune) while SAVE_DIR holds no run, resume SAVE_DIR once it does; EXTRA_ARGS
    come after the script's flags and the user's flags last, so they win."""
    data, load, save = tmp_path / "data", tmp_path / "load", tmp_path / "save"
    data.mkdir(), load.mkdir()
    env = dict(os.environ, DATA_DIR=str(data), LOAD_DIR=str(load), SAVE_DIR=str(save), EXTRA_ARGS="--lr 1 --seed 7")
    argv = _argv(script, env, "--lr", "2")
    assert argv[:4] == ["--data-path", str(data), "--save", str(save)]
    assert argv[4:7] == ["--load", str(load), "--finetune"]
    assert argv[-6:] == ["--lr", "1", "--seed", "7", "--lr", "2"]
    # the trainer reads a later run length as an override of the script's (--epochs 2 -> --train-iters 2000), and
    # the script's flags make a valid configuration
    cfg = config_from_args(build_parser().parse_args(_argv(script, env, "--train-iters", "2000")))
    assert (cfg.data.train_iters, cfg.data.epochs, cfg.optimizer.lr) == (2000, None, 1.0)
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("5\n")
    argv = _argv(script, env)
    assert argv[4:8] == ["--load", str(save), "--ref-load", str(load)] and "--finetune" not in argv


def test_missing_variable_is_one_line_error_in_both_modes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "LOAD_DIR", "SAVE_DIR")}
    script = ROOT / "examples" / "var_llama3_8b.sh"
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == f"error: set DATA_DIR (see the header of {script})"
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == f"error: set DATA_DIR (see the header of {script})"
