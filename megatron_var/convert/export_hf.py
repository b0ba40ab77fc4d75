"""megatron_var checkpoint (converter or training, any TP/PP it was written with) -> HF directory, streaming.

Each HF tensor is read as one region of the dist checkpoint (e.g. rows [0, F) of layer 7's linear_fc1 = gate),
cast and appended to the current safetensors shard; optimizer and other training state are never read.
config.json is the stored source config when it still describes the same architecture (an exact round trip),
else it is rebuilt from model_arch.json.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from megatron_var.convert import family_map
from megatron_var.convert.core import HF_DTYPE_NAMES, FamilyMap, dims, family_dtype
from megatron_var.convert.dcp_io import CheckpointReader
from megatron_var.convert.hf_io import ShardedSafetensorsWriter
from megatron_var.convert.staging import staged_output
from megatron_var.checkpoint import integrity as checkpoint_integrity
from megatron_var.checkpoint import layout as layout
from megatron_var.models.arch import ModelArch, arch_from_hf_config, hf_config_from_arch

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """'5GB' -> 5e9 bytes (as transformers), '512MiB' -> 512*2**20, '1000' -> 1000."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 1000000")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if n <= 0:
        raise ValueError(f"--max-shard-size must be > 0, got {text!r}")
    return n


def _region_reader(reader: CheckpointReader, key: str, shape: tuple[int, ...], layer: Optional[int]):
    rest = tuple(shape[1:])
    if layer is None:
        return lambda row0, rows: reader.read(key, (row0, *(0,) * len(rest)), (rows, *rest))
    return lambda row0, rows: reader.read(key, (layer, row0, *(0,) * len(rest)), (1, rows, *rest))[0]


def check_checkpoint(fmap: FamilyMap, arch: ModelArch, reader: CheckpointReader) -> None:
    """Every Megatron tensor the architecture needs is stored with the expected global shape."""
    dm = dims(arch)
    groups = ((fmap.active(fmap.pre, arch), False), (fmap.layer, True), (fmap.active(fmap.post, arch), False))
    for rules, layered in groups:
        for rule in rules:
            key = fmap.meg_key(rule, layered)
            want = ((arch.num_layers,) if layered else ()) + rule.meg_shape(dm)
            got = tuple(reader.tensor(key).size)
            if got != want:
                raise ValueError(f"checkpoint of a different model shape: {key} is {list(got)} in {reader.path}, "
                                 f"model_arch.json implies {list(want)}")


def iter_hf_tensors(fmap: FamilyMap, arch: ModelArch, reader: CheckpointReader) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) in HF file order, one region read at a time."""
    dm = dims(arch)
    for rule in fmap.active(fmap.pre, arch):
        yield from rule.to_hf(dm, _region_reader(reader, rule.meg, rule.meg_shape(dm), None))
    for layer in range(arch.num_layers):
        for rule in fmap.layer:
            read = _region_reader(reader, fmap.meg_key(rule, True), rule.meg_shape(dm), layer)
            for name, t in rule.to_hf(dm, read):
                yield fmap.hf_layer_name(layer, name), t
    for rule in fmap.active(fmap.post, arch):
        yield from rule.to_hf(dm, _region_reader(reader, rule.meg, rule.meg_shape(dm), None))


def export_config(arch: ModelArch, root: Path, dtype: torch.dtype) -> dict:
    """The source config.json when it still matches ``arch`` (exact round trip), else one built from ``arch``."""
    src = layout.hf_dir(root) / "config.json"
    config = None
    if src.is_file():
        try:
            original = json.loads(src.read_text())
            same = {**arch_from_hf_config(original).to_dict(), "torch_dtype": arch.torch_dtype} == arch.to_dict()
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            logger.warning("ignoring %s: %s", src, e)
            same = False
        if same:
            config = original
        else:
            logger.warning("%s no longer matches model_arch.json; config.json is rebuilt from the latter", src)
    if config is None:
        config = hf_config_from_arch(arch)
    key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
    config[key] = HF_DTYPE_NAMES[dtype]
    return config


def convert_megatron_to_hf(load, out, dtype: Optional[str] = None, iteration: Optional[int] = None,
                           overwrite: bool = False, max_shard_size="5GB", progress: bool = False) -> Path:
    """Export checkpoint ``load`` as an HF model directory ``out`` (``dtype`` default: the original HF dtype)."""
    root = Path(load)
    arch = layout.read_arch(root)
    ckpt_dir = layout.resolve_checkpoint(root, iteration)
    checkpoint_integrity.ensure_intact(ckpt_dir)  # manifest + safe metadata, before reading a tensor
    fmap = family_map(arch.family)
    reader = CheckpointReader(ckpt_dir)
    check_checkpoint(fmap, arch, reader)
    out_dtype = family_dtype(arch, dtype)
    specs = [(n, s, out_dtype) for n, s in fmap.hf_tensor_shapes(arch).items()]
    max_bytes = parse_size(max_shard_size)
    bar = _progress_bar(sum(torch.Size(s).numel() * out_dtype.itemsize for _, s, _ in specs)) if progress else None
    start = time.time()
    with staged_output(out, [root], overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs, max_bytes)
        for name, tensor in iter_hf_tensors(fmap, arch, reader):
            writer.write(name, tensor.to(out_dtype))
            if bar:
                bar.update(tensor.numel() * out_dtype.itemsize)
            del tensor
        writer.finish()
        hf_src = layout.hf_dir(root)
        if hf_src.is_dir():
            copied = layout.copy_hf_files(hf_src, tmp)
            logger.info("carried over %s", copied)
        else:
            logger.warning("%s has no hf/ directory: no tokenizer or generation config to carry over", root)
        (tmp / "config.json").write_text(json.dumps(export_config(arch, root, out_dtype), indent=2) + "\n")
    if bar:
        bar.close()
    secs = time.time() - start
    logger.info("wrote %s: %d tensors in %d file(s), %.1f MB in %.1f s (%.1f MB/s)", out, len(specs),
                len(writer.names), writer.bytes_written / 1e6, secs, writer.bytes_written / 1e6 / max(secs, 1e-9))
    return Path(out)


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="megatron -> hf", dynamic_ncols=True)
