"""Streaming access to HF safetensors checkpoints: a lazy reader (headers first, one tensor at a time) and a
sharded writer that writes each tensor's bytes as soon as it is produced.

Why not ``save_file``: it needs a whole shard (5 GB by default) in memory; a safetensors file is an 8-byte header
length, a JSON header with every tensor's byte range, then the raw bytes — all known from the shapes in advance,
so the header can be written first and each tensor appended and dropped.
Why a shard is opened per tensor on read: ``safe_open`` memory-maps the file and the pages read stay resident
(and counted in RSS) while it is open; closing it after each tensor keeps the footprint at one tensor.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_ST_TO_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class HFCheckpoint:
    """Names, shapes and dtypes of an HF safetensors checkpoint (headers only); ``get`` reads one tensor."""

    def __init__(self, hf_dir):
        self.dir = Path(hf_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for fname, names in self._files().items():
            self._read_header(fname, names)

    def _files(self) -> dict[str, Optional[set[str]]]:
        """{shard file: names the index assigns to it (None = no index)}; ValueErrors for missing files."""
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
            files: dict[str, Optional[set[str]]] = {}
            for name, fname in weight_map.items():
                files.setdefault(fname, set()).add(name)
            missing = sorted(f for f in files if not (self.dir / f).is_file())
            if missing:
                raise ValueError(f"missing shard {self.dir / missing[0]} (listed in {index})"
                                 + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
            return files
        if (self.dir / SINGLE_FILE).is_file():
            return {SINGLE_FILE: None}
        if any(self.dir.glob("pytorch_model*.bin")):
            raise ValueError(f"{self.dir} holds PyTorch .bin weights; only safetensors are supported "
                             "(re-save with save_pretrained(..., safe_serialization=True))")
        raise ValueError(f"{self.dir} has neither {INDEX_FILE} nor {SINGLE_FILE}")

    def _read_header(self, fname: str, expected: Optional[set[str]]) -> None:
        path = self.dir / fname
        found: set[str] = set()
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    found.add(name)
                    sl = f.get_slice(name)
                    dtype = sl.get_dtype()
                    if dtype not in _ST_TO_TORCH:
                        raise ValueError(f"corrupt or unsupported shard {path}: tensor {name} has dtype {dtype}")
                    self.tensors[name] = TensorInfo(fname, tuple(sl.get_shape()), _ST_TO_TORCH[dtype])
        except ValueError:
            raise
        except Exception as e:  # safetensors raises SafetensorError / OSError for a truncated or garbled file
            raise ValueError(f"corrupt shard {path}: {type(e).__name__}: {e}") from e
        if expected is not None:
            absent = sorted(expected - found)
            if absent:
                raise ValueError(f"shard {path} lacks {absent[0]} listed for it in {INDEX_FILE}")

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (the shard is opened and closed around it)."""
        info = self.tensors[name]
        path = self.dir / info.file
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name} from shard {path}: {type(e).__name__}: {e}") from e


def plan_shards(specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Greedy split of the tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets
    its own shard), like transformers' ``save_pretrained``."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        n = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _header(specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        n = math.prod(shape) * dtype.itemsize
        meta[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Writes tensors, in the announced order, into ``model-0000i-of-0000n.safetensors`` (+ index) files."""

    def __init__(self, out_dir, specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        for name, _, dtype in specs:
            if dtype not in _ST_DTYPES:
                raise ValueError(f"cannot write {name} as {dtype}")
        self.dir = Path(out_dir)
        self.specs = specs
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.file_of = {specs[i][0]: self.names[s] for s, idx in enumerate(self.shards) for i in idx}
        self._next = 0
        self._shard = -1
        self._stream = None
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, shape, dtype = self.specs[self._next]
        if name != exp_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise AssertionError(f"writer expected {exp_name} {shape} {dtype}, got {name} "
                                 f"{tuple(tensor.shape)} {tensor.dtype}")
        if self._stream is None or self._next not in self.shards[self._shard]:
            self._open_next()
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._stream.write(memoryview(data))
        self.bytes_written += data.nbytes
        self._next += 1
        if self._next == len(self.specs) or self._next not in self.shards[self._shard]:
            self._close()

    def _open_next(self) -> None:
        self._close()
        self._shard += 1
        self._stream = open(self.dir / self.names[self._shard], "wb")
        self._stream.write(_header([self.specs[i] for i in self.shards[self._shard]]))

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.flush()
            os.fsync(self._stream.fileno())  # on disk before the output directory is renamed into place
            self._stream.close()
            self._stream = None

    def finish(self) -> None:
        """Check every tensor was written; write the index when there are several shards."""
        self._close()
        if self._next != len(self.specs):
            raise AssertionError(f"only {self._next} of {len(self.specs)} tensors were written")
        if len(self.names) > 1:
            total = sum(math.prod(s) * d.itemsize for _, s, d in self.specs)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.file_of.items()))}
            (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
