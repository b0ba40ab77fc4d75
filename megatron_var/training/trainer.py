"""The training loop: one global batch of groups per iteration, for any ``Objective`` and ``ReferenceSource``.

Per iteration and DP rank: take this rank's groups (``batching.steps.step_groups``), ask the reference source for
their values (online scoring in the policy's layout, or a cache), let the objective attach what its loss reads to
the policy micro-batches, run megatron's schedule (forward/backward), step the optimizer and the LR schedule, and
hand the step's global record to the callbacks (metrics, validation, checkpoints, stopping).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_var.batching.steps import split_by_tokens, step_groups, step_start
from megatron_var.checkpoint import io as checkpoint_io
from megatron_var.checkpoint.layout import copy_hf_files, hf_dir
from megatron_var.models.gpt import build_model_chunks
from megatron_var.objectives import ref_gap
from megatron_var.objectives.objective import build_objective
from megatron_var.runtime.engine import build_optimizer, run_schedule, sum_reports, sync_params, wrap_ddp
from megatron_var.runtime.forward_step import make_forward_step
from megatron_var.runtime.microbatches import policy_microbatches
from megatron_var.runtime.parallel import process_groups
from megatron_var.training import progress, run_dir
from megatron_var.training.callbacks import Callback
from megatron_var.training.config import TrainConfig
from megatron_var.training.data_checks import arch_source, check_data_tokenizer, data_tokenizer
from megatron_var.training.global_stats import global_stats
from megatron_var.training.logging_sinks import check_wandb
from megatron_var.training.setup import (PAD_ID, build_reference, load_data, read_arch, reference_origin,
                                         restore)
from megatron_var.training.standard_callbacks import default_callbacks
from megatron_var.training.throughput import real_tokens

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many NaN/inf losses: the run stops (exit 3) without writing a checkpoint."""


class Trainer:
    """Wires a run together from its config; ``train()`` runs it."""

    def __init__(self, cfg: TrainConfig, callbacks: Optional[list[Callback]] = None):
        self.cfg = cfg
        ck = cfg.checkpoint
        self.callbacks = default_callbacks(cfg) if callbacks is None else callbacks
        self.is_logging_rank = dist.get_rank() == 0
        check_wandb(cfg.logging)  # a missing package fails now, not after the model is built
        self.objective = build_objective(cfg.objective)
        self.arch = read_arch(cfg)
        if run_dir.check_save_dir(ck.save, ck.load, ck.finetune, ck.overwrite, cfg.reference.ref_load):
            run_dir.clear_run(ck.save)
        self.data, self.valid = load_data(cfg, self.objective.needs_rewards)
        self.pgs = process_groups()  # handed to the model, DDP and the data sharding explicitly
        self.dp, self.dp_rank = self.pgs.dp.size(), self.pgs.dp.rank()
        if cfg.data.global_batch_size % (cfg.data.micro_batch_size * self.dp):
            raise ValueError(f"--global-batch-size {cfg.data.global_batch_size} must be a multiple of "
                             f"--micro-batch-size {cfg.data.micro_batch_size} x data-parallel size {self.dp}")
        options = cfg.model.options(on_gpu=torch.cuda.is_available())
        self.model = wrap_ddp(build_model_chunks(self.arch, cfg.parallel, options, self.pgs), cfg.optimizer, self.pgs)
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        state = restore(cfg, self.model, self.optimizer)
        check_data_tokenizer(self.data, self.arch, arch_source(ck.load, cfg.model.model_arch), ck.load,
                             state.recorded_tokenizer)
        self._position(state)
        self.ref_origin = reference_origin(cfg, state)
        self.saved_iteration: Optional[int] = None
        if not ck.load and ck.save:
            self.save(weights_only=True)  # iteration 0: the random initial weights = the reference's source
        rng = checkpoint_io.capture_rng_state()
        self.reference = build_reference(cfg, self.arch, options, self.objective, self.ref_origin, self.data,
                                         self.pgs)
        # the reference's random init (then overwritten by its weights) must not shift the restored RNG streams
        checkpoint_io.restore_rng_state(rng)
        self._forward_step = make_forward_step(self.objective.reduce_fn(), self.arch.vocab_size)
        # megatron's activation checkpoint saves its inputs with save_for_backward (tensors only): a SegmentMask
        # cannot pass it, so recomputation trains on padded rows
        self.pack = cfg.data.pack_sequences and cfg.model.recompute_granularity is None
        if cfg.data.pack_sequences and not self.pack:
            logger.info("sequence packing is off: --recompute-granularity %s needs plain (padded) micro-batches",
                        cfg.model.recompute_granularity)

    def _position(self, state) -> None:
        """Where the run stands (iteration, consumed groups) and where it ends; the LR schedule at that point,
        rebuilt from consumed groups and this run's flags, never loaded (progress.py)."""
        self.iteration, self.consumed, self.nan_skips = state.iteration, state.consumed, state.nan_skips
        self.start_iteration = self.iteration
        self.plan = progress.plan_run(iteration=self.iteration, consumed=self.consumed,
                                      num_groups=self.data.groups_per_epoch, data=self.cfg.data,
                                      optimizer=self.cfg.optimizer, warmup_groups=state.saved.get("lr_warmup_groups"))
        self.end_iteration = self.plan.end_iteration
        self.scheduler = progress.build_scheduler(self.optimizer, self.plan, self.consumed, self.cfg.optimizer)

    # ---- one pass over a batch of groups -----------------------------------------------------------------
    def _run(self, groups: list, forward_only: bool) -> tuple[dict, float]:
        """Reference values + policy schedule over this rank's ``groups``; the global stats and the start time."""
        data = self.cfg.data
        budget = data.max_tokens_per_micro_batch if self.pack else None
        micro = split_by_tokens(groups, budget) if budget else \
            [groups[i:i + data.micro_batch_size] for i in range(0, len(groups), data.micro_batch_size)]
        t0 = time.perf_counter()
        batches = policy_microbatches(micro, PAD_ID, self.cfg.parallel.sequence_multiple,
                                      same_length=self.cfg.parallel.pipeline_model_parallel_size > 1, pack=self.pack,
                                      row_tokens=budget)
        ref_values = self.reference.values(groups) if self.reference is not None else None
        extra = self.objective.attach(batches, micro, ref_values)
        for cb in self.callbacks:
            cb.on_batches(self, batches, forward_only)
        counts = {"tokens": real_tokens(batches),
                  "computed_tokens": sum(b["tokens"].numel() for b in batches),
                  "ref_computed_tokens": self.reference.computed_tokens if self.reference is not None else 0}
        reports = run_schedule(self._forward_step, batches, self.model, forward_only=forward_only,
                               seq_length=max(b["tokens"].size(1) for b in batches),
                               micro_batch_size=batches[0]["tokens"].size(0))
        gap = ref_gap.pop_global_gap(reports)  # a collective on every rank; None unless the objective reports it
        stats = global_stats(sum_reports(reports), extra, counts, self.objective.per_sample_prefixes)
        if gap is not None:
            stats[ref_gap.KEY] = gap
        return stats, t0

    # ---- training ----------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        data = self.cfg.data
        # as Megatron-LM's train_step: without it the non-distributed optimizer leaves param.grad aliasing DDP's
        # main_grad buffer, and the next backward adds each gradient into that buffer twice
        self.optimizer.zero_grad()
        G = self.data.groups_per_epoch
        start = step_start(self.consumed, data.global_batch_size, G)
        if start > self.consumed and self.is_logging_rank:
            logger.info("epoch %d ends: its last %d groups (fewer than --global-batch-size %d) are skipped; epoch %d "
                        "reads grouping %d of %d", self.consumed // G, start - self.consumed, data.global_batch_size,
                        start // G, (start // G) % self.data.num_groupings, self.data.num_groupings)
        idx = step_groups(G, data.seed, self.consumed, data.global_batch_size, self.dp_rank, self.dp,
                          self.data.num_groupings)
        stats, t0 = self._run([self.data[k] for k in idx], forward_only=False)
        loss = stats.pop("loss_sum") / max(stats.pop("units"), 1.0)
        ok, grad_norm = self._optimizer_step(loss)
        skipped = start - self.consumed  # an epoch tail: the schedule passes over it too (progress.py)
        self.scheduler.step(increment=skipped + data.global_batch_size)
        self.iteration += 1
        self.consumed = start + data.global_batch_size
        rec = {"iteration": self.iteration, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
               "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "step_time_s": time.perf_counter() - t0, "skipped": not ok, "consumed_groups": self.consumed,
               "epoch": start // G, "skipped_groups": skipped}
        rec.update(stats)
        return rec

    def _optimizer_step(self, loss: float) -> tuple[bool, Optional[float]]:
        """Step the optimizer, or skip the update of a NaN/inf loss (stop after more than --max-nan-skips)."""
        if math.isfinite(loss):
            ok, grad_norm, _ = self.optimizer.step()
            return ok, grad_norm
        limit = self.cfg.objective.max_nan_skips
        self.nan_skips += 1
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.nan_skips > limit:
            raise TrainingDiverged(f"loss was NaN/inf at {self.nan_skips} iterations (the last at iteration "
                                   f"{self.iteration + 1}), more than --max-nan-skips {limit}; "
                                   "stopped without saving (the last checkpoint is untouched)")
        logger.warning("iteration %d: loss is NaN/inf, update skipped (%d of --max-nan-skips %d)",
                       self.iteration + 1, self.nan_skips, limit)
        return False, float("nan")

    def train(self) -> None:
        for cb in self.callbacks:
            cb.on_train_start(self)
        stop = None
        while self.iteration < self.end_iteration and stop is None:
            rec = self.train_step()
            for cb in self.callbacks:
                cb.on_step_end(self, rec)
            if self.iteration < self.end_iteration:
                stop = next((r for r in (cb.should_stop(self) for cb in self.callbacks) if r), None)
        if stop is not None:
            logger.warning("stopping after iteration %d of %d: %s%s", self.iteration, self.end_iteration, stop,
                           "" if self.cfg.checkpoint.save else " (no --save: nothing is saved)")
        for cb in reversed(self.callbacks):
            cb.on_train_end(self, stop)

    # ---- validation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> Optional[dict]:
        """Mean loss and metrics over up to --eval-iters global batches of the held-out split; handed to the
        callbacks' ``on_validation_end``. None when there is no (large enough) valid split."""
        gbs = self.cfg.data.global_batch_size
        if self.valid is None or len(self.valid) < gbs:
            return None
        n = min(self.cfg.logging.eval_iters, len(self.valid) // gbs)
        for m in self.model:
            m.eval()
        totals: dict[str, float] = {}
        per_rank = gbs // self.dp
        for k in tqdm(range(n), desc="validation", unit="batch", disable=not self.is_logging_rank, leave=False):
            start = k * gbs + self.dp_rank * per_rank
            stats, _ = self._run([self.valid[i] for i in range(start, start + per_rank)], forward_only=True)
            for key, v in stats.items():
                totals[key] = totals.get(key, 0.0) + v
        for m in self.model:
            m.train()
        rec = {"iteration": self.iteration, "valid/loss": totals["loss_sum"] / max(totals["units"], 1.0)}
        rec.update({f"valid/{k}": v / n for k, v in totals.items() if k.startswith(self.objective.metric_prefixes)})
        for cb in self.callbacks:
            cb.on_validation_end(self, rec)
        return rec

    # ---- checkpoints -------------------------------------------------------------------------------------
    def save(self, weights_only: bool = False) -> None:
        ck = self.cfg.checkpoint
        self.saved_iteration = self.iteration
        sync_params(self.model)  # --overlap-param-gather: other ranks' shards of the last step arrive lazily
        if self.is_logging_rank:
            Path(ck.save).mkdir(parents=True, exist_ok=True)
            self.arch.save(Path(ck.save) / "model_arch.json")
            src = hf_dir(ck.load) if ck.load else None
            if src is not None and src.is_dir() and Path(ck.load).resolve() != Path(ck.save).resolve():
                copy_hf_files(src, hf_dir(ck.save))  # tokenizer + HF config, so export finds them
        checkpoint_io.save_checkpoint(ck.save, self.iteration, self.model, None if weights_only else self.optimizer,
                                      None if weights_only else self.scheduler,
                                      {"consumed_groups": self.consumed, "nan_skips": self.nan_skips,
                                       "ref_source": self.ref_origin, "data_tokenizer": data_tokenizer(self.data),
                                       "lr_warmup_groups": self.plan.warmup_groups})
