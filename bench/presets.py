"""The benchmark's sizes (model shape + workload per ``--preset``) and the targets its ratios are compared with.

Each preset fixes (a) the policy micro-batch of the policy-step measurement, (b)/(c) the group (B prompts of P
tokens, B responses of R tokens) that reference scoring and the VAR-vs-SFT step use, (d) the length distribution
and step size of the length-realistic benchmark (``--lengths``), and the size of the matmul that measures the
device's peak FLOP/s (the MFU denominator).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_var.models.arch import ModelArch


@dataclass(frozen=True)
class Preset:
    """Model shape and workload of one benchmark size."""

    arch: ModelArch
    micro_batch: int
    """(a) rows per policy micro-batch."""
    seq_length: int
    """(a) tokens per row."""
    group_size: int
    """(b)/(c) B."""
    prompt_len: int
    """(b)/(c) P."""
    response_len: int
    """(b)/(c) R."""
    matmul_n: int
    """n of the n³ matmul that measures the device's peak FLOP/s."""
    warmup: int = 2
    iters: int = 6
    length_medians: tuple[int, int] = (150, 250)
    """(d) ``--lengths``: median prompt and response length of the lognormal draw (p95 = 4 × median), each pair then
    fitted to ``seq_length`` as prepare_data does (bench/length_groups.py)."""
    lengths_groups: int = 2
    """(d) ``--lengths``: groups per step, one group per micro-batch (the trainer's --micro-batch-size 1)."""
    trl_ref_rows: int = 64
    """(d) ``--lengths``: rows per reference forward of the TRL-style step (its B² pairs in chunks of this many; full
    logits of a 1B group's 64 rows at once would take ~100 GB)."""


PRESETS = {
    "tiny": Preset(  # the 1B preset's proportions (B=8, P = 2R, GQA 4:1, tied) at a size a CPU core runs in seconds
        arch=ModelArch(family="llama", num_layers=2, hidden_size=128, ffn_hidden_size=512, num_attention_heads=8,
                       num_query_groups=2, kv_channels=16, vocab_size=1024, max_position_embeddings=1024,
                       rope_theta=10000.0, tie_word_embeddings=True),
        micro_batch=2, seq_length=256, group_size=8, prompt_len=64, response_len=32, matmul_n=512, warmup=2,
        iters=7, length_medians=(19, 31), lengths_groups=2, trl_ref_rows=64),  # medians: 1B's x seq_length 256/2048
    "micro": Preset(  # bench/gpu_check.sh --dry-run: the code path end to end in seconds, numbers meaningless
        arch=ModelArch(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, kv_channels=16, vocab_size=256, max_position_embeddings=256,
                       rope_theta=10000.0, tie_word_embeddings=True),
        micro_batch=2, seq_length=64, group_size=4, prompt_len=16, response_len=8, matmul_n=128, warmup=0,
        iters=1, length_medians=(5, 8), lengths_groups=2, trl_ref_rows=16),
    "llama3.2-1b": Preset(
        arch=ModelArch(family="llama", num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                       num_query_groups=8, kv_channels=64, vocab_size=128256, max_position_embeddings=131072,
                       rope_theta=500000.0, rope_scaling_factor=32.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
        micro_batch=4, seq_length=2048, group_size=8, prompt_len=512, response_len=256, matmul_n=8192, warmup=1,
        iters=4,  # one warm-up run is enough to compile FlexAttention and keeps the whole run within a few minutes
        length_medians=(150, 250), lengths_groups=4, trl_ref_rows=16),
}

TARGETS = {"policy_vs_transformers": 1.1, "policy_mfu": 0.52, "var_over_sft": 2.3, "shared_prefix_speedup": 2.0}
"""What a GPU run should reach: policy step ≥ 1.1× transformers at ≥ 52% MFU, online VAR step ≤ 2.3× the SFT step
(the FLOP floor is ~2.2×, docs/performance.md), shared-prefix scoring ≥ 2× naive. Reported, never asserted."""

LENGTHS_TARGETS = {"speedup_vs_trl_style_online": 2.0, "speedup_vs_trl_style_cached": 3.0}
"""``--lengths`` on a GPU: our VAR step ≥ 2× the TRL-style step with an online reference, ≥ 3× with a cached one
(same groups, dtype and optimizer). Reported, never asserted."""
