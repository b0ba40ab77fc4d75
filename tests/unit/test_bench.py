"""tools/bench.py --preset tiny runs on CPU and reports every measurement (no timing is asserted: timings are not
test material); the cross-pair matrices it scores agree between naive and shared-prefix packing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_preset_reports_every_part(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "tools/bench.py", "--preset", "tiny", "--iters", "1", "--warmup", "0",
                        "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    written = list(tmp_path.glob("tiny_*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["preset"] == "tiny"
    assert out["peak"]["flops_per_s"] > 0
    pol = out["policy_step"]
    for impl in ("megatron", "transformers"):
        # MFU is tokens/s x FLOPs per token over a peak measured once: on a shared CPU either timing can be off,
        # so check the arithmetic, not a bound
        assert pol[impl]["tokens_per_s"] > 0 and pol[impl]["mfu"] == pytest.approx(
            pol[impl]["tokens_per_s"] * pol["flops_per_token"] / out["peak"]["flops_per_s"], rel=1e-9), pol[impl]
    assert pol["megatron"]["params"] == pol["transformers"]["params"]  # same model shape on both sides
    sc = out["reference_scoring"]
    assert set(sc) >= {"B", "P", "R", "naive", "naive_per_prompt", "shared_prefix_dense"}
    for name in ("naive", "naive_per_prompt"):
        assert sc[name]["s"] > 0 and sc[name]["max_rel_diff_vs_shared_prefix_dense"] < 1e-5
    assert sc["shared_prefix_dense"]["speedup_vs_naive"] > 0
    st = out["var_vs_sft"]
    assert st["sft"]["step_s"] > 0 and st["sft_full_logits"]["step_s"] > 0
    for name in ("shared_prefix_dense", "naive", "naive_per_prompt", "cached"):
        entry = st["var_" + name]
        assert entry["ratio_to_sft"] > 0 and entry["reference_s"] >= 0, entry
    assert set(out["targets"]) == {"policy_vs_transformers", "policy_mfu", "var_over_sft", "shared_prefix_speedup"}


def test_unknown_preset_is_a_clean_error():
    r = subprocess.run([sys.executable, "tools/bench.py", "--preset", "huge"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
