"""Optional metric sinks next to metrics.jsonl: TensorBoard and wandb (offline when no API key), rank 0 only."""

from __future__ import annotations

import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)


class MetricSinks:
    def __init__(self, tensorboard_dir: Optional[str] = None, wandb_project: Optional[str] = None,
                 run_name: Optional[str] = None, config: Optional[dict] = None):
        self.tb = None
        self.wandb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("--wandb-project needs the wandb package: pip install 'megatron_var[wandb]'") from e
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config or {}, mode=mode)
            logger.info("wandb run in %s mode", mode)

    def log(self, record: dict) -> None:
        step = record["iteration"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
