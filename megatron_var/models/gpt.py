"""Build megatron-core GPTModels (one per virtual pipeline chunk) for a Llama/Qwen2 ``ModelArch``.

Why a GPTModel subclass: megatron-core computes RoPE from ``arange(seq_len)`` and ignores ``position_ids``.
Shared-prefix cross-pair scoring restarts every response's positions after the prompt, so the rotary
frequencies must follow the given positions; ``PositionalGPTModel`` does exactly that and nothing else.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_var.models import specs
from megatron_var.models.arch import ModelArch
from megatron_var.models import mask_guard

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RECOMPUTE_GRANULARITIES = (None, "selective", "full")


@dataclass
class ModelOptions:
    """Run-time model options (not part of the architecture)."""

    params_dtype: str = "fp32"
    """'fp32' | 'bf16' | 'fp16'; bf16 on GPU, fp32 on CPU by default."""
    transformer_impl: str = "auto"
    """'auto' (TE when importable and CUDA present) | 'te' | 'local' (local spec + SDPA core attention)."""
    flex_attention: bool = False
    """FlexAttention (BlockMask) for segment-masked batches (shared-prefix cross pairs) on GPU, with either layer
    implementation; without CUDA those batches use a dense mask. Causal batches always use SDPA."""
    recompute_granularity: Optional[str] = None
    """Activation recomputation, as Megatron-LM: None (keep all activations); 'selective' (megatron-core's
    ``recompute_modules=["core_attn"]``: the core attention of every layer is recomputed in backward, so only its
    inputs are kept; pays off when the attention stores s x s scores); 'full' (every layer keeps only its input
    and is recomputed as a whole: uniform, one layer per checkpoint; costs about one more forward)."""
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    seq_length: int = 4096
    """Longest sequence the run will see (RoPE table size); never below the model's own limit is needed."""

    def __post_init__(self):
        if self.params_dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.params_dtype!r}")
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise ValueError(f"--recompute-granularity must be selective or full, got {self.recompute_granularity!r}")


class PositionalGPTModel(GPTModel):
    """GPTModel whose RoPE follows ``position_ids`` when they are given ([b, s] long).

    ``attention_mask`` may also be a ``SegmentMask`` (compact shared-prefix mask). Any core attention that does not
    declare that it applies masks refuses one (``models.mask_guard``) instead of silently computing causal attention.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mask_guard.guard(self)

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if position_ids is None or self.position_embedding_type != "rope" or out[1] is None:
            return out
        table = self.rotary_pos_emb.get_emb(int(position_ids.max()) + 1)  # [P, 1, 1, d]
        rope = table[:, 0, 0, :][position_ids.t()].unsqueeze(2)  # [s, b, 1, d]
        return (out[0], rope) + tuple(out[2:])


def transformer_config(arch: ModelArch, parallel, options: ModelOptions) -> TransformerConfig:
    """megatron-core TransformerConfig for ``arch`` in ``parallel`` layout (ParallelConfig)."""
    dtype = _DTYPES[options.params_dtype]
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        hidden_dropout=options.hidden_dropout,
        attention_dropout=options.attention_dropout,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # fixed shapes per schedule call: callers pad the micro-batches of one call to one length under PP
        # (megatron's shape exchange uses batch_isend_irecv, which deadlocks on gloo when prev == next stage)
        variable_seq_lengths=False,
        # fused kernels are CUDA-only (and need apex/TE); megatron falls back to plain torch when off
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,  # position-following RoPE produces [s, b, 1, d] frequencies
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        # loss_funcs return (sum, units): megatron divides by the global unit count (DDP must know at build time)
        calculate_per_token_loss=True,
        # with PP=2 interleaving, gloo gave wrong numbers when prev and next stage are the same rank
        batch_p2p_comm=parallel.virtual_pipeline_model_parallel_size is None,
        # no CUDA graphs are captured; megatron-core 0.19's default "full" is deprecated (it warns on every config)
        # and [] is its documented spelling of the same whole-layer scope
        cuda_graph_modules=[],
    )
    if options.recompute_granularity == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif options.recompute_granularity == "selective":
        # megatron-core's default recompute_modules, spelled out: checkpoint the core attention only
        # (recompute_method / recompute_num_layers must stay None for selective)
        kwargs.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    with warnings.catch_warnings():
        # selective + core_attn warns that TE's fused core attention needs no recompute; the core attention is
        # ours (SDPA / FlexAttention, models/specs.py) with either layer implementation, so the hint does not apply
        warnings.filterwarnings("ignore", message="If you are using transformer_engine as the transformer "
                                "implementation", category=UserWarning)
        return TransformerConfig(**kwargs)


def build_model_chunks(arch: ModelArch, parallel, options: ModelOptions, pg_collection=None
                       ) -> list[PositionalGPTModel]:
    """This rank's model chunk(s): one per virtual pipeline stage (one when not interleaved).

    parallel_state must already be initialised with the same layout. ``pg_collection``: the process groups the
    model communicates in (megatron-core's ``ProcessGroupCollection``; None = megatron's global ones).
    """
    arch.check_layout(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                      parallel.virtual_pipeline_model_parallel_size)
    config = transformer_config(arch, parallel, options)
    backend = specs.choose_backend(options.transformer_impl)
    flex = specs.use_flex_attention(options.flex_attention)
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = PositionalGPTModel(
            config=config,
            transformer_layer_spec=specs.layer_spec(backend, config=config, vp_stage=stage, flex_attention=flex),
            vocab_size=arch.padded_vocab_size,
            max_sequence_length=max(options.seq_length, arch.max_position_embeddings),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,
            vp_stage=stage,
            pg_collection=pg_collection,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    if parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
        n = sum(p.numel() for m in chunks for p in m.parameters())
        logger.info("built %d model chunk(s) (%s), %.2fM parameters on PP rank %d", len(chunks),
                    f"{backend}+flex" if flex else backend, n / 1e6, parallel_state.get_pipeline_model_parallel_rank())
    return chunks
