"""Model FLOPs, device peaks and the log-interval meter (megatron_var/training/throughput.py), by hand."""

import pytest
import torch

from megatron_var.models.arch import ModelArch
from megatron_var.training import throughput as T


def tiny(**kw) -> ModelArch:
    shape = dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, kv_channels=16, vocab_size=256, max_position_embeddings=256)
    return ModelArch(**dict(shape, **kw))


def test_flops_by_hand():
    arch = tiny()
    # per layer: QKV 64·(64 + 2·32) + O 64·64 + SwiGLU 3·64·128 = 8192 + 4096 + 24576; LM head 64·256
    assert T.gemm_weights(arch) == 2 * 36864 + 16384 == 90112
    # 6·90112 per token + attention 6·L·q·s = 6·2·64·32
    assert T.train_flops_per_token(arch, 32) == 540672 + 24576
    assert T.train_flops(arch, 10, 32) == 10 * 565248
    assert T.forward_flops(arch, 10, 32) == pytest.approx(10 * 565248 / 3)
    assert T.step_flops(arch, 10, 30, 32) == pytest.approx(10 * 565248 + 10 * 565248)
    # the padded vocab: 250 rows are padded to 256 for the head's matmul
    assert T.gemm_weights(tiny(vocab_size=250)) == T.gemm_weights(arch)
    # mean row length: Σ rows·s² / Σ rows·s over micro-batches of [2, 8] and [1, 16] -> (128 + 256) / 32
    batches = [{"tokens": torch.zeros(2, 8, dtype=torch.long)}, {"tokens": torch.zeros(1, 16, dtype=torch.long)}]
    assert T.mean_row_length(batches) == 12.0
    assert T.train_flops(arch, 32, 12.0) == 2 * 8 * T.train_flops_per_token(arch, 8) + \
        16 * T.train_flops_per_token(arch, 16)
    assert T.mean_row_length([]) is None


@pytest.mark.parametrize("tied", [False, True])
def test_gemm_weights_are_the_models_matmul_weights(tied):
    """The same count from the weights of a real model of this shape (transformers' Llama: the same GEMMs as our
    megatron-core GPTModel): every matrix but the embedding lookup, plus the LM head once (tied or not)."""
    transformers = pytest.importorskip("transformers")
    arch = tiny(tie_word_embeddings=tied)
    cfg = transformers.LlamaConfig(vocab_size=arch.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # tied: one tensor, counted once
    lookup = 0 if tied else model.get_input_embeddings().weight.numel()
    assert T.gemm_weights(arch) == matrices - lookup


def test_flops_match_megatron_lm():
    """Megatron-LM's own num_floating_point_operations (BSHD: batch x seq_length tokens, full rows) agrees."""
    training = pytest.importorskip("megatron.training.training")

    class Args:
        def __init__(self, **kw):
            self.__dict__.update(kw)

        def __getattr__(self, name):  # the MoE/MLA/hybrid settings this model does not have
            return None

    for arch in (tiny(), tiny(vocab_size=1000, num_query_groups=4, tie_word_embeddings=True)):
        args = Args(num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
                    num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
                    group_query_attention=True, kv_channels=arch.kv_channels,
                    padded_vocab_size=arch.padded_vocab_size, seq_length=48, swiglu=True, num_experts=None,
                    multi_latent_attention=False, attention_output_gate=False, is_hybrid_model=False)
        assert T.train_flops(arch, 3 * 48, 48) == pytest.approx(training.num_floating_point_operations(args, 3),
                                                                rel=1e-12)


def test_device_peaks():
    assert T.device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert T.device_peak_tflops("NVIDIA H200", torch.bfloat16) == 989.5
    assert T.device_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert T.device_peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert T.device_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") < 312.0
    assert T.device_peak_tflops("NVIDIA H100 80GB HBM3", "fp32") < 989.5
    assert T.device_peak_tflops("NVIDIA GeForce RTX 3090", "bf16") is None
    assert T.device_peak_tflops(None, "fp32") is None


def test_durations():
    assert [T.format_duration(s) for s in (0, 45, 65, 3720, 2 * 86400 + 3 * 3600 + 59)] == \
        ["0s", "45s", "1m05s", "1h02m", "2d03h"]


def _record(it, dt, tokens=100, computed=128, ref=0, skipped=False):
    return {"iteration": it, "step_time_s": dt, "tokens": tokens, "computed_tokens": computed,
            "ref_computed_tokens": ref, "skipped": skipped}


def test_interval_meter_gpu():
    arch = tiny()
    m = T.IntervalMeter(arch, end_iteration=10, on_gpu=True, peak_tflops=1e-6, world=2)
    m.observe_batches([{"tokens": torch.zeros(4, 32, dtype=torch.long)}])
    step = m.add(_record(1, 0.5, ref=256))
    flops1 = T.train_flops(arch, 128, 32) + T.forward_flops(arch, 256, 32)
    assert step["tokens_per_s"] == 200 and step["computed_tokens_per_s"] == 256
    assert step["tflops_per_gpu"] == pytest.approx(flops1 / 0.5 / 2 / 1e12)
    assert step["mfu"] == pytest.approx(step["tflops_per_gpu"] / 1e-6)
    m.add(_record(2, 1.5, skipped=True))
    flops2 = T.train_flops(arch, 128, 32)
    out = m.summary(2, peak_mem_bytes=3 * T.GIB)
    assert out["perf/ms_per_step"] == pytest.approx(1000.0)
    assert out["perf/tokens_per_s"] == pytest.approx(200 / 2.0)
    assert out["perf/tflops_per_gpu"] == pytest.approx((flops1 + flops2) / 2.0 / 2 / 1e12)
    assert out["perf/mfu"] == pytest.approx(out["perf/tflops_per_gpu"] / 1e-6)
    assert out["perf/peak_mem_gib"] == 3.0
    assert out["perf/eta_s"] == pytest.approx(1.0 * 8)  # mean step 1 s x 8 iterations left
    assert out["perf/steps"] == 2 and out["perf/skipped_steps"] == 1
    assert m.pending == 0 and m.summary(2) == {}


def test_interval_meter_cpu_has_no_flops_or_mfu():
    m = T.IntervalMeter(tiny(), end_iteration=3, on_gpu=False, peak_tflops=None, world=1)
    assert set(m.add(_record(1, 0.25))) == {"tokens_per_s", "computed_tokens_per_s"}
    out = m.summary(1)
    assert "perf/tflops_per_gpu" not in out and "perf/mfu" not in out and out["perf/eta_s"] == pytest.approx(0.5)


def test_peak_memory_cpu_is_the_processes_peak_rss():
    held = bytearray(64 * 1024 * 1024)  # noqa: F841 (64 MiB resident while measured)
    held[::4096] = b"x" * len(held[::4096])
    assert T.peak_memory_bytes(on_gpu=False) >= 64 * 1024 * 1024


@pytest.mark.parametrize("pack", [True, False])
def test_real_tokens_counts_token_id_zero_and_not_padding(pack):
    """Id 0 is the pad id and a real token in Llama-3's vocabulary: the count follows the rows' layout, not ids."""
    from types import SimpleNamespace

    from megatron_var.runtime.microbatches import policy_microbatches

    prompts, responses = [[0, 5, 0], [7], [3, 0, 0, 0, 2]], [[0], [9, 0, 4], [1, 1]]
    group = SimpleNamespace(prompt_ids=prompts, response_ids=responses)
    batches = policy_microbatches([[group]], 0, 4, same_length=False, pack=pack)
    assert batches[0]["tokens"].numel() > 15  # padding is there to be left out
    assert T.real_tokens(batches) == sum(map(len, prompts)) + sum(map(len, responses)) == 15


def test_mean_row_length_counts_each_packed_sequence_alone():
    """Attention FLOPs by hand: padded rows cost S² each (padding scored), a packed sequence len² (its doc only)."""
    from types import SimpleNamespace

    from megatron_var.runtime.microbatches import policy_microbatches

    group = SimpleNamespace(prompt_ids=[[5] * 3, [6] * 1, [7] * 2], response_ids=[[1] * 4, [2] * 2, [3] * 1])
    (padded,) = policy_microbatches([[group]], 0, 1, same_length=False, pack=False)  # 3 rows of 7
    (packed,) = policy_microbatches([[group]], 0, 1, same_length=False, pack=True)  # rows [7], [3, 3]
    assert T.mean_row_length([padded]) == 3 * 49 / 21
    assert T.mean_row_length([packed]) == (49 + 9 + 9) / 14
    assert T.mean_row_length([padded, packed]) == (3 * 49 + 49 + 9 + 9) / (21 + 14)
