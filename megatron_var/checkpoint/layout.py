"""The on-disk contract of a megatron_var checkpoint directory, shared by the converters, the trainer and tools.

    MEG_DIR/
      model_arch.json                    ModelArch: no model-shape flags are ever needed
      hf/                                source HF config.json, generation_config.json, tokenizer files
      latest_checkpointed_iteration.txt  the iteration to load; written last, atomically
      iter_0000000/                      megatron-core dist checkpoint (torch_dist); the converter writes model
                                         tensors only, the trainer adds optimizer/RNG/trainer state

Why one module: a converter checkpoint and a training checkpoint must be interchangeable for every reader
(training start, scoring, export), so the file names and the "load only the model part" rule live once.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from megatron_var.checkpoint import integrity as checkpoint_integrity, safe_unpickle
from megatron_var.models.arch import ModelArch

logger = logging.getLogger(__name__)

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
    """Record ``iteration`` as the one to load (tmp file + os.replace, so readers never see a partial file)."""
    root = Path(root)
    tmp = root / f"{TRACKER}.tmp-{os.getpid()}"
    tmp.write_text(f"{int(iteration)}\n")
    os.replace(tmp, root / TRACKER)


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
    root = Path(root)
    tmp = root / f"{ARCH_FILE}.tmp-{os.getpid()}"
    arch.save(tmp)
    os.replace(tmp, root / ARCH_FILE)


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


def _model_sharded_sd(chunks: list) -> dict:
    """{'model': sd} for one chunk, {'model0': sd0, 'model1': sd1, ...} for virtual-pipeline chunks."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def check_model_shapes(sd: dict, shapes: dict[str, tuple], ckpt: Path) -> None:
    """Clear errors for a model tensor that the checkpoint lacks or holds with another global shape."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for sh in nested_values(sd):
        if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
            continue
        if sh.key not in shapes:
            raise ValueError(f"checkpoint {ckpt} has no tensor {sh.key!r}: a checkpoint of a different model "
                             f"(it holds {len(shapes)} tensors, e.g. {sorted(shapes)[:3]})")
        if isinstance(sh, ShardedTensor) and tuple(sh.global_shape) != shapes[sh.key]:
            raise ValueError(f"checkpoint of a different model shape: {sh.key} is {list(shapes[sh.key])} in {ckpt}, "
                             f"this model expects {list(sh.global_shape)} (check model_arch.json)")


def load_error_summary(e: BaseException) -> str:
    """One line for what ``dist_checkpointing.load`` raised: torch DCP's ``CheckpointException`` carries every
    rank's failure with a formatted traceback; keep the first original error's type and first line."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for f in failures.values():
            orig = f[0] if isinstance(f, tuple) and f else f
            if isinstance(orig, BaseException):
                e = orig
                break
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, EOFError) and not first:
        first = "a file ends early (truncated?)"
    return f"{type(e).__name__}: {first}"


def _drop_missing_extra_state(sd: dict, object_keys: set[str]) -> None:
    """Remove ``*_extra_state`` ShardedObjects the checkpoint does not hold (TE fp8 metadata / local-spec None:
    a TE model loading a local-spec or converter checkpoint has extra ones)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    for key in list(sd):
        v = sd[key]
        if isinstance(v, dict):
            _drop_missing_extra_state(v, object_keys)
        elif isinstance(v, ShardedObject) and v.key.endswith("_extra_state") and v.unique_key not in object_keys:
            del sd[key]


def load_model(chunks: list, root, iteration: Optional[int] = None) -> Path:
    """Load the model tensors of checkpoint ``root`` into this rank's model chunks (all ranks call it).

    Works for converter checkpoints (model only) and training checkpoints (their optimizer, RNG and trainer
    state are ignored), whatever TP/PP/VPP they were written with. Returns the ``iter_*`` directory read.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt = resolve_checkpoint(root, iteration)
    checkpoint_integrity.ensure_intact(ckpt, collective=True)  # before anything unpickles its metadata
    sd = _model_sharded_sd(chunks)
    check_model_shapes(sd, checkpoint_tensor_shapes(ckpt), ckpt)
    _drop_missing_extra_state(sd, checkpoint_object_keys(ckpt))
    try:
        loaded = dist_checkpointing.load(sd, str(ckpt))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise ValueError(f"cannot load model tensors from {ckpt} ({load_error_summary(e)})") from e
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys):
        result = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing:
            raise ValueError(f"checkpoint {ckpt} did not provide {missing[:5]}")
    logger.info("loaded model weights from %s", ckpt)
    return ckpt
