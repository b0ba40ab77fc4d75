"""Tiny random HF Llama / Qwen2 checkpoints for the conversion tests (unit and distributed).

Weights are drawn with a large std (and norms/biases randomised, not left at 1/0) so that every mapping mistake —
a wrong QKV interleave, a missing bias, an unscaled RoPE frequency — moves the log-probs far beyond 1e-5;
with HF's default std 0.02 the Llama-3 RoPE scaling changes log-probs by only ~2e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def llama_config(tied: bool = True, rope_scaling: bool = True, kv_heads: int = 2, vocab: int = 120, layers: int = 2):
    """GQA Llama; theta 5e5 and head_dim 16 put RoPE frequencies in all three Llama-3 regimes (kept, smoothed,
    divided by the factor)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=256,
                       rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE) if rope_scaling else None,
                       rms_norm_eps=1e-5, tie_word_embeddings=tied, initializer_range=0.3)


def qwen2_config(tied: bool = False, vocab: int = 130, layers: int = 2):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=tied, use_sliding_window=False, initializer_range=0.3)


CONFIGS = {
    "llama-gqa-rope3-tied": lambda: llama_config(tied=True),
    "llama-untied": lambda: llama_config(tied=False, rope_scaling=False, kv_heads=4),
    "qwen2-untied": lambda: qwen2_config(tied=False),
    "qwen2-tied": lambda: qwen2_config(tied=True),
}


def build_model(config, seed: int = 0):
    """A random float32 ``*ForCausalLM`` with randomised norms and biases."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                elif name.endswith(".bias"):
                    p.normal_(0.0, 0.3)
    return model.eval()


def save_model(model, out_dir, max_shard_size: str = "30KB", extra_files: bool = True) -> Path:
    """save_pretrained with small shards (several files) plus stand-in tokenizer files to carry over."""
    out = Path(out_dir)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    if extra_files:
        (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256, "marker": str(out)}))
        (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>"}))
    return out


def make_hf_dir(name: str, out_dir, seed: int = 0, **save_kw) -> Path:
    return save_model(build_model(CONFIGS[name](), seed), out_dir, **save_kw)


def hf_token_logps(model, pairs) -> list[list[float]]:
    """Reference: transformers' own forward, one pair at a time, float32."""
    out = []
    with torch.no_grad():
        for x, y in pairs:
            ids = torch.tensor([list(x) + list(y)])
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # [s, V]
            out.append([logp[len(x) - 1 + t, tok].item() for t, tok in enumerate(y)])
    return out


def random_pairs(n: int, vocab: int, seed: int = 0, max_len: int = 12) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def seq():
        k = int(torch.randint(1, max_len + 1, (1,), generator=g))
        return torch.randint(0, vocab, (k,), generator=g).tolist()

    return [(seq(), seq()) for _ in range(n)]
