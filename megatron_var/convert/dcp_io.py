"""Write and read megatron-core ``torch_dist`` checkpoints tensor by tensor, without a process group.

Writing: a ``SavePlanner`` whose plan is built from shapes alone and whose ``resolve_data`` produces each chunk
on demand (read from the HF shard, permuted, cast), so only one chunk is ever alive. The result is what
``dist_checkpointing.save`` writes for a TP=1/PP=1 model: one global tensor per ShardedTensor key, layer-stacked
keys stored as one chunk per layer, ShardedObjects (``_extra_state``, ``common_state``) as pickled lists, plus
megatron's ``metadata.json``. One file per item (``single_file_per_rank=False``): torch's writer keeps every
tensor of a file alive until the file is closed, so one file per item is what bounds the memory.

Reading: a region that is exactly one stored chunk (every region the exporter asks of a converter checkpoint) is
``torch.load``-ed in place; any other region (e.g. layer 7 of linear_qkv from a TP=2 training checkpoint) goes
through a ``LoadPlanner`` that assembles it from whatever chunks overlap it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_var.checkpoint import integrity as checkpoint_integrity, safe_unpickle


MEGATRON_CHECKPOINT_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}


@dataclass(frozen=True)
class TensorChunk:
    """The block [offsets, offsets + sizes) of global tensor ``key``; ``load()`` makes it (contiguous)."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * self.dtype.itemsize


@contextlib.contextmanager
def _quiet():
    """Silence DCP's 'assuming single process' warning: working without a process group is the point here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextlib.contextmanager
def _unwrapped():
    """Re-raise the original error (a ValueError naming a shard, an OSError, Ctrl-C) instead of DCP's
    CheckpointException, which wraps every failure of a save or load together with a formatted traceback."""
    try:
        yield
    except CheckpointException as e:
        originals = [f[0] for f in e.failures.values() if isinstance(f, tuple) and isinstance(f[0], BaseException)]
        if originals:
            raise originals[0] from None
        raise


def sharded_object_key(key: str, offset: tuple[int, ...], global_shape: tuple[int, ...]) -> str:
    """megatron's ``ShardedObject.unique_key``: ``key/shard_<offset>_<shape>`` (dot-joined)."""
    return f"{key}/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, global_shape))}"


def _check_tiling(chunks: list[TensorChunk]) -> None:
    """Every key's chunks must fit its shape and fill it exactly (a table bug must not write holes)."""
    volume: dict[str, int] = {}
    shape: dict[str, tuple] = {}
    for c in chunks:
        if shape.setdefault(c.key, c.global_shape) != c.global_shape:
            raise AssertionError(f"{c.key}: chunks disagree on the global shape")
        if any(o + s > g for o, s, g in zip(c.offsets, c.sizes, c.global_shape)):
            raise AssertionError(f"{c.key}: chunk {c.offsets}+{c.sizes} outside {c.global_shape}")
        volume[c.key] = volume.get(c.key, 0) + math.prod(c.sizes)
    for key, v in volume.items():
        if v != math.prod(shape[key]):
            raise AssertionError(f"{key}: chunks cover {v} of {math.prod(shape[key])} elements")


class _LazySavePlanner(DefaultSavePlanner):
    def __init__(self, chunks: list[TensorChunk], objects: dict[str, Any], on_chunk: Optional[Callable]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        self.objects = objects
        self.on_chunk = on_chunk

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self.objects]
        for c in self.chunks.values():
            items.append(WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            ))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save([self.objects[write_item.index.fqn]], buf)  # megatron stores a list of shard data
            return buf
        c = self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        t = c.load()
        if tuple(t.shape) != tuple(c.sizes) or t.dtype != c.dtype:
            raise AssertionError(f"{c.key}{list(c.offsets)}: made {tuple(t.shape)} {t.dtype}, "
                                 f"planned {c.sizes} {c.dtype}")
        t = t.contiguous()
        if self.on_chunk is not None:
            self.on_chunk(c)
        return t


def write_checkpoint(path, chunks: list[TensorChunk], objects: dict[str, Any],
                     common_state: dict, on_chunk: Optional[Callable[[TensorChunk], None]] = None) -> None:
    """Write a megatron-core torch_dist checkpoint to the (new) directory ``path``.

    ``objects``: {ShardedObject unique key: data}; ``common_state``: megatron's non-sharded state dict.
    """
    _check_tiling(chunks)
    objects = dict(objects)
    objects[sharded_object_key("common_state", (0,), (1,))] = common_state
    Path(path).mkdir(parents=True, exist_ok=False)
    writer = FileSystemWriter(str(path), single_file_per_rank=False, thread_count=1, overwrite=False)
    with _unwrapped(), _quiet():
        dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, objects, on_chunk), no_dist=True)
    # megatron's CheckpointingConfig (what dist_checkpointing.save writes last), without importing megatron
    (Path(path) / "metadata.json").write_text(json.dumps(MEGATRON_CHECKPOINT_CONFIG))
    checkpoint_integrity.write_manifest(path)  # what the trainer writes too: loads verify it


def _narrow(t: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        t = t.narrow(dim, o, n)
    return t


class _CachedReader(FileSystemReader):
    """Reads ``.metadata`` once for many region loads, with the restricted unpickler (never plain pickle)."""

    def __init__(self, path):
        super().__init__(str(path))
        self._metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = safe_unpickle.load_metadata(self.path)
            self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _RegionLoadPlanner(DefaultLoadPlanner):
    def __init__(self, key: str, offsets: tuple[int, ...], dest: torch.Tensor):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.key, self.offsets, self.dest = key, offsets, dest

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.state_dict, self.metadata, self.is_coordinator = {}, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        want = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.dest.shape)
        md = self.metadata.state_dict_metadata[self.key]
        return LoadPlan(create_read_items_for_chunk_list(self.key, md, [want]))

    def resolve_tensor(self, read_item):
        return _narrow(self.dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class CheckpointReader:
    """Region reads from a torch_dist checkpoint directory (no process group, one region in memory)."""

    def __init__(self, path):
        self.path = Path(path)
        self._reader = _CachedReader(self.path)
        self.metadata = self._reader.read_metadata()  # ValueError naming the file when unreadable or unsafe

    def tensor(self, key: str) -> TensorStorageMetadata:
        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"checkpoint {self.path} has no tensor {key!r}")
        return md

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The block [offsets, offsets + sizes) of ``key``, in the stored dtype."""
        md = self.tensor(key)
        stored = [c for c in md.chunks if tuple(c.offsets) == tuple(offsets) and tuple(c.sizes) == tuple(sizes)]
        if stored:
            t = self._read_stored_chunk(key, stored[0])
            if t is not None:
                return t
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        try:
            with _unwrapped(), _quiet():
                dcp.load({}, storage_reader=self._reader, planner=_RegionLoadPlanner(key, tuple(offsets), dest),
                         no_dist=True)
        except Exception as e:
            raise ValueError(f"cannot read {key} from {self.path}: {type(e).__name__}: {e}") from e
        return dest

    def _read_stored_chunk(self, key: str, chunk: ChunkStorageMetadata) -> Optional[torch.Tensor]:
        """A region that is exactly one stored chunk, loaded in place (DCP's reader would load it and then copy
        it into the destination: 2x the memory). None when the item is stored in a way we do not read here."""
        info = self.metadata.storage_data.get(MetadataIndex(key, chunk.offsets))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        try:
            with open(self.path / info.relative_path, "rb") as f:
                t = torch.load(_FileView(f, info.offset, info.length), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read {key} from {self.path / info.relative_path}: {type(e).__name__}: {e}") from e
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(chunk.sizes):
            raise ValueError(f"corrupt checkpoint item {key} in {self.path / info.relative_path}")
        return t


class _FileView(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file as a seekable stream (one torch.save blob)."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self.f, self.start, self.length = f, offset, length
        self.f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.f.tell() - self.start

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self.length}[whence]
        self.f.seek(self.start + base + pos)
        return self.tell()

    def readinto(self, b) -> int:
        n = min(len(b), self.length - self.tell())
        if n <= 0:
            return 0
        return self.f.readinto(memoryview(b)[:n])
