"""The measurements of ``bench.step_benchmark``: one function per question, each returning a JSON-able dict.

Why separate from the orchestration: each measurement builds its own models and must leave the device clean for the
next one (the 1B preset holds a policy with optimizer state, two reference copies and [20k, 128k] logits at once).
Timings are medians of ``iters`` runs after ``warmup`` runs, each run ended by a device synchronisation.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import statistics
import time
from typing import Callable, Optional

import torch

from megatron_var.batching.steps import rewards_tensor
from megatron_var.runtime.microbatches import policy_microbatches
from megatron_var.data.groups import Group
from megatron_var.models.arch import ModelArch, hf_config_from_arch
from megatron_var.models.gpt import ModelOptions, build_model_chunks
from megatron_var.objectives.reducers import sft_reduce, var_reduce
from megatron_var.objectives.var import var_weights
from megatron_var.reference.online import FrozenReference
from megatron_var.runtime.engine import OptimConfig, build_optimizer, install_schedule_hooks, run_schedule, wrap_ddp
from megatron_var.runtime.forward_step import make_forward_step

logger = logging.getLogger(__name__)

PAD_ID = 0
VAR_LAMBDA = 1.0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in seconds (device-synchronised) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mem_gib() -> Optional[float]:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def guarded(fn: Callable[[], dict], name: str = "") -> dict:
    """Run one measurement; an OOM or other failure becomes ``{"error": ...}`` so one run still reports the rest.
    Each measurement is logged with its wall time as it finishes (a long GPU run shows where it is)."""
    free_device()
    t0 = time.perf_counter()
    try:
        out = fn()
    except torch.OutOfMemoryError:
        out = {"error": "OOM"}
    except Exception as e:  # noqa: BLE001 - a benchmark run must report every part it could measure
        logger.exception("measurement failed")
        out = {"error": f"{type(e).__name__}: {e}"[:500]}
    free_device()
    logger.info("bench: %s done in %.1f s: %s", name or "measurement", time.perf_counter() - t0,
                {k: v for k, v in out.items() if not isinstance(v, dict)})
    return out


def measure_peak_flops(n: int, warmup: int = 3, iters: int = 10) -> dict:
    """FLOP/s of an n³ matmul: bf16 on GPU, fp32 on CPU (the MFU denominator, measured on this machine)."""
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    t = median_time(lambda: a @ b, warmup, iters)
    return {"flops_per_s": 2 * n**3 / t, "matmul_n": n, "dtype": str(dtype).replace("torch.", "")}


def random_tokens(b: int, s: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(1, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def random_group(group_size: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> Group:
    """B prompts of exactly ``prompt_len`` and B responses of exactly ``response_len`` random tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, vocab, (group_size, prompt_len), generator=g).tolist()
    responses = torch.randint(1, vocab, (group_size, response_len), generator=g).tolist()
    rewards = torch.randn(group_size, group_size, generator=g).numpy()
    return Group(group_id=0, prompt_ids=prompts, response_ids=responses, rewards=rewards)


# ---- (a) policy train step: ours vs transformers -----------------------------------------------------------------
def megatron_policy_step(arch: ModelArch, pc, options: ModelOptions, micro_batch: int, seq: int,
                         warmup: int, iters: int) -> dict:
    """fwd+bwd of one [micro_batch, seq] micro-batch through megatron's schedule (DDP, fp32 grad buffers)."""
    chunks = build_model_chunks(arch, pc, options)
    model = wrap_ddp(chunks, OptimConfig(use_distributed_optimizer=False))
    install_schedule_hooks(model)
    tokens = random_tokens(micro_batch, seq + 1, arch.vocab_size, seed=1)
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
             "loss_mask": torch.ones(micro_batch, seq), "position_ids": None, "attention_mask": None}
    step = make_forward_step(sft_reduce, arch.vocab_size)
    t = median_time(lambda: run_schedule(step, [batch], model, forward_only=False, seq_length=seq,
                                         micro_batch_size=micro_batch), warmup, iters)
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    out = {"step_s": t, "tokens_per_s": micro_batch * seq / t, "params": n_params, "peak_mem_gib": peak_mem_gib()}
    del model, chunks
    return out


def build_hf_model(arch: ModelArch) -> torch.nn.Module:
    """transformers' ``*ForCausalLM`` of ``arch`` (SDPA attention, random init) on the benchmark's device and dtype
    (bf16 on GPU, fp32 on CPU), in train mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = hf_config_from_arch(arch)
    cfg.pop("torch_dtype", None)
    config = AutoConfig.for_model(**cfg)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.train()


def hf_policy_step(arch: ModelArch, micro_batch: int, seq: int, warmup: int, iters: int) -> dict:
    """fwd+bwd of transformers' LlamaForCausalLM (SDPA, random init) with its own causal-LM loss, same shape."""
    model = build_hf_model(arch)
    tokens = random_tokens(micro_batch, seq, arch.vocab_size, seed=1).to(next(model.parameters()).device)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()

    t = median_time(step, warmup, iters)
    out = {"step_s": t, "tokens_per_s": micro_batch * seq / t, "params": sum(p.numel() for p in model.parameters()),
           "peak_mem_gib": peak_mem_gib(), "attn_implementation": model.config._attn_implementation}
    del model
    return out


# ---- (b) reference cross-pair scoring, (c) VAR step vs SFT step ---------------------------------------------------
def build_references(arch: ModelArch, pc, options: ModelOptions, flex: bool) -> dict[str, FrozenReference]:
    """Frozen references sharing one set of random weights: naive, shared-prefix dense, shared-prefix flex."""
    dense = build_model_chunks(arch, pc, dataclasses.replace(options, flex_attention=False))
    refs = {name: FrozenReference(dense, arch.vocab_size, PAD_ID, method=m)
            for name, m in (("naive", "naive"), ("shared_prefix_dense", "shared_prefix"))}
    if flex:
        flex_chunks = build_model_chunks(arch, pc, dataclasses.replace(options, flex_attention=True))
        for fc, dc in zip(flex_chunks, dense):
            fc.load_state_dict(dc.state_dict())
        refs["shared_prefix_flex"] = FrozenReference(flex_chunks, arch.vocab_size, PAD_ID, method="shared_prefix")
    return refs


def score_naive_per_prompt(ref: FrozenReference, group: Group) -> torch.Tensor:
    """Naive scoring split into B micro-batches of B rows [x_i; y_j] (one per prompt) -> [B, B].

    Each prompt is scored as a group of its own against all B responses: one [1, B] matrix per micro-batch, which
    stacked give the group's [B, B] (``ref`` must use the naive method)."""
    if ref.method != "naive":
        raise ValueError(f"score_naive_per_prompt needs a naive reference, got method {ref.method!r}")
    rows = ref.score_cross_pairs([[x] for x in group.prompt_ids], [group.response_ids] * len(group.prompt_ids))
    return torch.cat(rows)


def scoring_methods(refs: dict[str, FrozenReference], group: Group, order: list[str],
                    **extra: Callable[[], torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """``name -> () -> [B, B]`` for the methods in ``order`` that exist: each reference's own method on the whole
    group, ``naive_per_prompt`` (the naive reference split per prompt) and any ``extra``. Order matters: a run cut
    short keeps the first ones, so callers list what the targets need first and the one-micro-batch naive (may OOM)
    last."""
    methods = {name: (lambda r=ref: r.score_cross_pairs([group.prompt_ids], [group.response_ids])[0])
               for name, ref in refs.items()}
    methods["naive_per_prompt"] = lambda: score_naive_per_prompt(refs["naive"], group)
    methods.update(extra)
    return {name: methods[name] for name in order if name in methods}


def reference_scoring(refs: dict[str, FrozenReference], group: Group, warmup: int, iters: int) -> dict:
    """Time one group's [B, B] matrix per method; matrices compared with the shared-prefix dense one."""
    runs = scoring_methods(refs, group, ["shared_prefix_dense", "naive_per_prompt", "shared_prefix_flex", "naive"])
    out, mats = {}, {}

    def measure(name):
        mats[name] = runs[name]()
        t = median_time(runs[name], warmup, iters)
        return {"s": t, "peak_mem_gib": peak_mem_gib()}

    for name in runs:
        out[name] = guarded(lambda: measure(name), f"reference_scoring/{name}")
    base = mats.get("shared_prefix_dense")
    for name, m in mats.items():
        if base is not None and name in out and "error" not in out[name]:
            out[name]["max_rel_diff_vs_shared_prefix_dense"] = float((m - base).abs().max() / base.abs().max())
    return out


def var_vs_sft(arch: ModelArch, pc, options: ModelOptions, refs: dict[str, FrozenReference], group: Group,
               warmup: int, iters: int) -> dict:
    """One training step (fwd+bwd+optimizer) on B·(P+R) tokens: SFT, and VAR = reference pass + weights + step."""
    optim = OptimConfig(lr=1e-7)
    model = wrap_ddp(build_model_chunks(arch, pc, options), optim)
    optimizer = build_optimizer(model, optim)
    rewards = rewards_tensor([group])  # [1, B, B]
    parts: dict[str, list[float]] = {}

    def policy_step(batch: dict, reduce_fn, key: str, select_positions: bool = True) -> None:
        t0 = time.perf_counter()
        step = make_forward_step(reduce_fn, arch.vocab_size, select_positions=select_positions)
        run_schedule(step, [batch], model, forward_only=False,
                     seq_length=batch["tokens"].size(1), micro_batch_size=batch["tokens"].size(0))
        sync()
        t1 = time.perf_counter()
        optimizer.step()
        sync()
        parts.setdefault(key + "/fwd_bwd", []).append(t1 - t0)
        parts.setdefault(key + "/optimizer", []).append(time.perf_counter() - t1)

    def sft_step(select_positions: bool = True, key: str = "sft"):
        policy_step(one_microbatch([group]), sft_reduce, key, select_positions)

    def var_step(score: Callable[[], torch.Tensor], key: str):
        t0 = time.perf_counter()
        ref_bb = score()  # [B, B]
        batch = one_microbatch([group])
        batch["weights"] = var_weights(ref_bb[None], rewards, VAR_LAMBDA).reshape(-1)
        sync()
        parts.setdefault(key + "/reference", []).append(time.perf_counter() - t0)
        policy_step(batch, var_reduce(), key)

    cached = scoring_methods(refs, group, ["shared_prefix_dense"])["shared_prefix_dense"]()
    scorers = scoring_methods(refs, group, ["shared_prefix_flex", "shared_prefix_dense", "cached", "naive_per_prompt",
                                            "naive"], cached=lambda: cached)  # --ref-cache: scored before training
    out = {"sft": guarded(lambda: {"step_s": median_time(sft_step, warmup, iters)}, "var_vs_sft/sft")}
    for name, score in scorers.items():  # the targets' method (flex on GPU) first, naive last
        out["var_" + name] = guarded(lambda: {"step_s": median_time(lambda: var_step(score, name), warmup, iters)},
                                     f"var_vs_sft/var_{name}")
        if name == "cached":  # SFT with logits at every position (no selection): what models.selected_logits saves
            out["sft_full_logits"] = guarded(
                lambda: {"step_s": median_time(lambda: sft_step(False, "sft_full_logits"), warmup, iters)},
                "var_vs_sft/sft_full_logits")
    for key, vals in parts.items():  # per-part medians (warm-up included in the lists: drop it)
        run, part = key.split("/")
        entry = out.get(run if run.startswith("sft") else "var_" + run, {})
        if "error" not in entry:
            entry[part + "_s"] = statistics.median(vals[warmup:] or vals)
    sft = out["sft"].get("step_s")
    if sft and "step_s" in out["sft_full_logits"]:
        out["sft_full_logits"]["ratio_to_sft"] = out["sft_full_logits"]["step_s"] / sft
    for name in scorers:
        entry = out["var_" + name]
        if sft and "step_s" in entry:
            entry["ratio_to_sft"] = entry["step_s"] / sft
            if "fwd_bwd_s" in out["sft"]:
                entry["ratio_to_sft_fwd_bwd_only"] = (entry["reference_s"] + entry["fwd_bwd_s"]) / \
                    out["sft"]["fwd_bwd_s"]
    del model, optimizer
    return out


def one_microbatch(groups: list[Group]) -> dict:
    """The policy micro-batch of ``groups`` as the trainer builds it, padded (these measurements compare fixed
    shapes)."""
    return policy_microbatches([groups], PAD_ID, 1, same_length=False, pack=False)[0]
