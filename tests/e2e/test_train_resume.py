"""The training entry point end to end on CPU (TP=2, gloo): VAR on the bundled tiny task, a SIGKILL after a
checkpoint, resume from the last checkpoint, and the same per-step losses bitwise as an uninterrupted run."""

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
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
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "megatron_var.cli.train",
            "--objective", "var", "--var-lambda", "0.5", "--data-path", str(tiny / "data"),
            "--tensor-model-parallel-size", "2", "--global-batch-size", "2", "--train-iters", "6",
            "--lr", "1e-3", "--lr-warmup-iters", "1", "--save", str(save), "--save-interval", "2", *extra]


def _losses(save):
    return [json.loads(ln)["loss"] for ln in (save / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """Per-step losses of a 6-iteration VAR run with online reference scoring (the run the others compare with)."""
    full = tmp_path_factory.mktemp("full")
    r = _run(_train_cmd(tiny, full, "--model-arch", str(tiny / "model_arch.json")), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ref = _losses(full)
    assert len(ref) == 6 and all(x == x for x in ref)
    return full, ref


def _kill_run(launcher: subprocess.Popen) -> None:
    """SIGKILL the torchrun launcher and every worker it started, and check that none survives.

    torch elastic starts each worker in a session of its own, so killing the launcher's process group leaves the
    workers training (and writing checkpoints) on; they are found as the launcher's children before it dies.
    """
    workers = psutil.Process(launcher.pid).children(recursive=True)
    assert workers, "the launcher has no worker processes yet"
    for p in [psutil.Process(launcher.pid), *workers]:
        p.send_signal(signal.SIGKILL)
    launcher.wait()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers survived SIGKILL: {alive}"


def test_sigkill_and_resume_is_bitwise(tiny, uninterrupted, tmp_path):
    ref = uninterrupted[1]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *_train_cmd(tiny, killed, "--model-arch", str(tiny / "model_arch.json"))],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    tracker = killed / "latest_checkpointed_iteration.txt"
    while time.time() < deadline and not (tracker.exists() and tracker.read_text().strip() in ("2", "4")):
        time.sleep(0.05)
    _kill_run(proc)
    resumed_from = int(tracker.read_text())
    assert resumed_from in (2, 4)
    r = _run(_train_cmd(tiny, killed, "--load", str(killed)), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _losses(killed) == ref  # bitwise, and no duplicated lines from the killed run


def test_bad_load_path_is_a_clean_error(tiny, tmp_path):
    r = _run(["-m", "megatron_var.cli.train", "--data-path", str(tiny / "data"), "--load", str(tmp_path / "nope"),
              "--train-iters", "1"], timeout=300)
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr


def test_layout_not_fitting_world_is_a_clean_error(tiny, tmp_path):
    r = _run(["-m", "megatron_var.cli.train", "--data-path", str(tiny / "data"), "--model-arch",
              str(tiny / "model_arch.json"), "--tensor-model-parallel-size", "2", "--train-iters", "1"], timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "not divisible by --tensor-model-parallel-size" in r.stderr and "Traceback" not in r.stderr


def test_ref_cache_trains_like_online_scoring(tiny, uninterrupted, tmp_path):
    """--ref-cache scores every group's [B, B] matrix before step 1 (other groupings of the same forward-only pass)
    and gives the same VAR losses as scoring online; a restarted run reuses the cache instead of rebuilding it."""
    full, ref = uninterrupted
    cached = tmp_path / "cached"
    # the online run's random initial weights (its iteration-0 checkpoint) as a fresh run's start and reference
    r = _run(_train_cmd(tiny, cached, "--load", str(full), "--ckpt-step", "0", "--finetune", "--ref-cache"),
             timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (cached / "ref_cache.pt").is_file() and re.search(r"reference cache: \d+ groups written", r.stderr), \
        r.stderr[-3000:]
    losses = _losses(cached)
    assert len(losses) == 6
    for a, b in zip(losses, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, ref)
    r = _run(_train_cmd(tiny, cached, "--load", str(cached), "--ref-cache"), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "reference cache: reusing" in r.stderr, r.stderr[-3000:]
    assert _losses(cached) == losses  # nothing left to train, nothing appended


def _single_rank_cmd(tiny, save, *extra):
    return ["-m", "megatron_var.cli.train", "--objective", "sft", "--data-path", str(tiny / "data"),
            "--model-arch", str(tiny / "model_arch.json"), "--global-batch-size", "1", "--lr", "1e-3",
            "--save", str(save), "--save-interval", "1", *extra]


def test_nan_loss_skips_the_update_then_stops_at_the_limit(tiny, tmp_path):
    """A NaN loss (injected into the real backward) skips that update; one NaN too many stops the run with a clear
    message, exit 3, and the last good checkpoint stays the one --load finds."""
    env = dict(ENV, MEGATRON_VAR_INJECT_NAN_ITERS="2")
    run = tmp_path / "skip"
    r = subprocess.run([sys.executable, *_single_rank_cmd(tiny, run, "--train-iters", "3")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped"] for x in recs] == [False, True, False]
    assert recs[1]["loss"] != recs[1]["loss"]  # NaN logged as such
    assert all(x["loss"] == x["loss"] and x["grad_norm"] == x["grad_norm"] for x in (recs[0], recs[2]))
    assert "iteration 2: loss is NaN/inf, update skipped" in r.stderr

    stop = tmp_path / "stop"
    env = dict(ENV, MEGATRON_VAR_INJECT_NAN_ITERS="2,3")
    r = subprocess.run([sys.executable, *_single_rank_cmd(tiny, stop, "--train-iters", "4", "--max-nan-skips", "1")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "more than --max-nan-skips 1" in r.stderr and "Traceback" not in r.stderr
    # iterations 1 and 2 were saved (2 = skipped update, finite weights); the stopping iteration 3 was not
    assert (stop / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not list(stop.glob("*.tmp"))
