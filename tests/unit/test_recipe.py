"""docs/recipe.md and its SLURM jobs: every tool command in the recipe parses with that tool's own argument
parser, referenced files exist, and the sbatch files pass bash -n / shellcheck and dry-run (stub srun, python,
torchrun) into commands the tools accept."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "docs" / "recipe.md"
JOBS = ["score_rewards.sbatch", "export_hf.sbatch", "eval.sbatch"]
pytestmark = pytest.mark.timeout(120)


def _parse(script: str, args: list[str]):
    """Parse args with the parser of the tool at `script` (SystemExit = rejected)."""
    name = Path(script).name
    if name == "score_rewards.py":
        from megatron_var.cli.score_rewards import build_parser
    elif name == "eval_reward.py":
        from megatron_var.cli.eval_reward import build_parser
    elif name == "eval_winrate.py":
        from megatron_var.cli.eval_winrate import build_parser
    elif name == "prepare_data.py":
        from megatron_var.cli.prepare_data import build_parser
    elif name == "hf_to_megatron.py":
        from megatron_var.cli.hf_to_megatron import parse_args
        return parse_args(args)
    elif name == "megatron_to_hf.py":
        from megatron_var.cli.megatron_to_hf import parse_args
        return parse_args(args)
    else:
        raise AssertionError(f"no parser known for {script}")
    return build_parser().parse_args(args)


def _tool_call(argv: list[str]) -> tuple[str, list[str]] | None:
    """(script, its args) of a command line: skips VAR=x prefixes, python / torchrun and torchrun's options."""
    for k, tok in enumerate(argv):
        if re.fullmatch(r"(tools|checkpoints_convert)/\w+\.py", tok):
            return tok, argv[k + 1:]
    return None


def _recipe_commands() -> list[list[str]]:
    text = RECIPE.read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(shlex.split(line))
    return cmds


def test_recipe_tool_commands_parse():
    calls = [c for c in map(_tool_call, _recipe_commands()) if c]
    scripts = {Path(s).name for s, _ in calls}
    assert scripts >= {"hf_to_megatron.py", "prepare_data.py", "score_rewards.py", "megatron_to_hf.py",
                       "eval_reward.py", "eval_winrate.py"}, scripts
    for script, args in calls:
        assert (ROOT / script).is_file(), script
        try:
            _parse(script, args)
        except SystemExit:
            pytest.fail(f"docs/recipe.md: {script} {' '.join(args)} is rejected by its parser")
    # negative control: a misspelled flag is rejected, so the loop above checks something
    with pytest.raises(SystemExit):
        _parse("tools/score_rewards.py", ["--data", "d", "--reward-model", "m", "--batch-sise", "4"])


def test_recipe_references_exist_and_readme_links_it():
    text = RECIPE.read_text()
    for ref in set(re.findall(r"(examples/[\w./-]+\.(?:sh|sbatch))", text)):
        assert (ROOT / ref).is_file(), ref
    for doc in set(re.findall(r"\]\((\w[\w-]*\.md)\)", text)):
        assert (ROOT / "docs" / doc).is_file(), doc
    assert "--objective alol" in text and "var/ess" in text and "Out of memory" in text
    assert "(docs/recipe.md)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("job", JOBS)
def test_sbatch_syntax_and_shellcheck(job):
    path = ROOT / "examples" / "slurm" / job
    subprocess.run(["bash", "-n", str(path)], check=True)
    beside = Path(sys.executable).parent / "shellcheck"
    if not beside.exists():
        pytest.skip("shellcheck not installed (test extra)")
    proc = subprocess.run([str(beside), "-x", str(path), str(ROOT / "examples/slurm/_rank_env.sh")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
    header = path.read_text()
    assert "#SBATCH --job-name=" in header and "set -euo pipefail" in header


STUB = """#!/bin/bash
python3 -c 'import json, os, sys; print(json.dumps({"exe": os.path.basename(sys.argv[1]), "argv": sys.argv[2:],
  "rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE")}))' "$0" "$@" >> "$STUB_LOG"
"""
SRUN = """#!/bin/bash
while [[ $# -gt 0 && "$1" == --* ]]; do shift; done
SLURM_PROCID=0 SLURM_NTASKS=2 SLURM_LOCALID=0 "$@"
"""


def _dry_run(tmp_path: Path, job: str, env: dict) -> list[dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("python", STUB), ("torchrun", STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "STUB_LOG": str(log),
                "SLURM_SUBMIT_DIR": str(ROOT), **env}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "slurm" / job)], env=full_env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(x) for x in log.read_text().splitlines()]


def test_score_rewards_job_dry_run(tmp_path):
    (call,) = _dry_run(tmp_path, "score_rewards.sbatch", {"DATA_DIR": "/d", "RM_DIR": "/rm"})
    assert call["exe"] == "python" and (call["rank"], call["world"]) == ("0", "2")  # ranks from SLURM
    args = _parse(call["argv"][0], call["argv"][1:])
    assert args.data == "/d" and args.reward_model == "/rm"


def test_export_job_dry_run(tmp_path):
    (call,) = _dry_run(tmp_path, "export_hf.sbatch", {"SAVE_DIR": "/run", "HF_OUT": "/hf", "ITERATION": "200"})
    args = _parse(call["argv"][0], call["argv"][1:])
    assert (args.load, args.out, args.iteration, args.dtype) == ("/run", "/hf", 200, "bf16")


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_eval_job_dry_run(tmp_path, engine):
    env = {"MODELS": "/m1 /m2", "NAMES": "a b", "PROMPTS": "/p1.jsonl.gz /p2.jsonl.gz", "RM_DIR": "/rm",
           "OUT_DIR": str(tmp_path / "out"), "ENGINE": engine, "JUDGE_BASE_URL": "http://j:8000/v1",
           "JUDGE_MODEL": "judge"}
    gen, judge = _dry_run(tmp_path, "eval.sbatch", env)
    assert gen["exe"] == ("torchrun" if engine == "transformers" else "python")
    script, rest = _tool_call(gen["argv"])
    args = _parse(script, rest)
    assert args.model == ["/m1", "/m2"] and args.names == ["a", "b"] and args.seeds == [0, 1, 2]
    assert args.engine == engine and args.save_generations == str(tmp_path / "out" / "generations.jsonl")
    w = _parse(judge["argv"][0], judge["argv"][1:])
    assert w.generations == [args.save_generations] and w.judge_model == "judge"
    # without a judge URL only the generation step runs
    env.pop("JUDGE_BASE_URL")
    (tmp_path / "again").mkdir()
    assert len(_dry_run(tmp_path / "again", "eval.sbatch", env)) == 1
