"""The on-disk contract of a megatron_var checkpoint directory, shared by the converters, the trainer and tools.

    MEG_DIR/
      model_arch.json                    ModelArch: no model-shape flags are ever needed
      hf/                                source HF config.json, generation_config.json, tokenizer files
      latest_checkpointed_iteration.txt  the iteration to load; written last, atomically
      iter_0000000/                      megatron-core dist checkpoint (torch_dist); the converter writes model
                                         tensors only, the trainer adds optimizer/RNG/trainer state

Why one module: a converter checkpoint and a training checkpoint must be interchangeable for every reader
(training start, scoring, export), so the file names live once. Loading them is ``megatron_var.checkpoint.io``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from megatron_var.checkpoint import safe_unpickle
from megatron_var.common.atomic import atomic_write_text
from megatron_var.models.arch import ModelArch


TRACKER = "latest_checkpointed_iteration.txt"
ARCH_FILE = "model_arch.json"
HF_SUBDIR = "hf"
# files of an HF model directory that are weights (never carried into hf/)
_HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
_HF_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def iteration_dir(root, iteration: int) -> Path:
    """``root/iter_0000042`` for iteration 42."""
    return Path(root) / f"iter_{int(iteration):07d}"


def latest_iteration(root) -> Optional[int]:
    """The iteration recorded in the tracker file, or None when ``root`` holds no (complete) checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def write_latest(root, iteration: int) -> None:
    """Record ``iteration`` as the one to load (atomically, so readers never see a partial file)."""
    atomic_write_text(Path(root) / TRACKER, f"{int(iteration)}\n")


def hf_dir(root) -> Path:
    """Where the source HF config and tokenizer files are kept (``root/hf``)."""
    return Path(root) / HF_SUBDIR


def read_arch(root) -> ModelArch:
    """The ModelArch stored with the checkpoint; ValueError naming the path when it is missing or broken."""
    path = Path(root) / ARCH_FILE
    if not Path(root).is_dir():
        raise ValueError(f"checkpoint directory {root} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} not found: {root} is not a megatron_var checkpoint "
                         "(convert an HF model with checkpoints_convert/hf_to_megatron.py)")
    return ModelArch.load(path)


def write_arch(root, arch: ModelArch) -> None:
    """Store ``arch`` as ``root/model_arch.json`` (atomically)."""
    arch.save(Path(root) / ARCH_FILE)


def is_hf_weight_file(name: str) -> bool:
    return name.endswith(_HF_WEIGHT_SUFFIXES) or name in _HF_WEIGHT_INDEXES


def copy_hf_files(src_dir, dst_dir) -> list[str]:
    """Copy the non-weight top-level files of an HF model dir (config, generation config, tokenizer, chat
    template, license...) from ``src_dir`` to ``dst_dir``; returns the copied names. A trainer saving to a new
    root should call ``copy_hf_files(hf_dir(load_root), hf_dir(save_root))`` so exports find the tokenizer."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src_dir.iterdir()) if src_dir.is_dir() else []:
        if f.is_file() and not is_hf_weight_file(f.name):
            shutil.copy2(f, dst_dir / f.name)
            copied.append(f.name)
    return copied


def resolve_checkpoint(root, iteration: Optional[int] = None) -> Path:
    """The ``iter_*`` directory to read: ``iteration`` or the tracker's; clear ValueErrors otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"checkpoint directory {root} does not exist")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise ValueError(f"{root} has no {TRACKER}: not a (complete) megatron_var checkpoint")
    ckpt = iteration_dir(root, iteration)
    if not (ckpt / ".metadata").is_file():
        raise ValueError(f"{ckpt} is missing or incomplete (no .metadata)")
    return ckpt


def checkpoint_tensor_shapes(ckpt_dir) -> dict[str, tuple[int, ...]]:
    """{ShardedTensor key: global shape} of every tensor in a torch_dist checkpoint (reads the metadata only)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = safe_unpickle.load_metadata(ckpt_dir)
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def checkpoint_object_keys(ckpt_dir) -> set[str]:
    """Unique keys of the ShardedObjects (bytes items) in a torch_dist checkpoint."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = safe_unpickle.load_metadata(ckpt_dir)
    return {k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
