"""Llama 2 / 3.x: HF ``LlamaForCausalLM`` names <-> megatron-core GPTModel (TE names) — a table, no logic."""

from megatron_var.convert.core import QKV, Copy, FamilyMap, GateUp, Vocab

EMBEDDING = Vocab("model.embed_tokens.weight", "embedding.word_embeddings.weight")
FINAL_NORM = Copy("model.norm.weight", "decoder.final_layernorm.weight", ("hidden",))
LM_HEAD = Vocab("lm_head.weight", "output_layer.weight", untied_only=True)

ATTENTION = (
    Copy("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight", ("hidden",)),
    QKV("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attention.linear_qkv.weight"),
)
OUT_PROJ_AND_MLP = (
    Copy("self_attn.o_proj.weight", "self_attention.linear_proj.weight", ("hidden", "q")),
    Copy("post_attention_layernorm.weight", "mlp.linear_fc1.layer_norm_weight", ("hidden",)),
    GateUp("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.linear_fc1.weight"),
    Copy("mlp.down_proj.weight", "mlp.linear_fc2.weight", ("hidden", "ffn")),
)
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                       "mlp.linear_fc2")

MAPPING = FamilyMap(
    pre=(EMBEDDING,),
    layer=ATTENTION + OUT_PROJ_AND_MLP,
    post=(FINAL_NORM, LM_HEAD),
    extra_state_modules=EXTRA_STATE_MODULES,
)
