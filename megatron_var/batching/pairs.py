"""Rows of (prompt, response) pairs as model inputs (pure torch): the B x B cross pairs log pi(y_j | x_i) of a
group for the reference, or its B diagonal pairs [x_i; y_i] for the policy and DPO.

Legend: P prompts x_i, R responses y_j (P == R == B for a VAR group), N rows, S padded sequence length.
Token log-prob convention shared with the trainer: token_logps[n, s] = log p(labels[n, s] | tokens[n, :s+1]),
i.e. labels are the next tokens; loss_mask / segment_index select the positions whose label is a response token.

Builders:
  build_naive          N = P*R rows [x_i; y_j], plain causal (attention_mask None), right padding.
  build_shared_prefix  N = P rows [x_i[:-1]; seg_1; ...; seg_R], seg_j = [x_i[-1]] + y_j. Each segment starts with
                       a copy of the prompt's last token, so every response label (including y_j[0]) is the next
                       token within its own segment. Positions of every segment restart at len(x_i) - 1, and the
                       block mask lets segment j see the prefix and itself only: the row gives the same numbers as
                       the R rows [x_i; y_j] at ~1/R of the prompt compute.
  build_diagonal       N = B rows [x_i; y_i] (policy batch / DPO), plain causal; reduce -> [B].

attn_segments [N, S] encodes the mask compactly (for FlexAttention block masks and for block_attention_mask; the
dense ``attention_mask`` of a batch is derived from it on access):
  -1 padding (attends to itself only), 0 shared (the prefix, visible to every later token of its sequence),
  j + 1 response segment j (sees shared tokens and earlier tokens of segment j).
A packed row (``pack_rows``) holds several independent sequences end to end: their values are
doc * DOC_STRIDE + the value above, and a token sees only tokens of its own doc. Unpacked rows are doc 0, so one
rule covers both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Literal, Sequence

import torch

__all__ = [
    "PairBatch",
    "block_attention_mask",
    "build_naive",
    "build_shared_prefix",
    "build_diagonal",
    "build_cross_pairs",
    "pack_rows",
    "flat_cells",
    "concat_rows",
    "split_cells",
    "sequence_lengths",
    "DOC_STRIDE",
]

TokenIds = Sequence[int] | torch.Tensor


def _row_fill(pad_id: int) -> dict[str, int]:
    """The per-position fields of a PairBatch ([N, S] each) and the value a padding position holds."""
    return {"tokens": pad_id, "labels": pad_id, "loss_mask": 0, "position_ids": 0, "segment_index": -1,
            "attn_segments": -1}


@dataclass
class PairBatch:
    """Model inputs for pairs of one or more groups plus the map from label positions back to their cells
    ((i, j) of the cross-pair matrix, or i on the diagonal)."""

    tokens: torch.Tensor  # [N, S] long
    labels: torch.Tensor  # [N, S] long, next token (pad_id where undefined)
    loss_mask: torch.Tensor  # [N, S] float, 1 where the label is a response token
    position_ids: torch.Tensor  # [N, S] long
    segment_index: torch.Tensor  # [N, S] long, flat cell (i * R + j, or i for diagonal) of each label, else -1
    attn_segments: torch.Tensor  # [N, S] long, see module docstring
    response_lengths: torch.Tensor  # matrix_shape, long: number of label positions per cell
    matrix_shape: tuple[int, ...]  # (P, R) or (B,) for diagonal
    block_masked: bool = False  # True: attention follows attn_segments (shared prefix); False: plain causal

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """[N, 1, S, S] bool, True = masked (megatron); None = plain causal. Built on each access: the dense mask
        of one B=8 group at prompt 512 / response 256 is 53 MB and took 0.5 s on a CPU core, so the reference
        passes ``attn_segments`` on (``models.segment_mask.SegmentMask``) and builds it on the device instead."""
        return block_attention_mask(self.attn_segments) if self.block_masked else None

    def reduce(self, token_logps: torch.Tensor, reduction: Literal["sum", "mean"] = "sum") -> torch.Tensor:
        """Sum (or per-token mean) of token log-probs [N, S] per cell -> matrix_shape, float32+, differentiable."""
        if token_logps.shape != self.segment_index.shape:
            raise ValueError(
                f"token_logps {tuple(token_logps.shape)} must match the batch {tuple(self.segment_index.shape)}"
            )
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        dtype = torch.promote_types(token_logps.dtype, torch.float32)
        idx = self.segment_index.reshape(-1).to(token_logps.device)
        valid = idx >= 0
        vals = torch.where(valid, token_logps.reshape(-1).to(dtype), 0.0)  # ignores -inf/NaN off the responses
        n_cells = math.prod(self.matrix_shape)
        out = torch.zeros(n_cells, dtype=dtype, device=token_logps.device).index_add(0, idx.clamp(min=0), vals)
        if reduction == "mean":
            out = out / self.response_lengths.reshape(-1).to(device=out.device, dtype=dtype)
        return out.view(self.matrix_shape)

    def to(self, device: torch.device | str) -> "PairBatch":
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in fields(self)
        }
        return PairBatch(**moved)

    def take_rows(self, rows: torch.Tensor, seq_length: int | None = None) -> "PairBatch":
        """The rows ``rows`` (indices), cut to ``seq_length`` columns (only padding may be cut), with the whole cell
        space: their ``reduce`` is a partial sum over all cells."""
        cut = {n: getattr(self, n)[rows, :seq_length] for n in _row_fill(0)}
        if int((cut["attn_segments"] >= 0).sum()) != int((self.attn_segments[rows] >= 0).sum()):
            raise ValueError(f"take_rows: seq_length {seq_length} cuts tokens")
        return dataclasses.replace(self, **cut)

    def with_rows(self, num_rows: int, pad_id: int) -> "PairBatch":
        """This batch with empty (all-padding) rows added up to ``num_rows`` (fixed pipeline shapes)."""
        extra = num_rows - self.tokens.size(0)
        if extra <= 0:
            return self
        s = self.tokens.size(1)
        grown = {n: torch.cat([getattr(self, n), torch.full((extra, s), v, dtype=getattr(self, n).dtype)])
                 for n, v in _row_fill(pad_id).items()}
        return dataclasses.replace(self, **grown)


DOC_STRIDE = 1 << 20
"""attn_segments of a packed row: doc * DOC_STRIDE + segment; a sequence never has this many response segments."""


def visible(seg_q: torch.Tensor, seg_k: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """The attention rule (True = q attends to k), elementwise on broadcastable tensors: k <= q, both non-pad, the
    same doc, and k shared or in q's segment; a pad q sees itself only (no fully masked row, no NaN softmax)."""
    same_doc = torch.div(seg_k, DOC_STRIDE, rounding_mode="floor") == torch.div(seg_q, DOC_STRIDE,
                                                                               rounding_mode="floor")
    sub_k, sub_q = seg_k % DOC_STRIDE, seg_q % DOC_STRIDE
    allowed = (kv_idx <= q_idx) & (seg_q >= 0) & (seg_k >= 0) & same_doc & ((sub_k == 0) | (sub_k == sub_q))
    return allowed | ((seg_q < 0) & (q_idx == kv_idx))


def sequence_lengths(attn_segments: torch.Tensor) -> torch.Tensor:
    """Token count of every sequence of the rows [N, S]: each doc of a packed row, or the whole non-pad part of an
    unpacked row (doc 0)."""
    docs = torch.div(attn_segments, DOC_STRIDE, rounding_mode="floor")
    row = torch.arange(attn_segments.size(0), device=attn_segments.device).unsqueeze(1)
    key = (row * (int(docs.max()) + 1) + docs)[attn_segments >= 0]
    return torch.unique(key, return_counts=True)[1]


def block_attention_mask(attn_segments: torch.Tensor) -> torch.Tensor:
    """Dense mask [N, 1, S, S] bool, True = masked, from attn_segments [N, S] (rule: ``visible``)."""
    n, s = attn_segments.shape
    pos = torch.arange(s, device=attn_segments.device)
    allowed = visible(attn_segments[:, :, None], attn_segments[:, None, :], pos[:, None], pos[None, :])
    return (~allowed).unsqueeze(1)


def _ids(seq: TokenIds, what: str, idx: int) -> list[int]:
    ids = seq.tolist() if isinstance(seq, torch.Tensor) else [int(t) for t in seq]
    if not ids:
        raise ValueError(f"{what} {idx} is empty; every prompt and response needs at least one token")
    return ids


def _padded_length(longest: int, pad_to_multiple_of: int, seq_length: int | None) -> int:
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if seq_length is None:
        return -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if seq_length % pad_to_multiple_of:
        raise ValueError(f"seq_length {seq_length} is not a multiple of pad_to_multiple_of {pad_to_multiple_of}")
    if longest > seq_length:
        raise ValueError(f"a cross-pair row needs {longest} tokens but seq_length is {seq_length}")
    return seq_length


class _Rows:
    """Accumulates rows as python lists (one per field) and pads them into a PairBatch."""

    def __init__(self) -> None:
        self.cols: dict[str, list[list[int]]] = {k: [] for k in ("tok", "lab", "msk", "pos", "cell", "seg")}
        self.row: dict[str, list[int]] = {}

    def start_row(self) -> None:
        self.row = {k: [] for k in self.cols}

    def extend(self, tok: list[int], pos0: int, cell: int, seg: int, labels: list[int], scored: int) -> None:
        """Append tokens at positions pos0.. whose first `scored` labels are response tokens of `cell`."""
        n = len(tok)
        self.row["tok"] += tok
        self.row["lab"] += labels
        self.row["pos"] += list(range(pos0, pos0 + n))
        self.row["msk"] += [1] * scored + [0] * (n - scored)
        self.row["cell"] += [cell] * scored + [-1] * (n - scored)
        self.row["seg"] += [seg] * n

    def end_row(self) -> None:
        for k, v in self.row.items():
            self.cols[k].append(v)

    def build(
        self, pad_id: int, pad_to_multiple_of: int, seq_length: int | None, shape: tuple[int, ...], masked: bool
    ) -> PairBatch:
        s = _padded_length(max(len(r) for r in self.cols["tok"]), pad_to_multiple_of, seq_length)
        fill = {"tok": pad_id, "lab": pad_id, "msk": 0, "pos": 0, "cell": -1, "seg": -1}
        t = {
            k: torch.tensor([r + [fill[k]] * (s - len(r)) for r in rows], dtype=torch.long)
            for k, rows in self.cols.items()
        }
        n_cells = math.prod(shape)
        cells = t["cell"][t["cell"] >= 0]
        lengths = torch.bincount(cells, minlength=n_cells).view(shape)
        return PairBatch(
            tokens=t["tok"],
            labels=t["lab"],
            loss_mask=t["msk"].to(torch.float32),
            position_ids=t["pos"],
            segment_index=t["cell"],
            attn_segments=t["seg"],
            response_lengths=lengths,
            matrix_shape=shape,
            block_masked=masked,
        )


def _plain_row(rows: _Rows, x: list[int], y: list[int], cell: int, pad_id: int) -> None:
    """Row [x; y]: labels = next token; the labels of positions len(x)-1 .. len(x)+len(y)-2 are y."""
    rows.start_row()
    rows.extend(x[:-1], 0, -1, 0, x[1:], 0)
    rows.extend([x[-1]] + y, len(x) - 1, cell, 0, y + [pad_id], len(y))
    rows.end_row()


def _inputs(prompts: Sequence[TokenIds], responses: Sequence[TokenIds]) -> tuple[list[list[int]], list[list[int]]]:
    if not prompts or not responses:
        raise ValueError("a cross-pair group needs at least one prompt and one response")
    return (
        [_ids(p, "prompt", i) for i, p in enumerate(prompts)],
        [_ids(r, "response", j) for j, r in enumerate(responses)],
    )


def build_naive(
    prompts: Sequence[TokenIds],
    responses: Sequence[TokenIds],
    pad_id: int,
    pad_to_multiple_of: int = 1,
    seq_length: int | None = None,
) -> PairBatch:
    """P*R rows [x_i; y_j] (row i*R + j), causal, right-padded; reduce -> [P, R]."""
    xs, ys = _inputs(prompts, responses)
    rows = _Rows()
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            _plain_row(rows, x, y, i * len(ys) + j, pad_id)
    return rows.build(pad_id, pad_to_multiple_of, seq_length, (len(xs), len(ys)), masked=False)


def build_shared_prefix(
    prompts: Sequence[TokenIds],
    responses: Sequence[TokenIds],
    pad_id: int,
    pad_to_multiple_of: int = 1,
    seq_length: int | None = None,
) -> PairBatch:
    """P rows [x_i[:-1]; [x_i[-1]] + y_1; ...; [x_i[-1]] + y_R] with the block mask; reduce -> [P, R]."""
    xs, ys = _inputs(prompts, responses)
    rows = _Rows()
    for i, x in enumerate(xs):
        rows.start_row()
        rows.extend(x[:-1], 0, -1, 0, x[1:], 0)
        for j, y in enumerate(ys):
            rows.extend([x[-1]] + y, len(x) - 1, i * len(ys) + j, j + 1, y + [pad_id], len(y))
        rows.end_row()
    return rows.build(pad_id, pad_to_multiple_of, seq_length, (len(xs), len(ys)), masked=True)


def build_diagonal(
    prompts: Sequence[TokenIds],
    responses: Sequence[TokenIds],
    pad_id: int,
    pad_to_multiple_of: int = 1,
    seq_length: int | None = None,
) -> PairBatch:
    """B rows [x_i; y_i], causal, right-padded; reduce -> [B]."""
    xs, ys = _inputs(prompts, responses)
    if len(xs) != len(ys):
        raise ValueError(f"build_diagonal needs as many prompts as responses, got {len(xs)} and {len(ys)}")
    rows = _Rows()
    for i, (x, y) in enumerate(zip(xs, ys)):
        _plain_row(rows, x, y, i, pad_id)
    return rows.build(pad_id, pad_to_multiple_of, seq_length, (len(xs),), masked=False)


def build_cross_pairs(
    prompts: Sequence[TokenIds],
    responses: Sequence[TokenIds],
    pad_id: int,
    method: Literal["shared_prefix", "naive"] = "shared_prefix",
    pad_to_multiple_of: int = 1,
    seq_length: int | None = None,
) -> PairBatch:
    """Dispatch on method (--cross-pair-method): both give the same [P, R] matrix."""
    builders = {"shared_prefix": build_shared_prefix, "naive": build_naive}
    if method not in builders:
        raise ValueError(f"cross-pair method must be one of {sorted(builders)}, got {method!r}")
    return builders[method](prompts, responses, pad_id, pad_to_multiple_of, seq_length)


def pack_rows(batch: PairBatch, capacity: int, pad_id: int, pad_to_multiple_of: int = 1,
              num_rows: int | None = None, seq_length: int | None = None) -> PairBatch:
    """The rows of ``batch`` (each an independent sequence: a pair [x_i; y_i] or a shared-prefix row) laid end to
    end into rows of at most ``capacity`` tokens (raised to the longest sequence if below it), longest first, each
    into the first row it fits. Tokens keep their labels, positions (restarting per sequence)
    and cells, so ``reduce`` returns the same matrix; each sequence becomes one doc of its row and attends only to
    itself. Why: rows padded to the longest sequence compute padding; packed rows compute (almost) only tokens.

    ``num_rows`` / ``seq_length``: add empty rows up to this many / pad rows to this length (pipeline parallelism
    sends fixed shapes).
    """
    seg = batch.attn_segments
    if int(seg.max()) >= DOC_STRIDE:
        raise ValueError("pack_rows: the batch is packed already")
    lengths = (seg >= 0).sum(dim=1).tolist()
    for r, n in enumerate(lengths):
        if n and int((seg[r, :n] < 0).sum()):
            raise ValueError(f"pack_rows: row {r} is not right-padded")
    capacity = max(capacity, max(lengths))
    bins: list[list[int]] = []
    free: list[int] = []
    for r in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        k = next((k for k, f in enumerate(free) if f >= lengths[r]), None)
        if k is None:
            bins.append([])
            free.append(capacity)
            k = len(bins) - 1
        bins[k].append(r)
        free[k] -= lengths[r]
    if num_rows is not None:
        if num_rows < len(bins):
            raise ValueError(f"pack_rows: {len(bins)} rows needed, num_rows is {num_rows}")
        bins += [[] for _ in range(num_rows - len(bins))]
    s = _padded_length(max(capacity - f for f in free), pad_to_multiple_of, seq_length)
    fill = _row_fill(pad_id)
    out = {n: torch.full((len(bins), s), v, dtype=getattr(batch, n).dtype) for n, v in fill.items()}
    for row, members in enumerate(bins):
        at = 0
        for doc, r in enumerate(members):
            n = lengths[r]
            for name in fill:
                out[name][row, at:at + n] = getattr(batch, name)[r, :n]
            out["attn_segments"][row, at:at + n] += doc * DOC_STRIDE
            at += n
    return PairBatch(**out, response_lengths=batch.response_lengths, matrix_shape=batch.matrix_shape,
                     block_masked=True)


def flat_cells(batches: Sequence[PairBatch]) -> list[PairBatch]:
    """Several groups' batches in one flat cell space: group k's cells follow those of groups 0..k-1, and every
    batch carries the response lengths of all cells. Why: the reference packs the sequences of several groups into
    shared rows; each micro-batch's ``reduce`` is then a partial sum over all the groups' cells (a mean too: each
    part is divided by the whole cell's length), and ``split_cells`` cuts the summed vector back into matrices."""
    sizes = [math.prod(b.matrix_shape) for b in batches]
    lengths = torch.cat([b.response_lengths.reshape(-1) for b in batches])
    out, offset = [], 0
    for b, n in zip(batches, sizes):
        index = torch.where(b.segment_index >= 0, b.segment_index + offset, -1)
        out.append(dataclasses.replace(b, segment_index=index, response_lengths=lengths, matrix_shape=(sum(sizes),)))
        offset += n
    return out


def concat_rows(batches: Sequence[PairBatch], pad_id: int) -> PairBatch:
    """The rows of batches that share one cell space (``flat_cells``) as one batch, right-padded to the longest."""
    s = max(b.tokens.size(1) for b in batches)
    cat = {name: torch.cat([torch.nn.functional.pad(getattr(b, name), (0, s - b.tokens.size(1)), value=v)
                            for b in batches]) for name, v in _row_fill(pad_id).items()}
    return dataclasses.replace(batches[0], **cat, block_masked=any(b.block_masked for b in batches))


def split_cells(flat: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """The flat cell vector of ``flat_cells`` cut back into one tensor of ``shapes[k]`` per group."""
    parts = torch.split(flat, [math.prod(s) for s in shapes])
    return [part.view(shape) for part, shape in zip(parts, shapes)]
