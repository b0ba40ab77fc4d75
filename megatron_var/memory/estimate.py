"""Per-GPU memory estimate of a training layout: will it fit before we queue it on the cluster?

Why a formula instead of a dry run: the question is asked for 8-32B models on 8-32 GPUs from a laptop. The formula
follows what this code base actually allocates (megatron-core DDP + distributed optimizer, the local or TE layer
spec, logits only at loss positions, the frozen reference's shared-prefix rows), and is checked against measured peaks
of the same code on CPU (``tests/unit/test_memory_estimate.py``).

Peak of the busiest rank = persistent state + the larger of the two phases of a step (they never overlap: the
reference scores a step's groups before the policy schedule starts):

* persistent: policy weights (params dtype), fp32 gradient buffer (``grad_reduce_in_fp32=True`` in
  ``runtime/engine.py``), optimizer (bf16/fp16 params: fp32 main copy + Adam m, v = 12 B/param; fp32 params:
  m, v = 8 B/param, the main params are the model's own), sharded over DP with the distributed optimizer; the
  reference's weights when resident (no grads, no optimizer).
* policy phase: activations of the micro-batches in flight + logits/cross-entropy buffers of one micro-batch + one
  weight-gradient temporary (``gradient_accumulation_fusion=False``: each weight's grad is materialised before it is
  added to the fp32 buffer).
* reference phase (forward only, ``no_grad``): the larger of the working set of one layer for one group's
  micro-batch and its logits at the B·B·R response positions (they never coexist), plus the dense shared-prefix
  masks (not with FlexAttention: [B, 1, S, S] bool per group, and per attention call SDPA's additive copy), plus the
  reference weights when offloaded (``--ref-offload`` moves them in for the phase). With ``--ref-cache`` this phase
  runs once, before training, with the reference resident; it still has to fit.

Activations per layer and token (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models": 34·s·b·h + 5·a·s²·b bytes in 16-bit), adapted term by term to this model — e = activation bytes (2 for
bf16, 4 for fp32), t = TP, h-sized terms divided by t only with sequence parallelism:

* RMSNorm x2: TE keeps the norm input and the normalised output the next linear reads (2·e·h each); our local
  RMSNorm computes in fp32, so it keeps an fp32 copy of the input, its output and the linear's input ((4+2e)·h).
  No dropout (p=0 skips the mask), so Korthikanti's 2·s·b·h dropout-mask terms are gone.
* attention (GQA: a query heads, g KV heads, head dim d): the fused QKV output stays alive because V is a view of
  it (e·(a+2g)·d), plus RoPE'd Q and K (e·(a+g)·d), plus the attention output (e·a·d; the local spec also keeps
  the [s, b, h] reshape copy the projection reads: another e·a·d), plus fp32 softmax statistics (4·a).
  Fused attention (SDPA flash / memory-efficient, TE fused, FlexAttention) never stores the s² score matrix, so
  Korthikanti's 5·a·s/h term is absent; ``attention="unfused"`` adds it back (scores and softmax output,
  2·e·a·s per token: TE's unfused backend, e.g. with an arbitrary mask) and selective recompute then drops it.
* SwiGLU MLP (F = ffn_hidden_size): fc1's 2F output and the F-wide product fc2 reads (3·e·F, fused
  bias-SwiGLU on GPU); unfused (CPU) the SiLU output is kept too (4·e·F).

Full recompute (``--recompute-granularity full``: megatron ``full``/``uniform``, 1 layer per checkpoint) keeps only
every layer's input (e·h) and rebuilds one layer at a time in backward. Every layer's backward holds its own
activations plus gradients of about the same size, so one extra layer's activations are added in both modes.
Selective recompute (megatron ``recompute_modules=["core_attn"]``) keeps the core attention's inputs, counted
above anyway, and recomputes what lives inside it; with fused attention that is only the softmax statistics, so it
is estimated as no recompute (measured on CPU, 4-layer fp32 model, one group of 4 at P = R = 128: policy peak
217.6 MiB selective vs 222.0 MiB none, 136.4 MiB full).

Pipeline: rank k of a 1F1B schedule holds min(PP−k, M) micro-batches in flight (M micro-batches per step);
interleaved (VPP v): (PP−k−1)·2 + (v−1)·PP + 1 model chunks of L/(PP·v) layers, so the first rank holds
L·(1 + (PP−1)/(PP·v)) layers' worth (Megatron-LM's formula). Every rank is evaluated; the busiest is reported.

Logits (``models/selected_logits.py``): n = rows with loss weight (policy: micro-batch × B × R; reference:
B·B·R per group), [n, V/t] in the params dtype out of the output layer plus the fp32 copy the vocab-parallel cross
entropy works in (in place; its softmax is what backward reuses): (e + 4)·n·V/t, 4·n·V/t when e=4, and one more fp32
copy on the rank that holds padded vocabulary columns (they are masked with ``masked_fill``).

Not modelled: the CUDA context, NCCL/communication buffers and allocator fragmentation (``overhead_gib``, 2 GiB by
default for GPUs, 0 for the CPU validation), pipeline p2p buffers and RoPE tables (small).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_var.models.arch import ModelArch

GIB = 1024 ** 3
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Layout:
    """Parallel layout (Megatron-LM flag names)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    data_parallel_size: int = 1

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.virtual_pipeline_model_parallel_size in (None, 1):
            self.virtual_pipeline_model_parallel_size = None
        elif self.virtual_pipeline_model_parallel_size < 1 or self.pipeline_model_parallel_size < 2:
            raise ValueError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size >= 2")
        if self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # as the trainer: meaningless without TP


@dataclass
class Workload:
    """What one step feeds the model, per data-parallel rank."""

    objective: str = "var"
    """'var' | 'sft' | 'dpo' (sft has no reference; dpo's reference scores only the diagonal)."""
    group_size: int = 8
    """B: samples per group (DPO: 2, chosen and rejected)."""
    micro_batch_size: int = 1
    """Groups per policy micro-batch (the trainer's --micro-batch-size)."""
    prompt_length: int = 1024
    """P: prompt tokens of the longest sample (micro-batches are padded to the longest)."""
    response_length: int = 1024
    """R: response tokens of the longest sample; the loss (and the logits) cover these positions only."""
    num_microbatches: Optional[int] = None
    """Policy micro-batches per step and DP rank (global batch / (micro-batch × DP)); None = enough to fill the
    pipeline."""
    cross_pair_method: str = "shared_prefix"

    def __post_init__(self):
        if self.objective not in ("var", "sft", "dpo"):
            raise ValueError(f"--objective must be var, sft or dpo, got {self.objective!r}")
        if self.cross_pair_method not in ("shared_prefix", "naive"):
            raise ValueError(f"--cross-pair-method must be shared_prefix or naive, got {self.cross_pair_method!r}")
        for name in ("group_size", "micro_batch_size", "prompt_length", "response_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_microbatches is not None and self.num_microbatches < 1:
            raise ValueError(f"number of micro-batches must be >= 1, got {self.num_microbatches}")


@dataclass
class Precision:
    """Numerics, memory-saving options and the kernels they run on."""

    params_dtype: str = "bf16"
    use_distributed_optimizer: bool = True
    recompute_granularity: str = "none"
    """'none' | 'selective' (--recompute-granularity selective or --recompute-activations: drops only the s²
    attention terms, which fused attention never stores) | 'full' (--recompute-granularity full)."""
    ref: str = "resident"
    """Reference placement: 'resident' | 'offloaded' (--ref-offload) | 'cached' (--ref-cache)."""
    transformer_impl: str = "te"
    """'te' (Transformer Engine, the GPU image) | 'local' (our spec: CPU, or GPU without TE)."""
    fused_kernels: bool = True
    """Fused bias-SwiGLU (megatron enables it on GPU); False on CPU."""
    attention: str = "fused"
    """'fused' (no s² scores kept: SDPA flash/efficient, TE fused, FlexAttention) | 'unfused'."""
    flex_attention: bool = True
    """Shared-prefix reference rows through FlexAttention block masks (local spec on GPU); otherwise a dense
    [B, 1, S, S] bool mask per group, kept for the whole reference pass of a step."""
    overhead_gib: float = 2.0
    """CUDA context, NCCL buffers, allocator fragmentation."""

    def __post_init__(self):
        if self.params_dtype not in _BYTES:
            raise ValueError(f"dtype must be one of {sorted(_BYTES)}, got {self.params_dtype!r}")
        if self.recompute_granularity not in ("none", "selective", "full"):
            raise ValueError("--recompute-granularity must be none, selective or full, "
                             f"got {self.recompute_granularity!r}")
        if self.ref not in ("resident", "offloaded", "cached"):
            raise ValueError(f"--ref must be resident, offloaded or cached, got {self.ref!r}")
        if self.transformer_impl not in ("te", "local"):
            raise ValueError(f"--transformer-impl must be te or local, got {self.transformer_impl!r}")
        if self.attention not in ("fused", "unfused"):
            raise ValueError(f"--attention must be fused or unfused, got {self.attention!r}")
        if self.overhead_gib < 0:
            raise ValueError(f"--overhead-gib must be >= 0, got {self.overhead_gib}")


COMPONENTS = ("weights", "grads", "optimizer", "reference", "activations", "logits", "reference_activations",
              "reference_logits", "overhead")


@dataclass
class Estimate:
    """Bytes per component on the busiest rank (``rank``: its pipeline stage) and the phase that sets the peak."""

    rank: int
    components: dict[str, float]
    phase: str
    """'policy' or 'reference': which phase of the step is the peak."""
    policy_phase: float
    reference_phase: float
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Peak bytes: persistent state + the larger phase (+ overhead)."""
        c = self.components
        persistent = c["weights"] + c["grads"] + c["optimizer"] + c["overhead"]
        return persistent + max(self.policy_phase, self.reference_phase)

    def fits(self, gpu_gib: float, margin: float = 0.10) -> bool:
        """True when the peak leaves at least ``margin`` of the GPU free."""
        return self.total <= gpu_gib * GIB * (1.0 - margin)

    def table(self, gpu_gib: Optional[float] = None, margin: float = 0.10) -> str:
        """Components in GiB, the total and (with ``gpu_gib``) the verdict."""
        lines = [f"{'component':<24}{'GiB':>10}"]
        for k in COMPONENTS:
            tag = ""
            if k in ("activations", "logits") and self.phase != "policy":
                tag = "  (policy phase)"
            if k in ("reference_activations", "reference_logits") and self.phase != "reference":
                tag = "  (reference phase)"
            lines.append(f"{k:<24}{self.components[k] / GIB:>10.2f}{tag}")
        lines.append(f"{'peak (busiest rank)':<24}{self.total / GIB:>10.2f}  pipeline rank {self.rank}, "
                     f"{self.phase} phase")
        lines.extend(f"note: {n}" for n in self.notes)
        if gpu_gib is not None:
            budget = gpu_gib * (1.0 - margin)
            verdict = "FITS" if self.fits(gpu_gib, margin) else "DOES NOT FIT"
            headroom = budget - self.total / GIB
            lines.append(f"{verdict}: {self.total / GIB:.1f} GiB of {gpu_gib:g} GiB "
                         f"(limit {budget:.1f} GiB with {margin:.0%} margin; headroom {headroom:+.1f} GiB)")
        return "\n".join(lines)


# ---- parameters ---------------------------------------------------------------------------------------------
def layer_params(arch: ModelArch, tp: int) -> float:
    """Parameters of one transformer layer on one TP rank (norm weights are replicated)."""
    a, g, d, h, f = (arch.num_attention_heads, arch.num_query_groups, arch.kv_channels, arch.hidden_size,
                     arch.ffn_hidden_size)
    qkv = h * (a + 2 * g) * d + ((a + 2 * g) * d if arch.add_qkv_bias else 0)
    proj = a * d * h
    mlp = h * 2 * f + f * h
    return (qkv + proj + mlp) / tp + 2 * h


def stage_params(arch: ModelArch, layout: Layout, rank: int) -> float:
    """Parameters held by pipeline rank ``rank`` on one TP rank (embedding first, output layer last; a tied
    output layer is a second copy on the last stage when PP > 1, as megatron does)."""
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    n = arch.num_layers / pp * layer_params(arch, tp)
    vocab = arch.padded_vocab_size * arch.hidden_size / tp
    if rank == 0:
        n += vocab
    if rank == pp - 1:
        n += arch.hidden_size  # final norm
        if not (arch.tie_word_embeddings and pp == 1):
            n += vocab
    return n


def largest_weight(arch: ModelArch, tp: int) -> float:
    """Elements of the largest weight matrix on one TP rank (its gradient is materialised once in backward)."""
    h = arch.hidden_size
    return max(arch.padded_vocab_size * h, 2 * arch.ffn_hidden_size * h,
               (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.kv_channels * h) / tp


# ---- activations --------------------------------------------------------------------------------------------
def layer_activation_bytes_per_token(arch: ModelArch, layout: Layout, prec: Precision, seq: int,
                                     recompute_scores: bool = False) -> float:
    """Bytes one layer keeps for backward per token of a micro-batch (no recompute); see the module docstring."""
    e = _BYTES[prec.params_dtype]
    t = layout.tensor_model_parallel_size
    sp = t if layout.sequence_parallel else 1
    a, g, d, h, f = (arch.num_attention_heads, arch.num_query_groups, arch.kv_channels, arch.hidden_size,
                     arch.ffn_hidden_size)
    norm = 2 * e * h if prec.transformer_impl == "te" else (4 + 2 * e) * h
    outs = 1 if prec.transformer_impl == "te" else 2
    attn = e * ((a + 2 * g) * d + (a + g) * d + outs * a * d) + 4 * a
    if prec.attention == "unfused" and not recompute_scores:
        attn += 2 * e * a * seq
    mlp = (3 if prec.fused_kernels else 4) * e * f
    return 2 * norm / sp + (attn + mlp) / t


def _in_flight_layers(arch: ModelArch, layout: Layout, rank: int, microbatches: Optional[int]) -> float:
    """Layers' worth of micro-batch activations pipeline rank ``rank`` holds at once (1F1B / interleaved)."""
    pp, v = layout.pipeline_model_parallel_size, layout.virtual_pipeline_model_parallel_size or 1
    m = microbatches if microbatches is not None else 10 ** 9
    if v == 1:
        chunks = min(pp - rank, m)
    else:
        chunks = min((pp - rank - 1) * 2 + (v - 1) * pp + 1, m * v)
    return chunks * arch.num_layers / (pp * v)


def _pad(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def _logit_bytes(arch: ModelArch, layout: Layout, prec: Precision, rows: int) -> float:
    """Logits of ``rows`` positions on the rank with the vocabulary's last slice (it holds the padded columns)."""
    e = _BYTES[prec.params_dtype]
    per_row = arch.padded_vocab_size / layout.tensor_model_parallel_size
    factor = 4 + (e if e < 4 else 0) + (4 if arch.padded_vocab_size > arch.vocab_size else 0)
    return factor * rows * per_row + e * rows * arch.hidden_size


def estimate(arch: ModelArch, layout: Layout, work: Workload, prec: Precision) -> Estimate:
    """The busiest rank's memory for one training step (see the module docstring for every term)."""
    arch.check_layout(layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                      layout.virtual_pipeline_model_parallel_size)
    e = _BYTES[prec.params_dtype]
    t, pp, dp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size, layout.data_parallel_size
    sp = t if layout.sequence_parallel else 1
    h = arch.hidden_size
    B, P, R = work.group_size, work.prompt_length, work.response_length
    notes: list[str] = []

    # policy micro-batch: micro_batch_size groups x B rows of [x_i; y_i], padded to a multiple of TP under SP
    seq = _pad(P + R, sp)
    tokens = work.micro_batch_size * B * seq
    rows = work.micro_batch_size * B * R
    full = prec.recompute_granularity == "full"
    per_layer = layer_activation_bytes_per_token(arch, layout, prec, seq,
                                                 recompute_scores=prec.recompute_granularity != "none") * tokens
    kept_per_layer = e * h / sp * tokens if full else per_layer

    # the reference's micro-batch: one group
    has_ref = work.objective in ("var", "dpo")
    if work.objective == "dpo":
        ref_rows_n, ref_seq, ref_logit_rows = B, seq, B * R
    elif work.cross_pair_method == "shared_prefix":
        ref_rows_n, ref_seq, ref_logit_rows = B, _pad(P + B * R, sp), B * B * R
    else:
        ref_rows_n, ref_seq, ref_logit_rows = B * B, seq, B * B * R
    ref_tokens = ref_rows_n * ref_seq
    groups_per_step = (work.num_microbatches or pp) * work.micro_batch_size
    masked = work.objective == "var" and work.cross_pair_method == "shared_prefix"
    dense_masks = ref_rows_n * ref_seq ** 2 * groups_per_step if masked and not prec.flex_attention else 0
    if masked and not prec.flex_attention:
        notes.append(f"dense shared-prefix masks: {dense_masks / GIB:.2f} GiB ({groups_per_step} groups x "
                     f"[{ref_rows_n}, {ref_seq}, {ref_seq}] bool)")

    best: Optional[Estimate] = None
    for rank in range(pp):
        params = stage_params(arch, layout, rank)
        weights = params * e
        grads = params * 4
        opt = params * (12 if e < 4 else 8) / (dp if prec.use_distributed_optimizer else 1)
        ref_weights = weights if has_ref else 0.0
        layers_here = arch.num_layers / pp
        in_flight = _in_flight_layers(arch, layout, rank, work.num_microbatches)
        last = rank == pp - 1
        acts = kept_per_layer * in_flight + per_layer  # + one layer rebuilt / being differentiated in backward
        if last:
            acts += ((4 + 2 * e) if prec.transformer_impl == "local" else 2 * e) * h / sp * tokens  # final norm
        logits = _logit_bytes(arch, layout, prec, rows) if last else 0.0
        wgrad = largest_weight(arch, t) * e
        policy_phase = acts + logits + wgrad

        ref_acts = ref_logits = 0.0
        if has_ref and layers_here:
            a, g, d, f = arch.num_attention_heads, arch.num_query_groups, arch.kv_channels, arch.ffn_hidden_size
            # forward only: the residual stream in and out, the gathered norm output (SP) and the larger of the
            # attention block's tensors (QKV, RoPE'd Q/K, K/V repeated for a masked GQA call, output) and the
            # MLP's (fc1 out, SiLU out, product)
            attn = e * ((a + 2 * g) * d + (a + g) * d + 2 * a * d + 2 * a * d) / t
            mlp = e * (4 if not prec.fused_kernels else 3) * f / t
            layer = (2 * e * h / sp + e * h + max(attn, mlp)) * ref_tokens
            if masked and not prec.flex_attention:
                # per attention call: the inverted bool mask and SDPA's additive mask in the activation dtype
                layer += (1 + e) * ref_rows_n * ref_seq ** 2
            if prec.attention == "unfused":
                layer += 2 * e * a / t * ref_rows_n * ref_seq ** 2
            ref_acts = layer + dense_masks
            ref_logits = _logit_bytes(arch, layout, prec, ref_logit_rows) if last else 0.0
        # the decoder's working set and the logits never coexist: the layers are done when the output layer runs
        reference_phase = max(ref_acts, ref_logits + dense_masks)
        if has_ref and prec.ref in ("offloaded", "cached"):
            reference_phase += ref_weights  # brought in for the phase (cached: once, before training)
            resident = 0.0
        else:
            resident = ref_weights
        comps = {"weights": weights, "grads": grads, "optimizer": opt, "reference": ref_weights if has_ref and
                 prec.ref != "cached" else 0.0, "activations": acts, "logits": logits + wgrad,
                 "reference_activations": ref_acts, "reference_logits": ref_logits,
                 "overhead": prec.overhead_gib * GIB}
        est = Estimate(rank=rank, components=comps, phase="policy" if policy_phase + resident >= reference_phase
                       else "reference", policy_phase=policy_phase + resident,
                       reference_phase=reference_phase + resident, notes=list(notes))
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    if prec.ref == "offloaded" and has_ref:
        best.notes.append("reference offloaded: its weights count only in the reference phase")
    if prec.ref == "cached" and has_ref:
        best.notes.append("reference cached: the reference phase runs once, before training (cache build)")
    return best

