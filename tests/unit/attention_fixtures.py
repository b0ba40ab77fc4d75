"""Shared helpers for the core-attention tests: a bare core attention module and attention written out in float64."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType


def make_core(cls, heads: int, groups: int, head_dim: int):
    """``cls`` (a local-spec core attention) for one rank, no parameters, in eval mode."""
    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=head_dim, use_cpu_initialization=True)
    one_rank = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    return cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
               pg_collection=one_rank).eval()


def reference_attention(q, k, v, masked_bss):
    """float64 on the CPU, by hand. q [s, b, np, hn], k/v [s, b, ng, hn], masked [b, s, s] (True = masked)
    -> [s, b, np*hn]. Query head h reads KV group h // (np / ng)."""
    q, k, v = (t.detach().cpu().double().permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, d]
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(masked_bss.cpu()[:, None], float("-inf"))
    ctx = torch.softmax(scores, dim=-1) @ v  # [b, h, s, d]
    return ctx.permute(2, 0, 1, 3).reshape(ctx.size(2), ctx.size(0), -1)
