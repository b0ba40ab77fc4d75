"""A shortened run of the embedded demo through the real commands (HF -> Megatron -> SFT/VAR/DPO/A-LoL at TP=2 on CPU
-> HF -> generation + reward): every stage runs, the report is written, and SFT learns the task (its held-out
reward beats the random base model's). The full-length effect (SFT+VAR vs SFT) is in the README's demo section."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_short(tmp_path):
    # from outside the checkout, with a relative work dir: every stage must be found as a package command, not as
    # a path relative to the cwd
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run([sys.executable, "-m", "megatron_var.demo.run", "--work-dir", "demo",
                        "--scale", "0.1", "--seeds", "0", "--curve-points", "1"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    work = tmp_path / "demo"
    summary = json.loads((work / "summary.json").read_text())
    table = summary["table"]
    assert set(table) == {"base", "SFT", "SFT+VAR", "SFT+DPO", "SFT+A-LoL"}
    assert table["SFT"]["mean"] > table["base"]["mean"] + 0.05, table
    assert (work / "var_valid_reward.png").stat().st_size > 1000
    for name in ("hf_sft", "hf_var", "hf_dpo", "hf_alol"):
        assert (work / name / "model.safetensors.index.json").exists() or any((work / name).glob("*.safetensors"))
