"""Measure the real peak memory of one VAR step on CPU (run as a fresh process by test_memory_estimate.py).

How, and why it is honest: torch's CPU allocator has no statistics and ``tracemalloc`` does not see it, but every
tensor byte is process memory. The parent starts this script with ``MALLOC_MMAP_THRESHOLD_=65536`` (a fixed
threshold also turns off glibc's dynamic one), so every tensor above 64 KiB is its own ``mmap`` and goes back to the
kernel when freed: the resident set then follows live tensor memory. Peaks are the kernel's high-water mark
(``VmHWM``), reset before each phase by writing 5 to ``/proc/self/clear_refs``; everything is relative to the
resident set after imports and process-group set-up, before the first model is built.

One-time allocations of the libraries (thread pools, megatron's and gloo's first-use buffers: about 37 MiB here,
the same for every model size, CPU's analogue of the CUDA context) are made before the baseline by a warm-up step of
a 1-layer model, so the peaks are what the configuration itself costs.

Usage: ``python tests/unit/memory_probe.py '[{"arch": {...}, "micro_batch_size": 1, ...}, ...]'`` -> one JSON line,
a list with ``static``, ``reference_peak`` and ``policy_peak`` (bytes over the baseline) per configuration.
"""

from __future__ import annotations

import gc
import json
import re
import sys
from types import SimpleNamespace


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


def _reset_peak() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(cfg: dict, warm_up: bool = False) -> dict:
    """Peaks of one configuration: static state after a first step, then a reference pass and a policy step."""
    import torch

    from megatron_var.runtime import parallel
    from megatron_var.models.arch import ModelArch
    from megatron_var.models.gpt import ModelOptions, build_model_chunks
    from megatron_var.reference.online import FrozenReference
    from megatron_var.runtime.microbatches import policy_microbatches
    from megatron_var.runtime.engine import OptimConfig, build_optimizer, run_schedule, wrap_ddp
    from megatron_var.objectives.reducers import sft_reduce
    from megatron_var.runtime.forward_step import make_forward_step

    parallel.seed_everything(1)
    arch = ModelArch(**cfg["arch"])
    pc = parallel.ParallelConfig(cfg.get("tp", 1), sequence_parallel=cfg.get("sp", False))
    # "recompute": true = full (the estimator tests' cases), false = none, or a --recompute-granularity name
    recompute = {True: "full", False: None}.get(cfg["recompute"], cfg["recompute"])
    opts = ModelOptions(params_dtype="fp32", transformer_impl="local", recompute_granularity=recompute,
                        seq_length=cfg["prompt_length"] + cfg["group_size"] * cfg["response_length"])
    g = torch.Generator().manual_seed(0)
    P, R, Bn = cfg["prompt_length"], cfg["response_length"], cfg["group_size"]

    def group():
        return SimpleNamespace(
            prompt_ids=[torch.randint(1, arch.vocab_size, (P,), generator=g).tolist() for _ in range(Bn)],
            response_ids=[torch.randint(1, arch.vocab_size, (R,), generator=g).tolist() for _ in range(Bn)])

    groups = [group() for _ in range(cfg["micro_batch_size"])]
    if not warm_up:
        gc.collect()
        base = _status("VmRSS")
        _reset_peak()

    model = wrap_ddp(build_model_chunks(arch, pc, opts), OptimConfig(lr=1e-4))
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    pad = pc.tensor_model_parallel_size if pc.sequence_parallel else 1
    ref = FrozenReference(build_model_chunks(arch, pc, opts), arch.vocab_size, 0, pad_to_multiple_of=pad)
    step = make_forward_step(sft_reduce, arch.vocab_size)

    def reference_pass():
        ref.score_cross_pairs([gr.prompt_ids for gr in groups], [gr.response_ids for gr in groups])

    def policy_step():
        batch = policy_microbatches([groups], 0, pad, same_length=False, pack=False)[0]
        run_schedule(step, [batch], model, forward_only=False, seq_length=batch["tokens"].size(1),
                     micro_batch_size=batch["tokens"].size(0))
        optimizer.step()

    reference_pass()
    policy_step()  # the first step allocates Adam's states
    if warm_up:
        return {}
    gc.collect()
    static = _status("VmRSS") - base
    _reset_peak()
    reference_pass()
    ref_peak = _status("VmHWM") - base
    _reset_peak()
    policy_step()
    pol_peak = _status("VmHWM") - base
    return {"static": static, "reference_peak": ref_peak, "policy_peak": pol_peak}


def main(cfgs: list[dict]) -> list[dict]:
    """Every configuration in one process (under torchrun: one layout for all, each rank measures itself)."""
    import torch

    from megatron_var.runtime import parallel

    torch.set_num_threads(1)
    parallel.init_distributed()
    tp, sp = cfgs[0].get("tp", 1), cfgs[0].get("sp", False)
    parallel.init_model_parallel(parallel.ParallelConfig(tp, sequence_parallel=sp))
    tiny = dict(family="llama", num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, kv_channels=16, vocab_size=256, max_position_embeddings=256)
    layout = dict(tp=tp, sp=sp)
    for recompute in (True, False):
        measure(dict(arch=tiny, micro_batch_size=1, group_size=2, prompt_length=8, response_length=8,
                     recompute=recompute, **layout), warm_up=True)
    out = []
    for cfg in cfgs:
        out.append(measure(cfg))
        gc.collect()
    return out


if __name__ == "__main__":
    import os

    result = main(json.loads(sys.argv[1]))
    line = ("rank%s " % os.environ["RANK"] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "") + json.dumps(result)
    # one write(2) of the whole line: ranks share the pipe, and print's separate text and newline writes interleaved
    # ("rank1 [...]rank0 [...]" on one line); a pipe write below PIPE_BUF (4096 bytes) is atomic
    os.write(sys.stdout.fileno(), (line + "\n").encode())
