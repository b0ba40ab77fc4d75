"""Command line of tools/prepare_data.py (kept here so the script stays a thin entry point)."""

from __future__ import annotations

import argparse
import sys

from megatron_var.cli.common import run_cli
from megatron_var.data.adapters import FORMATS
from megatron_var.data.formatting import DEFAULT_RAW_TEMPLATE
from megatron_var.data.prepare import RESPONSE_MODES, PrepareConfig, prepare

DESCRIPTION = """\
Turn preference / instruction data into tokenized VAR groups (Parquet shards + meta.json).

Inputs: JSONL (.jsonl, .jsonl.gz), JSON, Parquet, CSV files, datasets.save_to_disk directories (--split, default
train or the only split), or a dataset name that is not a local path (datasets.load_dataset, --split).
Formats, auto-detected from the columns (most specific wins; text fields may be strings or [{role, content}] lists):
  offsetbias           instruction, output_1, output_2, label (1|2 = the better output)
  ultrafeedback        prompt|instruction, completions[{response, annotations, fine-grained_score, ...}]
  preference           prompt, chosen, rejected [, score_chosen, score_rejected] (TRL preference;
                       HuggingFaceH4/ultrafeedback_binarized: chosen/rejected are whole dialogues)
  implicit_preference  chosen, rejected (TRL implicit prompt: the shared beginning / earlier turns are the prompt)
  hh                   chosen, rejected as "\\n\\nHuman: ...\\n\\nAssistant: ..." (Anthropic/hh-rlhf)
  unpaired_preference  prompt, completion, label (TRL/KTO; --responses chosen keeps label=true rows)
  prompt_completion    prompt, completion (TRL prompt-completion)
  plain                prompt, response|chosen [, rejected] [, system]
  messages             messages: [{role, content}, ...] (last assistant turn = response) [, rejected]
Refused with a reason: text only (language modeling) and prompt only (no responses to train on).
Next step: tools/score_rewards.py --data OUTPUT writes the [B,B] reward matrices next to the shards."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare_data.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input / output")
    io.add_argument("--input", nargs="+", required=True, metavar="PATH",
                    help="input files, save_to_disk dirs, or dataset names (datasets.load_dataset)")
    io.add_argument("--input-format", default="auto", choices=("auto", *FORMATS), help="default: auto-detect")
    io.add_argument("--split", default=None, metavar="NAME",
                    help="split of a saved DatasetDict or hub dataset (default: train, else the only split)")
    io.add_argument("--output", required=True, metavar="DIR", help="output directory (must be absent or empty)")
    io.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    io.add_argument("--on-bad-row", default="error", choices=("error", "skip"),
                    help="stop at the first bad row (default) or skip bad rows and count them by reason")
    fmt = p.add_argument_group("formatting")
    fmt.add_argument("--tokenizer", required=True, metavar="DIR",
                     help="local HF tokenizer dir, or a megatron_var checkpoint dir (uses DIR/hf/ if present)")
    fmt.add_argument("--template", default="chat", choices=("chat", "raw"),
                     help="chat: the tokenizer's chat template (instruct models); raw: --raw-template (base models)")
    fmt.add_argument("--raw-template", default=DEFAULT_RAW_TEMPLATE,
                     help="prompt template with {prompt} (and optionally {system}); default: %(default)r")
    fmt.add_argument("--system-prompt", default=None, help="system turn added to prompts that have none")
    fmt.add_argument("--responses", default="chosen", choices=RESPONSE_MODES,
                     help="chosen: preferred response only; all: every response is a sample; pairs: DPO groups "
                          "of 2 (chosen, rejected)")
    fmt.add_argument("--ultrafeedback-score", default="fine-grained", choices=("fine-grained", "overall"),
                     help="UltraFeedback ranking score (fine-grained = mean of per-aspect ratings)")
    fmt.add_argument("--seq-length", type=int, default=2048, help="max prompt+response tokens (default 2048)")
    fmt.add_argument("--overlong", default="truncate", choices=("truncate", "drop"),
                     help="truncate: cut the prompt from the left (the response tail only if the response alone "
                          "is too long); drop: drop the sample. Both are counted")
    grp = p.add_argument_group("groups")
    grp.add_argument("--group-size", type=int, default=None, help="B samples per group (default 8; pairs: 2)")
    grp.add_argument("--valid-fraction", type=float, default=0.05, help="fraction of groups for valid (0.05)")
    grp.add_argument("--seed", type=int, default=1234, help="shuffle / split seed")
    grp.add_argument("--shard-size", type=int, default=1000, help="groups per shard file (default 1000)")
    grp.add_argument("--regroup-epochs", type=int, default=1, metavar="N",
                     help="write N groupings of the same train samples (train/, train.g1/, ...; seeded); the "
                          "trainer uses grouping e %% N in epoch e, so Z(x) is estimated against other responses "
                          "each epoch. score_rewards scores them all (default 1; not with --responses pairs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = PrepareConfig(
        inputs=args.input, output=args.output, tokenizer=args.tokenizer, input_format=args.input_format,
        split=args.split,
        template=args.template, raw_template=args.raw_template, system_prompt=args.system_prompt,
        responses=args.responses, group_size=args.group_size, seq_length=args.seq_length, overlong=args.overlong,
        valid_fraction=args.valid_fraction, seed=args.seed, shard_size=args.shard_size, overwrite=args.overwrite,
        regroup_epochs=args.regroup_epochs,
        on_bad_row=args.on_bad_row, ultrafeedback_score=args.ultrafeedback_score, progress=not args.no_progress,
    )
    summary = prepare(cfg)
    print(summary.table())
    print(f"wrote {args.output}")
    return 0


def cli() -> None:
    """Console-script entry point ([project.scripts] in pyproject.toml)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
