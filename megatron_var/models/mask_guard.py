"""No attention mask is ever dropped: only a core attention that declares it applies masks may receive one.

Why: Transformer Engine's ``TEDotProductAttention`` (and megatron's specs, which give every core attention
``attn_mask_type=causal``) ignores ``attention_mask`` for causal mask types, so a shared-prefix batch through it is
scored with plain causal attention — every ``log π_ref(y_j|x_i)`` for j ≥ 2 silently wrong. Our core attentions
(``models/layers.py``) set ``applies_segment_masks = True``; every other core attention in a model gets a forward
pre-hook that raises ``MaskNotAppliedError`` as soon as it is handed a mask (a ``SegmentMask`` or a dense one).
"""

from __future__ import annotations

import torch

ATTR = "applies_segment_masks"


class MaskNotAppliedError(RuntimeError):
    """A segment (shared-prefix / packed) attention mask reached a core attention that would ignore it."""


def applies_masks(core_attention: torch.nn.Module) -> bool:
    """True when ``core_attention`` declares (class attribute ``applies_segment_masks``) that it applies masks."""
    return bool(getattr(core_attention, ATTR, False))


def core_attentions(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every attention's ``core_attention`` submodule in ``model``."""
    return [(f"{name}.core_attention" if name else "core_attention", m.core_attention)
            for name, m in model.named_modules() if isinstance(getattr(m, "core_attention", None), torch.nn.Module)]


def _reject_masks(module, args, kwargs):
    mask = args[3] if len(args) > 3 else kwargs.get("attention_mask")
    if mask is not None:
        raise MaskNotAppliedError(
            f"{type(module).__name__} was given an attention mask ({type(mask).__name__}) but does not declare "
            f"`{ATTR} = True`: it would compute plain causal attention (Transformer Engine ignores the mask for "
            "causal mask types). Build the model with megatron_var.models.specs.layer_spec, whose core attention "
            "applies segment masks on every backend.")


def guard(model: torch.nn.Module) -> int:
    """Install the mask-rejecting pre-hook on every core attention of ``model`` that does not apply masks
    (idempotent); returns how many are guarded."""
    n = 0
    for _, core in core_attentions(model):
        if applies_masks(core):
            continue
        if not getattr(core, "_mask_guarded", False):
            core.register_forward_pre_hook(_reject_masks, with_kwargs=True)
            core._mask_guarded = True
        n += 1
    return n
