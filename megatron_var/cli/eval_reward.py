"""Command line of tools/eval_reward.py: flags -> EvalConfig, the results table, JSON output."""

from __future__ import annotations

import argparse
import sys
import json
import math
import os
from pathlib import Path

from megatron_var.cli.common import run_cli
from megatron_var.common.atomic import atomic_write_text
from megatron_var.data.formatting import DEFAULT_RAW_TEMPLATE
from megatron_var.eval.reward_eval import EvalConfig, evaluate

DESCRIPTION = """\
Sample responses from one or more local HF models on a prompt set and score them with an HF reward model
(AutoModelForSequenceClassification, its own tokenizer and chat template) or a python reward function.
Sampling follows the VAR paper (temperature 0.8, top-p 0.9, top-k 50). Reports, per model and per subset, the
mean reward over --seeds with the standard error of the per-seed means.

Prompt rows (JSONL[.gz], JSON, Parquet, CSV, save_to_disk dir): {"prompt": ...} | {"messages": [...]} (a final
assistant turn is the reference answer) | HH-RLHF {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."} (the whole
conversation before the last assistant reply, which is the reference answer); optional "subset" (default: the
file name, or its folder for test/train files). --save-generations keeps each prompt's messages and reference
answer for tools/eval_winrate.py.

Scale: --engine vllm (tensor-parallel over --tensor-parallel-size GPUs, one process) when vLLM is installed;
else transformers, data-parallel under torchrun (each rank samples every WORLD_SIZE-th batch; rank 0 writes):
  torchrun --nproc_per_node 8 tools/eval_reward.py --engine transformers --model ... --prompts ...
Generations depend on model, prompts, --batch-size and seed, not on the number of ranks."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_reward.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models and prompts")
    g.add_argument("--model", nargs="+", required=True, metavar="HF_DIR", help="local HF causal-LM directories")
    g.add_argument("--names", nargs="+", metavar="NAME", help="labels for the models (default: directory names)")
    g.add_argument("--prompts", nargs="+", required=True, metavar="FILE", help="prompt files")
    g.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    g.add_argument("--template", default="chat", choices=("chat", "raw"),
                   help="chat: tokenizer.apply_chat_template(add_generation_prompt=True); raw: --raw-template")
    g.add_argument("--raw-template", default=DEFAULT_RAW_TEMPLATE, help="raw prompt template with {prompt}")
    g.add_argument("--system-prompt", help="system turn added to prompts that have none")
    g = p.add_argument_group("scoring (exactly one)")
    g.add_argument("--reward-model", metavar="HF_DIR", help="AutoModelForSequenceClassification dir")
    g.add_argument("--reward-fn", metavar="MODULE:FN", help="fn(prompts, responses) -> list[float]")
    g.add_argument("--rm-batch-size", type=int, default=16)
    g.add_argument("--rm-max-length", type=int, default=4096)
    g = p.add_argument_group("sampling")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda:LOCAL_RANK if available)")
    g.add_argument("--engine", default="auto", choices=("auto", "transformers", "vllm"),
                   help="auto: vllm if installed, on GPU, without torchrun; else transformers")
    g.add_argument("--tensor-parallel-size", type=int, help="vLLM only (default: all visible GPUs)")
    g = p.add_argument_group("output")
    g.add_argument("--output", metavar="JSON", help="write all results here")
    g.add_argument("--save-generations", metavar="JSONL", help="write every generation with its reward here")
    g.add_argument("--no-progress", action="store_true")
    return p


def _fmt(mean: float, se: float | None) -> str:
    return f"{mean:.3f}" if se is None or math.isnan(se) else f"{mean:.3f} ± {se:.3f}"


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    subsets = sorted(report["subsets"])
    header = ["model", "reward", *subsets, "tokens", "eos"]
    rows = []
    for r in report["results"]:
        rows.append([r["name"], _fmt(r["mean"], r["se"]),
                     *[_fmt(r["subsets"][s]["mean"], r["subsets"][s]["se"]) for s in subsets],
                     f"{r['response_tokens_mean']:.1f}", f"{100 * r['eos_rate']:.0f}%"])
    return header, rows


def print_table(report: dict) -> None:
    header, rows = table_rows(report)
    seeds = report["config"]["seeds"]
    title = f"mean reward ± SE over {len(seeds)} seed(s), {report['n_prompts']} prompts"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(header)]
        print(title)
        for line in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
        return
    table = Table(title=title)
    for k, h in enumerate(header):
        table.add_column(h, justify="left" if k == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=max(100, min(200, os.get_terminal_size(0).columns if os.isatty(0) else 160))).print(table)


def _write_json(path: str, obj) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(obj, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = EvalConfig(
        models=a.model, prompts=a.prompts, names=a.names, reward_model=a.reward_model, reward_fn=a.reward_fn,
        template=a.template, raw_template=a.raw_template, system_prompt=a.system_prompt, seeds=a.seeds,
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size, max_prompts=a.max_prompts, rm_batch_size=a.rm_batch_size,
        rm_max_length=a.rm_max_length, dtype=a.dtype, device=a.device, engine=a.engine,
        tensor_parallel_size=a.tensor_parallel_size, progress=not a.no_progress,
    )
    report = evaluate(cfg)
    if report is None:  # not rank 0: rank 0 gathered this rank's share and writes the outputs
        return 0
    generations = report.pop("generations")
    print_table(report)
    if a.output:
        _write_json(a.output, report)
        print(f"wrote {a.output}")
    if a.save_generations:
        out = Path(a.save_generations)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))
        print(f"wrote {out} ({len(generations)} generations)")
    return 0


def cli() -> None:
    """Console-script entry point ([project.scripts] in pyproject.toml)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
