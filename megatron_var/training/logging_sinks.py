"""Metric sinks next to metrics.jsonl: TensorBoard and wandb, on the logging rank only.

wandb is checked before the model is built (``check_wandb``, from the Trainer's construction): a missing package is
a one-line error before minutes of model building and checkpoint loading, not after. The run goes online when wandb
itself finds credentials — WANDB_API_KEY, or the netrc entry ``wandb login`` wrote (wandb's own lookup, so its hosts
and file locations apply) — and offline otherwise, with a warning saying so and how to upload later. An explicit
WANDB_MODE (offline, disabled, online) is the user's choice and wins.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch.distributed as dist

logger = logging.getLogger(__name__)

WANDB_MISSING = "--wandb-project needs wandb: pip install 'megatron_var[wandb]'"
_warned_offline = False


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ValueError(WANDB_MISSING) from e
    return wandb


def _is_rank0() -> bool:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def wandb_credentials(wandb) -> Optional[str]:
    """Where wandb would find an API key (``'WANDB_API_KEY'``, ``'netrc'``, ``'settings'``), or None. Read-only:
    never prompts, writes or contacts the server."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth  # newer wandb: wandb.api.api_key is deprecated there and warns
    except ImportError:
        return "netrc" if wandb.api.api_key else None  # older wandb: env, settings file and netrc
    settings = wandb_setup.singleton().settings
    if wbauth.read_netrc_auth(host=settings.base_url):
        return "netrc"
    return "settings" if settings.api_key else None


def check_wandb(logging_cfg, warn: Optional[bool] = None) -> Optional[str]:
    """The wandb mode of this run ('online', 'offline', or WANDB_MODE), None without --wandb-project.

    Call before building the model. Raises ValueError when wandb is not installed. Without credentials the run
    logs offline, and the logging rank (``warn`` None: global rank 0) warns once per process.
    """
    if not logging_cfg.wandb_project:
        return None
    return _wandb_mode(_import_wandb(), warn)


def _wandb_mode(wandb, warn: Optional[bool]) -> str:
    global _warned_offline
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    try:
        source = wandb_credentials(wandb)
    except Exception as e:  # e.g. an API key in netrc in a format wandb rejects
        logger.warning("wandb could not read its credentials (%s)", e)
        source = None
    if source is not None:
        return "online"
    if (_is_rank0() if warn is None else warn) and not _warned_offline:
        _warned_offline = True
        logger.warning("wandb: no credentials (neither WANDB_API_KEY nor a `wandb login`); this run logs offline — "
                       "upload it later with `wandb sync <dir>/wandb/offline-run-*`")
    return "offline"


class MetricSinks:
    """TensorBoard and/or wandb scalars; each ``log`` takes a record with an ``iteration`` and logs its numbers."""

    def __init__(self, tensorboard_dir: Optional[str] = None, wandb_project: Optional[str] = None,
                 run_name: Optional[str] = None, config: Optional[dict] = None, wandb_dir: Optional[str] = None,
                 wandb_mode: Optional[str] = None):
        self.tb = None
        self.wandb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            wandb = _import_wandb()
            wandb_mode = wandb_mode or _wandb_mode(wandb, warn=None)
            if wandb_dir and not os.environ.get("WANDB_DIR"):
                os.makedirs(wandb_dir, exist_ok=True)
            else:
                wandb_dir = None
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config or {}, mode=wandb_mode,
                                    dir=wandb_dir)
            logger.info("wandb run %s in %s mode", getattr(self.wandb, "name", "?"), wandb_mode)

    def log(self, record: dict) -> None:
        step = int(record["iteration"])
        scalars = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and k != "iteration"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def flush(self) -> None:
        """Push TensorBoard's buffered events to disk (a crash loses at most the current log interval)."""
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
