"""Training entry point: ``torchrun ... -m megatron_var.train --objective var|sft|dpo|alol ...``.

Every flag is generated from the run's configuration (megatron_var/training/config.py: one argument group per
part, --help text = the field's documentation, defaults from the dataclasses). Flags follow Megatron-LM's names
where one exists; VAR's own are prefixed --var-. User errors (bad flags, missing paths, layouts that do not fit)
end with one error: line and exit code 2, never a traceback; a diverged run (too many NaN losses) exits 3.
SIGTERM or SIGUSR1 (SLURM's warning signals), --exit-duration-in-mins and --exit-interval stop the run after the
current iteration with a checkpoint and exit code 0; --load of that directory resumes it, also in another TP/PP/DP
layout or with another --global-batch-size / --train-iters / --train-samples / --epochs.
"""

from __future__ import annotations

import argparse
import sys

from megatron_var.runtime.logs import quiet_known_warnings, setup_logging

quiet_known_warnings()  # before the imports below: they load megatron-core, which warns at import

from megatron_var.cli import config_args  # noqa: E402  (after the filter: these imports load megatron-core)
from megatron_var.training.config import TrainConfig  # noqa: E402

PROG = "python -m megatron_var.train"


def build_parser() -> argparse.ArgumentParser:
    """The trainer's parser, generated from ``TrainConfig``; ``config_from_args`` turns its result into one."""
    return config_args.build_parser(TrainConfig, prog=PROG, description=__doc__)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration from parsed flags (ValueError for a bad value or combination)."""
    return config_args.config_from_args(args, TrainConfig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)  # every check that needs no process group, before one exists
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logging()  # INFO on global rank 0 (torchrun's RANK), warnings only elsewhere
    from megatron_var.runtime import parallel
    from megatron_var.training.trainer import Trainer, TrainingDiverged

    try:
        parallel.init_distributed()
        parallel.init_model_parallel(cfg.parallel)
        parallel.seed_everything(cfg.data.seed)
        Trainer(cfg).train()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


def cli() -> None:
    """Console-script entry point ([project.scripts] in pyproject.toml)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
