"""The training entry point end to end on CPU (TP=2, gloo): VAR on the bundled tiny task, a SIGKILL after a
checkpoint, resume from the last checkpoint, and the same per-step losses bitwise as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    for cmd in (["examples/tiny/make_tiny.py", str(out)],
                ["tools/prepare_data.py", "--input", str(out / "train.jsonl"), "--tokenizer", str(out / "tokenizer"),
                 "--template", "chat", "--responses", "all", "--group-size", "8", "--seq-length", "64",
                 "--output", str(out / "data"), "--no-progress"],
                ["tools/score_rewards.py", "--data", str(out / "data"), "--split", "all",
                 "--reward-fn", "examples/tiny/reward.py:score", "--no-progress"]):
        r = _run(cmd, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def _train_cmd(tiny, save, *extra):
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "megatron_var.train",
            "--objective", "var", "--var-lambda", "0.5", "--data-path", str(tiny / "data"),
            "--tensor-model-parallel-size", "2", "--global-batch-size", "2", "--train-iters", "6",
            "--lr", "1e-3", "--lr-warmup-iters", "1", "--save", str(save), "--save-interval", "2", *extra]


def _losses(save):
    return [json.loads(ln)["loss"] for ln in (save / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_and_resume_is_bitwise(tiny, tmp_path):
    full = tmp_path / "full"
    r = _run(_train_cmd(tiny, full, "--model-arch", str(tiny / "model_arch.json")), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ref = _losses(full)
    assert len(ref) == 6 and all(x == x for x in ref)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *_train_cmd(tiny, killed, "--model-arch", str(tiny / "model_arch.json"))],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    tracker = killed / "latest_checkpointed_iteration.txt"
    while time.time() < deadline and not (tracker.exists() and tracker.read_text().strip() in ("2", "4")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = int(tracker.read_text())
    assert resumed_from in (2, 4)
    r = _run(_train_cmd(tiny, killed, "--load", str(killed)), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _losses(killed) == ref  # bitwise, and no duplicated lines from the killed run


def test_bad_load_path_is_a_clean_error(tiny, tmp_path):
    r = _run(["-m", "megatron_var.train", "--data-path", str(tiny / "data"), "--load", str(tmp_path / "nope"),
              "--train-iters", "1"], timeout=300)
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr


def test_layout_not_fitting_world_is_a_clean_error(tiny, tmp_path):
    r = _run(["-m", "megatron_var.train", "--data-path", str(tiny / "data"), "--model-arch",
              str(tiny / "model_arch.json"), "--tensor-model-parallel-size", "2", "--train-iters", "1"], timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "not divisible by --tensor-model-parallel-size" in r.stderr and "Traceback" not in r.stderr
