"""The prepared GPU check runs end to end in its --dry-run mode on CPU (every part, each within
its own time limit, the JSON rewritten after each part), and a part over its limit is killed and recorded."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT), PYTHON=sys.executable)
    proc = subprocess.Popen(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path), "--dry-run"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, report = [], tmp_path / "gpu_check.json"
    while proc.poll() is None:  # the JSON as it grows: one more part each time
        if report.exists():
            parts = tuple(json.loads(report.read_text())["parts"])  # written atomically
            if not seen or seen[-1] != parts:
                seen.append(parts)
        time.sleep(0.2)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    assert seen[:3] == [("train",), ("train", "matrices"), ("train", "matrices", "bench")], seen
    r = json.loads(report.read_text())
    assert r["dry_run"] and set(r["parts"]) == {"train", "matrices", "bench"}
    for name, part in r["parts"].items():
        assert part["ok"] and not part["timed_out"] and part["wall_s"] <= part["limit_s"], (name, part)
    train = r["parts"]["train"]
    assert train["steps"] == 20 and train["finite"] and train["losses"][-1] < train["losses"][0]
    assert train["ref_policy_logp_gap_step1"] <= train["gap_bound_bf16"]
    assert train["ref_policy_logp_gap"][-1] > train["ref_policy_logp_gap_step1"]  # the policy moved
    m = r["parts"]["matrices"]
    assert m["fp32"]["flex_vs_naive"] <= 1e-5 and m["fp32"]["dense_vs_naive"] <= 1e-5
    assert m["bf16"]["flex_vs_naive"] <= 5e-2
    assert Path(r["parts"]["bench"]["written_to"]).exists()


def test_a_part_over_its_limit_is_killed_and_recorded(tmp_path):
    """Negative control for the limits: a part that hangs after writing partial results is killed at its limit
    (with its children), its partial JSON kept, and it is not ok."""
    script = (f"import json, subprocess, sys, time; open({str(tmp_path / 'slow.json')!r}, 'w')"
              ".write(json.dumps({'ok': True, 'partial': 1})); "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    t0 = time.time()
    r = gpu_check.run_part("slow", tmp_path, True, limit=2, cmd=[sys.executable, "-c", script])
    assert time.time() - t0 < 20
    assert r["timed_out"] and not r["ok"] and r["partial"] == 1 and r["limit_s"] == 2


def test_lengths_part_dry_run(tmp_path, monkeypatch):
    """The optional lengths part (``--parts ...,lengths``; outside the default 6-minute budget) at its dry-run size:
    both sides measured, the JSON written, the speed-ups reported."""
    for k, v in dict(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT)).items():
        monkeypatch.setenv(k, v)  # run_part's subprocess inherits the environment
    monkeypatch.chdir(ROOT)
    r = gpu_check.run_part("lengths", tmp_path, True, limit=gpu_check.LIMITS[True]["lengths"])
    assert r["ok"] and not r["timed_out"], (r, (tmp_path / "lengths.log").read_text()[-3000:])
    assert r["preset"] == "micro" and Path(r["written_to"]).name.endswith("_lengths.json")
    assert set(r["speedup_vs_trl_style"]) == {"online", "cached"}
    assert "lengths" not in gpu_check.DEFAULT_PARTS and "lengths" in gpu_check.ORDER
