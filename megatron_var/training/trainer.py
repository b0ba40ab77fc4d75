"""The training loop: VAR, SFT or DPO on megatron-core, one global batch of groups per iteration.

Per iteration and DP rank: take this rank's groups (batches.step_groups), let the frozen reference score them
(VAR: [B, B] cross pairs -> weights on the last stage; DPO: diagonal log-probs), attach the results to the policy
micro-batches, run megatron's schedule (forward/backward), step the distributed optimizer and the LR schedule,
log, and checkpoint atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_var.checkpoint.layout import copy_hf_files, hf_dir, load_model
from megatron_var.data.groups import EpochGroupings, GroupDataset
from megatron_var.models.arch import ModelArch
from megatron_var.models.gpt import ModelOptions, build_model_chunks
from megatron_var.objectives.alol import alol_advantages
from megatron_var.objectives.var import var_metrics, var_weights
from megatron_var.reference import cache as reference_cache
from megatron_var.runtime.parallel import ParallelConfig
from megatron_var.reference.online import FrozenReference
from megatron_var.batching import steps as B
from megatron_var.checkpoint import io as ckpt
from megatron_var.objectives import ref_gap
from megatron_var.training import progress, run_dir
from megatron_var.training.data_checks import arch_source, check_data_tokenizer, data_tokenizer
from megatron_var.training.exit_conditions import ExitConditions
from megatron_var.training.timed_saves import TimedSaves
from megatron_var.training.logging_sinks import MetricSinks
from megatron_var.runtime.engine import OptimConfig, build_optimizer, run_schedule, sum_reports, wrap_ddp
from megatron_var.objectives.reducers import alol_reduce, dpo_reduce, var_reduce
from megatron_var.objectives.reducers import sft_reduce
from megatron_var.runtime.forward_step import make_forward_step

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many NaN/inf losses: the run stops (exit 3) without writing a checkpoint."""


def _injected_nan_iterations() -> set[int]:
    """Testing hook (fault injection): ``MEGATRON_VAR_INJECT_NAN_ITERS="3,4"`` makes those iterations' loss NaN."""
    raw = os.environ.get("MEGATRON_VAR_INJECT_NAN_ITERS", "")
    return {int(x) for x in raw.split(",") if x.strip()}


OBJECTIVES = ("var", "sft", "dpo", "alol")
NEEDS_REWARDS = ("var", "alol")
# objective metrics shown in the log line and kept for validation; the per-sample ones are sums until _global_stats
OBJECTIVE_METRICS = ("var/", "rewards/", "alol/")
PER_SAMPLE_METRICS = ("rewards/", "logps/", "alol/")


@dataclass
class TrainConfig:
    """What to train and for how long (the model shape comes from the checkpoint or --model-arch)."""

    objective: str = "var"
    data_path: str = ""
    micro_batch_size: int = 1
    """Groups per micro-batch."""
    global_batch_size: int = 1
    """Groups per iteration over all DP ranks (= micro-batch × accumulation × DP)."""
    train_iters: Optional[int] = None
    epochs: Optional[float] = None
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    seed: int = 1234
    var_lambda: float = 1.0
    logp_reduction: str = "sum"
    """'sum' (the paper) or 'mean' (per-token mean log-probs for π_ref and π_θ)."""
    cross_pair_method: str = "shared_prefix"
    dpo_beta: float = 0.1
    alol_clip: float = 0.2
    """A-LoL: the sequence-level importance weight pi_theta/pi_ref is clipped to [1 - eps, 1 + eps]."""
    alol_variant: str = "alol"
    """'alol': advantage r - V(x) (V = x's mean reward over its group), positive advantages only; 'rlol': reward."""
    load: Optional[str] = None
    finetune: bool = False
    """Load only the weights of --load and start a fresh run (iteration 0, new optimizer), as Megatron-LM."""
    ckpt_step: Optional[int] = None
    """Load this iteration of --load instead of the latest (Megatron-LM's --ckpt-step)."""
    ref_load: Optional[str] = None
    ref_offload: bool = False
    ref_cache: bool = False
    """Score every group's reference matrix (VAR) / vectors (DPO) once before training and train from the cache
    (<save>/ref_cache.pt, reused on resume); see megatron_var/reference/cache.py."""
    model_arch: Optional[str] = None
    save: Optional[str] = None
    save_interval: Optional[int] = None
    save_interval_mins: Optional[float] = None
    """Also save when this many minutes have passed since the last save (rank 0's clock)."""
    log_interval: int = 1
    max_nan_skips: int = 10
    tensorboard_dir: Optional[str] = None
    eval_interval: Optional[int] = None
    """Evaluate loss and VAR metrics on the held-out split every N iterations (and at the end)."""
    eval_iters: int = 10
    """Global batches of the held-out split per evaluation (fewer when the split is smaller)."""
    wandb_project: Optional[str] = None
    overwrite: bool = False
    """Delete the run already in --save before starting (otherwise a new run into it is refused)."""
    exit_duration_in_mins: Optional[float] = None
    """Save and exit 0 once the job has run this long (Megatron-LM's flag; all ranks agree)."""
    exit_interval: Optional[int] = None
    """Save and exit 0 after an iteration divisible by this (Megatron-LM's flag)."""

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.alol_variant not in ("alol", "rlol"):
            raise ValueError(f"--alol-variant must be alol or rlol, got {self.alol_variant!r}")
        if not 0.0 < self.alol_clip < 1.0:
            raise ValueError(f"--alol-clip must be in (0, 1), got {self.alol_clip}")
        if not self.data_path:
            raise ValueError("--data-path is required")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("--global-batch-size must be a multiple of --micro-batch-size")
        if (self.train_iters is None) == (self.epochs is None):
            raise ValueError("give exactly one of --train-iters and --epochs")
        if self.var_lambda <= 0:
            raise ValueError(f"--var-lambda must be > 0, got {self.var_lambda}")
        if self.ref_cache and self.objective == "sft":
            raise ValueError("--ref-cache needs --objective var, dpo or alol (SFT has no reference)")
        if self.load is None and self.model_arch is None:
            raise ValueError("give --load (a megatron_var checkpoint) or --model-arch (random init)")
        if self.exit_duration_in_mins is not None and self.exit_duration_in_mins <= 0:
            raise ValueError(f"--exit-duration-in-mins must be > 0, got {self.exit_duration_in_mins}")
        if self.save_interval_mins is not None and self.save_interval_mins <= 0:
            raise ValueError(f"--save-interval-mins must be > 0, got {self.save_interval_mins}")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise ValueError(f"--exit-interval must be >= 1, got {self.exit_interval}")


def _arch(cfg: TrainConfig) -> ModelArch:
    if cfg.load:
        path = Path(cfg.load) / "model_arch.json"
        if not path.exists():
            raise ValueError(f"--load {cfg.load}: no model_arch.json (not a megatron_var checkpoint)")
        return ModelArch.load(path)
    return ModelArch.load(cfg.model_arch)


def _is_last_stage_holder() -> bool:
    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


class Trainer:
    def __init__(self, cfg: TrainConfig, pc: ParallelConfig, optim: OptimConfig, options: ModelOptions):
        self.cfg, self.pc = cfg, pc
        self.exit = ExitConditions(cfg.exit_duration_in_mins, cfg.exit_interval)
        self.timed_saves, self.saved_iteration = TimedSaves(cfg.save_interval_mins), None
        self._nan_iters = _injected_nan_iterations()
        self.arch = _arch(cfg)
        if run_dir.check_save_dir(cfg.save, cfg.load, cfg.finetune, cfg.overwrite, cfg.ref_load):
            run_dir.clear_run(cfg.save)
        # every grouping of the train split (prepare_data --regroup-epochs): epoch e trains on grouping e % N
        self.data = EpochGroupings(cfg.data_path, "train", require_rewards=cfg.objective in NEEDS_REWARDS)
        self.valid = None
        if cfg.eval_interval:
            valid = GroupDataset(cfg.data_path, "valid", require_rewards=cfg.objective in NEEDS_REWARDS)
            self.valid = valid if len(valid) else None
            if self.valid is None:
                logger.warning("--eval-interval given but %s has no valid split; no evaluation", cfg.data_path)
        self.group_size = int(self.data.meta["group_size"])
        self.pad_id = 0
        self.dp = parallel_state.get_data_parallel_world_size()
        if cfg.global_batch_size % (cfg.micro_batch_size * self.dp):
            raise ValueError(f"--global-batch-size {cfg.global_batch_size} must be a multiple of "
                             f"--micro-batch-size {cfg.micro_batch_size} x data-parallel size {self.dp}")
        chunks = build_model_chunks(self.arch, pc, options)
        self.model = wrap_ddp(chunks, optim)
        self.optimizer = build_optimizer(self.model, optim)
        self.iteration, self.consumed, self.nan_skips = 0, 0, 0
        state = {}
        if cfg.load:
            # the LR schedule is rebuilt from consumed groups and this run's flags, not loaded (progress.py)
            state = ckpt.load_checkpoint(cfg.load, self.model, None if cfg.finetune else self.optimizer,
                                         iteration=cfg.ckpt_step)
            loaded_iteration = state.pop("checkpoint_iteration")  # the tracker's, or an older intact one
        check_data_tokenizer(self.data, self.arch, arch_source(cfg.load, cfg.model_arch), cfg.load,
                             state.get("data_tokenizer"))
        if cfg.load:
            state = {} if cfg.finetune else state
            self.iteration = int(state.get("iteration", 0))
            self.consumed = int(state.get("consumed_groups", 0))
            self.nan_skips = int(state.get("nan_skips", 0))
        self.plan = progress.plan_run(iteration=self.iteration, consumed=self.consumed,
                                      global_batch_size=cfg.global_batch_size, num_groups=self.data.groups_per_epoch,
                                      train_iters=cfg.train_iters, epochs=cfg.epochs,
                                      lr_warmup_iters=cfg.lr_warmup_iters,
                                      warmup_groups=state.get("lr_warmup_groups"))
        self.iters = self.plan.end_iteration
        self.scheduler = progress.build_scheduler(self.optimizer, self.plan, self.consumed, lr=optim.lr,
                                                  min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                                                  decay_style=cfg.lr_decay_style)
        # the reference is the policy's *initial* weights unless --ref-load says otherwise; a resumed run finds
        # where they came from in its trainer state
        self.ref_source = state.get("ref_source") or (
            {"root": cfg.ref_load, "iteration": None} if cfg.ref_load else
            {"root": cfg.load, "iteration": loaded_iteration} if cfg.load else
            {"root": cfg.save, "iteration": 0})
        if not cfg.load and cfg.save:
            self.save(weights_only=True)  # iteration 0: the random initial weights = the reference source
        self.ref, self.ref_cache = None, None
        if cfg.objective != "sft":
            if not self.ref_source["root"]:
                raise ValueError("VAR, DPO and A-LoL need a reference: give --load, --ref-load or --save")

            def make_ref() -> FrozenReference:
                ref_chunks = build_model_chunks(self.arch, pc, options)
                load_model(ref_chunks, self.ref_source["root"], self.ref_source["iteration"])  # checks shapes
                return FrozenReference(ref_chunks, self.arch.vocab_size, self.pad_id,
                                       method=cfg.cross_pair_method, offload=cfg.ref_offload,
                                       pad_to_multiple_of=self._pad_multiple())

            if cfg.ref_cache:
                kind = "cross" if cfg.objective == "var" else "diagonal"
                meta = reference_cache.cache_meta(cfg.data_path, "train", len(self.data), cfg.logp_reduction,
                                                  self.ref_source, kind, groupings=self.data.num_groupings)
                self.ref_cache = reference_cache.load_or_build([cfg.save, cfg.load], meta, make_ref, self.data,
                                                               reduction=cfg.logp_reduction, kind=kind)
            else:
                self.ref = make_ref()
        self.metrics_path = Path(cfg.save) / "metrics.jsonl" if cfg.save else None
        self.sinks = MetricSinks(cfg.tensorboard_dir, cfg.wandb_project, config=dataclasses.asdict(cfg)) \
            if dist.get_rank() == 0 else None
        self._truncate_metrics()

    def _pad_multiple(self) -> int:
        return self.pc.tensor_model_parallel_size if self.pc.sequence_parallel else 1

    def _truncate_metrics(self) -> None:
        """Keep metrics.jsonl append-safe across resumes: drop lines past the resumed iteration."""
        if self.metrics_path is None or dist.get_rank() != 0:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.metrics_path, self.metrics_path.parent / "valid_metrics.jsonl"):
            if path.exists():
                keep = [ln for ln in path.read_text().splitlines()
                        if ln.strip() and json.loads(ln)["iteration"] <= self.iteration]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(ln + "\n" for ln in keep))
                os.replace(tmp, path)

    # ---- one iteration ------------------------------------------------------------------------------------
    def _reference_pass(self, micro: list[list]) -> tuple[list[dict], dict]:
        cfg, extra = self.cfg, {}
        groups = [g for mg in micro for g in mg]
        prompts = [g.prompt_ids for g in groups]
        responses = [g.response_ids for g in groups]
        batches = B.uniform_microbatches(micro, self.pad_id, self._pad_multiple(),
                                         same_length=self.pc.pipeline_model_parallel_size > 1)
        if cfg.objective == "var":
            mats = self._cached(groups) if self.ref_cache is not None else \
                self.ref.score_cross_pairs(prompts, responses, cfg.logp_reduction)
            if mats is not None:
                ref_bb = torch.stack(mats)  # [G, B, B]
                rewards = B.rewards_tensor(groups)
                w = var_weights(ref_bb, rewards, cfg.var_lambda)  # [G, B]
                extra = var_metrics(ref_bb, rewards, cfg.var_lambda, w)
                per_micro = w.split([len(mg) for mg in micro])
                diag = torch.diagonal(ref_bb, dim1=1, dim2=2).split([len(mg) for mg in micro])
                for b, wm, dm in zip(batches, per_micro, diag):
                    b["weights"], b["ref_diag"] = wm.reshape(-1), dm.reshape(-1)
        elif cfg.objective in ("dpo", "alol"):
            vecs = self._cached(groups) if self.ref_cache is not None else \
                self.ref.score_diagonal(prompts, responses, cfg.logp_reduction)
            if vecs is not None:
                sizes = [len(mg) for mg in micro]
                per_micro = torch.stack(vecs).split(sizes)
                adv = alol_advantages(B.rewards_tensor(groups), cfg.alol_variant).split(sizes) \
                    if cfg.objective == "alol" else [None] * len(sizes)
                for b, v, a in zip(batches, per_micro, adv):
                    b["ref_logps"] = v.reshape(-1)
                    if a is not None:
                        b["advantages"] = a.reshape(-1)
        return batches, extra

    def _run(self, groups: list, forward_only: bool) -> tuple[dict, float]:
        """Reference pass + policy schedule over this rank's ``groups``; global stats and wall time."""
        cfg = self.cfg
        micro = [groups[i:i + cfg.micro_batch_size] for i in range(0, len(groups), cfg.micro_batch_size)]
        t0 = time.perf_counter()
        batches, extra = self._reference_pass(micro)
        if not forward_only and self.iteration + 1 in self._nan_iters:
            for b in batches:  # a real NaN loss and NaN gradients through the whole backward
                b["loss_mask"] = b["loss_mask"] * float("nan")
        reduce_fn = {"var": var_reduce(cfg.logp_reduction), "dpo": dpo_reduce(cfg.dpo_beta, cfg.logp_reduction),
                     "alol": alol_reduce(cfg.alol_clip, cfg.alol_variant == "alol", cfg.logp_reduction),
                     "sft": sft_reduce}[cfg.objective]
        tokens = sum(int((b["tokens"] != self.pad_id).sum()) for b in batches)
        reports = run_schedule(make_forward_step(reduce_fn, self.arch.vocab_size), batches, self.model,
                               forward_only=forward_only, seq_length=max(b["tokens"].size(1) for b in batches),
                               micro_batch_size=batches[0]["tokens"].size(0))
        gap = ref_gap.pop_global_gap(reports) if cfg.objective == "var" else None
        stats = _global_stats(sum_reports(reports), extra, tokens)
        return (stats if gap is None else dict(stats, **{ref_gap.KEY: gap})), t0

    def _cached(self, groups: list) -> Optional[list[torch.Tensor]]:
        """The reference cache's values for ``groups``, where online scoring would return them (last PP stage)."""
        return [self.ref_cache[g.group_id] for g in groups] if _is_last_stage_holder() else None

    def train_step(self) -> dict:
        cfg = self.cfg
        # as Megatron-LM's train_step: without it the non-distributed optimizer leaves param.grad aliasing DDP's
        # main_grad buffer, and the next backward adds each gradient into that buffer twice
        self.optimizer.zero_grad()
        G = self.data.groups_per_epoch
        start = B.step_start(self.consumed, cfg.global_batch_size, G)
        if start > self.consumed and dist.get_rank() == 0:
            logger.info("epoch %d ends: its last %d groups (fewer than --global-batch-size %d) are skipped; epoch %d "
                        "reads grouping %d of %d", self.consumed // G, start - self.consumed, cfg.global_batch_size,
                        start // G, (start // G) % self.data.num_groupings, self.data.num_groupings)
        idx = B.step_groups(G, cfg.seed, self.consumed, cfg.global_batch_size,
                            parallel_state.get_data_parallel_rank(), self.dp, self.data.num_groupings)
        stats, t0 = self._run([self.data[k] for k in idx], forward_only=False)
        if self.iteration == 0 and not self.cfg.ref_load and dist.get_rank() == 0:  # ref = the start weights
            ref_gap.check_identity(stats.get(ref_gap.KEY), self.model[0].config.params_dtype)
        loss = stats["loss_sum"] / max(stats["units"], 1.0)
        if not math.isfinite(loss):
            self.nan_skips += 1
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            if self.nan_skips > cfg.max_nan_skips:
                raise TrainingDiverged(f"loss was NaN/inf at {self.nan_skips} iterations (the last at iteration "
                                       f"{self.iteration + 1}), more than --max-nan-skips {cfg.max_nan_skips}; "
                                       "stopped without saving (the last checkpoint is untouched)")
            logger.warning("iteration %d: loss is NaN/inf, update skipped (%d of --max-nan-skips %d)",
                           self.iteration + 1, self.nan_skips, cfg.max_nan_skips)
            ok, grad_norm = False, float("nan")
        else:
            ok, grad_norm, _ = self.optimizer.step()
        skipped = start - self.consumed  # an epoch tail: the schedule passes over it too (progress.py)
        self.scheduler.step(increment=skipped + cfg.global_batch_size)
        self.iteration += 1
        self.consumed = start + cfg.global_batch_size
        dt = time.perf_counter() - t0
        rec = {"iteration": self.iteration, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
               "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "tokens_per_s": stats["tokens"] / dt, "step_time_s": dt, "skipped": not ok,
               "consumed_groups": self.consumed, "epoch": start // G, "skipped_groups": skipped}
        rec.update({k: v for k, v in stats.items() if k not in ("loss_sum", "units", "tokens")})
        return rec

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        """Mean loss and metrics over up to ``eval_iters`` global batches of the held-out split."""
        if self.valid is None or len(self.valid) < self.cfg.global_batch_size:
            return None
        n = min(self.cfg.eval_iters, len(self.valid) // self.cfg.global_batch_size)
        for m in self.model:
            m.eval()
        totals: dict[str, float] = {}
        for k in tqdm(range(n), desc="validation", unit="batch", disable=dist.get_rank() != 0, leave=False):
            per_rank = self.cfg.global_batch_size // self.dp
            start = k * self.cfg.global_batch_size + parallel_state.get_data_parallel_rank() * per_rank
            stats, _ = self._run([self.valid[i] for i in range(start, start + per_rank)], forward_only=True)
            for key, v in stats.items():
                totals[key] = totals.get(key, 0.0) + v
        for m in self.model:
            m.train()
        out = {"iteration": self.iteration, "valid/loss": totals["loss_sum"] / max(totals["units"], 1.0)}
        out.update({f"valid/{k}": v / n for k, v in totals.items() if k.startswith(OBJECTIVE_METRICS)})
        return out

    def _log_eval(self) -> None:
        rec = self.evaluate()
        if rec is None or dist.get_rank() != 0:
            return
        logger.info("validation at iter %d | loss %.5f%s", self.iteration, rec["valid/loss"],
                    "".join(f" | {k} {v:.4g}" for k, v in rec.items() if k.startswith("valid/var/ess")))
        if self.metrics_path:
            with (self.metrics_path.parent / "valid_metrics.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")
        self.sinks.log(rec)

    def train(self) -> None:
        stop = None
        while self.iteration < self.iters and stop is None:
            rec = self.train_step()
            if dist.get_rank() == 0:
                if self.metrics_path:
                    with self.metrics_path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                self.sinks.log(rec)
                if self.iteration % self.cfg.log_interval == 0:
                    logger.info("iter %d/%d | loss %.5f | lr %.3g | grad norm %s | %.0f tokens/s | %.2f s/it%s",
                                self.iteration, self.iters, rec["loss"], rec["lr"],
                                f"{rec['grad_norm']:.4f}" if rec["grad_norm"] is not None else "-",
                                rec["tokens_per_s"], rec["step_time_s"],
                                "".join(f" | {k} {v:.4g}" for k, v in rec.items() if k.startswith(OBJECTIVE_METRICS)))
            if self.cfg.eval_interval and self.iteration % self.cfg.eval_interval == 0:
                self._log_eval()
            every = self.cfg.save_interval
            if self.cfg.save and ((every and self.iteration % every == 0) or self.timed_saves.due()):
                self.save()
            stop = self.exit.check(self.iteration) if self.iteration < self.iters else None
        if stop is not None:
            logger.warning("stopping after iteration %d of %d: %s%s", self.iteration, self.iters, stop,
                           "" if self.cfg.save else " (no --save: nothing is saved)")
        elif self.cfg.eval_interval and self.iteration % self.cfg.eval_interval:
            self._log_eval()
        if self.cfg.save and self.saved_iteration != self.iteration:
            self.save()
        if self.sinks is not None:
            self.sinks.close()
        self.exit.restore()

    def save(self, weights_only: bool = False) -> None:
        self.saved_iteration = self.iteration
        self.timed_saves.saved()
        if dist.get_rank() == 0:
            Path(self.cfg.save).mkdir(parents=True, exist_ok=True)
            self.arch.save(Path(self.cfg.save) / "model_arch.json")
            src = hf_dir(self.cfg.load) if self.cfg.load else None
            if src is not None and src.is_dir() and Path(self.cfg.load).resolve() != Path(self.cfg.save).resolve():
                copy_hf_files(src, hf_dir(self.cfg.save))  # tokenizer + HF config, so export finds them
        ckpt.save_checkpoint(self.cfg.save, self.iteration, self.model, None if weights_only else self.optimizer,
                             None if weights_only else self.scheduler,
                             {"consumed_groups": self.consumed, "nan_skips": self.nan_skips,
                              "ref_source": self.ref_source, "data_tokenizer": data_tokenizer(self.data),
                              "lr_warmup_groups": self.plan.warmup_groups})


def _global_stats(summed: dict, extra: dict, tokens: int) -> dict:
    """Sum loss/units/metric sums over the last-stage ranks of all DP replicas (TP rank 0), tokens over DP."""
    holder = _is_last_stage_holder() and parallel_state.get_tensor_model_parallel_rank() == 0
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # only last-stage ranks have reports: every rank must all-reduce the same keys (and know which are means)
        summed, extra = _with_last_stage_keys(summed, extra)
    keys = sorted(set(summed) | set(extra))
    vals = [summed.get(k, 0.0) + (extra.get(k, 0.0) if holder else 0.0) if holder else 0.0 for k in keys]
    first_mp = parallel_state.get_tensor_model_parallel_rank() == 0 and \
        parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    t = torch.tensor(vals + [1.0 if holder else 0.0, float(tokens) if first_mp else 0.0], dtype=torch.float64)
    dist.all_reduce(t)
    out = dict(zip(keys, t[:-2].tolist()))
    n_holders = max(t[-2].item(), 1.0)
    for k in extra:  # VAR metrics are means per DP replica: average them
        out[k] = out[k] / n_holders
    units = max(out.get("units", 1.0), 1.0)
    for k in list(out):
        if k.startswith(PER_SAMPLE_METRICS):  # sums over samples -> means
            out[k] = out[k] / units
    out["tokens"] = t[-1].item()
    return out


def _with_last_stage_keys(summed: dict, extra: dict) -> tuple[dict, dict]:
    """``summed`` and ``extra`` with every key a last-stage rank reports (0.0 where this rank has none)."""
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, (sorted(summed), sorted(extra)))
    all_summed = {k for s, _ in names for k in s}
    all_extra = {k for _, e in names for k in e}
    return {k: summed.get(k, 0.0) for k in all_summed}, {k: extra.get(k, 0.0) for k in all_extra}
