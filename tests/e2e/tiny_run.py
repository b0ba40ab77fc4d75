"""The bundled tiny task as a test fixture, and the few helpers the resume/run-safety e2e tests share.

Why a module, not conftest: the tests import the helpers explicitly (a plain function call builds the fixture
directory), so each test file keeps its own module-scoped fixtures and runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run(args, env=None, **kw):
    """``python ARGS`` in the repository root, output captured."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or ENV, capture_output=True, text=True, **kw)


def prepare(out: Path, tokenizer: Path, name: str = "data") -> Path:
    """tools/prepare_data.py + score_rewards.py over the tiny rows with ``tokenizer``; returns the data dir."""
    data = out / name
    for cmd in (["tools/prepare_data.py", "--input", str(out / "train.jsonl"), "--tokenizer", str(tokenizer),
                 "--template", "chat", "--responses", "all", "--group-size", "8", "--seq-length", "64",
                 "--output", str(data), "--no-progress"],
                ["tools/score_rewards.py", "--data", str(data), "--split", "all",
                 "--reward-fn", "examples/tiny/reward.py:score", "--no-progress"]):
        r = run(cmd, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    return data


def make_tiny(out: Path) -> Path:
    """OUT/train.jsonl, OUT/tokenizer/, OUT/model_arch.json (examples/tiny/make_tiny.py) and OUT/data."""
    r = run(["examples/tiny/make_tiny.py", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    prepare(out, out / "tokenizer")
    return out


_SHARED = {}


def shared_tiny(tmp_path_factory) -> Path:
    """One make_tiny directory per pytest session, for every test module that only reads it."""
    if "tiny" not in _SHARED:
        _SHARED["tiny"] = make_tiny(tmp_path_factory.mktemp("tiny"))
    return _SHARED["tiny"]


def torchrun(nproc: int = 2, *launcher_args: str) -> list[str]:
    """``python`` arguments starting the trainer under torchrun on this machine."""
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *launcher_args,
            "-m", "megatron_var.cli.train"]


def records(save: Path) -> list[dict]:
    return [json.loads(ln) for ln in (save / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def losses(save: Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in records(save)}


def one_error_line(stderr: str) -> str:
    """The single ``error:`` line a user mistake must end with (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]
