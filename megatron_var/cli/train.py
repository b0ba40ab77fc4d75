"""Training entry point: ``torchrun ... -m megatron_var.cli.train --objective var|sft|dpo ...``.

Flags follow Megatron-LM's names where one exists; VAR's own are prefixed ``--var-``. User errors (bad flags,
missing paths, layouts that do not fit) end with one ``error:`` line and exit code 2, never a traceback.
SIGTERM or SIGUSR1 (SLURM's warning signals), ``--exit-duration-in-mins`` and ``--exit-interval`` stop the run after
the current iteration with a checkpoint and exit code 0; ``--load`` of that directory resumes it, also in another
TP/PP/DP layout or with another --global-batch-size / --train-iters / --epochs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

import torch


class RunLength(argparse.Action):
    """--train-iters and --epochs say the same thing: the one given last wins, so a launcher's
    ``--epochs 2`` is overridden by ``--train-iters 2000`` appended after it (examples/_launch.sh)."""

    def __call__(self, parser, namespace, values, option_string=None):
        for dest in ("train_iters", "epochs"):
            setattr(namespace, dest, None)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_var.cli.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("objective")
    g.add_argument("--objective", choices=["var", "sft", "dpo", "alol"], default="var",
                   help="alol: A-LoL / R-LoL (Baheti et al.), the paper's offline-RL baseline")
    g.add_argument("--var-lambda", type=float, default=1.0, help="λ: rewards enter the weights as r/λ")
    g.add_argument("--var-logp-reduction", choices=["sum", "mean"], default="sum",
                   help="sequence log-prob = sum (paper) or per-token mean of response token log-probs")
    g.add_argument("--cross-pair-method", choices=["shared_prefix", "naive"], default="shared_prefix")
    g.add_argument("--dpo-beta", type=float, default=0.1)
    g.add_argument("--alol-clip", type=float, default=0.2,
                   help="A-LoL: clip the importance weight pi_theta/pi_ref to [1 - eps, 1 + eps]")
    g.add_argument("--alol-variant", choices=["alol", "rlol"], default="alol",
                   help="alol: advantage r - V(x), positive only (V = mean reward of x over its group); "
                        "rlol: the reward itself")
    g = p.add_argument_group("data and checkpoints")
    g.add_argument("--data-path", required=True, help="directory written by tools/prepare_data.py")
    g.add_argument("--load", help="megatron_var checkpoint (converted from HF or saved by training)")
    g.add_argument("--finetune", action="store_true",
                   help="load only the weights of --load and start a fresh run (new optimizer, iteration 0)")
    g.add_argument("--ckpt-step", type=int, help="load this iteration of --load instead of the latest")
    g.add_argument("--ref-load", help="reference checkpoint (default: the policy's initial --load)")
    g.add_argument("--ref-offload", action="store_true", help="keep reference weights on CPU between uses (GPU)")
    g.add_argument("--ref-cache", action="store_true",
                   help="score every group's reference matrix once before training (forward-only, same layout), "
                        "train from <save>/ref_cache.pt (reused on resume); VAR and DPO")
    g.add_argument("--model-arch", help="model_arch.json for a randomly initialised model (no --load)")
    g.add_argument("--save", help="checkpoint directory of this run; a new run into a directory that holds another "
                   "run is refused (resume that run with --load = --save, or see --overwrite)")
    g.add_argument("--save-interval", type=int, help="save every N iterations")
    g.add_argument("--save-interval-mins", type=float,
                   help="also save when N minutes of wall time have passed since the last save")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in --save although it holds another run: DELETES that run's checkpoints, "
                        "metrics and reference cache first")
    g.add_argument("--exit-duration-in-mins", type=float,
                   help="save and exit 0 once the job has run this many minutes (leave time for the save)")
    g.add_argument("--exit-interval", type=int, help="save and exit 0 after an iteration divisible by this")
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=1, help="groups per micro-batch")
    g.add_argument("--global-batch-size", type=int, default=1, help="groups per iteration over all DP ranks")
    g.add_argument("--train-iters", type=int, action=RunLength,
                   help="run length in iterations (a later --train-iters or --epochs replaces an earlier one)")
    g.add_argument("--epochs", type=float, action=RunLength, help="run length in passes over the train split")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--max-nan-skips", type=int, default=10)
    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--no-use-distributed-optimizer", action="store_true")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters (default on GPU; CPU runs use fp32)")
    g.add_argument("--transformer-impl", choices=["auto", "te", "local"], default="auto")
    g.add_argument("--recompute-activations", action="store_true")
    g.add_argument("--no-flex-attention", dest="flex_attention", action="store_false",
                   help="score shared-prefix cross pairs with dense masked SDPA instead of FlexAttention block masks "
                        "(FlexAttention is used only with CUDA, with either --transformer-impl)")
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--eval-interval", type=int, help="validate on the held-out split every N iterations")
    g.add_argument("--eval-iters", type=int, default=10, help="global batches per validation")
    g.add_argument("--tensorboard-dir", help="also write scalars for TensorBoard here")
    g.add_argument("--wandb-project", help="also log to wandb (offline mode when WANDB_API_KEY is unset)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore")
    from megatron_var.runtime import parallel
    from megatron_var.models.gpt import ModelOptions
    from megatron_var.runtime.engine import OptimConfig
    from megatron_var.training.trainer import TrainConfig, Trainer, TrainingDiverged

    try:
        pc = parallel.ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                     args.virtual_pipeline_model_parallel_size, args.sequence_parallel)
        cfg = TrainConfig(objective=args.objective, data_path=args.data_path,
                          micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                          train_iters=args.train_iters, epochs=args.epochs, lr_warmup_iters=args.lr_warmup_iters,
                          lr_decay_style=args.lr_decay_style, seed=args.seed, var_lambda=args.var_lambda,
                          logp_reduction=args.var_logp_reduction, cross_pair_method=args.cross_pair_method,
                          dpo_beta=args.dpo_beta, alol_clip=args.alol_clip, alol_variant=args.alol_variant,
                          load=args.load, finetune=args.finetune, ckpt_step=args.ckpt_step,
                          ref_load=args.ref_load, ref_offload=args.ref_offload, ref_cache=args.ref_cache,
                          model_arch=args.model_arch, save=args.save,
                          save_interval=args.save_interval, save_interval_mins=args.save_interval_mins,
                          log_interval=args.log_interval,
                          max_nan_skips=args.max_nan_skips, tensorboard_dir=args.tensorboard_dir,
                          wandb_project=args.wandb_project, eval_interval=args.eval_interval,
                          eval_iters=args.eval_iters, overwrite=args.overwrite,
                          exit_duration_in_mins=args.exit_duration_in_mins, exit_interval=args.exit_interval)
        optim = OptimConfig(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, clip_grad=args.clip_grad,
                            use_distributed_optimizer=not args.no_use_distributed_optimizer)
        bf16 = args.bf16 or torch.cuda.is_available()
        options = ModelOptions(params_dtype="bf16" if bf16 else "fp32", transformer_impl=args.transformer_impl,
                               recompute_granularity="full" if args.recompute_activations else None,
                               flex_attention=args.flex_attention)
        parallel.init_distributed()
        parallel.init_model_parallel(pc)
        parallel.seed_everything(args.seed)
        Trainer(cfg, pc, optim, options).train()
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
