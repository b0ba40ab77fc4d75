"""The Dockerfile passes hadolint and the project rules; deliberately bad Dockerfiles fail both.

Docker cannot build here, so these static checks (plus running the image's helper script and
default command in this environment) are what keeps the image honest.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


lint = _load("lint_dockerfile")
base_constraints = _load("base_constraints")

BAD = """\
FROM x:latest
RUN pip install foo
RUN pip install --no-cache-dir "megatron-core>=0.18"
RUN curl -s https://example.com | sh
HEALTHCHECK CMD curl -f http://localhost/ || exit 1
COPY no_such_dir ./no_such_dir
COPY .venv ./.venv
CMD python train.py
"""


def test_hadolint_reports_nothing_on_the_dockerfile():
    assert lint.run_hadolint(DOCKERFILE.read_text()) == []


def test_hadolint_negative_control():
    codes = {line.split()[1] for line in lint.run_hadolint(BAD)}
    # latest tag, unpinned pip, pip cache, pipe without pipefail, shell-form CMD
    assert {"DL3007", "DL3013", "DL3042", "DL4006", "DL3025"} <= codes


def test_hadolint_ignore_list_is_empty():
    config = (ROOT / ".hadolint.yaml").read_text()
    assert "ignored: []" in config
    assert "failure-threshold: style" in config


def test_project_rules_pass_on_the_dockerfile():
    assert lint.check_dockerfile(DOCKERFILE.read_text()) == []


def test_project_rules_negative_control():
    problems = "\n".join(lint.check_dockerfile(BAD))
    expected = [
        "base image 'x:latest' is not a pinned",
        "pip install without --no-cache-dir",
        "pip requirement 'foo' has no version",
        "megatron-core>=0.18 differs from pyproject.toml's",
        "RUN uses a pipe but SHELL sets no -o pipefail",
        "HEALTHCHECK is not wanted",
        "COPY source 'no_such_dir' does not exist",
        "COPY source '.venv' is excluded by .dockerignore",
        "CMD must be",
        "no WORKDIR",
    ]
    for fragment in expected:
        assert fragment in problems, f"missing {fragment!r} in:\n{problems}"


@pytest.mark.parametrize("edit", [
    ('"megatron-core>=0.19,<0.20"', '"megatron-core>=0.19,<0.21"'),
    ("pytorch:25.12-py3", "pytorch:latest"),
    ("pytorch:25.12-py3", "pytorch"),
    ('"--help"]', '"--version"]'),
    ("--no-cache-dir --constraint /tmp/base-constraints.txt .", "--constraint /tmp/base-constraints.txt ."),
])
def test_each_rule_catches_a_one_line_regression(edit):
    text = DOCKERFILE.read_text()
    assert edit[0] in text
    assert lint.check_dockerfile(text.replace(edit[0], edit[1], 1)) != []


def test_megatron_core_range_matches_pyproject():
    """Independent of the linter: a regex over the raw text, compared as specifier sets."""
    import re
    import tomllib

    from packaging.specifiers import SpecifierSet

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    want = next(Requirement(d) for d in deps if Requirement(d).name == "megatron-core").specifier
    found = re.findall(r'"megatron-core([^"]*)"', DOCKERFILE.read_text())
    assert found and all(SpecifierSet(spec) == want for spec in found), (found, str(want))


def test_dockerignore_keeps_outputs_out_and_sources_in():
    patterns = lint.read_dockerignore(ROOT)
    for path in [".venv", ".git", "runs", "demo_out", "checkpoints", "wandb", "model/x.safetensors",
                 "a/b/__pycache__", ".pytest_cache"]:
        assert lint.dockerignore_excludes(patterns, path), path
    for path in ["megatron_var", "megatron_var/data", "pyproject.toml", "setup.py", "examples",
                 "tools", "checkpoints_convert", "docker/base_constraints.py"]:
        assert not lint.dockerignore_excludes(patterns, path), path
    assert not lint.dockerignore_excludes(["*.md", "!README.md"], "README.md")


def test_base_constraints_pin_this_environments_torch():
    out = subprocess.run([sys.executable, str(ROOT / "docker" / "base_constraints.py")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert f"torch=={md.version('torch')}" in out
    assert f"numpy=={md.version('numpy')}" in out
    for line in out:  # a valid constraints file: exact pins the installed versions satisfy
        req = Requirement(line)
        assert [s.operator for s in req.specifier] == ["=="]
        assert req.specifier.contains(md.version(req.name), prereleases=True)
    assert base_constraints.constraint_lines(("surely-not-an-installed-dist",)) == []


def test_lint_cli_exit_codes(tmp_path):
    script = str(ROOT / "docker" / "lint_dockerfile.py")
    bad = tmp_path / "Dockerfile"
    bad.write_text(BAD)
    proc = subprocess.run([sys.executable, script, "--dockerfile", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "DL3007" in proc.stdout
    proc = subprocess.run([sys.executable, script, "--dockerfile", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_default_cmd_prints_the_entry_points_help():
    if importlib.util.find_spec("megatron_var.train") is None:
        pytest.skip("megatron_var.train (the training entry point) is not written yet")
    proc = subprocess.run([sys.executable, "-m", "megatron_var.train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout and "--objective" in proc.stdout


def test_docs_build_commands_match_the_dockerfile():
    """docs/cluster.md: every --build-arg exists as an ARG, and the pinned base tag is the documented one."""
    import re

    docs = (ROOT / "docs" / "cluster.md").read_text()
    text = DOCKERFILE.read_text()
    args = set(re.findall(r"^ARG (\w+)", text, re.M))
    used = set(re.findall(r"--build-arg (\w+)=", docs))
    assert used and used <= args, used - args
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert f"ARG BASE_IMAGE={base}" in docs
    launcher_vars = set(re.findall(r"\$\{?([A-Z][A-Z_]+)", (ROOT / "examples" / "_launch.sh").read_text()))
    assert {"DATA_DIR", "LOAD_DIR", "SAVE_DIR", "REF_LOAD", "EXTRA_ARGS"} <= launcher_vars
    for var in sorted(launcher_vars - {"CUDA_DEVICE_MAX_CONNECTIONS", "MEGATRON_VAR_PRINT_ARGS"}) + [
            "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA"]:
        assert f"`{var}`" in docs, var
    assert "`HF_DIR`" not in docs  # documented once, read by nothing
