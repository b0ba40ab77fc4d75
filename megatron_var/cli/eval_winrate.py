"""Command line of tools/eval_winrate.py: eval_reward generations -> judged pairs -> win/tie/lose per seed."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from megatron_var.cli.common import run_cli
from megatron_var.common.atomic import atomic_write_text
from megatron_var.eval.judge import Judge, JudgeConfig, JudgmentCache, Request
from megatron_var.eval.winrate import OUTCOMES, TEMPLATE_ID, pair_outcome, render_question, seed_rates, summarize_seeds

DESCRIPTION = """\
Pairwise win rate of each model's answers against the reference answers (the test set's chosen responses),
judged by an LLM with the MT-Bench pairwise template through any OpenAI-compatible endpoint (vLLM, SGLang, a
hosted API). Every pair is judged in both orders: win = wins both, or wins one and ties the other; tie = ties
both, or wins one and loses the other; lose otherwise. Reports win/tie/lose rates per seed and mean ± standard
error over seeds. Judgments are cached in --cache (JSONL): a rerun asks only what is missing.

Input: the --save-generations JSONL file(s) of tools/eval_reward.py (fields model, seed, index, messages,
response, reference)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval_winrate.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generations", nargs="+", required=True, metavar="JSONL", help="eval_reward generations")
    p.add_argument("--models", nargs="+", metavar="NAME", help="judge only these models (default: all)")
    p.add_argument("--judge-base-url", required=True, help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--judge-model", required=True, help="judge model name as the server knows it")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable with the API key (default OPENAI_API_KEY; local servers need none)")
    p.add_argument("--cache", metavar="JSONL", help="judgment cache (default: OUTPUT with .cache.jsonl)")
    p.add_argument("--output", required=True, metavar="JSON", help="results")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--max-retries", type=int, default=5, help="HTTP retries per request (default 5)")
    p.add_argument("--verdict-retries", type=int, default=2,
                   help="re-asks when a reply has no [[A]]/[[B]]/[[C]] verdict (default 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--judge-max-tokens", type=int, default=2048)
    p.add_argument("--max-error-rate", type=float, default=0.02,
                   help="exit 1 when more than this fraction of pairs has no verdict (default 0.02)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _where(path: Path, lineno: int) -> str:
    return f"{path}:{lineno}"


def _check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a generation record must be a JSON object")
    for key, kind in (("model", str), ("seed", int), ("index", int), ("response", str)):
        if not isinstance(rec.get(key), kind):
            raise ValueError(f"{where}: field {key!r} missing or not {kind.__name__}")
    if not isinstance(rec.get("reference"), str) or not rec["reference"].strip():
        raise ValueError(f"{where}: no 'reference' answer (the prompt file needs a chosen answer: HH 'chosen', "
                         "'messages' ending with an assistant turn, or 'chosen'/'response' next to 'prompt')")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs):
        raise ValueError(f"{where}: field 'messages' missing or not a list of {{role, content}} "
                         "(written by tools/eval_reward.py --save-generations)")
    return rec


def read_generations(paths: list[str], models: list[str] | None) -> dict[str, dict[int, list[dict]]]:
    """{model: {seed: records sorted by index}}; duplicates and unknown --models are errors."""
    out: dict[str, dict[int, dict[int, dict]]] = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"--generations {path}: no such file")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = _where(path, lineno)
                try:
                    rec = _check_record(json.loads(line), where)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None
                if models and rec["model"] not in models:
                    continue
                seed_map = out.setdefault(rec["model"], {}).setdefault(rec["seed"], {})
                if rec["index"] in seed_map:
                    raise ValueError(f"{where}: duplicate generation for model {rec['model']!r}, seed {rec['seed']}, "
                                     f"prompt index {rec['index']}")
                seed_map[rec["index"]] = rec
    if models:
        missing = sorted(set(models) - set(out))
        if missing:
            raise ValueError(f"--models {' '.join(missing)}: not in the generations")
    if not out:
        raise ValueError(f"--generations {' '.join(paths)}: no generations found")
    return {m: {s: [recs[i] for i in sorted(recs)] for s, recs in sorted(seeds.items())} for m, seeds in out.items()}


def pair_requests(rec: dict) -> tuple[Request, Request]:
    """The two orders of one (model answer, reference) pair."""
    q = render_question(rec["messages"])
    return (Request(q, rec["response"], rec["reference"], "model_first"),
            Request(q, rec["reference"], rec["response"], "reference_first"))


def evaluate_winrate(gens: dict[str, dict[int, list[dict]]], judge: Judge) -> list[dict]:
    requests = [r for seeds in gens.values() for recs in seeds.values() for rec in recs for r in pair_requests(rec)]
    verdicts = judge.judge_all(requests)
    results = []
    for model, seeds in gens.items():
        per_seed = {}
        for seed, recs in seeds.items():
            outcomes = []
            for rec in recs:
                first, second = pair_requests(rec)
                outcomes.append(pair_outcome(verdicts[first], verdicts[second]))
            per_seed[seed] = seed_rates(outcomes)
        results.append({"model": model, **summarize_seeds(per_seed)})
    return results


def _fmt(block: dict) -> str:
    mean, se = block["mean"], block["se"]
    return f"{100 * mean:.1f}%" if se is None or math.isnan(se) else f"{100 * mean:.1f} ± {100 * se:.1f}%"


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not 0 <= a.max_error_rate <= 1:
        raise ValueError("--max-error-rate must be in [0, 1]")
    cfg = JudgeConfig(base_url=a.judge_base_url, model=a.judge_model, api_key_env=a.api_key_env,
                      concurrency=a.concurrency, max_retries=a.max_retries, verdict_retries=a.verdict_retries,
                      timeout=a.timeout, max_tokens=a.judge_max_tokens, progress=not a.no_progress)
    gens = read_generations(a.generations, a.models)
    out = Path(a.output)
    cache_path = Path(a.cache) if a.cache else out.with_name(out.stem + ".cache.jsonl")
    judge = Judge(cfg, JudgmentCache(cache_path))
    results = evaluate_winrate(gens, judge)
    report = {"judge": {"base_url": cfg.base_url, "model": cfg.model, "template_id": TEMPLATE_ID,
                        "temperature": cfg.temperature, "max_tokens": cfg.max_tokens},
              "generations": [str(Path(p).resolve()) for p in a.generations], "cache": str(cache_path),
              "stats": asdict(judge.stats), "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    for r in results:
        print(f"{r['model']}: " + ", ".join(f"{k} {_fmt(r[k])}" for k in OUTCOMES)
              + f" over {len(r['per_seed'])} seed(s), {r['n_pairs']} pairs, {r['errors']} errors")
    s = judge.stats
    print(f"judge: {s.requests} requests, {s.cache_hits} cached, {s.unusable_replies} unusable replies re-asked, "
          f"{s.errors} judgments without verdict; wrote {out}")
    n_pairs = sum(r["n_pairs"] + r["errors"] for r in results)
    n_err = sum(r["errors"] for r in results)
    if n_pairs and n_err / n_pairs > a.max_error_rate:
        print(f"error: {n_err} of {n_pairs} pairs have no verdict (over --max-error-rate {a.max_error_rate}); "
              "rerun to retry them (the cache keeps the rest)", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """Console-script entry point ([project.scripts] in pyproject.toml)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
