"""Shared pieces of the distributed tests: tiny architectures, deterministic batches, comparisons."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_var.runtime import parallel
from megatron_var.models.arch import ModelArch

LLAMA = ModelArch(family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
                  num_query_groups=4, kv_channels=8, vocab_size=120, max_position_embeddings=256,
                  rope_theta=10000.0, rms_norm_eps=1e-5)
QWEN_TIED = ModelArch(family="qwen2", num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                      num_query_groups=2, kv_channels=16, vocab_size=130, max_position_embeddings=256,
                      rope_theta=1e6, rms_norm_eps=1e-6, add_qkv_bias=True, tie_word_embeddings=True)


def sft_microbatches(n: int, b: int, s: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` micro-batches of [b, s] random tokens with next-token labels and a ragged response mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
        start = torch.randint(1, s // 2, (b, 1), generator=g)
        end = torch.randint(s // 2 + 1, s + 1, (b, 1), generator=g)
        pos = torch.arange(s)[None]
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": ((pos >= start) & (pos < end)).float()})
    return out


def dp_share(items: list, replicate: bool = False) -> list:
    """This data-parallel rank's contiguous share of the global list (all of it when ``replicate``)."""
    if replicate:
        return list(items)
    dp, r = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    assert len(items) % dp == 0
    k = len(items) // dp
    return items[r * k:(r + 1) * k]


def global_sum(values: list[float]) -> list[float]:
    """Sum over the loss-holding ranks (last PP stage, TP rank 0) of the whole world -> same on every rank."""
    holder = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
        parallel_state.get_tensor_model_parallel_rank() == 0
    t = torch.tensor(values if holder else [0.0] * len(values), dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest max|a-b| / max|b| over tensors with the same key set."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    worst, where = 0.0, ""
    for k in b:
        denom = b[k].abs().max().item() or 1.0
        err = (a[k].double() - b[k].double()).abs().max().item() / denom
        if err > worst:
            worst, where = err, k
    return worst, where


FLOAT32_EPS = torch.finfo(torch.float32).eps  # 2**-23 = one ulp of 1.0


def max_update_err(stepped: dict[str, torch.Tensor], ref_stepped: dict[str, torch.Tensor],
                   init: dict[str, torch.Tensor], rel_tol: float) -> tuple[float, str]:
    """Worst ratio of |update - ref update| to what float32 allows, over tensors; <= 1 passes.

    An update is read back as ``stepped - init`` from float32 parameters, so it carries the rounding of the stored
    parameter, not only its own: AdamW rounds p twice per step (weight decay, then the Adam step), <= half an ulp
    each, so two runs can differ by 2 * 2 * ulp(p)/2 <= 2 * eps * |p| however exactly they computed the update.
    With |p| ~ 1 and an update of ~lr = 1e-2 that alone is ~2.4e-5 of the update, above ``rel_tol``; which side
    of a rounding boundary a value lands on depends on the CPU's kernels (AVX2 vs AVX-512), not on the layout.
    Allowed per element: ``rel_tol * max|ref update| + 2 * eps * max(|init|, |ref stepped|)``.
    """
    assert set(stepped) == set(ref_stepped) == set(init), sorted(set(stepped) ^ set(ref_stepped))
    worst, where = 0.0, ""
    for k in ref_stepped:
        p0, p_ref = init[k].double(), ref_stepped[k].double()
        update, ref_update = stepped[k].double() - p0, p_ref - p0
        bound = rel_tol * ref_update.abs().max() + 2 * FLOAT32_EPS * torch.maximum(p0.abs(), p_ref.abs())
        ratio = ((update - ref_update).abs() / bound.clamp_min(torch.finfo(torch.float64).tiny)).max().item()
        if ratio > worst:
            worst, where = ratio, k
    return worst, where


@contextlib.contextmanager
def layout(tp: int = 1, pp: int = 1, vpp=None, sp: bool = False, seed: int = 1234):
    """megatron's TP/PP/DP groups for one layout of the world, torn down on exit."""
    pc = parallel.ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sp)
    parallel.init_model_parallel(pc)
    parallel.seed_everything(seed)
    try:
        yield pc
    finally:
        parallel.destroy_model_parallel()
