"""Which transformer-layer implementation to build: Transformer Engine when usable, else local + SDPA.

Why a separate, pure decision function: the choice must be testable here, where TE is absent, and the rule is
subtle — TE needs both the package and a CUDA device; the local spec is only acceptable with a fused attention core.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "te", "local")


def te_importable() -> bool:
    """True when ``transformer_engine.pytorch`` can be imported (without importing it here)."""
    try:
        return importlib.util.find_spec("transformer_engine") is not None and \
            importlib.util.find_spec("transformer_engine.pytorch") is not None
    except (ImportError, ValueError):
        return False


def choose_backend(requested: str = "auto", *, te_available: Optional[bool] = None,
                   cuda_available: Optional[bool] = None) -> str:
    """Resolve ``--transformer-impl``: 'te' or 'local'.

    auto -> 'te' when TE imports and CUDA is present, else 'local' (SDPA core attention).
    An explicit 'te' without TE or CUDA is a user error.
    """
    if requested not in BACKENDS:
        raise ValueError(f"--transformer-impl must be one of {BACKENDS}, got {requested!r}")
    te = te_importable() if te_available is None else te_available
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "te":
        if not (te and cuda):
            raise ValueError("--transformer-impl te needs transformer_engine and a CUDA device")
        return "te"
    if requested == "local":
        return "local"
    return "te" if (te and cuda) else "local"


def use_flex_attention(requested: bool, *, cuda_available: Optional[bool] = None) -> bool:
    """``ModelOptions.flex_attention`` resolved: FlexAttention only when asked for and CUDA is present (its fused
    kernel is compiled for GPUs; on CPU the dense masked SDPA path gives the same numbers faster)."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested and not cuda:
        logger.info("flex attention requested without CUDA: using dense masked SDPA")
    return bool(requested and cuda)


def layer_spec(backend: str, *, config, vp_stage: Optional[int] = None, flex_attention: bool = False) -> object:
    """The decoder spec for ``backend`` ('te' | 'local'), core attention always ours: SDPA (causal / dense mask),
    FlexAttention for segment-masked batches when ``flex_attention``.

    te: megatron's TE spec (fused layer-norm + linear, TE linears) with its ``TEDotProductAttention`` replaced —
    the spec gives it ``attn_mask_type=causal``, for which TE ignores ``attention_mask``, so shared-prefix scoring
    would silently run causal (``models/mask_guard.py``). local: megatron's local spec with our core attention and
    a sequence-parallel-capable RMSNorm (per layer and for the final norm).
    """
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from megatron_var.models.layers import FlexCoreAttention, RMSNorm, SDPACoreAttention

    core = FlexCoreAttention if flex_attention else SDPACoreAttention
    if backend == "te":
        spec = specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
        spec.submodules.self_attention.submodules.core_attention = core
        return spec
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = core
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=RMSNorm)


def describe(spec) -> str:
    """Short name of a built spec for logs."""
    from megatron_var.models.layers import FlexCoreAttention

    layer = spec if isinstance(spec, ModuleSpec) else spec.layer_specs[0]
    core = layer.submodules.self_attention.submodules.core_attention
    name = "transformer_engine+sdpa" if isinstance(spec, ModuleSpec) else "local+sdpa"
    return name + "+flex" if core is FlexCoreAttention else name
