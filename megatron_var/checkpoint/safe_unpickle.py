"""Read torch DCP checkpoint metadata without letting the file run code.

Why: torch's ``FileSystemReader.read_metadata`` and megatron's ``dist_checkpointing.load`` ``pickle.load`` the
``.metadata`` file, and DCP ``torch.load``s every ShardedObject with ``weights_only=False``: a crafted checkpoint
ran code on load. Here ``.metadata`` is read with an unpickler that admits only the classes DCP metadata is made
of (collected from real converter and training checkpoints), and every pickled object item is checked with
torch's ``weights_only`` unpickler. A checkpoint that passes ``check_checkpoint`` is then safe to hand to torch
and megatron, which unpickle the same bytes the normal way.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

METADATA_FILE = ".metadata"
LEGACY_COMMON_FILE = "common.pt"  # where older megatron-core versions kept the common state

# (module, name) of every global a DCP ``.metadata`` pickle needs; torch dtypes are admitted separately
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.layout's reducer: looks a layout up by name
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch.distributed.checkpoint.planner", "BytesIOWriteData"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # storage_meta.checkpoint_id of a checkpoint saved with a Path
    ("pathlib", "PurePosixPath"),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would run code (or is not what it claims to be) when unpickled."""


def _is_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or _is_dtype(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refuses global {module}.{name}")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError("refuses persistent ids")


def load_metadata(ckpt_dir):
    """The DCP ``Metadata`` of ``ckpt_dir``, read with the restricted unpickler.

    ValueError (``UnsafeCheckpointError`` for a forbidden class) naming the file when it is missing, truncated,
    not a pickle or not DCP metadata.
    """
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = Path(ckpt_dir) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: not loaded, it is not plain checkpoint metadata ({e})") from None
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError, IndexError,
            KeyError, MemoryError) as e:  # what a truncated or scrambled pickle raises
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise ValueError(f"{path} is unreadable (holds a {type(md).__name__}, not DCP metadata)")
    if getattr(md, "storage_meta", None) is None:  # what torch's reader does too
        md.storage_meta = StorageMeta()
    return md


def check_objects(ckpt_dir, md) -> None:
    """Refuse a checkpoint whose pickled object items (ShardedObjects: common/trainer/scheduler state, extra
    state) need more than torch's ``weights_only`` unpickler: DCP loads them with ``weights_only=False``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    storage = md.storage_data or {}
    for key, item in md.state_dict_metadata.items():
        if not isinstance(item, BytesStorageMetadata):
            continue
        info = storage.get(MetadataIndex(key))
        if info is None:
            raise ValueError(f"{Path(ckpt_dir) / METADATA_FILE}: object {key!r} has no storage entry")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{ckpt_dir}: object {key!r} is stored transformed "
                                        f"({info.transform_descriptors}); not checked, not loaded")
        path = Path(ckpt_dir) / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
        except OSError as e:
            raise ValueError(f"{path}: object {key!r} is unreadable ({e})") from None
        _check_plain_data(io.BytesIO(blob), f"{path}: object {key!r}")


def _check_plain_data(stream, what: str) -> None:
    """Refuse a ``torch.save`` payload that torch's ``weights_only`` unpickler would not load."""
    try:
        torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{what} not loaded, it needs more than plain data to unpickle "
                                    f"({str(e).splitlines()[0]})") from None
    except (OSError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{what} is unreadable ({type(e).__name__}: {first})") from None


def check_checkpoint(ckpt_dir):
    """Restricted read of ``.metadata`` plus the object-item check; returns the metadata.

    Also megatron's legacy ``common.pt``: if a checkpoint has one, megatron loads it instead of the common-state
    object, with ``torch.load``'s default (``weights_only`` unless an environment variable turns it off).
    """
    md = load_metadata(ckpt_dir)
    check_objects(ckpt_dir, md)
    legacy = Path(ckpt_dir) / LEGACY_COMMON_FILE
    if legacy.exists():
        with open(legacy, "rb") as f:
            _check_plain_data(f, str(legacy))
    return md
