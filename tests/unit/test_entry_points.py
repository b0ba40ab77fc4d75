"""The console scripts of pyproject.toml are installed, point at a callable, and start: the documented tools/*.py
and checkpoints_convert/*.py commands are one-line calls into the same functions."""

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
SHIMS = {"tools/prepare_data.py": "prepare_data", "tools/score_rewards.py": "score_rewards",
         "tools/score_logprobs.py": "score_logprobs", "tools/eval_reward.py": "eval_reward",
         "tools/eval_winrate.py": "eval_winrate", "checkpoints_convert/hf_to_megatron.py": "hf_to_megatron",
         "checkpoints_convert/megatron_to_hf.py": "megatron_to_hf"}


def test_every_script_is_installed_and_loads():
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.value.startswith("megatron_var.")}
    assert set(SCRIPTS) <= set(installed), set(SCRIPTS) - set(installed)
    for name, target in SCRIPTS.items():
        assert installed[name].value == target
        assert callable(installed[name].load()), name


def test_documented_commands_call_the_package():
    for path, module in SHIMS.items():
        text = (ROOT / path).read_text()
        assert f"from megatron_var.cli.{module} import cli" in text, path
        assert f"megatron_var.cli.{module}:cli" in SCRIPTS.values(), module


def test_installed_scripts_start():
    bin_dir = Path(sys.executable).parent
    for name in ("megatron-var-train", "megatron-var-prepare-data"):
        r = subprocess.run([str(bin_dir / name), "--help"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
