"""One-process performance benchmark: policy step vs transformers, cross-pair scoring, VAR vs SFT step.

    python tools/bench.py --preset tiny            # CPU, seconds
    python tools/bench.py --preset llama3.2-1b     # one GPU (bf16), a few minutes
    python tools/bench.py --preset micro           # seconds: the GPU check's dry run (bench/gpu_check.sh)

Everything is measured in one run of one process (a world of 1 through ``megatron_var.runtime.parallel``), so the ratios
compare like with like on the same device:
  policy_step        fwd+bwd of one micro-batch: our megatron-core GPTModel (local spec, SDPA) vs transformers'
                     LlamaForCausalLM (SDPA), same shape, random init. MFU = tokens/s × model FLOPs per token
                     (the trainer's, ``megatron_var.training.throughput``: 6 × GEMM weights + 6·L·q·s) / peak, with
                     the peak measured here by an n³ matmul (bf16 on GPU, fp32 on CPU).
  reference_scoring  one group's [B, B] cross-pair matrix: naive (B² rows in one micro-batch, as
                     ``--cross-pair-method naive``; and split per prompt), shared prefix with the dense mask, and
                     shared prefix with the FlexAttention BlockMask (GPU).
  var_vs_sft         a training step on B·(P+R) tokens: SFT, and VAR = reference pass + weights + the same step.
``--lengths`` (``bench/length_benchmark.py``) instead runs whole steps on groups of lognormal (or a data
directory's) lengths: real vs computed tokens and time of SFT, VAR online / cached, DPO and a TRL-style VAR step.
Results: printed as JSON and written to ``bench/results/<preset>_<device>.json``. Targets (``bench/presets.py``)
are reported, never asserted (timings are not test material). Sizes: ``bench/presets.py``; the measurements
themselves: ``bench/measure_steps.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Optional

import torch

from bench.measure_steps import (build_references, free_device, guarded, hf_policy_step, measure_peak_flops,
                                 megatron_policy_step, random_group, reference_scoring, var_vs_sft)
from bench.presets import PRESETS, TARGETS, Preset
from megatron_var.training.throughput import train_flops_per_token

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where ``<preset>_<device>.json`` goes by default: bench/results of this checkout, whatever the working directory."""


def device_name() -> str:
    """'NVIDIA H100 80GB HBM3', or the CPU model (from /proc/cpuinfo) and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def device_slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug if torch.cuda.is_available() else "cpu-" + slug.removeprefix("cpu-")


def _measure_policy_step(preset: Preset, pc, options, peak: float) -> dict:
    arch, mb, s = preset.arch, preset.micro_batch, preset.seq_length
    ours = guarded(lambda: megatron_policy_step(arch, pc, options, mb, s, preset.warmup, preset.iters),
                   "policy_step/megatron")
    hf = guarded(lambda: hf_policy_step(arch, mb, s, preset.warmup, preset.iters), "policy_step/transformers")
    out = {"micro_batch": mb, "seq_length": s, "flops_per_token": train_flops_per_token(arch, s),
           "megatron": ours, "transformers": hf}
    for entry in (ours, hf):
        if "tokens_per_s" in entry:
            entry["mfu"] = entry["tokens_per_s"] * out["flops_per_token"] / peak
    if "tokens_per_s" in ours and "tokens_per_s" in hf:
        out["megatron_over_transformers"] = ours["tokens_per_s"] / hf["tokens_per_s"]
    return out


def _measure_scoring_and_steps(preset: Preset, pc, options, flex: bool, on_scoring=lambda scoring: None
                       ) -> tuple[dict, dict]:
    arch = preset.arch
    group = random_group(preset.group_size, preset.prompt_len, preset.response_len, arch.vocab_size)
    shape = {"B": preset.group_size, "P": preset.prompt_len, "R": preset.response_len}
    try:
        refs = build_references(arch, pc, options, flex)
    except torch.OutOfMemoryError:
        return dict(shape, error="OOM building references"), dict(shape, error="OOM building references")
    scoring = dict(shape, **reference_scoring(refs, group, preset.warmup, preset.iters))
    base = scoring["shared_prefix_dense"].get("s")
    for naive in ("naive", "naive_per_prompt"):
        t = scoring[naive].get("s")
        for sp in ("shared_prefix_dense", "shared_prefix_flex"):
            if t and scoring.get(sp, {}).get("s"):
                scoring[sp][f"speedup_vs_{naive}"] = t / scoring[sp]["s"]
    if base is None:
        logger.warning("shared-prefix scoring failed: %s", scoring["shared_prefix_dense"])
    on_scoring(scoring)
    steps = dict(shape, **guarded(lambda: var_vs_sft(arch, pc, options, refs, group, preset.warmup, preset.iters),
                                  "var_vs_sft"))
    del refs
    free_device()
    return scoring, steps


def _targets(result: dict) -> dict:
    """Each target with its measured value (None when not measured); a GPU run is the one that counts."""
    pol, sc, st = result["policy_step"], result["reference_scoring"], result["var_vs_sft"]
    best_sp = "shared_prefix_flex" if "s" in sc.get("shared_prefix_flex", {}) else "shared_prefix_dense"
    naive_key = "speedup_vs_naive" if "speedup_vs_naive" in sc.get(best_sp, {}) else "speedup_vs_naive_per_prompt"
    values = {
        "policy_vs_transformers": pol.get("megatron_over_transformers"),
        "policy_mfu": pol["megatron"].get("mfu"),
        "var_over_sft": st.get("var_" + best_sp, {}).get("ratio_to_sft"),
        "shared_prefix_speedup": sc.get(best_sp, {}).get(naive_key),
    }
    out = {}
    for k, v in values.items():
        bound = TARGETS[k]
        met = None if v is None else (v <= bound if k == "var_over_sft" else v >= bound)
        out[k] = {"value": v, "target": ("<= " if k == "var_over_sft" else ">= ") + str(bound), "met": met}
    out["var_over_sft"]["method"] = best_sp
    out["shared_prefix_speedup"]["method"] = f"{best_sp} {naive_key}"
    return out


def start_run(preset_name: str, iters: Optional[int], warmup: Optional[int], flex: Optional[bool],
              cpu_threads: int) -> tuple[Preset, object, bool, bool]:
    """The preset with the run's iteration counts, and this process set up as a one-rank megatron world (both
    benchmarks start so): (preset, ParallelConfig, CUDA present, FlexAttention on)."""
    from megatron_var.runtime import parallel

    if preset_name not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset_name!r}")
    preset = PRESETS[preset_name]
    preset = dataclasses.replace(preset, iters=iters or preset.iters,
                                 warmup=preset.warmup if warmup is None else warmup)
    cuda = torch.cuda.is_available()
    flex = cuda if flex is None else flex
    if flex and not cuda:
        raise ValueError("--flex on needs a CUDA device (FlexAttention's fused kernel); use --flex auto on CPU")
    if not cuda:
        torch.set_num_threads(cpu_threads)
    parallel.init_distributed()
    pc = parallel.ParallelConfig()
    parallel.init_model_parallel(pc)
    parallel.seed_everything(1234)
    torch.backends.cuda.matmul.allow_tf32 = True
    return preset, pc, cuda, flex


def run_benchmark(preset_name: str, out_dir: Optional[Path] = RESULTS_DIR, *, flex: Optional[bool] = None,
        transformer_impl: str = "local", iters: Optional[int] = None, warmup: Optional[int] = None,
        cpu_threads: int = 1) -> dict:
    """Run every measurement of ``preset_name`` in this process; returns (and writes) the result dict.

    ``cpu_threads``: torch intra-op threads without CUDA. 1 by default: on a 2-core machine two OpenMP threads
    next to gloo's made single timings 20× slower at random (0.02 s -> 0.9 s for the same step).
    """
    from megatron_var.models.gpt import ModelOptions

    preset, pc, cuda, flex = start_run(preset_name, iters, warmup, flex, cpu_threads)
    options = ModelOptions(params_dtype="bf16" if cuda else "fp32", transformer_impl=transformer_impl,
                           seq_length=max(preset.seq_length, preset.prompt_len + preset.group_size *
                                          (preset.response_len + 1)))
    t0 = time.time()
    name = device_name()
    peak = measure_peak_flops(preset.matmul_n)
    import megatron.core
    import transformers

    result = {
        "preset": preset_name, "device": name, "dtype": options.params_dtype, "transformer_impl": transformer_impl,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "megatron_core": megatron.core.__version__},
        "warmup": preset.warmup, "iters": preset.iters, "cpu_threads": None if cuda else torch.get_num_threads(),
        "peak": peak,
        "arch": preset.arch.to_dict(),
    }
    path = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{preset_name}_{device_slug(name)}.json"

    def write() -> None:  # after every part: a run cut short still leaves what it measured
        if path is not None:
            result["wall_s"] = round(time.time() - t0, 1)
            path.write_text(json.dumps(result, indent=2) + "\n")

    result["policy_step"] = _measure_policy_step(preset, pc, options, peak["flops_per_s"])
    write()
    result["reference_scoring"], result["var_vs_sft"] = _measure_scoring_and_steps(
        preset, pc, options, flex, on_scoring=lambda sc: (result.update(reference_scoring=sc), write()))
    result["targets"] = _targets(result)
    write()
    if path is not None:
        result["written_to"] = str(path)
    return result


def main(argv=None) -> int:
    """``tools/bench.py``'s command line: run one preset, print the result JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out-dir", default=str(RESULTS_DIR),
                   help="where <preset>_<device>.json goes ('' = do not write)")
    p.add_argument("--flex", choices=["auto", "on", "off"], default="auto",
                   help="also time shared-prefix scoring with FlexAttention (auto: when CUDA is present)")
    p.add_argument("--transformer-impl", choices=["local", "te", "auto"], default="local",
                   help="our model's layer implementation (local = megatron local spec + SDPA/Flex core attention)")
    p.add_argument("--iters", type=int,
                   help="timed runs per measurement (median; with --lengths: counted steps, mean); default from the "
                        "preset")
    p.add_argument("--warmup", type=int,
                   help="untimed runs first (with --lengths: uncounted steps); default from the preset")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads on CPU (1: stable timings)")
    p.add_argument("--lengths", action="store_true",
                   help="instead: the length-realistic step benchmark (bench/length_benchmark.py): real vs computed "
                        "tokens and step time of SFT, VAR online/cached, DPO and a TRL-style VAR step, on lognormal "
                        "lengths; writes <preset>_<device>_lengths.json")
    p.add_argument("--lengths-from", metavar="DATA",
                   help="with --lengths (implied): draw the groups from this prepared data directory's train split")
    p.add_argument("--lengths-seed", type=int, default=0, help="seed of the --lengths draw")
    args = p.parse_args(argv)
    if args.lengths or args.lengths_from:
        from bench.length_benchmark import main_lengths

        return main_lengths(args)
    flex = {"auto": None, "on": True, "off": False}[args.flex]
    result = run_benchmark(args.preset, Path(args.out_dir) if args.out_dir else None, flex=flex,
                           transformer_impl=args.transformer_impl, iters=args.iters, warmup=args.warmup,
                           cpu_threads=args.cpu_threads)
    print(json.dumps(result, indent=2))
    return 0
