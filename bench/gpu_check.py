"""The prepared GPU check: every part in its own process under its own time limit, ``OUT/gpu_check.json``
rewritten after each part, so a lent GPU's few minutes always leave what was measured.

    python -m bench.gpu_check OUT [--dry-run] [--limit part=seconds ...]

Why processes: a part that hangs or overruns (a FlexAttention compile, an OOM in the 1B benchmark) is killed with
its whole process group at its limit and the next part still runs. Parts: ``bench/gpu_check_parts.py``.
Default limits add up to 5.5 minutes on a GPU (bench/gpu_check.sh's 6-minute budget, with start-up); the optional
``lengths`` part adds 2.5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_var.common.atomic import atomic_write_text

ORDER = ("train", "matrices", "bench", "lengths")
DEFAULT_PARTS = ("train", "matrices", "bench")
"""What runs without ``--parts``: the 6-minute budget. ``lengths`` (the 1B length-realistic benchmark against the
TRL-style step and the packed attention timing, ~3 minutes more) does not fit in it and runs when asked: ``--parts train,matrices,bench,lengths``."""
LIMITS = {False: {"train": 90, "matrices": 60, "bench": 180, "lengths": 180},
          True: {"train": 120, "matrices": 90, "bench": 120, "lengths": 120}}  # dry run: caps for a loaded CI machine


def run_part(name: str, out: Path, dry_run: bool, limit: float, cmd: Optional[list[str]] = None) -> dict:
    """Run one part (``cmd`` overrides its command line, for tests); its own JSON (if it got that far) plus rc,
    wall time, limit and whether it was killed."""
    cmd = cmd or [sys.executable, "-m", "bench.gpu_check_parts", name, str(out)] + \
        (["--dry-run"] if dry_run else [])
    t0 = time.time()
    with (out / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            rc, timed_out = proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    path = out / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    metrics = out / "train_run" / "save" / "metrics.jsonl"  # the training part's per-step log, kept if cut short
    if name == "train" and not result and metrics.exists():
        result["metrics_so_far"] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    result.update(rc=rc, timed_out=timed_out, wall_s=round(time.time() - t0, 1), limit_s=limit,
                  log=str(out / f"{name}.log"))
    result["ok"] = bool(result.get("ok")) and rc == 0 and not timed_out
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU when there is no GPU")
    p.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS", help="override a part's limit")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma-separated parts of {', '.join(ORDER)}, run in that order (default: "
                        f"{','.join(DEFAULT_PARTS)})")
    args = p.parse_args(argv)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limits = dict(LIMITS[args.dry_run])
    for item in args.limit:
        k, v = item.split("=", 1)
        if k not in limits:
            raise SystemExit(f"--limit: unknown part {k!r} (parts: {', '.join(ORDER)})")
        limits[k] = float(v)
    report = {"dry_run": args.dry_run, "cuda": torch.cuda.is_available(),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "limits_s": limits, "parts": {}}
    t0 = time.time()
    unknown = set(args.parts.split(",")) - set(ORDER)
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {', '.join(sorted(unknown))} (parts: {', '.join(ORDER)})")
    for name in [n for n in ORDER if n in args.parts.split(",")]:
        report["parts"][name] = run_part(name, out, args.dry_run, limits[name])
        report["wall_s"] = round(time.time() - t0, 1)
        # never half-written, even when the machine is taken back
        atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
        print(f"[gpu_check] {name}: ok={report['parts'][name]['ok']} rc={report['parts'][name]['rc']} "
              f"{report['parts'][name]['wall_s']}s (limit {limits[name]:.0f}s)", flush=True)
    return 0 if all(r["ok"] for r in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
