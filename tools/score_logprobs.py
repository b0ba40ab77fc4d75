#!/usr/bin/env python
"""Per-token log-probs of (prompt, response) pairs from a megatron_var checkpoint, at any TP/PP (run with torchrun):

    torchrun --nproc_per_node K tools/score_logprobs.py --load MEG_DIR --tensor-model-parallel-size N \\
        --pipeline-model-parallel-size M --input pairs.jsonl --output out.jsonl

Logic in megatron_var/scoring.py and megatron_var/scoring_cli.py; run with --help for the input format.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_var.data.cli import run_cli  # noqa: E402
from megatron_var.scoring_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
