"""Qwen2 / Qwen2.5: Llama's table plus the q/k/v biases (interleaved per group like the weights)."""

from megatron_var.convert import llama
from megatron_var.convert.core import QKV, FamilyMap

QKV_BIAS = QKV("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
               "self_attention.linear_qkv.bias", bias=True)

MAPPING = FamilyMap(
    pre=llama.MAPPING.pre,
    layer=llama.ATTENTION + (QKV_BIAS,) + llama.OUT_PROJ_AND_MLP,
    post=llama.MAPPING.post,
    extra_state_modules=llama.EXTRA_STATE_MODULES,
)
