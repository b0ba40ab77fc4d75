"""What packing costs in attention (``tools/bench.py --lengths``, part ``attention``): the core attention of the
steps' policy micro-batches, forward and backward, with the same tokens in three layouts the trainer uses:

  padded        one group per micro-batch, rows padded to the longest pair, causal (``--no-pack-sequences``:
                SDPA's causal kernel, flash on a GPU)
  packed        the same micro-batches packed (the default: ``SegmentMask`` of doc boundaries; FlexAttention's block
                mask on a GPU, which skips the tiles between sequences; the dense mask with SDPA on the CPU)
  token_budget  ``--max-tokens-per-micro-batch``: whole groups in one packed row of up to the budget

q, k and v are random (``ModelArch`` heads, KV groups, head dim; one TP rank), the mask is the micro-batch's own.
Reported per step (means over the counted steps): milliseconds of one layer's core attention (its mask built
before, untimed: the model builds it once per micro-batch for all layers; ``mask_ms`` is that build), computed
tokens (padding included), and causal score entries over whole rows (Σ rows·S(S+1)/2, what a causal kernel
without the doc mask computes) next to the ones the sequences need (Σ len(len+1)/2): the gap is what
FlexAttention's block masks can skip. Why core attention alone: the rest of the layer costs the same per computed
token in every layout, so a step's time differences are these plus the padding's.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from bench.measure_steps import PAD_ID, guarded, sync
from megatron_var.batching.pairs import sequence_lengths
from megatron_var.batching.steps import split_by_tokens
from megatron_var.models.arch import ModelArch
from megatron_var.models.layers import FlexCoreAttention, SDPACoreAttention
from megatron_var.runtime.microbatches import policy_microbatches


def core_attention(arch: ModelArch, flex: bool) -> torch.nn.Module:
    """The local spec's core attention for one TP rank (no parameters), as the model builds it."""
    config = TransformerConfig(num_layers=1, hidden_size=arch.num_attention_heads * arch.kv_channels,
                               num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
                               kv_channels=arch.kv_channels, use_cpu_initialization=True)
    one_rank = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    cls = FlexCoreAttention if flex else SDPACoreAttention
    return cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
               pg_collection=one_rank).eval()


def layouts(steps: list[list], budget: int) -> dict[str, list[list[dict]]]:
    """Per layout, per step, the policy micro-batches (one group each, or whole groups up to ``budget``)."""
    def each(pack: bool, tokens=None):
        return [policy_microbatches(split_by_tokens(s, tokens) if tokens else [[g] for g in s], PAD_ID, 1,
                                    same_length=False, pack=pack, row_tokens=tokens) for s in steps]
    return {"padded": each(False), "packed": each(True), "token_budget": each(True, budget)}


def score_entries(batch: dict) -> tuple[int, int]:
    """(rows, needed): causal score entries over whole rows vs over each sequence alone."""
    rows, s = batch["cross"].attn_segments.shape
    lengths = sequence_lengths(batch["cross"].attn_segments)
    return rows * s * (s + 1) // 2, int((lengths * (lengths + 1) // 2).sum())


def time_layout(core, arch: ModelArch, steps: list[list[dict]], warmup: int, dtype, device) -> dict:
    """Forward + backward of ``core`` over every micro-batch of each step; the first ``warmup`` steps uncounted."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    times, mask_times, computed, whole, needed = [], [], 0, 0, 0
    for k, batches in enumerate(steps):
        inputs = []
        for b in batches:
            rows, s = b["tokens"].shape
            qkv = [torch.randn(s, rows, h, arch.kv_channels, generator=gen).to(device, dtype).requires_grad_()
                   for h in (arch.num_attention_heads, arch.num_query_groups, arch.num_query_groups)]
            inputs.append((qkv, b["attention_mask"]))
        sync()
        t0 = time.perf_counter()
        for _, mask in inputs:
            if mask is not None:
                mask.block_mask(device) if isinstance(core, FlexCoreAttention) else mask.dense(device)
        sync()
        t1, t0 = t0, time.perf_counter()
        for qkv, mask in inputs:
            core(*qkv, mask).sum().backward()
        sync()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
            mask_times.append(t0 - t1)
            computed += sum(b["tokens"].numel() for b in batches)
            for b in batches:
                w, n = score_entries(b)
                whole, needed = whole + w, needed + n
    n = len(times)
    return {"ms_per_step": 1e3 * sum(times) / n, "mask_ms": 1e3 * sum(mask_times) / n,
            "computed_tokens": computed / n, "row_score_entries": whole / n, "needed_score_entries": needed / n}


def packed_attention(arch: ModelArch, steps: list[list], warmup: int, budget: int, flex: bool, dtype) -> dict:
    """The three layouts' attention time and sizes, and padded / packed and padded / token-budget time ratios."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flex = flex and device.type == "cuda"  # FlexAttention has no backward on the CPU
    core = core_attention(arch, flex)
    out = {"kernel": {"padded": "SDPA causal", "packed": "FlexAttention block mask" if flex else
                      "SDPA dense mask"}, "budget_tokens": budget}
    for name, per_step in layouts(steps, budget).items():
        out[name] = guarded(lambda: time_layout(core, arch, per_step, warmup, dtype, device), f"attention/{name}")
    ok = all("error" not in out[n] for n in ("padded", "packed", "token_budget"))
    if ok:
        out["padded_over_packed"] = out["padded"]["ms_per_step"] / out["packed"]["ms_per_step"]
        out["padded_over_token_budget"] = out["padded"]["ms_per_step"] / out["token_budget"]["ms_per_step"]
    return out
