#!/usr/bin/env python
"""Per-token log-probs of (prompt, response) pairs from a megatron_var checkpoint, at any TP/PP (run with torchrun):

    torchrun --nproc_per_node K tools/score_logprobs.py --load MEG_DIR --tensor-model-parallel-size N \\
        --pipeline-model-parallel-size M --input pairs.jsonl --output out.jsonl

Run with --help for the input format.

The same command as `megatron-var-score-logprobs`; the code is megatron_var/cli/score_logprobs.py."""

from megatron_var.cli.score_logprobs import cli

if __name__ == "__main__":
    cli()
