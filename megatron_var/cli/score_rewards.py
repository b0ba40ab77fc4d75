"""Command line of tools/score_rewards.py (kept here so the script stays a thin entry point)."""

from __future__ import annotations

import argparse
import sys

from megatron_var.cli.common import run_cli
from megatron_var.data.rewards import ScoreConfig, score_rewards

DESCRIPTION = """\
Score every group of a prepared data directory: the [B,B] matrix r(x_i, y_j) for all prompts i and responses j
of the group, written as rewards-XXXXX.parquet next to each shard-XXXXX.parquet.

Data-parallel by group: every shard is cut into chunks of --groups-per-chunk groups and rank r scores chunks
r::WORLD_SIZE of all shards (no process group needed), so all GPUs work even on a one-shard data set, e.g.
  torchrun --nproc_per_node 8 tools/score_rewards.py --data DIR --reward-model RM_DIR
The rewards file of a shard is written once all its chunks are scored; the result does not depend on the number
of ranks. Resumable: shards with a rewards file, and chunks already scored, are skipped unless --overwrite."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="score_rewards.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DIR", help="directory written by prepare_data.py")
    p.add_argument("--split", default="all", choices=("train", "valid", "all"),
                   help="default: all; train includes every grouping of --regroup-epochs (train.g1/, ...)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--reward-model", metavar="HF_DIR",
                     help="local AutoModelForSequenceClassification dir with its tokenizer; score = logits[:, 0]")
    src.add_argument("--reward-fn", metavar="MODULE:FN",
                     help="python fn(prompts: list[str], responses: list[str]) -> list[float]; "
                          "module:function or path/to/file.py:function")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per reward-model forward (default 16)")
    p.add_argument("--max-length", type=int, default=4096,
                   help="max reward-model tokens per sequence; longer ones keep their end (default 4096)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="reward-model dtype; auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--on-bad-score", default="error", choices=("error", "skip"),
                   help="NaN/inf score: stop with an error (default) or leave the group out and count it")
    p.add_argument("--groups-per-chunk", type=int, default=16,
                   help="groups per unit of work (split over ranks, resumed, one scorer call; default 16)")
    p.add_argument("--overwrite", action="store_true", help="re-score shards that already have rewards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = ScoreConfig(
        data=args.data, split=args.split, reward_model=args.reward_model, reward_fn=args.reward_fn,
        batch_size=args.batch_size, max_length=args.max_length, dtype=args.dtype, overwrite=args.overwrite,
        on_bad_score=args.on_bad_score, groups_per_chunk=args.groups_per_chunk, progress=not args.no_progress,
    )
    s = score_rewards(cfg)
    rate = s.pairs / s.seconds if s.seconds else 0.0
    print(f"rank {cfg.rank}/{cfg.world_size}: shards {s.shards_total} (already done {s.shards_done_before}, "
          f"written by this rank {s.shards_scored}), chunks {s.chunks_total} (already done {s.chunks_done_before}), "
          f"groups scored {s.groups_scored}, groups left out (bad score) "
          f"{s.groups_bad}, {s.pairs} pairs in {s.seconds:.1f} s ({rate:.1f} pairs/s)")
    return 0


def cli() -> None:
    """Console-script entry point ([project.scripts] in pyproject.toml)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
