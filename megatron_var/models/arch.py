"""The model architecture we support (Llama 2/3.x, Qwen2/2.5), read from and written back to an HF config.

Why a dataclass of our own: the Megatron checkpoint stores it (``model_arch.json``) so training and export need no
model-shape flags, and every HF field we cannot express in megatron-core is refused here, once, with a clear message
(a silent fallback, e.g. a Llama-3 rope factor left at its default, gives a model that loads but computes other
log-probs than the HF one).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_var.common.atomic import atomic_write_text

SUPPORTED_FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# megatron-core's RotaryEmbedding hard-codes these Llama-3 scaling constants; only the factor is a parameter.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
VOCAB_PAD_MULTIPLE = 128  # divisible by every power-of-two TP up to 128, so one checkpoint loads at any such TP


@dataclass
class ModelArch:
    """Shape and numerics of a Llama/Qwen2-family decoder."""

    family: str
    """'llama' or 'qwen2' (the HF ``model_type``)."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """KV heads (GQA); equal to num_attention_heads for MHA."""
    kv_channels: int
    """Head dimension."""
    vocab_size: int
    """True vocabulary size (the HF embedding rows); padded rows never take probability mass."""
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling_factor: Optional[float] = None
    """Llama-3 RoPE scaling factor (3.1: 8, 3.2: 32); None = no scaling."""
    rms_norm_eps: float = 1e-5
    add_qkv_bias: bool = False
    """Qwen2 has biases on q/k/v projections."""
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    """dtype of the original HF weights, kept on export."""
    padded_vocab_size: int = 0
    """Rows of the Megatron embedding/output layer: vocab_size rounded up to VOCAB_PAD_MULTIPLE."""
    hf_extra: dict = field(default_factory=dict)
    """HF config fields we do not model (token ids, …), carried through to the exported config.json."""

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {sorted(SUPPORTED_FAMILIES)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} not divisible by KV heads {self.num_query_groups}"
            )
        if not self.padded_vocab_size:
            self.padded_vocab_size = math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    # ---- persistence -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArch":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model_arch fields {sorted(unknown)}")
        return cls(**d)

    def save(self, path: Path) -> None:
        """Write ``model_arch.json`` atomically (a reader never sees half of it)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelArch":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read model architecture {path}: {e}") from e

    # ---- parallel layout checks ---------------------------------------------------------------------------
    def check_layout(self, tp: int, pp: int, vpp: Optional[int] = None) -> None:
        """Raise ValueError when TP/PP/VPP cannot split this model."""
        if self.num_attention_heads % tp:
            raise ValueError(f"--tensor-model-parallel-size {tp} does not divide {self.num_attention_heads} heads")
        if self.num_query_groups % tp:
            raise ValueError(f"--tensor-model-parallel-size {tp} does not divide {self.num_query_groups} KV heads")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"--tensor-model-parallel-size {tp} does not divide FFN size {self.ffn_hidden_size}")
        if self.padded_vocab_size % tp:
            raise ValueError(f"--tensor-model-parallel-size {tp} does not divide padded vocab {self.padded_vocab_size}")
        chunks = pp * (vpp or 1)
        if self.num_layers % chunks:
            raise ValueError(
                f"{self.num_layers} layers are not divisible by --pipeline-model-parallel-size {pp}"
                + (f" x --virtual-pipeline-model-parallel-size {vpp}" if vpp else "")
            )


def _rope(hf: dict) -> tuple[float, Optional[float]]:
    """(theta, llama3 factor) from either the transformers-5 ``rope_parameters`` or the classic fields."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    if scaling:
        params = {**params, **scaling}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"rope scaling type {rope_type!r} is not supported (only 'llama3' and none)")
    for key, expected in _LLAMA3_FIXED.items():
        if key in params and float(params[key]) != expected:
            raise ValueError(
                f"llama3 rope_scaling {key}={params[key]} cannot be expressed in megatron-core (fixed at {expected})"
            )
    if "factor" not in params:
        raise ValueError("llama3 rope_scaling without 'factor'")
    return theta, float(params["factor"])


_CARRIED = ("bos_token_id", "eos_token_id", "pad_token_id", "architectures", "hidden_act", "initializer_range",
            "max_window_layers", "use_sliding_window", "sliding_window", "attention_dropout", "pretraining_tp")


def arch_from_hf_config(hf: dict) -> ModelArch:
    """Build a ModelArch from an HF ``config.json`` dict, refusing what megatron-core cannot reproduce."""
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model_type {family!r} is not supported; supported: {sorted(SUPPORTED_FAMILIES)} (Llama 2/3.x, Qwen2/2.5)"
        )
    if hf.get("num_local_experts") or hf.get("num_experts"):
        raise ValueError("mixture-of-experts configs are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError("Llama configs with attention_bias/mlp_bias are not supported")
    if family == "qwen2" and hf.get("use_sliding_window"):
        types = hf.get("layer_types") or []
        if not types or "sliding_attention" in types:
            raise ValueError("Qwen2 sliding-window attention in use (use_sliding_window=true) is not supported")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    theta, factor = _rope(hf)
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return ModelArch(
        family=family,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=int(hf.get("head_dim") or hidden // heads),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        rope_scaling_factor=factor,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        add_qkv_bias=family == "qwen2",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        torch_dtype=str(dtype).replace("torch.", ""),
        hf_extra={k: hf[k] for k in _CARRIED if k in hf},
    )


def hf_config_from_arch(arch: ModelArch) -> dict[str, Any]:
    """The ``config.json`` dict for an HF ``*ForCausalLM`` with this architecture."""
    cfg: dict[str, Any] = {
        "architectures": [SUPPORTED_FAMILIES[arch.family]],
        "model_type": arch.family,
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.kv_channels,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "torch_dtype": arch.torch_dtype,
    }
    if arch.rope_scaling_factor is not None:
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": arch.rope_scaling_factor, **_LLAMA3_FIXED}
    if arch.family == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    for k, v in arch.hf_extra.items():
        cfg.setdefault(k, v)
    return cfg
