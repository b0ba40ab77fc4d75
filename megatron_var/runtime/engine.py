"""megatron-core's DDP, distributed optimizer and pipeline schedules, wired the way Megatron-LM wires them.

Why here: the trainer, the layout-invariance tests and the benchmark must drive exactly the same code path, and
megatron-core leaves the wiring (finalize hooks, no_sync, per-token loss normalisation) to the caller.

Loss contract: every ``loss_func`` returns ``(loss_sum, num_units, report)`` and ``calculate_per_token_loss`` is on,
so megatron divides the summed gradient by the number of units of the whole global batch (all micro-batches, all
DP ranks). The gradient of a global batch therefore does not depend on how it is split into micro-batches, gradient
accumulation steps or DP ranks; "unit" is a token for SFT and a sample for VAR/DPO.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func


@dataclass
class OptimConfig:
    """AdamW and gradient settings (Megatron-LM flag names)."""

    lr: float = 1e-5
    """Peak learning rate (after warmup)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (and held after --lr-decay-iters)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay."""
    adam_beta2: float = 0.95
    """Adam's second-moment decay."""
    adam_eps: float = 1e-8
    """Adam's epsilon (added to the denominator's square root)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the DP gradient reduction with backward (pays off on GPUs; also correct on CPU/gloo)."""
    # with it the last step's weights arrive lazily (next forward's pre-hooks): sync_params before reading them
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward (needs
    --overlap-grad-reduce, as in Megatron-LM)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"--min-lr must be in [0, --lr], got {self.min_lr}")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0, got {self.clip_grad}")
        if self.adam_eps <= 0:
            raise ValueError(f"--adam-eps must be > 0, got {self.adam_eps}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.overlap_param_gather:
            if not self.use_distributed_optimizer:
                raise ValueError("--overlap-param-gather needs the distributed optimizer "
                                 "(drop --no-use-distributed-optimizer)")
            if not self.overlap_grad_reduce:
                raise ValueError("--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")


def wrap_ddp(chunks: list[torch.nn.Module], optim: OptimConfig, pg_collection=None) -> list[DistributedDataParallel]:
    """megatron DDP per model chunk (fp32 gradient buffers); the first chunk owns bucketing (as Megatron-LM).
    ``pg_collection``: the data-parallel groups to reduce in (None = megatron's global ones)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=optim.overlap_grad_reduce,
        overlap_param_gather=optim.overlap_param_gather,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0,
                                pg_collection=pg_collection)
        for i, c in enumerate(chunks)
    ]


def build_optimizer(ddp_chunks: list[DistributedDataParallel], optim: OptimConfig):
    """megatron AdamW (decoupled weight decay) over the DDP chunks; distributed when configured."""
    config = ddp_chunks[0].config
    oc = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        decoupled_weight_decay=True,
    )
    # megatron's global groups, not an explicit collection: megatron-core refuses gloo side groups next to one, and
    # on GPU the distributed optimizer gathers its checkpoint state over those gloo groups
    optimizer = get_megatron_optimizer(oc, ddp_chunks, use_gloo_process_groups=torch.cuda.is_available())
    install_schedule_hooks(ddp_chunks, optimizer)
    return optimizer


def sync_params(model: list[torch.nn.Module]) -> None:
    """Make every rank's model weights those of the last optimizer step; all data-parallel ranks must call it.

    With ``overlap_param_gather`` the distributed optimizer updates only this rank's shard and the other shards
    arrive lazily, in the forward pre-hooks of the next forward pass; a checkpoint saved (or weights read) right
    after a step would hold the previous step's values for them. A no-op without overlap. Megatron-LM does the
    same before saving (``disable_forward_pre_hook(model)``: a forced synchronous all-gather).
    """
    with torch.no_grad():
        for m in model:
            if isinstance(m, DistributedDataParallel) and m.ddp_config.overlap_param_gather:
                m.start_param_sync(force_sync=True)


def install_schedule_hooks(model: list[torch.nn.Module], optimizer=None) -> None:
    """Set the callbacks the pipeline schedules read from the config (as Megatron-LM's training loop does)."""
    config = model[0].config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    if isinstance(model[0], DistributedDataParallel):
        no_sync = [m.no_sync for m in model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if optimizer is not None:
        # weakly: megatron's optimizer holds views of the model's params whose autograd graph ends in the nodes that
        # carry DDP's gradient hooks, so a strong config -> optimizer link closes a cycle through C++ objects that gc
        # cannot collect (the model, its process groups and their threads would outlive the run)
        opt_ref = weakref.ref(optimizer)
        config.grad_scale_func = lambda loss: opt_ref().scale_loss(loss)


def run_schedule(forward_step: Callable, microbatches: list, model: list[torch.nn.Module], *,
                 forward_only: bool, seq_length: int, micro_batch_size: int) -> list:
    """One pass of megatron's schedule over ``microbatches``; returns the loss reports (last PP stage only).

    Each virtual-pipeline chunk gets its own iterator over the same micro-batches, as the interleaved schedule
    expects.
    """
    for m in model:
        m.config.calculate_per_token_loss = True
    if not forward_only:
        for m in model:
            if hasattr(m, "zero_grad_buffer"):
                m.zero_grad_buffer()
    iterators = [iter(microbatches) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def sum_reports(reports: Iterable[dict], keys: Optional[Iterable[str]] = None) -> dict[str, float]:
    """Add up per-micro-batch report values (tensors or floats) by key; non-scalar tensors (per-sample values)
    are not sums and are skipped."""
    out: dict[str, float] = {}
    for r in reports:
        for k, v in r.items():
            if torch.is_tensor(v) and v.numel() != 1:
                continue
            if keys is None or k in keys:
                out[k] = out.get(k, 0.0) + float(v)
    return out
