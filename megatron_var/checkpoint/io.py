"""Checkpoint I/O: the one way a megatron_var checkpoint is read into a model, and the training checkpoint save.

Two entry points share one loading path (``_read_into``):
    load_model(chunks, root)              model weights only: the frozen reference (``--ref-load``), scoring, the
                                          converters' output; the checkpoint named (tracker or ``iteration``) must
                                          be intact.
    load_checkpoint(root, model, ...)     the trainer's ``--load``: model + optimizer (when given and saved) +
                                          common trainer state + RNG state; a damaged latest checkpoint falls back
                                          to the newest intact one.
Both verify the checksum manifest and read the metadata with a restricted unpickler before megatron touches the
files (``integrity.check``), compare every model tensor's global shape with the checkpoint's (a checkpoint of
another model is one line naming the tensor and both shapes), and load the model strictly: every parameter and
buffer must come from the checkpoint; only ``*_extra_state`` (TE fp8 metadata) the checkpoint lacks keeps this
model's own. Every failure is one ValueError line.

Why atomic: a crash during a save must leave the previous checkpoint as the one ``--load`` finds. The new
checkpoint is written to ``iter_XXXXXXX.tmp``, gets its checksum manifest when every rank has finished, is
renamed, and only then is the tracker file replaced (``megatron_var.common.atomic``).

RNG state (Megatron-LM's ``--no-load-rng``): every save stores each rank's python/numpy/torch/CUDA RNG states and
megatron-core's tensor-parallel RNG tracker as a ShardedObject keyed by (PP, TP, DP) rank; ``load_checkpoint``
restores them unless ``load_rng=False``. A resume in another layout restores none (and says so), as Megatron-LM
does after a TP/PP change: no rank of the new layout has a saved stream of its own.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from megatron_var.checkpoint import integrity as checkpoint_integrity
from megatron_var.checkpoint.layout import (TRACKER, checkpoint_object_keys, checkpoint_tensor_shapes, iteration_dir,
                                            latest_iteration, resolve_checkpoint, write_latest)
from megatron_var.common.atomic import replace_directory

logger = logging.getLogger(__name__)

# model-space optimizer state (one tensor per parameter and Adam moment, keyed like the model's sharded tensors):
# a resume may change TP, PP and DP. The per-bucket 'dp_reshardable' format saves without gathering but ties the
# checkpoint to the saved TP x PP layout; checkpoints written in it still load when the layout is unchanged.
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
RNG_KEY = "rng_state"

# What reading a checkpoint that does not fit or does not read raises inside megatron-core and torch DCP: DCP's
# CheckpointException (a BaseException, carrying every rank's failure), megatron's CheckpointingException, and
# what a truncated or scrambled file or a mismatched tensor gives the readers underneath.
_READ_ERRORS = (CheckpointException, CheckpointingException, OSError, EOFError, pickle.UnpicklingError,
                RuntimeError, ValueError, KeyError)


# ---- loading ------------------------------------------------------------------------------------------------
def load_model(chunks: list, root, iteration: Optional[int] = None) -> Path:
    """Load the model tensors of checkpoint ``root`` into this rank's model chunks (all ranks call it).

    Works for converter checkpoints (model only) and training checkpoints (their optimizer, RNG and trainer
    state are ignored), whatever TP/PP/VPP they were written with. Returns the ``iter_*`` directory read.
    """
    ckpt = resolve_checkpoint(root, iteration)
    checkpoint_integrity.ensure_intact(ckpt, collective=True)  # before anything unpickles its metadata
    _read_into(chunks, ckpt, {}, f"cannot load model tensors from {ckpt}")
    logger.info("loaded model weights from %s", ckpt)
    return ckpt


def load_checkpoint(root, model: list, optimizer=None, iteration: Optional[int] = None, *, scheduler=None,
                    load_rng: bool = True) -> dict:
    """Load model (and optimizer/scheduler when given and saved) from ``root``; returns the trainer state.

    A checkpoint written by ``hf_to_megatron.py`` holds model weights only: then the trainer state is empty and a
    fresh run starts from those weights. ``checkpoint_iteration`` in the result is the iteration actually read
    (older than the tracker's when the latest was damaged). ``load_rng=False`` is Megatron-LM's ``--no-load-rng``
    (a ``--finetune`` should not restore them either).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--load {root}: no such directory")
    it = latest_iteration(root) if iteration is None else iteration
    if it is None:
        raise ValueError(f"--load {root}: no {TRACKER} (not a megatron_var checkpoint)")
    ckpt = iteration_dir(root, it)
    if not ckpt.is_dir():
        what = "tracker names" if iteration is None else "asked for"
        raise ValueError(f"--load {root}: {what} iteration {it} but {ckpt} is missing")
    ckpt = _intact_checkpoint(root, it, fallback=iteration is None)
    common = _common_state(ckpt)
    has_train_state = "trainer_state" in common  # converter checkpoints hold model weights only
    with_optimizer = optimizer is not None and "optimizer" in common
    if optimizer is not None and has_train_state and not with_optimizer and dist.get_rank() == 0:
        logger.warning("%s holds no optimizer state (a weights-only save): the optimizer starts fresh", ckpt)
    extra: dict = {}
    if has_train_state:
        extra["trainer_state"] = {}
        if "opt_param_scheduler" in common:
            extra["opt_param_scheduler"] = scheduler.state_dict() if scheduler is not None else {}
    rng = _rng_to_load(ckpt, load_rng, has_train_state)
    if rng is not None:
        extra[RNG_KEY] = rng

    def optimizer_sd(model_sd: dict) -> dict:
        _materialise_optimizer_state(optimizer)
        return {"optimizer": optimizer.sharded_state_dict(model_sd if len(model) > 1 else model_sd["model"],
                                                          is_loading=True,
                                                          metadata=_saved_optim_metadata(common.get("optimizer")))}

    t0 = time.perf_counter()
    logger.info("loading checkpoint %s (%s)", ckpt, "model + optimizer" if with_optimizer else "model weights")
    loaded = _read_into(model, ckpt, extra, f"--load {ckpt}: cannot load it",
                        optimizer_sd if with_optimizer else None)
    if with_optimizer:
        _adopt_current_schedule_bounds(loaded["optimizer"], optimizer)
        with torch.no_grad(), _step_free_state_copy(optimizer):  # fp32 main params are leaves requiring grad
            optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    if scheduler is not None and "opt_param_scheduler" in extra:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if rng is not None:
        restore_rng_state(loaded[RNG_KEY])
    logger.info("loaded checkpoint %s in %.1f s%s", ckpt, time.perf_counter() - t0,
                " (RNG state restored)" if rng is not None else "")
    state = dict(loaded.get("trainer_state", {})) if has_train_state else {}
    return dict(state, checkpoint_iteration=int(ckpt.name.split("_")[1]))


def _read_into(model: list, ckpt: Path, extra: dict, error: str, optimizer_sd=None) -> dict:
    """Load the model part of ``ckpt`` (plus the ``extra`` items, plus ``optimizer_sd(model_sd)``) into ``model``'s
    chunks; returns what ``dist_checkpointing.load`` read. ``ckpt`` must have passed ``integrity.check``."""
    sd = _model_sd(model)
    check_model_shapes(sd, checkpoint_tensor_shapes(ckpt), ckpt)
    if optimizer_sd is not None:  # built from the full model sd: the optimizer's keys follow the parameters
        sd.update(optimizer_sd(sd))
    _drop_missing_extra_state(sd, checkpoint_object_keys(ckpt))
    sd.update(extra)
    try:
        loaded = dist_checkpointing.load(sd, str(ckpt))
    except _READ_ERRORS as e:
        raise ValueError(f"{error} ({load_error_summary(e)})") from e
    for chunk, key in zip(model, _model_keys(len(model))):
        _load_chunk(getattr(chunk, "module", chunk), loaded[key], ckpt)
    return loaded


def _model_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _model_sd(model: list) -> dict:
    """{'model': sd} for one chunk, {'model0': sd0, 'model1': sd1, ...} for virtual-pipeline chunks.

    DDP wrappers are unwrapped so that policy (DDP) and frozen reference (bare) chunks use the same tensor keys.
    """
    bare = [getattr(m, "module", m) for m in model]
    return {k: m.sharded_state_dict() for k, m in zip(_model_keys(len(bare)), bare)}


def _load_chunk(chunk, state: dict, ckpt: Path) -> None:
    """``load_state_dict(strict=True)`` of what the checkpoint provided, after naming what does not fit.

    ``*_extra_state`` the checkpoint does not hold (TE fp8 metadata a local-spec or converter checkpoint lacks,
    the output layer's, which megatron-core leaves out of the sharded state dict) keeps this model's own value.
    """
    own = chunk.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state]
    lacking = [k for k in missing if not k.endswith("_extra_state")]
    if lacking:
        raise ValueError(f"checkpoint {ckpt} did not provide {lacking[:5]}"
                         + (f" (+{len(lacking) - 5} more)" if len(lacking) > 5 else ""))
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ValueError(f"checkpoint {ckpt} provided {unknown[:5]}, which this model does not have")
    chunk.load_state_dict({**state, **{k: own[k] for k in missing}}, strict=True)


def check_model_shapes(sd: dict, shapes: dict[str, tuple], ckpt: Path) -> None:
    """Clear errors for a model tensor that the checkpoint lacks or holds with another global shape."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for sh in nested_values(sd):
        if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
            continue
        if sh.key not in shapes:
            raise ValueError(f"checkpoint {ckpt} has no tensor {sh.key!r}: a checkpoint of a different model "
                             f"(it holds {len(shapes)} tensors, e.g. {sorted(shapes)[:3]})")
        if isinstance(sh, ShardedTensor) and tuple(sh.global_shape) != shapes[sh.key]:
            raise ValueError(f"checkpoint of a different model shape: {sh.key} is {list(shapes[sh.key])} in {ckpt}, "
                             f"this model expects {list(sh.global_shape)} (check model_arch.json)")


def _drop_missing_extra_state(sd: dict, object_keys: set[str]) -> None:
    """Remove ``*_extra_state`` ShardedObjects the checkpoint does not hold (TE fp8 metadata / local-spec None:
    a TE model loading a local-spec or converter checkpoint has extra ones)."""
    for key in list(sd):
        v = sd[key]
        if isinstance(v, dict):
            _drop_missing_extra_state(v, object_keys)
        elif isinstance(v, ShardedObject) and v.key.endswith("_extra_state") and v.unique_key not in object_keys:
            del sd[key]


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


def _intact_checkpoint(root: Path, it: int, fallback: bool) -> Path:
    """``iter_<it>`` when its files match its manifest and its metadata is safe to read; otherwise (``fallback``)
    the newest intact older ``iter_*`` in ``root``, with the damage and the fallback logged. All ranks call it
    and get the same answer (the verdict is gathered); the ValueError names the damage of every iteration tried."""
    older = sorted((int(d.name[5:]) for d in root.glob("iter_*") if d.is_dir() and d.name[5:].isdigit()
                    and int(d.name[5:]) < it), reverse=True) if fallback else []
    damaged = []
    for cand in [it, *older]:
        ckpt = iteration_dir(root, cand)
        problems = checkpoint_integrity.check(ckpt, collective=True)
        if not problems:
            if damaged and dist.get_rank() == 0:
                logger.warning("falling back to %s, the newest intact checkpoint in %s (the latest, %s, is "
                               "damaged)", ckpt.name, root, iteration_dir(root, it).name)
            return ckpt
        damaged.append(f"{ckpt.name}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        if dist.get_rank() == 0:
            logger.error("checkpoint %s is damaged: %s", ckpt, "; ".join(problems))
    if not fallback:
        raise ValueError(f"--load {root} --ckpt-step {it}: checkpoint is damaged: {damaged[0]}")
    raise ValueError(f"--load {root}: no intact checkpoint: {'; '.join(damaged)}")


def _common_state(ckpt: Path) -> dict:
    """The checkpoint's common (non-sharded) state: trainer state, scheduler, the optimizer's format."""
    try:
        return dist_checkpointing.load_common_state_dict(str(ckpt))
    except _READ_ERRORS as e:
        raise ValueError(f"--load {ckpt}: cannot read its common state ({load_error_summary(e)})") from e


# ---- saving -------------------------------------------------------------------------------------------------
def save_checkpoint(root, iteration: int, model: list, optimizer=None, scheduler=None,
                    trainer_state: Optional[dict] = None) -> Path:
    """Save a full training state at ``iteration`` (with every rank's RNG state); every rank must call it."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")  # one name on every rank (rank 0 creates and renames it)
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
        tmp.mkdir()
    dist.barrier()
    sd = _model_sd(model)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd if len(model) > 1 else sd["model"],
                                                       metadata=OPTIM_METADATA)
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["trainer_state"] = dict(trainer_state or {}, iteration=iteration)
    sd[RNG_KEY] = _rng_object(capture_rng_state())
    dist_checkpointing.save(sd, str(tmp))
    dist.barrier()
    checkpoint_integrity.write_manifest(tmp, collective=True)  # before the rename: a final dir always has one
    if dist.get_rank() == 0:
        replace_directory(tmp, final)
        write_latest(root, iteration)
    dist.barrier()
    logger.info("saved checkpoint %s", final)
    return final


# ---- RNG state ----------------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """This rank's RNG states as plain data (tensors, ints, tuples: torch's ``weights_only`` loader reads them,
    so the restricted checkpoint check admits them): python ``random``, numpy's global generator, torch's CPU
    generator, the current CUDA device's (when CUDA is in use) and megatron-core's tensor-parallel RNG tracker
    (when it has states)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": random.getstate(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    if tracker:  # graph-safe trackers hold generators: stored as state tensors
        state["tracker"] = {k: tensor_parallel.convert_cuda_rng_state(v, to_graphable=False)
                            for k, v in tracker.items()}
    return state


def restore_rng_state(state: dict) -> None:
    """Set this rank's RNG states to ``capture_rng_state``'s ``state``; a part it lacks is left alone."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        tracker = tensor_parallel.get_cuda_rng_tracker()
        graph_safe = tensor_parallel.is_graph_safe_cuda_rng_tracker(tracker)
        tracker.set_states({k: tensor_parallel.convert_cuda_rng_state(v, to_graphable=graph_safe)
                            for k, v in state["tracker"].items()})


def _rng_layout() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(PP, TP, DP) sizes of this run and this rank's (PP, TP, DP) ranks."""
    ps = parallel_state
    return ((ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size()),
            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             ps.get_data_parallel_rank()))


def _rng_object(state: dict) -> ShardedObject:
    """This rank's RNG state as one shard of a (PP, TP, DP) grid: every rank saves and loads its own."""
    shape, offset = _rng_layout()
    return ShardedObject(RNG_KEY, state, shape, offset, replica_id=0)


def _rng_to_load(ckpt: Path, load_rng: bool, has_train_state: bool) -> Optional[ShardedObject]:
    """The RNG ShardedObject to load from ``ckpt``, or None (not asked, not saved, or saved in another layout:
    logged). The answer is the same on every rank (it depends on the layout and the metadata only)."""
    if not load_rng or not has_train_state:
        return None
    obj = _rng_object(capture_rng_state())
    keys = checkpoint_object_keys(ckpt)
    if obj.unique_key in keys:
        return obj
    if dist.get_rank() == 0:
        saved = sorted(k for k in keys if k.startswith(f"{RNG_KEY}/"))
        if saved:
            grid = saved[0].rsplit("_", 1)[-1].replace(".", " x ")
            here = " x ".join(map(str, obj.global_shape))
            logger.warning("RNG state not restored: %s saved it with PP x TP x DP = %s, this run is %s", ckpt, grid,
                           here)
        else:
            logger.info("RNG state not restored: %s holds none (saved before RNG states were)", ckpt)
    return None


# ---- the distributed optimizer's state ----------------------------------------------------------------------
def _saved_optim_metadata(common_optimizer) -> dict:
    """The distributed-optimizer format the checkpoint was written in (loading must request the same one)."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            if "param_state_sharding_type" in x:
                found.append(x["param_state_sharding_type"])
            for v in x.values():
                walk(v)

    walk(common_optimizer)
    return {"distrib_optim_sharding_type": found[0]} if found else OPTIM_METADATA


def _materialise_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer (no step taken yet) placeholder state to load into.

    Without apex/TE, megatron-core 0.19's ``DistributedOptimizer.state_dict()`` asserts one common 'step' over
    the (still empty) Adam state before its own ``is_loading`` branch would create that state.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not opt.optimizer.state and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


_SCHEDULE_BOUNDS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _adopt_current_schedule_bounds(optimizer_sd, optimizer) -> None:
    """Give the loaded param groups this run's LR/WD bounds (--lr, --min-lr, --weight-decay).

    megatron-core pairs saved and current param groups by these values too, so a resume with another --lr would
    fail with a KeyError; the schedule follows the current flags (training/progress.py), so they are adopted.
    Only bounds shared by every current group are set (groups that differ in them are left to megatron).
    """
    current = [g for opt in getattr(optimizer, "chained_optimizers", [optimizer]) for g in opt.param_groups]
    shared = {k: current[0][k] for k in _SCHEDULE_BOUNDS
              if current and all(k in g and g[k] == current[0][k] for g in current)}

    def walk(x):
        if isinstance(x, dict):
            for g in x.get("param_groups", []) if isinstance(x.get("param_groups"), list) else []:
                g.update({k: v for k, v in shared.items() if k in g})
            for v in x.values():
                walk(v)

    walk(optimizer_sd)


@contextlib.contextmanager
def _step_free_state_copy(optimizer):
    """Let megatron-core copy the model-space optimizer state into torch Adam's state, which holds a 'step'
    tensor the checkpoint's per-parameter tensors do not have.

    Without apex/TE, megatron-core 0.19's loader for the reshardable formats copies every tensor of the Adam state
    from the loaded tensors by key and fails with ``KeyError: 'step'``. A ``None`` entry is skipped by that copy;
    the step itself comes from the param groups (``_unshare_adam_steps``).
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is not None:
            opt._set_main_param_and_optimizer_states = \
                lambda param, tensors, _set=setter: _set(param, {"step": None, **tensors})
            patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def _unshare_adam_steps(optimizer) -> None:
    """Restore a per-parameter Adam 'step' tensor from the loaded param group's step after a load.

    Without apex/TE, megatron-core 0.19 keeps the step of the placeholder state (1) and shares one tensor across
    parameters, while the checkpoint's step sits in the param groups; torch's Adam would then use the wrong bias
    correction after a resume (seen: the first post-resume loss differed in the 3rd decimal).
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                state = opt.optimizer.state.get(p)
                if state is not None and torch.is_tensor(state.get("step")):
                    step = group.get("step", state["step"])
                    state["step"] = torch.tensor(float(step), dtype=state["step"].dtype)
