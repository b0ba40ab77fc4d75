"""Length-realistic step benchmark (``tools/bench.py --lengths``): tokens the step needs vs tokens it computes, and
step time, for SFT, VAR (online shared-prefix reference; cached reference) and DPO, on groups whose prompt and
response lengths follow a documented distribution (or come from a prepared data directory); and the same VAR step
written the way a TRL user would on transformers, in the same process, on the same groups.

Lengths and token counts: ``bench/length_groups.py``.

A step = ``Preset.lengths_groups`` groups, one group per micro-batch (the trainer's --micro-batch-size 1), run as
``Trainer.train_step`` runs it: ``optimizer.zero_grad``, ``runtime.microbatches.policy_microbatches`` (packed rows, the
trainer's default; ``ours_padded``: padded rows), the reference
source's values (``reference.source.OnlineReference`` over a ``FrozenReference`` with ``score_cross_pairs``
(shared prefix) or ``score_diagonal`` (DPO); ``CachedReference`` for "cached"), ``Objective.attach``
(``objectives.objective.build_objective``), megatron's schedule (``runtime.engine.run_schedule`` +
``make_forward_step``), ``optimizer.step`` (``runtime.engine.build_optimizer``). Each method runs the same
``warmup + iters`` steps, each with its own groups; the first ``warmup`` are not counted.

Per step (means over the counted steps; ratios are Σ over Σ):
  policy     real = Σ_i |x_i| + |y_i| (the step's samples); computed = numel of the policy micro-batches' token
             tensors (padding included).
  reference  VAR: real = the tokens of the shared-prefix rows without padding, Σ_i (|x_i| − 1 + Σ_j (|y_j| + 1)) per
             group (row i is x_i[:-1] and B segments [x_i[-1]; y_j]) — not the naive B² pairs' Σ_ij |x_i| + |y_j|,
             which is what a naive implementation computes, not what the step needs; computed = numel of the
             reference rows run (``FrozenReference.last_computed_tokens``; padding included): by default the rows
             of all the step's groups packed together, with a token budget in one-row micro-batches of the budget.
             DPO: the B diagonal rows [x_i; y_i] (its real = the policy's). Cached: no reference pass in the step
             (0).
  time       the whole step, and its parts: reference values + attach, forward/backward, optimizer.
  model FLOPs the trainer's count (``training.throughput.step_flops`` over the computed tokens, attention at the
             policy micro-batches' mean row length).

DPO runs on the same groups, each read as B/2 (chosen, rejected) pairs (its cost depends on the rows' lengths).

Attention (``attention``, ``bench/packed_attention.py``): one layer's core attention over the same steps' policy
micro-batches padded, packed and in token-budget rows (FlexAttention block masks on a GPU): time and score entries.

TRL-style (``trl_style``, ``bench/trl_style_step.py``): the same VAR step on transformers as a TRL user writes
it. Speed-up = TRL-style step time / ours.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from bench.length_groups import (LengthDistribution, Tally, data_groups, length_stats, lognormal_groups,
                                 policy_real_tokens, shared_prefix_real_tokens)
from bench.measure_steps import PAD_ID, VAR_LAMBDA, free_device, guarded, sync
from bench.packed_attention import packed_attention
from bench.presets import LENGTHS_TARGETS
from bench.trl_style_step import trl_style
from megatron_var.batching.steps import split_by_tokens
from megatron_var.runtime.microbatches import policy_microbatches
from megatron_var.data.groups import Group
from megatron_var.models.arch import ModelArch
from megatron_var.objectives import ref_gap
from megatron_var.objectives.objective import build_objective
from megatron_var.reference.online import FrozenReference
from megatron_var.reference.source import CachedReference, OnlineReference, ReferenceSource
from megatron_var.runtime.engine import OptimConfig, build_optimizer, run_schedule, wrap_ddp
from megatron_var.runtime.forward_step import make_forward_step
from megatron_var.training.config import ObjectiveConfig
from megatron_var.training.throughput import mean_row_length, step_flops

logger = logging.getLogger(__name__)

DPO_BETA = 0.1
OPTIM = OptimConfig(lr=1e-7)
"""Both sides' optimizer settings (megatron AdamW here; torch.optim.AdamW with the same numbers for TRL-style)."""


# ---- ours ---------------------------------------------------------------------------------------------------------
def reference_counts(frozen: FrozenReference, kind: str, groups: list[Group]) -> tuple[int, int]:
    """(real, computed) tokens of the step's reference rows as ``frozen`` lays them out (no model run)."""
    pairs, _ = frozen.microbatches(kind, [g.prompt_ids for g in groups], [g.response_ids for g in groups])
    real = sum(shared_prefix_real_tokens(g) if kind == "cross" else policy_real_tokens([g]) for g in groups)
    return real, sum(p.tokens.numel() for p in pairs)


def ours(arch: ModelArch, pc, options, steps: list[list[Group]], warmup: int, flex: bool, pack: bool = True,
         budget: Optional[int] = None) -> dict:
    """SFT, VAR online (shared prefix), VAR cached and DPO steps through the package's own code paths, on one policy
    (megatron DDP + optimizer) and a frozen reference built from the policy's start weights."""
    from megatron_var.models.gpt import build_model_chunks

    model = wrap_ddp(build_model_chunks(arch, pc, options), OPTIM)
    optimizer = build_optimizer(model, OPTIM)
    ref_chunks = build_model_chunks(arch, pc, dataclasses.replace(options, flex_attention=flex))
    for rc, m in zip(ref_chunks, model):  # the reference = the policy's start weights (a run from scratch)
        rc.load_state_dict(m.module.state_dict())
    frozen = FrozenReference(ref_chunks, arch.vocab_size, PAD_ID, method="shared_prefix", pack=pack,
                             row_tokens=budget)
    objectives = {name: build_objective(ObjectiveConfig(name=name, var_lambda=VAR_LAMBDA, dpo_beta=DPO_BETA))
                  for name in ("sft", "var", "dpo")}
    gaps: list[float] = []

    def step(groups: list[Group], objective, forward_step, source: Optional[ReferenceSource]) -> dict:
        t0 = time.perf_counter()
        optimizer.zero_grad()
        micro = split_by_tokens(groups, budget) if budget else [[g] for g in groups]
        batches = policy_microbatches(micro, PAD_ID, 1, same_length=pc.pipeline_model_parallel_size > 1, pack=pack,
                                      row_tokens=budget)
        ref_values = source.values(groups) if source is not None else None
        objective.attach(batches, micro, ref_values)
        sync()
        t1 = time.perf_counter()
        reports = run_schedule(forward_step, batches, model, forward_only=False,
                               seq_length=max(b["tokens"].size(1) for b in batches),
                               micro_batch_size=batches[0]["tokens"].size(0))
        sync()
        t2 = time.perf_counter()
        optimizer.step()
        sync()
        t3 = time.perf_counter()
        gaps.extend(float(r[ref_gap.KEY]) for r in reports if ref_gap.KEY in r)
        computed = sum(b["tokens"].numel() for b in batches)
        ref_computed = source.computed_tokens if isinstance(source, OnlineReference) else 0
        ref_real = 0
        if isinstance(source, OnlineReference):
            ref_real, expected = reference_counts(source.frozen, source.kind, groups)
            if ref_computed != expected:  # the counts reported describe what really ran
                raise AssertionError(f"reference ran {ref_computed} tokens, its rows have {expected}")
        return {"step_s": t3 - t0, "reference_s": t1 - t0, "fwd_bwd_s": t2 - t1, "optimizer_s": t3 - t2,
                "policy_real": policy_real_tokens(groups), "policy_computed": computed,
                "reference_real": ref_real, "reference_computed": ref_computed,
                "model_flops": step_flops(arch, computed, ref_computed, mean_row_length(batches))}

    def run(objective, source) -> dict:
        tally = Tally()
        forward_step = make_forward_step(objective.reduce_fn(), arch.vocab_size)  # once per run, as the Trainer
        for k, groups in enumerate(steps):
            rec = step(groups, objective, forward_step, source)
            if k >= warmup:
                tally.add(**rec)
        return tally.summary()

    out = {}
    online = OnlineReference(frozen, "cross", "sum")
    out["var_online"] = guarded(lambda: run(objectives["var"], online), "lengths/ours/var_online")
    if gaps:  # the first VAR step: reference and policy hold the same weights
        out["var_online"]["ref_policy_logp_gap_step1"] = gaps[0]

    def cached() -> dict:
        table = {g.group_id: m for s in steps for g, m in zip(s, frozen.score_cross_pairs(
            [g.prompt_ids for g in s], [g.response_ids for g in s]))}  # --ref-cache: scored before training
        return run(objectives["var"], CachedReference(table, "cross"))

    out["var_cached"] = guarded(cached, "lengths/ours/var_cached")
    if all(len(g.prompt_ids) % 2 == 0 for s in steps for g in s):
        out["dpo"] = guarded(lambda: run(objectives["dpo"], OnlineReference(frozen, "diagonal", "sum")),
                             "lengths/ours/dpo")
    else:
        out["dpo"] = {"error": "odd group size: DPO reads a group as (chosen, rejected) pairs"}
    out["sft"] = guarded(lambda: run(objectives["sft"], None), "lengths/ours/sft")
    del model, optimizer, ref_chunks, frozen, online
    return out


# ---- the run ------------------------------------------------------------------------------------------------------
def speedups(result: dict) -> dict:
    """TRL-style step time over ours, online and cached, with the GPU targets."""
    out = {}
    for mode in ("online", "cached"):
        o = result["ours"].get("var_" + mode, {}).get("step_s")
        t = result["trl_style"].get("var_" + mode, {}).get("step_s")
        key = "speedup_vs_trl_style_" + mode
        value = t / o if o and t else None
        out[mode] = {"value": value, "target": f">= {LENGTHS_TARGETS[key]} (GPU)",
                     "met": None if value is None else value >= LENGTHS_TARGETS[key]}
    return out


def run_lengths_benchmark(preset_name: str, out_dir: Optional[Path], *, data: Optional[str] = None,
                          seed: int = 0, flex: Optional[bool] = None, transformer_impl: str = "local",
                          iters: Optional[int] = None, warmup: Optional[int] = None, cpu_threads: int = 1) -> dict:
    """Draw the steps' groups, measure ours then the TRL-style step, write ``<preset>_<device>_lengths.json``
    after each part; returns the result dict."""
    from bench.step_benchmark import device_name, device_slug, start_run
    from megatron_var.models.gpt import ModelOptions

    preset, pc, cuda, flex = start_run(preset_name, iters, warmup, flex, cpu_threads)
    iters, warmup = preset.iters, preset.warmup
    arch = preset.arch
    n_groups = (warmup + iters) * preset.lengths_groups
    if data:
        groups = data_groups(data, n_groups, preset.lengths_groups, arch.vocab_size, preset.seq_length, seed)
        dist_info = {"kind": "data", "path": str(Path(data).resolve()), "split": "train",
                     "fitted_to_seq_length": preset.seq_length}
    else:
        dist = LengthDistribution(*preset.length_medians, preset.seq_length)
        groups = lognormal_groups(dist, n_groups, preset.group_size, arch.vocab_size, seed)
        dist_info = dist.describe()
    steps = [groups[k:k + preset.lengths_groups] for k in range(0, n_groups, preset.lengths_groups)]
    options = ModelOptions(params_dtype="bf16" if cuda else "fp32", transformer_impl=transformer_impl,
                           seq_length=preset.seq_length)
    name = device_name()
    import megatron.core
    import transformers

    result = {
        "preset": preset_name, "device": name, "dtype": options.params_dtype, "transformer_impl": transformer_impl,
        "flex_attention": flex,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "megatron_core": megatron.core.__version__},
        "cpu_threads": None if cuda else torch.get_num_threads(), "arch": arch.to_dict(),
        "lengths": dict(dist_info, seed=seed), "group_size": len(groups[0].prompt_ids),
        "groups_per_step": preset.lengths_groups, "groups_per_micro_batch": 1, "warmup_steps": warmup,
        "counted_steps": iters, "length_stats": length_stats(groups), "var_lambda": VAR_LAMBDA, "dpo_beta": DPO_BETA,
    }
    t0 = time.time()
    path = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{preset_name}_{device_slug(name)}_lengths.json"

    def write() -> None:  # after every part: a run cut short still leaves what it measured
        if path is not None:
            result["wall_s"] = round(time.time() - t0, 1)
            path.write_text(json.dumps(result, indent=2) + "\n")

    result["ours"] = ours(arch, pc, options, steps, warmup, flex, pack=True)
    free_device()
    write()
    result["ours_padded"] = ours(arch, pc, options, steps, warmup, flex, pack=False)
    free_device()
    result["packed_vs_padded"] = packing_gain(result)
    write()
    # --max-tokens-per-micro-batch: the step's groups in micro-batches of <= budget tokens, each one packed row
    result["token_budget"] = preset.seq_length * 4
    result["ours_token_budget"] = ours(arch, pc, options, steps, warmup, flex, pack=True,
                                       budget=result["token_budget"])
    free_device()
    write()
    result["attention"] = packed_attention(arch, steps, warmup, result["token_budget"], flex,
                                           torch.bfloat16 if cuda else torch.float32)
    free_device()
    write()
    result["trl_style"] = trl_style(arch, steps, warmup, preset.trl_ref_rows, OPTIM)
    free_device()
    result["speedup_vs_trl_style"] = speedups(result)
    write()
    if path is not None:
        result["written_to"] = str(path)
    return result


def packing_gain(result: dict) -> dict:
    """Per method: padded / packed policy computed tokens and step time (> 1: packing computes and takes less)."""
    out = {}
    for method, packed in result.get("ours", {}).items():
        padded = result.get("ours_padded", {}).get(method)
        if not isinstance(packed, dict) or not isinstance(padded, dict) or "error" in packed or "error" in padded:
            continue
        out[method] = {"policy_computed_tokens": padded["policy"]["computed_tokens"] / packed["policy"]["computed_tokens"],
                       "step_time": padded["step_s"] / packed["step_s"]}
    return out


def table(result: dict) -> str:
    """The printed summary: one line per method."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"{'method':<22}{'step s':>9}{'policy real':>13}{'computed':>10}{'c/r':>6}"
            f"{'ref real':>10}{'computed':>10}{'c/r':>6}{'TRL-style/ours':>16}")
    lines = [f"lengths: {result['lengths']['kind']} | {result['preset']} on {result['device']} ({result['dtype']}) | "
             f"{result['groups_per_step']} groups of {result['group_size']} per step, {result['counted_steps']} "
             "steps counted (means per step)", head]
    sp = result.get("speedup_vs_trl_style", {})
    for side in ("ours", "ours_token_budget", "ours_padded", "trl_style"):
        for method, entry in result.get(side, {}).items():
            if not isinstance(entry, dict):
                continue
            label = {"ours": "", "ours_token_budget": "budget ", "ours_padded": "padded ",
                     "trl_style": "TRL-style "}[side] + method
            if "error" in entry:
                lines.append(f"{label:<22}  error: {entry['error'][:80]}")
                continue
            pol, ref = entry["policy"], entry["reference"]
            speed = sp.get(method.removeprefix("var_"), {}).get("value") if side == "ours" and \
                method.startswith("var_") else None
            lines.append(f"{label:<22}{entry['step_s']:>9.4f}{pol['real_tokens']:>13.0f}{pol['computed_tokens']:>10.0f}"
                         f"{f(pol['computed_over_real'], '.2f'):>6}{ref['real_tokens']:>10.0f}"
                         f"{ref['computed_tokens']:>10.0f}{f(ref['computed_over_real'], '.2f'):>6}"
                         f"{f(speed, '.2f'):>16}")
    att = result.get("attention", {})
    if "padded_over_packed" in att:
        lines.append("core attention per step (fwd+bwd, one layer): " + ", ".join(
            f"{n} {att[n]['ms_per_step']:.2f} ms" for n in ("padded", "packed", "token_budget")) +
            f"; padded/packed {att['padded_over_packed']:.2f}x, padded/budget {att['padded_over_token_budget']:.2f}x"
            f" ({att['kernel']['packed']})")
    return "\n".join(lines)


def main_lengths(args) -> int:
    """``tools/bench.py --lengths``: the JSON on stdout, the table on stderr."""
    flex = {"auto": None, "on": True, "off": False}[args.flex]
    result = run_lengths_benchmark(args.preset, Path(args.out_dir) if args.out_dir else None,
                                   data=args.lengths_from, seed=args.lengths_seed, flex=flex,
                                   transformer_impl=args.transformer_impl, iters=args.iters, warmup=args.warmup,
                                   cpu_threads=args.cpu_threads)
    print(table(result), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0
