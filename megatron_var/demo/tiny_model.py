"""A tiny random Llama / Qwen2 HF checkpoint with a locally trained tokenizer: the demo's starting "base model".

Nothing can be downloaded here, so the base model is built from transformers' config classes with random weights
(float32) and saved like any HF checkpoint; the rest of the demo (HF -> Megatron conversion, training, export,
generation) then treats it exactly as it would treat a real Llama-3 or Qwen2.5 directory.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_var.data.tiny_tokenizer import build_tiny_tokenizer

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "qwen2")


@dataclass
class TinyModelConfig:
    """Shape of the tiny model. GQA (heads 4, KV heads 2) so that TP=2 splits both query and KV heads."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_hidden_size: int = 192
    tokenizer_vocab_size: int = 384  # BPE upper bound; the model's vocab is len(tokenizer)
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                             f"and num_heads by num_kv_heads {self.num_kv_heads}")


def hf_config(family: str, cfg: TinyModelConfig, tokenizer):
    """A transformers config for ``family`` with the tokenizer's vocabulary and special-token ids."""
    from transformers import LlamaConfig, Qwen2Config

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llama":
        return LlamaConfig(head_dim=cfg.hidden_size // cfg.num_heads, attention_bias=False, mlp_bias=False, **common)
    return Qwen2Config(use_sliding_window=False, **common)


def build_tiny_hf_model(
    out_dir: str | Path | None,
    family: str = "llama",
    texts: list[str] | None = None,
    seed: int = 0,
    cfg: TinyModelConfig | None = None,
):
    """Train a tokenizer on ``texts``, build a random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (float32) and,
    with ``out_dir``, save model + tokenizer + generation_config there. Returns (model, tokenizer); with
    ``out_dir`` the tokenizer is the one ``AutoTokenizer`` loads back from it.

    ``texts`` defaults to the demo task's corpus. Same texts and seed give identical weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    cfg = cfg or TinyModelConfig()
    if texts is None:
        from megatron_var.demo.task import corpus_texts

        texts = corpus_texts()
    if not texts:
        raise ValueError("build_tiny_hf_model: texts is empty; the tokenizer needs text to train on")
    tokenizer = build_tiny_tokenizer(list(texts), vocab_size=cfg.tokenizer_vocab_size)
    config = hf_config(family, cfg, tokenizer)
    config.dtype = "float32"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=0.8, top_p=0.9, top_k=50, max_new_tokens=32,  # the paper's sampling
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        # What every later stage gets: for qwen2, AutoTokenizer substitutes Qwen2Tokenizer (same vocabulary and
        # special tokens, Qwen's pre-tokenizer: single digits), so return that one, not the object trained here.
        tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        logger.info("tiny %s (%s, %.2fM params) saved to %s", family, asdict(cfg),
                    sum(p.numel() for p in model.parameters()) / 1e6, out)
    return model, tokenizer
