"""The parts of the prepared GPU check (``bench/gpu_check.sh``), one per process, each writing ``OUT/<part>.json``.

    python -m bench.gpu_check_parts {train,matrices,bench,lengths} OUT [--dry-run]

train     VAR training on CUDA/NCCL (world of 1), bf16, distributed optimizer, shared-prefix reference with
          compiled FlexAttention, 20 steps on one fixed batch of random groups: finite and decreasing loss,
          ``ref_policy_logp_gap`` at step 1 within its bf16 bound.
matrices  one group's [B, B] matrix by shared prefix with FlexAttention, shared prefix with the dense mask, and
          naive rows, in fp32 and bf16: largest relative differences (same weights).
bench     ``tools/bench.py``'s llama3.2-1b preset (policy vs transformers, VAR vs SFT, shared prefix vs naive).
lengths   ``tools/bench.py --preset llama3.2-1b --lengths`` (lognormal lengths: real vs computed tokens of SFT, VAR
          online/cached and DPO steps, our VAR step vs the TRL-style one, core attention time of padded vs packed
          rows with FlexAttention block masks); not in the default parts (time budget).

``--dry-run``: tiny shapes, on the CPU when there is no GPU (FlexAttention then runs eagerly): the whole check in
well under a minute, so the orchestration is tested in the suite; the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from megatron_var.models.arch import ModelArch

logger = logging.getLogger(__name__)

TRAIN_STEPS = 20
SIZES = {  # (arch, groups, B, prompt length range, response length range)
    False: (ModelArch(family="llama", num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                      num_query_groups=2, kv_channels=64, vocab_size=2048, max_position_embeddings=2048,
                      rope_theta=10000.0, tie_word_embeddings=True), 2, 8, (64, 160), (32, 96)),
    True: (ModelArch(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                     num_query_groups=2, kv_channels=16, vocab_size=128, max_position_embeddings=256,
                     rope_theta=10000.0), 2, 4, (3, 9), (2, 7)),
}


def _write(out: Path, name: str, result: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def part_train(out: Path, dry_run: bool) -> dict:
    from megatron_var.cli import train
    from megatron_var.data.synthetic import write_random_groups
    from megatron_var.objectives import ref_gap

    arch, groups, b, plen, rlen = SIZES[dry_run]
    work = out / "train_run"
    data = write_random_groups(work / "data", arch.vocab_size, groups, b, prompt_len=plen, response_len=rlen)
    arch.save(work / "model_arch.json")
    argv = ["--objective", "var", "--var-lambda", "0.5", "--data-path", str(data), "--model-arch",
            str(work / "model_arch.json"), "--global-batch-size", str(groups), "--train-iters", str(TRAIN_STEPS),
            "--lr", "1e-3", "--lr-decay-style", "constant", "--bf16", "--save", str(work / "save"), "--seed", "7"]
    rc = train.main(argv)
    recs = [json.loads(line) for line in (work / "save" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs]
    gap = recs[0].get(ref_gap.KEY) if recs else None
    k = max(1, len(losses) // 4)
    result = {"rc": rc, "steps": len(losses), "losses": losses, "ref_policy_logp_gap_step1": gap,
              "ref_policy_logp_gap": [r.get(ref_gap.KEY) for r in recs],
              "gap_bound_bf16": ref_gap.STEP1_BOUND[torch.bfloat16],
              "finite": bool(losses) and all(math.isfinite(x) for x in losses),
              "decreasing": len(losses) > 1 and sum(losses[-k:]) / k < sum(losses[:k]) / k,
              "cuda": torch.cuda.is_available(), "params_dtype": "bf16", "distributed_optimizer": True,
              "flex_attention": torch.cuda.is_available(), "tokens_per_s_last": recs[-1]["tokens_per_s"] if recs
              else None}
    result["ok"] = bool(rc == 0 and result["finite"] and result["decreasing"] and gap is not None
                        and gap <= result["gap_bound_bf16"] and len(losses) == TRAIN_STEPS)
    return result


def part_matrices(out: Path, dry_run: bool) -> dict:
    from bench.measure_steps import build_references, free_device, random_group, scoring_methods
    from megatron_var.runtime import parallel
    from megatron_var.models import specs
    from megatron_var.models.gpt import ModelOptions

    arch, _, b, plen, rlen = SIZES[dry_run]
    cuda = torch.cuda.is_available()
    if not cuda:  # the dry run exercises the FlexAttention path eagerly (on GPU it is the compiled kernel)
        specs.use_flex_attention = lambda requested, **_: bool(requested)
    parallel.init_distributed()
    pc = parallel.ParallelConfig()
    parallel.init_model_parallel(pc)
    group = random_group(b, plen[1], rlen[1], arch.vocab_size, seed=3)
    result = {"B": b, "P": plen[1], "R": rlen[1], "flex": "compiled" if cuda else "eager (CPU)"}
    for dtype in ("fp32", "bf16"):
        parallel.seed_everything(1234)
        seq = plen[1] + b * (rlen[1] + 1)
        refs = build_references(arch, pc, ModelOptions(params_dtype=dtype, seq_length=seq), flex=True)
        mats = {name: fn().double() for name, fn in scoring_methods(
            refs, group, ["shared_prefix_flex", "shared_prefix_dense", "naive"]).items()}
        base = mats["naive"]
        rel = lambda m: float((m - base).abs().max() / base.abs().max())
        result[dtype] = {"flex_vs_naive": rel(mats["shared_prefix_flex"]),
                         "dense_vs_naive": rel(mats["shared_prefix_dense"]),
                         "flex_vs_dense": float((mats["shared_prefix_flex"] - mats["shared_prefix_dense"]).abs().max()
                                                / mats["shared_prefix_dense"].abs().max())}
        del refs
        free_device()
        _write(out, "matrices", result)  # after each dtype
    bound = {"fp32": 1e-4, "bf16": 5e-2}  # same bounds as ref_policy_logp_gap's step-1 check
    result["ok"] = all(v <= bound[d] for d in bound for v in result[d].values())
    return result


def part_bench(out: Path, dry_run: bool) -> dict:
    from bench.step_benchmark import run_benchmark

    preset = "micro" if dry_run else "llama3.2-1b"
    r = run_benchmark(preset, out / "bench")  # writes out/bench/<preset>_<device>.json after each of its parts
    return {"preset": preset, "written_to": r.get("written_to"), "targets": r.get("targets"),
            "ok": "error" not in json.dumps(r.get("targets", {}))}


def part_lengths(out: Path, dry_run: bool) -> dict:
    from bench.length_benchmark import run_lengths_benchmark

    preset = "micro" if dry_run else "llama3.2-1b"
    # writes out/bench/<preset>_<device>_lengths.json after our side and again after the TRL-style side
    r = run_lengths_benchmark(preset, out / "bench")
    entries = [r[side][m] for side, ms in (("ours", ("sft", "var_online", "var_cached", "dpo")),
                                           ("trl_style", ("var_online", "var_cached"))) for m in ms]
    return {"preset": preset, "written_to": r.get("written_to"), "speedup_vs_trl_style": r["speedup_vs_trl_style"],
            "ours_var_online_ref_policy_logp_gap_step1": r["ours"]["var_online"].get("ref_policy_logp_gap_step1"),
            "attention": {k: r["attention"].get(k) for k in ("kernel", "padded_over_packed", "padded_over_token_budget")},
            "ok": all("error" not in e for e in entries) and "padded_over_packed" in r["attention"]}


PARTS = {"train": part_train, "matrices": part_matrices, "bench": part_bench, "lengths": part_lengths}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("out")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1) if not torch.cuda.is_available() else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = PARTS[args.part](out, args.dry_run)
    result["part_wall_s"] = round(time.time() - t0, 1)
    _write(out, args.part, result)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
