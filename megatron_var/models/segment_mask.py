"""The shared-prefix cross-pair mask in its compact form, as it travels through megatron's ``attention_mask``.

Why an object instead of the dense [b, 1, s, s] bool mask: the dense mask of one B=8 group at prompt 512 /
response 256 is 8 × 2568² bytes (53 MB) per micro-batch, moved to the device every step, and a dense mask rules out
the fast attention kernels. ``attn_segments`` [b, s] (see ``batching/pairs.py``) says everything: the core
attention turns it into a FlexAttention ``BlockMask`` (GPU) or a dense mask (CPU, SDPA) once per micro-batch and
device, cached on this object, so all layers of a forward pass share one build.

megatron-core hands ``attention_mask`` from ``GPTModel.forward`` through ``TransformerBlock`` /
``TransformerLayer`` / ``SelfAttention`` to the core attention untouched (checked for 0.19; only the recompute
paths differ: ``tensor_parallel.checkpoint`` saves its args with ``save_for_backward``, which takes tensors only,
so a ``SegmentMask`` is for forward passes without activation recomputation — the frozen reference's case).

Rule: ``batching.pairs.visible`` (the same function builds the dense mask): k <= q, same doc of a packed row, and k
shared or in q's segment; a pad query sees itself only.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from megatron_var.batching.pairs import block_attention_mask, visible

FLEX_BLOCK_SIZE = 128


def segment_mask_mod(segments_bs: torch.Tensor) -> Callable:
    """FlexAttention ``mask_mod(b, h, q, k) -> bool`` (True = attend) over ``segments_bs`` [b, s] long."""

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(segments_bs[b, q_idx], segments_bs[b, kv_idx], q_idx, kv_idx)

    return mask_mod


class SegmentMask:
    """``attn_segments`` [b, s] plus the masks built from it, cached per device (built on first use)."""

    def __init__(self, segments_bs: torch.Tensor):
        if segments_bs.dim() != 2 or segments_bs.dtype != torch.long:
            raise ValueError(f"segments must be a [b, s] long tensor, got {segments_bs.dtype} "
                             f"{tuple(segments_bs.shape)}")
        self.segments = segments_bs
        self._dense: dict[str, torch.Tensor] = {}
        self._block: dict[str, object] = {}

    @property
    def shape(self) -> torch.Size:
        return self.segments.shape

    def _on(self, device) -> torch.Tensor:
        return self.segments.to(device, non_blocking=True)

    def dense(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """[b, 1, s, s] bool, True = masked (megatron's convention), on ``device``."""
        device = torch.device(device) if device is not None else self.segments.device
        key = str(device)
        if key not in self._dense:
            self._dense[key] = block_attention_mask(self._on(device))
        return self._dense[key]

    def block_mask(self, device: Optional[torch.device] = None):
        """FlexAttention ``BlockMask`` (batch b, heads broadcast) on ``device``."""
        from torch.nn.attention.flex_attention import create_block_mask

        device = torch.device(device) if device is not None else self.segments.device
        key = str(device)
        if key not in self._block:
            seg = self._on(device).contiguous()
            b, s = seg.shape
            self._block[key] = flex_op(create_block_mask, device.type)(segment_mask_mod(seg), b, None, s, s,
                                                                       device=device, BLOCK_SIZE=FLEX_BLOCK_SIZE)
        return self._block[key]


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn)


def flex_op(fn: Callable, device_type: str) -> Callable:
    """A FlexAttention op (``flex_attention``, ``create_block_mask``) compiled once per process on GPU, eager elsewhere.

    On GPU the compiled ``flex_attention`` is the fused kernel and the compiled ``create_block_mask`` avoids
    materialising the whole [b, s, s] mask (torch deprecates its ``_compile`` flag for this). On CPU both run
    eagerly: the same numbers, and torch 2.14's compiled CPU flex kernel gave wrong rows at head_dim 16
    (docs/performance.md).
    """
    return _compiled(fn) if device_type == "cuda" else fn
