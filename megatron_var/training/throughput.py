"""Throughput of a training run: model FLOPs of a step, the device's peak, and rates over a log interval.

Model FLOPs follow Megatron-LM's ``num_floating_point_operations`` (megatron/training/training.py, GQA + SwiGLU,
no MoE/MTP): every GEMM costs 2 FLOPs per weight per token in the forward and twice that in the backward (data and
weight gradients), so fwd+bwd = 6 x the GEMM weights a token passes through; core attention (QK^T and softmax·V)
adds 6 x q_proj x seq per token and layer (4·s·q forward, halved by the causal mask, x3 for fwd+bwd). Norms, RoPE,
softmax and biases are left out, as there. MFU = these FLOPs / (step time x GPUs x the GPU's dense peak) — the
*model* FLOPs: activation recomputation re-runs work without counting it, as in Megatron-LM and PaLM.

What a VAR step computes beyond SFT: the frozen reference's forward over its own rows (VAR: the B x B cross pairs,
``ref_computed_tokens``), 1/3 of a training pass per token. Its attention term takes the policy's row length: a
naive reference row is [x_i; y_j] like a policy row, and in a shared-prefix row [x_i; y_1..y_B] each response
attends to x_i and itself only (the block mask), the same span.
"""

from __future__ import annotations

import resource
import sys
from typing import Optional

import torch
import torch.distributed as dist

from megatron_var.batching.pairs import sequence_lengths
from megatron_var.models.arch import ModelArch

GIB = 1024**3


# ---- model FLOPs -----------------------------------------------------------------------------------------------
def gemm_weights(arch: ModelArch) -> int:
    """Weights of the GEMMs one token passes through: per layer the Q, K, V (GQA: num_query_groups heads) and
    output projections and SwiGLU's gate, up and down matrices; then the LM head over the padded vocabulary (also
    when tied to the embedding: the lookup costs nothing, the head's matmul does)."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    q = arch.num_attention_heads * arch.kv_channels
    kv = arch.num_query_groups * arch.kv_channels
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f
    return arch.num_layers * per_layer + h * arch.padded_vocab_size


def train_flops(arch: ModelArch, tokens: float, seq_length: float) -> float:
    """Forward + backward FLOPs of ``tokens`` tokens in rows of ``seq_length`` (the padded row length: what the
    attention kernels are given)."""
    q = arch.num_attention_heads * arch.kv_channels
    return tokens * (6.0 * gemm_weights(arch) + 6.0 * arch.num_layers * q * seq_length)


def train_flops_per_token(arch: ModelArch, seq_length: float) -> float:
    return train_flops(arch, 1, seq_length)


def forward_flops(arch: ModelArch, tokens: float, seq_length: float) -> float:
    """Forward-only FLOPs (the frozen reference): a third of a training pass."""
    return train_flops(arch, tokens, seq_length) / 3.0


def step_flops(arch: ModelArch, computed_tokens: float, ref_computed_tokens: float, seq_length: float) -> float:
    """Model FLOPs of one training step: the policy's fwd+bwd over its tokens (padding included: the GPU computed
    them) plus the reference's forward over its own."""
    return train_flops(arch, computed_tokens, seq_length) + forward_flops(arch, ref_computed_tokens, seq_length)


def real_tokens(batches: list[dict]) -> int:
    """Tokens of the micro-batches' sequences, padding excluded. Read from the pairs' ``attn_segments`` (-1 marks
    padding), not from the token ids: the pad id 0 is a real token in Llama-3's vocabulary."""
    return sum(int((b["cross"].attn_segments >= 0).sum()) for b in batches)


def mean_row_length(batches: list) -> Optional[float]:
    """The row length that makes ``train_flops(computed tokens, ·)`` count the attention the micro-batches compute
    (as Megatron-LM's ``seqlen_squared_sum``): Σ S² per padded row (``tokens`` [rows, S]: a causal kernel scores the
    padding too), Σ len² per sequence of a packed row (each attends only to itself, and FlexAttention skips the
    tiles between them), over Σ rows·S."""
    tokens = squares = 0
    for b in batches:
        t = b["tokens"] if isinstance(b, dict) else b.tokens
        rows, seq = int(t.shape[0]), int(t.shape[-1])
        tokens += rows * seq
        pairs = b.get("cross") if isinstance(b, dict) else None
        if pairs is not None and pairs.block_masked:
            squares += int((sequence_lengths(pairs.attn_segments) ** 2).sum())
        else:
            squares += rows * seq * seq
    return squares / tokens if tokens else None


# ---- device peaks ----------------------------------------------------------------------------------------------
# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's data sheets, TFLOP/s: (name parts, bf16/fp16, fp32).
# fp32 is the plain FP32 peak: torch leaves TF32 matmuls off by default. First match wins: specific names first.
_PEAKS = (
    (("H100", "PCIE"), 756.0, 51.0),
    (("H100", "NVL"), 835.5, 60.0),
    (("H200", "NVL"), 835.5, 60.0),
    (("GH200",), 989.5, 67.0),
    (("H200",), 989.5, 67.0),
    (("H100",), 989.5, 67.0),  # SXM: "NVIDIA H100 80GB HBM3"
    (("A100",), 312.0, 19.5),  # SXM4 and PCIe alike
)


def device_peak_tflops(device_name: Optional[str], dtype) -> Optional[float]:
    """Dense peak TFLOP/s of one GPU (``torch.cuda.get_device_name()``) at ``dtype`` ('bf16', 'fp16', 'fp32' or
    a torch.dtype); None for a GPU not in the table or a CPU (no MFU then)."""
    if not device_name:
        return None
    name = device_name.upper()
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, dtype)
    for parts, half, single in _PEAKS:
        if all(p in name for p in parts):
            return {"bf16": half, "fp16": half, "fp32": single}.get(dtype)
    return None


# ---- memory ----------------------------------------------------------------------------------------------------
def peak_memory_bytes(on_gpu: bool) -> int:
    """Peak allocated GPU memory of this process's device, or on CPU the process's peak resident set size."""
    if on_gpu:
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


def format_duration(seconds: float) -> str:
    """'45s', '12m05s', '1h02m', '2d03h'."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# ---- rates over a log interval ---------------------------------------------------------------------------------
def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class IntervalMeter:
    """Per-step rates of each training record, and their aggregate over a log interval.

    ``observe_batches`` (the policy micro-batches of the coming step) gives the row length of the attention term;
    without it the term is left out. ``peak_tflops`` None (CPU or an unknown GPU): no MFU; ``on_gpu`` False: no
    TFLOP/s either (a CPU's FLOP/s says little about a GPU run).
    """

    def __init__(self, arch: ModelArch, end_iteration: int, *, on_gpu: bool, peak_tflops: Optional[float] = None,
                 world: Optional[int] = None):
        self.arch, self.end_iteration = arch, end_iteration
        self.on_gpu, self.peak_tflops = on_gpu, peak_tflops
        self.world = world or world_size()
        self.seq_length: Optional[float] = None
        self._reset()

    def _reset(self) -> None:
        self.steps, self.time_s, self.tokens, self.computed, self.flops, self.skipped = 0, 0.0, 0.0, 0.0, 0.0, 0

    @property
    def pending(self) -> int:
        """Steps added since the last ``summary``."""
        return self.steps

    def observe_batches(self, batches: list) -> None:
        self.seq_length = mean_row_length(batches) or self.seq_length

    def _rates(self, time_s: float, tokens: float, computed: float, flops: float) -> dict:
        t = max(time_s, 1e-12)
        out = {"tokens_per_s": tokens / t, "computed_tokens_per_s": computed / t}
        if self.on_gpu:
            tflops = flops / t / self.world / 1e12
            out["tflops_per_gpu"] = tflops
            if self.peak_tflops:
                out["mfu"] = tflops / self.peak_tflops
        return out

    def add(self, record: dict) -> dict:
        """Count one training record in the interval; its own rates (the keys of ``_rates``)."""
        dt = float(record["step_time_s"])
        tokens, computed = float(record["tokens"]), float(record["computed_tokens"])
        flops = step_flops(self.arch, computed, float(record.get("ref_computed_tokens") or 0.0),
                           self.seq_length or 0.0)
        self.steps += 1
        self.time_s += dt
        self.tokens += tokens
        self.computed += computed
        self.flops += flops
        self.skipped += bool(record.get("skipped"))
        return self._rates(dt, tokens, computed, flops)

    def summary(self, iteration: int, peak_mem_bytes: Optional[int] = None) -> dict:
        """The interval's rates under ``perf/`` (ms per step, tokens/s, TFLOP/s per GPU, MFU, peak memory, ETA in
        seconds from the mean step time x the iterations left); starts the next interval."""
        if not self.steps:
            return {}
        mean_s = self.time_s / self.steps
        out = {"perf/ms_per_step": 1e3 * mean_s, "perf/steps": self.steps, "perf/skipped_steps": self.skipped}
        out.update({f"perf/{k}": v for k, v in self._rates(self.time_s, self.tokens, self.computed,
                                                          self.flops).items()})
        if peak_mem_bytes is not None:
            out["perf/peak_mem_gib"] = peak_mem_bytes / GIB
        out["perf/eta_s"] = mean_s * max(self.end_iteration - iteration, 0)
        self._reset()
        return out
