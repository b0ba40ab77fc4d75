"""Building a run from its ``TrainConfig``: one function per piece, each with its own errors, so the Trainer's
constructor only wires the results together.

Order matters and is the Trainer's: the run directory is checked before anything is written, the data before the
model is built (its errors are cheaper), the checkpoint is loaded before the reference is chosen (a resumed run
keeps the reference it started with).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from megatron_var.data.groups import EpochGroupings, GroupDataset
from megatron_var.models.arch import ModelArch
from megatron_var.models.gpt import ModelOptions
from megatron_var.objectives.objective import Objective
from megatron_var.reference import cache as reference_cache
from megatron_var.reference.online import load_frozen_reference
from megatron_var.reference.source import ReferenceSource, build_reference_source
from megatron_var.checkpoint import io as checkpoint_io
from megatron_var.checkpoint import layout
from megatron_var.training.config import TrainConfig

logger = logging.getLogger(__name__)

PAD_ID = 0


def read_arch(cfg: TrainConfig) -> ModelArch:
    """The model's shape: from --load's model_arch.json, else from --model-arch."""
    if cfg.checkpoint.load:
        return layout.read_arch(cfg.checkpoint.load)
    return ModelArch.load(cfg.model.model_arch)


def load_data(cfg: TrainConfig, needs_rewards: bool) -> tuple[EpochGroupings, Optional[GroupDataset]]:
    """Every grouping of the train split (epoch e trains on grouping e % N) and the valid split when validation is
    asked for and the data has one."""
    path = cfg.data.data_path
    train = EpochGroupings(path, "train", require_rewards=needs_rewards)
    valid = None
    if cfg.logging.eval_interval:
        valid = GroupDataset(path, "valid", require_rewards=needs_rewards)
        if not len(valid):
            logger.warning("--eval-interval given but %s has no valid split; no evaluation", path)
            valid = None
    return train, valid


@dataclass
class RunState:
    """Where a run stands: what ``--load`` resumed (zeros for a fresh run or ``--finetune``)."""

    iteration: int = 0
    consumed: int = 0
    nan_skips: int = 0
    loaded_iteration: Optional[int] = None
    """The checkpoint iteration actually loaded (the tracker's, or an older intact one)."""
    saved: dict = field(default_factory=dict)
    """The trainer state stored with that checkpoint (empty when none was loaded or --finetune)."""
    recorded_tokenizer: Optional[dict] = None
    """The data tokenizer the run that wrote --load trained on (checked against this run's data, also with
    --finetune)."""


def restore(cfg: TrainConfig, model: list, optimizer) -> RunState:
    """Load --load into ``model`` (and ``optimizer`` unless --finetune / --no-load-optim)."""
    ck = cfg.checkpoint
    if not ck.load:
        return RunState()
    skip_optimizer = ck.finetune or ck.no_load_optim
    saved = checkpoint_io.load_checkpoint(ck.load, model, None if skip_optimizer else optimizer,
                                          iteration=ck.ckpt_step, load_rng=not (ck.finetune or ck.no_load_rng))
    loaded = saved.pop("checkpoint_iteration")
    tokenizer = saved.get("data_tokenizer")
    if ck.finetune:  # weights only: a fresh run from them
        return RunState(loaded_iteration=loaded, recorded_tokenizer=tokenizer)
    return RunState(iteration=int(saved.get("iteration", 0)), consumed=int(saved.get("consumed_groups", 0)),
                    nan_skips=int(saved.get("nan_skips", 0)), loaded_iteration=loaded, saved=saved,
                    recorded_tokenizer=tokenizer)


def reference_origin(cfg: TrainConfig, state: RunState) -> dict:
    """Where the reference weights come from: --ref-load, else the policy's *initial* weights (--load, or the random
    init saved as iteration 0 of --save). A resumed run finds the answer of its first start in its state."""
    if state.saved.get("ref_source"):
        return state.saved["ref_source"]
    ck = cfg.checkpoint
    if cfg.reference.ref_load:
        return {"root": cfg.reference.ref_load, "iteration": None}
    if ck.load:
        return {"root": ck.load, "iteration": state.loaded_iteration}
    return {"root": ck.save, "iteration": 0}


def build_reference(cfg: TrainConfig, arch: ModelArch, options: ModelOptions, objective: Objective, origin: dict,
                    data: EpochGroupings, pg_collection=None) -> Optional[ReferenceSource]:
    """The objective's reference source (None for SFT): online in the policy's layout, or cached."""
    if objective.reference_kind is None:
        return None
    if not origin["root"]:
        raise ValueError("VAR, DPO and A-LoL need a reference: give --load, --ref-load or --save")
    ref, reduction = cfg.reference, cfg.objective.logp_reduction

    def load_frozen():
        return load_frozen_reference(arch, cfg.parallel, options, origin["root"], origin["iteration"], pad_id=PAD_ID,
                                     method=ref.cross_pair_method, offload=ref.ref_offload,
                                     pg_collection=pg_collection, pack=cfg.data.pack_sequences,
                                     row_tokens=cfg.data.max_tokens_per_micro_batch)

    if not ref.ref_cache:
        return build_reference_source(objective.reference_kind, reduction, load_frozen)
    meta = reference_cache.cache_meta(cfg.data.data_path, "train", len(data), reduction, origin,
                                      objective.reference_kind, groupings=data.num_groupings)
    return build_reference_source(objective.reference_kind, reduction, load_frozen,
                                  cache_dirs=[cfg.checkpoint.save, cfg.checkpoint.load], cache_meta=meta,
                                  dataset=data)
