"""torch.distributed + megatron-core ``parallel_state`` set-up from the standard torchrun environment.

Why one module: every entry point (training, scoring, conversion checks, tests) needs the same decisions —
NCCL and one GPU per local rank when CUDA is present, otherwise gloo plus the CPU mode — and the same clear errors
for parallel sizes that do not fit the world.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_var.runtime.platform import cpu

logger = logging.getLogger(__name__)


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism is whatever is left of the world."""

    tensor_model_parallel_size: int = 1
    """Shards each weight matrix over this many ranks (Megatron TP)."""
    pipeline_model_parallel_size: int = 1
    """Splits the layers into this many stages (Megatron PP)."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank for the interleaved schedule (Megatron VPP); None = not interleaved."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in TP regions (needs TP > 1)."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp > 1 and self.pipeline_model_parallel_size < 2:
            raise ValueError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size >= 2")
        if self.virtual_pipeline_model_parallel_size == 1:
            self.virtual_pipeline_model_parallel_size = None
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # as Megatron-LM does: SP is meaningless without TP

    @property
    def sequence_multiple(self) -> int:
        """Rows must be a multiple of this many tokens: sequence parallelism splits the sequence over TP ranks."""
        return self.tensor_model_parallel_size if self.sequence_parallel else 1

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size} = {self.model_parallel_size}"
            )
        return world_size // self.model_parallel_size


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Initialise torch.distributed from torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Without torchrun a single-process world is created, so tools also run as plain ``python``.
    CUDA present: NCCL, one device per local rank. Otherwise: gloo and the CPU mode, logged once.
    """
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        cpu.enable()
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if dist.get_rank() == 0:
        logger.info("torch.distributed: backend=%s world_size=%d", backend, dist.get_world_size())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_GROUPS_BEFORE_INIT: set = set()


def _live_groups() -> set:
    """torch.distributed's process groups other than the default one."""
    world = dist.group.WORLD
    return {pg for pg in dist.distributed_c10d._world.pg_map if pg is not world}


def init_model_parallel(config: ParallelConfig, timeout_minutes: int = 30) -> None:
    """Create megatron-core's TP/PP/DP groups for ``config`` (torch.distributed must be initialised)."""
    from megatron.core import parallel_state

    world = dist.get_world_size()
    config.data_parallel_size(world)  # raises a clear ValueError when the layout does not fit
    _GROUPS_BEFORE_INIT.clear()
    _GROUPS_BEFORE_INIT.update(_live_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=torch.cuda.is_available(),  # with gloo as default they would be duplicates
    )


def destroy_model_parallel() -> None:
    """Tear down megatron's groups (and the process groups behind them) so another layout can be built in the
    same process.

    ``destroy_model_parallel`` leaves ``_EMBEDDING_GLOBAL_RANKS`` behind; stale values make middle PP stages
    believe they hold the embedding, so they are reset here too.
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state._EMBEDDING_GLOBAL_RANKS = None
    parallel_state._POSITION_EMBEDDING_GLOBAL_RANKS = None
    # megatron forgets its groups without destroying them; each gloo group keeps its sockets and threads (a test
    # process that built 30 layouts held ~1900 threads and ran 20x slower), so destroy the ones init created.
    gc.collect()  # models of this layout that are no longer referenced release their groups now
    if dist.is_initialized():
        dist.barrier()
        for pg in _live_groups() - _GROUPS_BEFORE_INIT:
            dist.destroy_process_group(pg)
    _GROUPS_BEFORE_INIT.clear()


def process_groups():
    """megatron-core's ``ProcessGroupCollection`` of the current layout, to hand to the model, DDP and our own
    data sharding explicitly instead of each reading megatron's global state."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def holds_results() -> bool:
    """Whether this rank holds one copy of per-sample results: last pipeline stage, tensor-parallel rank 0 (one
    such rank per data-parallel replica; gathering from these alone collects every result exactly once)."""
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
        parallel_state.get_tensor_model_parallel_rank() == 0


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron's TP RNG tracker (distinct TP streams, same DP streams)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
