"""The shared mapping core: every HF <-> Megatron tensor relation the Llama/Qwen2 families need, once.

A family file (llama.py, qwen2.py) is a table of the rules below; the drivers (import_hf.py, export_hf.py) only
walk the table. Every rule is a permutation/concatenation of rows, so a round trip is bitwise.

Legend: H hidden, F FFN, G query groups (KV heads), k = heads / G, d head dim, V vocab, Vp padded vocab,
L layers, r = trailing dims of a tensor (``[H]`` for weights, ``[]`` for biases).

Megatron side (what ``GPTModel.sharded_state_dict()`` saves at TP=1, keys are global and layer-stacked):
  linear_qkv  [G*(k+2)*d, *r] interleaved per group: [q_1..q_k, k, v] for group 1, then group 2, ...
  linear_fc1  [2F, H] = [gate; up]
  embedding / output_layer [Vp, H]: rows >= V are padding (zeros on import, stripped on export)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from megatron_var.models.arch import ModelArch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_HF_NAME_TO_DTYPE = {v: k for k, v in HF_DTYPE_NAMES.items()}


def dtype_from_hf_name(name: str) -> torch.dtype:
    """``'bfloat16'`` (HF config) -> torch.bfloat16; ValueError for dtypes we do not convert."""
    name = str(name).replace("torch.", "")
    if name not in _HF_NAME_TO_DTYPE:
        raise ValueError(f"dtype {name!r} is not supported (one of {sorted(_HF_NAME_TO_DTYPE)})")
    return _HF_NAME_TO_DTYPE[name]


def dims(arch: ModelArch) -> dict[str, int]:
    """Named row counts used in the tables."""
    return {
        "hidden": arch.hidden_size,
        "ffn": arch.ffn_hidden_size,
        "q": arch.num_attention_heads * arch.kv_channels,
        "kv": arch.num_query_groups * arch.kv_channels,
        "qkv": (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.kv_channels,
        "vocab": arch.vocab_size,
        "padded_vocab": arch.padded_vocab_size,
        "heads": arch.num_attention_heads,
        "groups": arch.num_query_groups,
        "head_dim": arch.kv_channels,
    }


# ---- the row permutations ----------------------------------------------------------------------------------
def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q [k*G*d, *r], k [G*d, *r], v [G*d, *r] -> Megatron [G*(k+2)*d, *r] interleaved per group."""
    rest = q.shape[1:]
    qg = q.reshape(groups, -1, *rest)  # [G, k*d, *r]
    kg = k.reshape(groups, -1, *rest)  # [G, d, *r]
    vg = v.reshape(groups, -1, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def qkv_from_megatron(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``qkv_to_megatron``: [G*(k+2)*d, *r] -> contiguous q, k, v."""
    rest = qkv.shape[1:]
    per_group = heads // groups
    d = qkv.shape[0] // (groups * (per_group + 2))
    g = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(g, [per_group * d, d, d], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


# ---- rules -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Rows [row0, row0 + rows) of a Megatron tensor, made from HF tensors ``hf`` by ``make`` (import side)."""

    row0: int
    rows: int
    hf: tuple[str, ...]
    make: Callable[[list[torch.Tensor]], torch.Tensor]


ReadRows = Callable[[int, int], torch.Tensor]  # (row0, rows) -> Megatron rows [rows, *r]


def _shape(spec: tuple, dm: dict[str, int]) -> tuple[int, ...]:
    return tuple(dm[s] if isinstance(s, str) else int(s) for s in spec)


def _only(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


@dataclass(frozen=True)
class Copy:
    """One HF tensor is one Megatron tensor (norms, o_proj, down_proj)."""

    hf_name: str
    meg: str
    shape: tuple  # dim names (see ``dims``) or ints

    def hf_shapes(self, dm) -> dict[str, tuple[int, ...]]:
        return {self.hf_name: _shape(self.shape, dm)}

    def meg_shape(self, dm) -> tuple[int, ...]:
        return _shape(self.shape, dm)

    def pieces(self, dm) -> list[Piece]:
        return [Piece(0, self.meg_shape(dm)[0], (self.hf_name,), _only)]

    def to_hf(self, dm, read: ReadRows) -> Iterator[tuple[str, torch.Tensor]]:
        yield self.hf_name, read(0, self.meg_shape(dm)[0])


@dataclass(frozen=True)
class QKV:
    """HF q/k/v projections (weights, or Qwen2's biases) <-> Megatron's per-group interleaved linear_qkv."""

    q: str
    k: str
    v: str
    meg: str
    bias: bool = False

    def _rest(self, dm) -> tuple[int, ...]:
        return () if self.bias else (dm["hidden"],)

    def hf_shapes(self, dm) -> dict[str, tuple[int, ...]]:
        r = self._rest(dm)
        return {self.q: (dm["q"], *r), self.k: (dm["kv"], *r), self.v: (dm["kv"], *r)}

    def meg_shape(self, dm) -> tuple[int, ...]:
        return (dm["qkv"], *self._rest(dm))

    def pieces(self, dm) -> list[Piece]:
        groups = dm["groups"]
        return [Piece(0, dm["qkv"], (self.q, self.k, self.v), lambda t: qkv_to_megatron(*t, groups=groups))]

    def to_hf(self, dm, read: ReadRows) -> Iterator[tuple[str, torch.Tensor]]:
        q, k, v = qkv_from_megatron(read(0, dm["qkv"]), dm["heads"], dm["groups"])
        yield self.q, q
        yield self.k, k
        yield self.v, v


@dataclass(frozen=True)
class GateUp:
    """SwiGLU gate_proj and up_proj <-> Megatron's fused linear_fc1 [gate; up] (two row blocks, no copy)."""

    gate: str
    up: str
    meg: str

    def hf_shapes(self, dm) -> dict[str, tuple[int, ...]]:
        return {self.gate: (dm["ffn"], dm["hidden"]), self.up: (dm["ffn"], dm["hidden"])}

    def meg_shape(self, dm) -> tuple[int, ...]:
        return (2 * dm["ffn"], dm["hidden"])

    def pieces(self, dm) -> list[Piece]:
        f = dm["ffn"]
        return [Piece(0, f, (self.gate,), _only), Piece(f, f, (self.up,), _only)]

    def to_hf(self, dm, read: ReadRows) -> Iterator[tuple[str, torch.Tensor]]:
        f = dm["ffn"]
        yield self.gate, read(0, f)
        yield self.up, read(f, f)


@dataclass(frozen=True)
class Vocab:
    """Embedding / LM head [V, H] <-> Megatron [Vp, H]: zero padding rows appended on import, dropped on export.

    ``untied_only``: the LM head exists on the Megatron side only when embeddings are not tied.
    """

    hf_name: str
    meg: str
    untied_only: bool = False

    def hf_shapes(self, dm) -> dict[str, tuple[int, ...]]:
        return {self.hf_name: (dm["vocab"], dm["hidden"])}

    def meg_shape(self, dm) -> tuple[int, ...]:
        return (dm["padded_vocab"], dm["hidden"])

    def pieces(self, dm) -> list[Piece]:
        v, vp, h = dm["vocab"], dm["padded_vocab"], dm["hidden"]
        out = [Piece(0, v, (self.hf_name,), _only)]
        if vp > v:
            out.append(Piece(v, vp - v, (), lambda _t: torch.zeros(vp - v, h)))  # dtype set by the driver
        return out

    def to_hf(self, dm, read: ReadRows) -> Iterator[tuple[str, torch.Tensor]]:
        yield self.hf_name, read(0, dm["vocab"])


Rule = Copy | QKV | GateUp | Vocab


@dataclass(frozen=True)
class FamilyMap:
    """A family's declarative table: rules before the layers, per layer, after the layers (HF file order)."""

    pre: tuple[Rule, ...]
    layer: tuple[Rule, ...]
    post: tuple[Rule, ...]
    extra_state_modules: tuple[str, ...]
    """Layer modules whose (None for the local spec) ``_extra_state`` megatron saves as a ShardedObject."""
    hf_layer_prefix: str = "model.layers.{}."
    meg_layer_prefix: str = "decoder.layers."
    hf_ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    """HF entries that are buffers, not weights (old checkpoints carry them); skipped on import."""

    def active(self, rules: tuple[Rule, ...], arch: ModelArch) -> tuple[Rule, ...]:
        """``rules`` without the LM head when embeddings are tied."""
        return tuple(r for r in rules if not (arch.tie_word_embeddings and getattr(r, "untied_only", False)))

    def hf_layer_name(self, layer: int, name: str) -> str:
        return self.hf_layer_prefix.format(layer) + name

    def meg_key(self, rule: Rule, layered: bool) -> str:
        return self.meg_layer_prefix + rule.meg if layered else rule.meg

    def hf_tensor_shapes(self, arch: ModelArch) -> dict[str, tuple[int, ...]]:
        """Every HF tensor the architecture has, in HF file order, with its shape."""
        dm = dims(arch)
        out: dict[str, tuple[int, ...]] = {}
        for rule in self.active(self.pre, arch):
            out.update(rule.hf_shapes(dm))
        for layer in range(arch.num_layers):
            for rule in self.layer:
                out.update({self.hf_layer_name(layer, n): s for n, s in rule.hf_shapes(dm).items()})
        for rule in self.active(self.post, arch):
            out.update(rule.hf_shapes(dm))
        return out

    def hf_tied_duplicates(self, arch: ModelArch) -> tuple[str, ...]:
        """HF names that may be present but are ignored (the LM head of a tied model)."""
        if not arch.tie_word_embeddings:
            return ()
        return tuple(r.hf_name for r in self.pre + self.post if getattr(r, "untied_only", False))


def family_dtype(arch: ModelArch, override: Optional[str]) -> torch.dtype:
    """The dtype to write: ``--dtype`` when given, else the original HF dtype (so round trips are bitwise)."""
    if override is not None:
        if override not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {override!r}")
        return DTYPES[override]
    return dtype_from_hf_name(arch.torch_dtype)
