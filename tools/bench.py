#!/usr/bin/env python
"""Performance benchmark in one process: policy step vs transformers (tokens/s, MFU), cross-pair scoring naive vs
shared prefix (dense / FlexAttention), VAR step vs SFT step. Prints JSON and writes
bench/results/<preset>_<device>.json.

    python tools/bench.py --preset tiny             # CPU, seconds
    python tools/bench.py --preset llama3.2-1b      # one GPU
    python tools/bench.py --preset micro            # seconds: the GPU check's dry run (bench/gpu_check.sh)
    python tools/bench.py --preset tiny --lengths   # lognormal lengths: real vs computed tokens of SFT / VAR
                                                    # online, cached / DPO steps, our VAR step vs a TRL-style one

Run with --help for the flags. The code is in bench/: step_benchmark.py (command line, orchestration), presets.py
(sizes, targets), measure_steps.py (the measurements), length_benchmark.py (--lengths: with length_groups.py,
packed_attention.py and trl_style_step.py); docs/performance.md explains what is measured.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed: import it from this checkout

from bench.step_benchmark import main  # noqa: E402
from megatron_var.cli.common import run_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
