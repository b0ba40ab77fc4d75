"""HF safetensors -> megatron_var checkpoint directory (see megatron_var/checkpoint/layout.py), streaming.

Order of work: read config.json and every shard header, check names and shapes against the architecture
(before a byte is written), then stream chunk by chunk into a staged directory that is renamed at the end.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_var.convert import family_map
from megatron_var.convert.core import HF_DTYPE_NAMES, FamilyMap, Piece, dims, family_dtype
from megatron_var.convert.dcp_io import TensorChunk, sharded_object_key, write_checkpoint
from megatron_var.convert.hf_io import HFCheckpoint
from megatron_var.convert.staging import staged_output
from megatron_var.checkpoint import layout as layout
from megatron_var.models.arch import SUPPORTED_FAMILIES, ModelArch, arch_from_hf_config

logger = logging.getLogger(__name__)


def read_hf_config(hf_dir) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found (--hf-dir must be an HF model directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    family = config.get("model_type")
    archs = config.get("architectures") or []
    if family in SUPPORTED_FAMILIES and archs and SUPPORTED_FAMILIES[family] not in archs:
        raise ValueError(f"{path}: architectures {archs} is not a causal LM; only {SUPPORTED_FAMILIES[family]} "
                         "checkpoints are converted")
    return config


def check_tensors(fmap: FamilyMap, arch: ModelArch, ckpt: HFCheckpoint) -> None:
    """Every tensor the config implies is present with its shape, and nothing unexplained is left over."""
    expected = fmap.hf_tensor_shapes(arch)
    where = f"config.json: {arch.num_layers} layers, hidden {arch.hidden_size}, tie_word_embeddings=" \
            f"{arch.tie_word_embeddings}"
    for name, shape in expected.items():
        info = ckpt.tensors.get(name)
        if info is None:
            raise ValueError(f"tensor {name} is missing from {ckpt.dir} ({where})")
        if info.shape != shape:
            raise ValueError(f"tensor {name} has shape {list(info.shape)} in {ckpt.dir / info.file}, but "
                             f"config.json implies {list(shape)}: config and weights do not match")
    ignored = set(fmap.hf_tied_duplicates(arch))
    extra = sorted(n for n in ckpt.tensors
                   if n not in expected and n not in ignored and not n.endswith(fmap.hf_ignored_suffixes))
    if extra:
        raise ValueError(f"tensor {extra[0]} in {ckpt.dir / ckpt.tensors[extra[0]].file} is not part of a "
                         f"{arch.family} model with this config ({where})"
                         + (f"; {len(extra) - 1} more" if len(extra) > 1 else ""))
    for name in sorted(ignored & set(ckpt.tensors)):
        _check_tied_copy(ckpt, name, fmap.pre[0].hf_name)


def _check_tied_copy(ckpt: HFCheckpoint, head: str, embedding: str) -> None:
    """A tied checkpoint may still store the LM head; it must then equal the embedding, or the config lies
    (dropping a real LM head is the 'converted fine, scores ~0' failure)."""
    if not torch.equal(ckpt.get(head), ckpt.get(embedding)):
        raise ValueError(f"config.json says tie_word_embeddings=true but tensor {head} in "
                         f"{ckpt.dir / ckpt.tensors[head].file} differs from {embedding}: config and weights do "
                         "not match")
    logger.info("tied embeddings: %s equals %s and is not stored twice", head, embedding)


def _make_chunk(ckpt: HFCheckpoint, piece: Piece, names: tuple[str, ...], dtype: torch.dtype,
                layered: bool) -> torch.Tensor:
    t = piece.make([ckpt.get(n) for n in names]).to(dtype)
    return t.unsqueeze(0) if layered else t


def plan_chunks(fmap: FamilyMap, arch: ModelArch, ckpt: HFCheckpoint, dtype: torch.dtype) -> list[TensorChunk]:
    """Every chunk of the Megatron checkpoint in HF file order, each with a lazy loader."""
    dm = dims(arch)
    chunks: list[TensorChunk] = []

    def add(rule, layer: Optional[int]) -> None:
        shape = rule.meg_shape(dm)
        rest = (0,) * (len(shape) - 1)
        for piece in rule.pieces(dm):
            names = tuple(fmap.hf_layer_name(layer, n) if layer is not None else n for n in piece.hf)
            load: Callable = functools.partial(_make_chunk, ckpt, piece, names, dtype, layer is not None)
            if layer is None:
                chunks.append(TensorChunk(rule.meg, shape, (piece.row0, *rest), (piece.rows, *shape[1:]), dtype, load))
            else:
                key = fmap.meg_key(rule, layered=True)
                chunks.append(TensorChunk(key, (arch.num_layers, *shape), (layer, piece.row0, *rest),
                                          (1, piece.rows, *shape[1:]), dtype, load))

    for rule in fmap.active(fmap.pre, arch):
        add(rule, None)
    for layer in range(arch.num_layers):
        for rule in fmap.layer:
            add(rule, layer)
    for rule in fmap.active(fmap.post, arch):
        add(rule, None)
    return chunks


def extra_state_objects(fmap: FamilyMap, arch: ModelArch) -> dict:
    """The ``_extra_state`` ShardedObjects a local-spec model saves (None), so every loader finds them."""
    n = arch.num_layers
    return {sharded_object_key(f"{fmap.meg_layer_prefix}{m}._extra_state", (layer,), (n,)): None
            for layer in range(n) for m in fmap.extra_state_modules}


def convert_hf_to_megatron(hf_dir, out, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                           dtype: Optional[str] = None, overwrite: bool = False, progress: bool = False) -> Path:
    """Convert the HF model in ``hf_dir`` into a megatron_var checkpoint at ``out``; returns ``out``.

    The TP/PP sizes only validate that the model can be split so (the checkpoint itself loads at any layout).
    ``dtype`` ('bf16' | 'fp16' | 'fp32', default: the HF checkpoint's own) is the stored dtype.
    """
    hf_dir = Path(hf_dir)
    config = read_hf_config(hf_dir)
    arch = arch_from_hf_config(config)
    arch.check_layout(tensor_model_parallel_size, pipeline_model_parallel_size)
    fmap = family_map(arch.family)
    ckpt = HFCheckpoint(hf_dir)
    check_tensors(fmap, arch, ckpt)
    if "torch_dtype" not in config and "dtype" not in config:  # keep what the weights really are
        first = next(iter(fmap.hf_tensor_shapes(arch)))
        arch.torch_dtype = HF_DTYPE_NAMES.get(ckpt.tensors[first].dtype, arch.torch_dtype)
    out_dtype = family_dtype(arch, dtype)
    chunks = plan_chunks(fmap, arch, ckpt, out_dtype)
    total = sum(c.nbytes for c in chunks)
    bar = _progress_bar(total, "hf -> megatron") if progress else None
    start = time.time()
    with staged_output(out, [hf_dir], overwrite) as tmp:
        layout.write_arch(tmp, arch)
        layout.copy_hf_files(hf_dir, layout.hf_dir(tmp))
        write_checkpoint(layout.iteration_dir(tmp, 0), chunks, extra_state_objects(fmap, arch), {},
                         on_chunk=(lambda c: bar.update(c.nbytes)) if bar else None)
        layout.write_latest(tmp, 0)
    if bar:
        bar.close()
    secs = time.time() - start
    logger.info("wrote %s: %d tensor chunks, %.1f MB in %.1f s (%.1f MB/s)", out, len(chunks), total / 1e6, secs,
                total / 1e6 / max(secs, 1e-9))
    return Path(out)


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, dynamic_ncols=True)
