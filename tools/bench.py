#!/usr/bin/env python
"""Performance benchmark in one process: policy step vs transformers (tokens/s, MFU), cross-pair scoring naive vs
shared prefix (dense / FlexAttention), VAR step vs SFT step. Prints JSON and writes bench/results/<preset>_<device>.json.

    python tools/bench.py --preset tiny             # CPU, seconds
    python tools/bench.py --preset llama3.2-1b      # one GPU
    python tools/bench.py --preset micro            # seconds: the GPU check's dry run (bench/gpu_check.sh)

Logic in bench/bench.py (orchestration, presets) and bench/bench_steps.py (measurements).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_var.cli.common import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from bench.bench import PRESETS, run

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"),
                   help="where <preset>_<device>.json goes ('' = do not write)")
    p.add_argument("--flex", choices=["auto", "on", "off"], default="auto",
                   help="also time shared-prefix scoring with FlexAttention (auto: when CUDA is present)")
    p.add_argument("--transformer-impl", choices=["local", "te", "auto"], default="local",
                   help="our model's layer implementation (local = megatron local spec + SDPA/Flex core attention)")
    p.add_argument("--iters", type=int, help="timed runs per measurement (median); default from the preset")
    p.add_argument("--warmup", type=int, help="untimed runs first; default from the preset")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads on CPU (1: stable timings)")
    args = p.parse_args(argv)
    flex = {"auto": None, "on": True, "off": False}[args.flex]
    result = run(args.preset, Path(args.out_dir) if args.out_dir else None, flex=flex,
                 transformer_impl=args.transformer_impl, iters=args.iters, warmup=args.warmup,
                 cpu_threads=args.cpu_threads)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
