"""Preemption under a real torchrun (2 processes, gloo): --exit-duration-in-mins, SIGUSR1 and SIGTERM each stop the
run after a whole iteration on every rank, with a checkpoint at that iteration and exit code 0, and ``--load`` of
the directory continues from there (one scenario: a job requeued three times)."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tiny_run import ENV, ROOT, records, run, shared_tiny, torchrun


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


def _cmd(tiny, save, *extra):
    # launched as examples/_launch.sh does: torchrun's agent leaves SIGTERM/SIGUSR1 to the ranks (_ignore_signals)
    return [*torchrun(2, "--signals_to_handle", "SIGINT,SIGHUP,SIGQUIT"), "--objective", "sft",
            "--data-path", str(tiny / "data"), "--global-batch-size", "2", "--train-iters", "1000", "--lr", "1e-4",
            "--save", str(save), "--save-interval", "1000", *extra]


def _ignore_signals():
    # as examples/_launch.sh (`trap '' USR1 TERM`): the agent neither dies of SIGUSR1 nor kills the ranks on SIGTERM
    # before they have saved; the ranks install their own handlers
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _run_until_signalled(cmd, save, after_iteration, send):
    """Start ``cmd``; once metrics.jsonl reaches ``after_iteration``, ``send(launcher, workers)``; returns rc and
    stderr (kept in a file: a pipe nobody reads would block the logging ranks)."""
    log = save.parent / f"{save.name}-{after_iteration}.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=f,
                                preexec_fn=_ignore_signals, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and _last_iteration(save) < after_iteration:
            assert proc.poll() is None, log.read_text()[-4000:]
            time.sleep(0.05)
        workers = {int(p.environ()["RANK"]): p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "RANK" in p.environ()}
        assert sorted(workers) == [0, 1]
        send(proc, workers)
        proc.wait(timeout=300)
        return proc.returncode, log.read_text()
    finally:
        if proc.poll() is None:  # a failed test: the ranks run in their own sessions, kill them one by one
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                p.kill()
            proc.wait()


def _last_iteration(save) -> int:
    """The last complete line of metrics.jsonl (rank 0 may be writing the next one)."""
    path = save / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return json.loads(lines[-1])["iteration"] if lines else 0


def _stopped_cleanly(save, first):
    """Iterations first..k logged once each, the checkpoint at k is the one --load finds; returns k."""
    its = [r["iteration"] for r in records(save)]
    k = its[-1]
    assert its == list(range(1, k + 1)) and k >= first, its
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(k)
    assert (save / f"iter_{k:07d}").is_dir() and not list(save.glob("*.tmp"))
    assert k < 1000
    return k


def test_preempted_run_saves_exits_0_and_resumes(tiny, tmp_path):
    save = tmp_path / "run"
    # 1. the wall-clock budget is spent during iteration 1
    r = run(_cmd(tiny, save, "--model-arch", str(tiny / "model_arch.json"), "--exit-duration-in-mins", "1e-6"),
            timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "--exit-duration-in-mins 1e-06 reached" in r.stderr
    assert _stopped_cleanly(save, 1) == 1

    # 2. requeued: resumes at iteration 2; SIGUSR1 (SLURM's --signal) reaches one worker only, the other learns
    # it from the vote
    rc, err = _run_until_signalled(_cmd(tiny, save, "--load", str(save)), save, 3,
                                   lambda launcher, workers: workers[1].send_signal(signal.SIGUSR1))
    assert rc == 0, err[-4000:]
    assert "SIGUSR1 received" in err
    k = _stopped_cleanly(save, 3)

    # 3. requeued again: SIGTERM to every process of the job step (agent and ranks), as SLURM sends it at the time
    # limit (by cgroup: torchrun starts the ranks in their own sessions)
    def sigterm_all(launcher, workers):
        for p in [launcher, *workers.values()]:
            p.send_signal(signal.SIGTERM)

    rc, err = _run_until_signalled(_cmd(tiny, save, "--load", str(save)), save, k + 2, sigterm_all)
    assert rc == 0, err[-4000:]
    assert "SIGTERM received" in err
    _stopped_cleanly(save, k + 2)
