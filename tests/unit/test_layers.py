"""The layer contract of pyproject.toml ([tool.importlinter], docs/architecture.md) holds for the package, and
import-linter really catches an upward import: planted into a copy of the package, the same contract fails."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(cwd / "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_package_keeps_its_layers():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_planted_upward_import_is_caught(tmp_path):
    shutil.copytree(ROOT / "megatron_var", tmp_path / "megatron_var", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    low = tmp_path / "megatron_var" / "data" / "groups.py"
    low.write_text(low.read_text() + "\nfrom megatron_var.training import trainer  # planted: data -> training\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert "megatron_var.data.groups -> megatron_var.training.trainer" in r.stdout, r.stdout
