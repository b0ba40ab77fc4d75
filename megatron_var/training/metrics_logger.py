"""The run's metrics, written by the logging rank (global rank 0) only: ``MetricsLogger``, a Trainer callback.

Every step: the record plus its rates (tokens/s real and computed, TFLOP/s per GPU and MFU on GPU) as one line of
``<save>/metrics.jsonl`` and as TensorBoard / wandb scalars. Every ``--log-interval`` steps: the interval's
aggregates under ``perf/`` (ms per step, rates, peak memory of the fullest rank, ETA) join that step's line and
scalars, and one INFO line sums it up::

    iter 12/100 | loss 1.23456 | lr 3e-05 | grad norm 0.8123 | 845 ms/it | 1234 tok/s | 12.3 TFLOP/s/GPU |
    MFU 41.0% | peak mem 3.2 GiB | ETA 1h02m | consumed 96 groups | var/ess 3.2 | ...

Validation records go to ``valid_metrics.jsonl`` and the same sinks (keys under ``valid/``). A resumed run first
drops the lines past the iteration it resumes from, so both files stay one line per iteration.

``check_wandb`` (re-exported from ``logging_sinks``) is for the Trainer to call before it builds the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_var.common.atomic import atomic_write_text
from megatron_var.training.callbacks import Callback
from megatron_var.training.logging_sinks import MetricSinks, check_wandb
from megatron_var.training.throughput import (IntervalMeter, device_peak_tflops, format_duration,
                                              peak_memory_bytes, world_size)

__all__ = ["MetricsLogger", "check_wandb", "format_train_line", "format_valid_line", "truncate_metrics"]

logger = logging.getLogger(__name__)

# objective metrics of the record (shown in the log line after the throughput)
OBJECTIVE_PREFIXES = ("var/", "rewards/", "alol/", "logps/", "dpo/", "ref_policy_logp_gap")
METRICS_FILE, VALID_METRICS_FILE = "metrics.jsonl", "valid_metrics.jsonl"


def truncate_metrics(run_dir: Path, iteration: int) -> None:
    """Keep metrics.jsonl and valid_metrics.jsonl append-safe across resumes: drop the lines past ``iteration``
    (written after the checkpoint a resumed run starts from) and a line torn by a crash mid-write."""
    for path in (Path(run_dir) / METRICS_FILE, Path(run_dir) / VALID_METRICS_FILE):
        if not path.exists():
            continue
        keep = []
        for ln in path.read_text().splitlines():
            try:
                if json.loads(ln)["iteration"] <= iteration:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):
                continue
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _num(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 1 else f"{x:.3g}"


def _objective_metrics(record: dict, prefix: str = "") -> str:
    return "".join(f" | {k} {v:.4g}" for k, v in record.items()
                   if k.startswith(tuple(prefix + p for p in OBJECTIVE_PREFIXES)) and isinstance(v, (int, float)))


def format_train_line(record: dict, perf: dict, end_iteration: int) -> str:
    """The INFO line of a log interval: the last step's loss, lr and grad norm, the interval's rates."""
    gn = record.get("grad_norm")
    parts = [f"iter {record['iteration']}/{end_iteration}", f"loss {record['loss']:.5f}", f"lr {record['lr']:.3g}",
             f"grad norm {gn:.4f}" if gn is not None else "grad norm -"]
    if "perf/ms_per_step" in perf:
        parts += [f"{perf['perf/ms_per_step']:.0f} ms/it", f"{perf['perf/tokens_per_s']:.0f} tok/s"]
    if "perf/tflops_per_gpu" in perf:
        parts.append(f"{_num(perf['perf/tflops_per_gpu'])} TFLOP/s/GPU")
    if "perf/mfu" in perf:
        parts.append(f"MFU {100 * perf['perf/mfu']:.1f}%")
    if "perf/peak_mem_gib" in perf:
        parts.append(f"peak mem {perf['perf/peak_mem_gib']:.1f} GiB")
    if "perf/eta_s" in perf:
        parts.append(f"ETA {format_duration(perf['perf/eta_s'])}")
    parts.append(f"consumed {record['consumed_groups']} groups")
    if perf.get("perf/skipped_steps"):
        parts.append(f"{perf['perf/skipped_steps']} updates skipped (NaN/inf loss)")
    return " | ".join(parts) + _objective_metrics(record)


def format_valid_line(record: dict) -> str:
    return f"validation at iter {record['iteration']} | loss {record['valid/loss']:.5f}" + \
        _objective_metrics(record, "valid/")


def _as_valid(record: dict) -> dict:
    """Validation keys under ``valid/`` (they share TensorBoard/wandb with the training scalars)."""
    return {k if k == "iteration" or k.startswith("valid/") else f"valid/{k}": v for k, v in record.items()}


class MetricsLogger(Callback):
    """metrics.jsonl, valid_metrics.jsonl, TensorBoard, wandb and the log line; see the module docstring."""

    def __init__(self):
        self.meter: Optional[IntervalMeter] = None
        self.sinks: Optional[MetricSinks] = None
        self.run_dir: Optional[Path] = None
        self.log_interval = 1
        self.on_gpu = False
        self._peak_mem = 0
        self._last: Optional[dict] = None  # the last record of an interval not logged yet

    # ---- set-up ----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        cfg = trainer.cfg
        self.on_gpu = torch.cuda.is_available()
        device = torch.cuda.get_device_name() if self.on_gpu else None
        dtype = "fp16" if cfg.model.fp16 else "bf16"  # a GPU run is bf16 or fp16 (ModelConfig.options)
        peak = device_peak_tflops(device, dtype)
        self.meter = IntervalMeter(trainer.arch, trainer.end_iteration, on_gpu=self.on_gpu, peak_tflops=peak)
        self.log_interval = cfg.logging.log_interval
        self.end_iteration = trainer.end_iteration
        if not trainer.is_logging_rank:
            return
        if self.on_gpu and peak is None:
            logger.info("no MFU in the log: %s at %s is not in the peak table (throughput.device_peak_tflops)",
                        device, dtype)
        save = cfg.checkpoint.save
        if save:
            self.run_dir = Path(save)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.run_dir, trainer.start_iteration)
        lc = cfg.logging
        self.sinks = MetricSinks(lc.tensorboard_dir, lc.wandb_project, run_name=lc.wandb_exp_name,
                                 config=dataclasses.asdict(cfg), wandb_dir=save, wandb_mode=check_wandb(lc))

    # ---- per step --------------------------------------------------------------------------------------------
    def on_batches(self, trainer, batches: list, forward_only: bool) -> None:
        if not forward_only and self.meter is not None:
            self.meter.observe_batches(batches)

    def on_step_end(self, trainer, record: dict) -> None:
        rates = self.meter.add(record)
        due = record["iteration"] % self.log_interval == 0
        perf = self.meter.summary(record["iteration"], self._peak_memory()) if due else {}
        if not trainer.is_logging_rank:
            return
        line = dict(record, **rates, **perf)
        self._append(METRICS_FILE, line)
        self.sinks.log(line)
        if due:
            self.sinks.flush()
            logger.info("%s", format_train_line(record, perf, self.end_iteration))
            self._last = None
        else:
            self._last = record

    def _peak_memory(self) -> int:
        """Peak memory of the fullest rank (a collective: every rank logs at the same iterations)."""
        local = peak_memory_bytes(self.on_gpu)
        if world_size() > 1:
            device = torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([local], dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            local = int(t.item())
        self._peak_mem = max(self._peak_mem, local)
        return self._peak_mem

    def on_validation_end(self, trainer, record: dict) -> None:
        if not trainer.is_logging_rank:
            return
        rec = _as_valid(record)
        self._append(VALID_METRICS_FILE, rec)
        self.sinks.log(rec)
        logger.info("%s", format_valid_line(rec))

    def on_train_end(self, trainer, stop_reason: Optional[str]) -> None:
        if not trainer.is_logging_rank:
            return
        if self._last is not None and self.meter.pending:  # the last steps of a run that ends between log lines
            perf = self.meter.summary(self._last["iteration"],
                                      max(self._peak_mem, peak_memory_bytes(self.on_gpu)))
            self.sinks.log(dict(perf, iteration=self._last["iteration"]))
            logger.info("%s", format_train_line(self._last, perf, self.end_iteration))
        if self.sinks is not None:
            self.sinks.close()

    def _append(self, name: str, line: dict) -> None:
        if self.run_dir is not None:
            with (self.run_dir / name).open("a") as f:
                f.write(json.dumps(line) + "\n")
