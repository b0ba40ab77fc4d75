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
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "megatron_var.demo.run", "--work-dir", str(tmp_path), "--scale", "0.1",
                        "--seeds", "0", "--curve-points", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    table = summary["table"]
    assert set(table) == {"base", "SFT", "SFT+VAR", "SFT+DPO", "SFT+A-LoL"}
    assert table["SFT"]["mean"] > table["base"]["mean"] + 0.05, table
    assert (tmp_path / "var_valid_reward.png").stat().st_size > 1000
    for name in ("hf_sft", "hf_var", "hf_dpo", "hf_alol"):
        assert (tmp_path / name / "model.safetensors.index.json").exists() or \
            any((tmp_path / name).glob("*.safetensors"))
