"""Full (TP=1/PP=1-named) tensors from a model split over TP/PP ranks, and back.

Why: layout-invariance checks compare gradients and weights of a TP×PP run with a single-rank run, and small
tools (exports of a live model, debugging) need the unsplit view. Uses the partition attributes megatron sets on
every tensor-parallel parameter (``tensor_model_parallel``, ``partition_dim``) and each layer's global
``layer_number``; the only special case is SwiGLU's fused ``linear_fc1`` whose TP shards are [gate_r; up_r].
Everything is gathered with collectives, so every rank of the world must call these together.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> name with the global layer index."""
    offsets = {}
    for i, layer in enumerate(getattr(chunk.decoder, "layers", [])):
        offsets[str(i)] = str(layer.layer_number - 1)
    names = {}
    for name, _ in chunk.named_parameters():
        m = _LAYER.match(name)
        names[name] = _LAYER.sub(f"decoder.layers.{offsets[m.group(1)]}.", name) if m else name
    return names


def _is_glu_fc1(name: str, chunk) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and chunk.config.gated_linear_unit


def _skip(name: str, chunk) -> bool:
    # a tied output layer on the last PP stage is a copy of the embedding; the TP=1/PP=1 model has no such param
    return name == "output_layer.weight" and getattr(chunk, "share_embeddings_and_output_weights", False)


def gather_full(chunks: Iterable[torch.nn.Module],
                select: Callable[[torch.nn.Parameter], Optional[torch.Tensor]] = lambda p: p.data
                ) -> dict[str, torch.Tensor]:
    """{global name: full tensor} on every rank; ``select`` picks what to gather per parameter (data, grad...).

    Parameters for which ``select`` returns None are left out.
    """
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = tp_group.size()
    local: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        names = _global_names(chunk)
        for name, p in chunk.named_parameters():
            if _skip(name, chunk):
                continue
            t = select(p)
            if t is None:
                continue
            t = t.detach().float()
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(t) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                dim = p.partition_dim
                if _is_glu_fc1(name, chunk):
                    halves = [x.chunk(2, dim=0) for x in parts]
                    t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
                else:
                    t = torch.cat(parts, dim=dim)
            local[names[name]] = t.cpu()
    # every pipeline stage contributes its layers
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    merged: dict[str, torch.Tensor] = {}
    parts_obj: list = [None] * pp_group.size()
    dist.all_gather_object(parts_obj, local, group=pp_group)
    for part in parts_obj:
        merged.update(part)
    return merged


def load_full(chunks: Iterable[torch.nn.Module], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slice of every parameter from ``full`` (TP=1/PP=1 names), no communication."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp, rank = tp_group.size(), tp_group.rank()
    for chunk in chunks:
        names = _global_names(chunk)
        for name, p in chunk.named_parameters():
            key = "embedding.word_embeddings.weight" if _skip(name, chunk) else names[name]
            t = full[key]
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                dim = p.partition_dim
                if _is_glu_fc1(name, chunk):
                    gate, up = t.chunk(2, dim=0)
                    t = torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
                else:
                    t = t.chunk(tp, dim=dim)[rank]
            with torch.no_grad():
                p.copy_(t.to(p.dtype))
