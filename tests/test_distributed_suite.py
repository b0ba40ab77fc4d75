"""Runs tests/distributed in a real 4-process gloo world: ``torchrun --nproc_per_node 4 -m pytest``.

One launch for the whole distributed suite pays the process start-up once. Each rank's output goes to its own log;
when any rank fails, every failing rank's log tail is shown. A hang is bounded by the gloo timeout inside and by
``MEGATRON_VAR_DIST_SUITE_TIMEOUT`` (seconds) here. Extra pytest args: ``MEGATRON_VAR_DIST_ARGS`` (e.g. ``-k vpp``).
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_distributed_suite(tmp_path):
    logs = tmp_path / "logs"
    env = dict(os.environ, MEGATRON_VAR_IN_TORCHRUN="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               TORCH_NCCL_ASYNC_ERROR_HANDLING="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "--log-dir", str(logs), "--redirects", "3",
           "-m", "pytest", str(ROOT / "tests" / "distributed"), "-q", "-p", "no:cacheprovider",
           "-o", "timeout=600", *shlex.split(os.environ.get("MEGATRON_VAR_DIST_ARGS", ""))]
    timeout = int(os.environ.get("MEGATRON_VAR_DIST_SUITE_TIMEOUT", "1500"))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, launcher_out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, launcher_out = "timeout", f"distributed suite exceeded {timeout}s\n{e.stdout or ''}{e.stderr or ''}"
    report = []
    for rank in range(4):
        files = sorted(logs.rglob(f"attempt_0/{rank}/stdout.log")) + sorted(logs.rglob(f"attempt_0/{rank}/stderr.log"))
        text = "".join(f.read_text(errors="replace") for f in files)
        summary = [ln for ln in text.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
        print(f"[rank {rank}] {summary[-1] if summary else 'no pytest summary'}")
        if rank == 0 or rc != 0:
            report.append(f"===== rank {rank} =====\n" + text[-15000:])
    print("\n".join(report[:1]))
    assert rc == 0, "distributed suite failed:\n" + launcher_out[-3000:] + "\n" + "\n".join(report)
