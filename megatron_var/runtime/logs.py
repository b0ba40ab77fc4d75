"""Process-wide logging set-up for the command-line tools: one readable log, not one per rank.

Global rank 0 logs INFO and up with a timestamp; every other rank only WARNING and up, tagged with its rank, so a
64-GPU job prints each progress line once while a rank's own problem still shows (and says whose it is). The rank
comes from torchrun's RANK before torch.distributed exists, so even the start-up messages are filtered.

``quiet_known_warnings`` hides the few third-party warnings every run prints and nobody can act on, one by one:
a blanket ``warnings.filterwarnings("ignore")`` would hide the warnings that matter too.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from typing import Optional

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_MARK = "_megatron_var_handler"


def setup_logging(rank: Optional[int] = None) -> None:
    """Configure the root logger for this process: INFO on global rank 0, WARNING elsewhere (``rank`` None: the
    RANK environment variable, 0 without one). Calling it again (e.g. once the rank is known) updates the set-up.

    The level goes on the root logger and on our stderr handler: the handler's level also holds back a library
    logger that set its own level to INFO. Other handlers already on the root logger (pytest's capture, an earlier
    ``basicConfig``) are left alone."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    fmt = FORMAT if rank == 0 else f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    root.setLevel(level)
    ours = [h for h in root.handlers if getattr(h, _MARK, False)]
    if not ours and root.handlers:
        return
    handler = ours[0] if ours else logging.StreamHandler()
    setattr(handler, _MARK, True)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(fmt, DATE_FORMAT))
    if not ours:
        root.addHandler(handler)


def quiet_known_warnings() -> None:
    """Hide the third-party warnings every run prints and no user can act on, each by message, category and
    module; any other warning still shows (no blanket ``filterwarnings("ignore")``)."""
    # megatron-core without Transformer Engine / apex (CPU, a pip install): its torch fallbacks are what we run
    warnings.filterwarnings("ignore", r"(Transformer Engine and Apex are|Apex is) not installed", UserWarning,
                            r"megatron\.core")
    # megatron-core's own default cuda_graph_scope trips its deprecation of that scope (we set no CUDA graphs)
    warnings.filterwarnings("ignore", r"full scope is deprecated", UserWarning, r"megatron\.core")
    # raised by merely importing megatron.core.optimizer (it imports the MIMO configs); we do not use MIMO
    warnings.filterwarnings("ignore", r"MimoModelConfig is experimental", UserWarning, r"megatron\.core")
    # megatron-core's distributed optimizer still calls the old collective names; torch renamed them
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                            r"deprecated", FutureWarning, r"torch\.distributed")
    # megatron-core's dist-checkpointing builds torch ShardedTensors (its format); torch asks users to move to DTensor
    warnings.filterwarnings("ignore", r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning)
    # megatron-core reads .grad of the fp32 main-param views while zeroing/copying grads (it uses main_grad)
    warnings.filterwarnings("ignore", r"The \.grad attribute of a Tensor that is not a leaf Tensor", UserWarning)
    # torch.distributed.checkpoint notices on the calls megatron-core makes and on our single-process metadata reads
    warnings.filterwarnings("ignore", r"The argument order of load has been changed", UserWarning)
    warnings.filterwarnings("ignore", r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning)
    if not torch.cuda.is_available():
        # a CUDA stream tuning hint from megatron's TP layers: there are no CUDA streams on a CPU run
        warnings.filterwarnings("ignore", r".*CUDA_DEVICE_MAX_CONNECTIONS", UserWarning, r"megatron\.core")
