"""``megatron-var-memory``: will this layout fit? Prints the per-GPU memory estimate and a verdict.

Flags follow Megatron-LM / ``megatron_var.cli.train`` names, so a launcher's flags can be pasted as they are
(``--recompute-granularity``, ``--recompute-activations``, ``--ref-offload``, ``--ref-cache``,
``--no-use-distributed-optimizer`` are accepted).
Exit code: 0 fits, 1 does not fit, 2 bad flags (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megatron_var.cli.common import run_cli
from megatron_var.memory.estimate import Layout, Precision, Workload, estimate
from megatron_var.models.arch import ModelArch, arch_from_hf_config

if TYPE_CHECKING:  # the training config imports megatron-core; the estimator CLI starts without it
    from megatron_var.training.config import TrainConfig

PRESETS_DIR = Path(__file__).resolve().parents[1] / "memory" / "presets"


def presets() -> list[str]:
    """Names of the bundled public HF configs (``megatron_var/memory/presets/<name>.json``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_arch(hf_config: Optional[str] = None, model_arch: Optional[str] = None,
              preset: Optional[str] = None) -> ModelArch:
    """The model from exactly one of: an HF config.json, a megatron_var model_arch.json, a bundled preset."""
    if sum(x is not None for x in (hf_config, model_arch, preset)) != 1:
        raise ValueError("give exactly one of --hf-config, --model-arch, --preset")
    if model_arch is not None:
        return ModelArch.load(Path(model_arch))
    if preset is not None:
        if preset not in presets():
            raise ValueError(f"unknown --preset {preset!r}; bundled: {', '.join(presets())}")
        hf_config = str(PRESETS_DIR / f"{preset}.json")
    try:
        return arch_from_hf_config(json.loads(Path(hf_config).read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read --hf-config {hf_config}: {e}") from e
    except KeyError as e:
        raise ValueError(f"--hf-config {hf_config} lacks {e}") from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-var-memory", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model (one of)")
    g.add_argument("--hf-config", help="Hugging Face config.json")
    g.add_argument("--model-arch", help="megatron_var model_arch.json")
    g.add_argument("--preset", help="bundled public config: " + ", ".join(presets()))
    g = p.add_argument_group("layout")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--data-parallel-size", type=int,
                   help="default: --num-gpus / (TP x PP), or 1")
    g.add_argument("--num-gpus", type=int, help="world size (nodes x GPUs per node)")
    g = p.add_argument_group("workload")
    g.add_argument("--objective", choices=["var", "sft", "dpo"], default="var")
    g.add_argument("--cross-pair-method", choices=["shared_prefix", "naive"], default="shared_prefix")
    g.add_argument("--group-size", type=int, help="B, samples per group (default 8; 2 for dpo)")
    g.add_argument("--micro-batch-size", type=int, default=1, help="groups per micro-batch")
    g.add_argument("--global-batch-size", type=int, help="groups per step over all DP ranks (sets the number of "
                                                         "micro-batches; default: enough to fill the pipeline)")
    g.add_argument("--seq-length", type=int,
                   help="prepare_data's --seq-length S (max prompt + response); the split is --response-length, "
                        "default S/2")
    g.add_argument("--prompt-length", type=int, help="P, longest prompt")
    g.add_argument("--response-length", type=int, help="R, longest response")
    g = p.add_argument_group("precision and memory savers")
    g.add_argument("--params-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    g.add_argument("--bf16", action="store_true", help="same as --params-dtype bf16 (the GPU default)")
    g.add_argument("--recompute-granularity", choices=["none", "selective", "full"], default="none")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron-LM's shorthand for --recompute-granularity selective (as the trainer's)")
    g.add_argument("--no-use-distributed-optimizer", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="(the default)")
    g.add_argument("--ref", choices=["resident", "offloaded", "cached"], default="resident",
                   help="reference placement")
    g.add_argument("--ref-offload", action="store_true", help="the trainer's flag: --ref offloaded")
    g.add_argument("--ref-cache", action="store_true", help="the trainer's flag: --ref cached")
    g.add_argument("--transformer-impl", choices=["te", "local"], default="te",
                   help="te: the GPU image; local: our spec (CPU, or a GPU without Transformer Engine)")
    g.add_argument("--no-flex-attention", dest="flex_attention", action="store_false",
                   help="shared-prefix rows with a dense mask (always so with --transformer-impl te)")
    g.add_argument("--attention", choices=["fused", "unfused"], default="fused",
                   help="unfused: count the s x s attention scores")
    g.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: no fused kernels, no overhead (what the CPU validation measures)")
    g.add_argument("--overhead-gib", type=float, help="CUDA context, NCCL, fragmentation (default 2; 0 on cpu)")
    g = p.add_argument_group("verdict")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory in GiB (80 GB class cards)")
    g.add_argument("--margin", type=float, default=0.10, help="fraction of the GPU to keep free")
    return p


def from_args(args: argparse.Namespace) -> tuple[ModelArch, Layout, Workload, Precision]:
    """The estimator's inputs from parsed flags (ValueError with the flag's name on nonsense)."""
    arch = load_arch(args.hf_config, args.model_arch, args.preset)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    dp = args.data_parallel_size
    if args.num_gpus is not None:
        if args.num_gpus < 1 or args.num_gpus % (tp * pp):
            raise ValueError(f"--num-gpus {args.num_gpus} is not a multiple of TP x PP = {tp * pp}")
        if dp is not None and dp != args.num_gpus // (tp * pp):
            raise ValueError(f"--data-parallel-size {dp} contradicts --num-gpus {args.num_gpus} / (TP x PP)")
        dp = args.num_gpus // (tp * pp)
    layout = Layout(tp, pp, args.virtual_pipeline_model_parallel_size, args.sequence_parallel, dp or 1)
    if args.seq_length is not None:
        if args.prompt_length is not None:
            raise ValueError("give --seq-length (with an optional --response-length) or --prompt-length and "
                             "--response-length, not both")
        if args.seq_length < 2:
            raise ValueError(f"--seq-length must be >= 2, got {args.seq_length}")
        response = args.response_length if args.response_length is not None else args.seq_length // 2
        if not 1 <= response < args.seq_length:
            raise ValueError(f"--response-length {response} must be in [1, --seq-length {args.seq_length})")
        prompt = args.seq_length - response
    else:
        if args.prompt_length is None or args.response_length is None:
            raise ValueError("give --seq-length, or both --prompt-length and --response-length")
        prompt, response = args.prompt_length, args.response_length
    micro = None
    if args.global_batch_size is not None:
        per = args.micro_batch_size * layout.data_parallel_size
        if args.global_batch_size < 1 or args.global_batch_size % per:
            raise ValueError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                             f"--micro-batch-size x data-parallel size = {per}")
        micro = args.global_batch_size // per
    group = args.group_size if args.group_size is not None else (2 if args.objective == "dpo" else 8)
    work = Workload(args.objective, group, args.micro_batch_size, prompt, response, micro, args.cross_pair_method)
    if args.ref_offload and args.ref_cache:
        raise ValueError("--ref-offload and --ref-cache exclude each other")
    ref = "offloaded" if args.ref_offload else "cached" if args.ref_cache else args.ref
    if args.use_distributed_optimizer and args.no_use_distributed_optimizer:
        raise ValueError("--use-distributed-optimizer and --no-use-distributed-optimizer exclude each other")
    if args.gpu_memory_gb <= 0 or not 0 <= args.margin < 1:
        raise ValueError("--gpu-memory-gb must be > 0 and --margin in [0, 1)")
    if args.recompute_activations and args.recompute_granularity == "full":
        raise ValueError("--recompute-activations means --recompute-granularity selective; "
                         "it conflicts with --recompute-granularity full")
    cpu = args.device == "cpu"
    prec = Precision(
        params_dtype="bf16" if args.bf16 else args.params_dtype,
        use_distributed_optimizer=not args.no_use_distributed_optimizer,
        recompute_granularity="selective" if args.recompute_activations else args.recompute_granularity,
        ref=ref, transformer_impl=args.transformer_impl, fused_kernels=not cpu, attention=args.attention,
        # TE gets the dense mask (models/gpt.py); FlexAttention runs only with the local spec on CUDA
        flex_attention=args.flex_attention and args.transformer_impl == "local" and not cpu,
        overhead_gib=args.overhead_gib if args.overhead_gib is not None else (0.0 if cpu else 2.0))
    return arch, layout, work, prec


def main(argv=None) -> int:
    """Exit 0 when the layout fits, 1 when it does not, 2 (one ``error:`` line) for bad flags or files."""
    return run_cli(_estimate_and_print, argv)


def _estimate_and_print(argv) -> int:
    args = build_parser().parse_args(argv)
    arch, layout, work, prec = from_args(args)
    est = estimate(arch, layout, work, prec)
    vpp = layout.virtual_pipeline_model_parallel_size
    print(f"model: {arch.family}, {arch.num_layers} layers, hidden {arch.hidden_size}, vocab {arch.padded_vocab_size}"
          f" | TP {layout.tensor_model_parallel_size} PP {layout.pipeline_model_parallel_size}"
          f"{f' VPP {vpp}' if vpp else ''}"
          f" DP {layout.data_parallel_size}{' SP' if layout.sequence_parallel else ''} | {work.objective}, "
          f"B={work.group_size}, micro-batch {work.micro_batch_size} group(s), P={work.prompt_length} "
          f"R={work.response_length} | {prec.params_dtype}, recompute {prec.recompute_granularity}, "
          f"{'distributed' if prec.use_distributed_optimizer else 'replicated'} optimizer, reference {prec.ref}")
    print(est.table(args.gpu_memory_gb, args.margin))
    return 0 if est.fits(args.gpu_memory_gb, args.margin) else 1


def from_train_args(cfg: TrainConfig, arch: ModelArch, num_gpus: int, seq_length: int,
                    response_length: Optional[int] = None, group_size: Optional[int] = None
                    ) -> tuple[Layout, Workload, Precision]:
    """The estimator's inputs for a training run's configuration (``megatron_var.cli.train``'s command line:
    ``train.config_from_args(train.build_parser().parse_args(argv))``) on ``num_gpus`` GPUs with the Transformer
    Engine image, at data prepared with ``--seq-length seq_length`` (responses of ``response_length``, default half
    of it)."""
    pc, data = cfg.parallel, cfg.data
    tp, pp = pc.tensor_model_parallel_size, pc.pipeline_model_parallel_size
    if num_gpus % (tp * pp):
        raise ValueError(f"{num_gpus} GPUs are not a multiple of TP x PP = {tp * pp}")
    layout = Layout(tp, pp, pc.virtual_pipeline_model_parallel_size, pc.sequence_parallel, num_gpus // (tp * pp))
    response = response_length if response_length is not None else seq_length // 2
    per = data.micro_batch_size * layout.data_parallel_size
    if data.global_batch_size % per:
        raise ValueError(f"--global-batch-size {data.global_batch_size} is not a multiple of micro-batch x DP = {per}")
    objective = cfg.objective.name
    group = group_size if group_size is not None else (2 if objective == "dpo" else 8)
    work = Workload(objective, group, data.micro_batch_size, seq_length - response, response,
                    data.global_batch_size // per, cfg.reference.cross_pair_method)
    impl = "local" if cfg.model.transformer_impl == "local" else "te"
    ref = cfg.reference
    prec = Precision(params_dtype="fp16" if cfg.model.fp16 else "bf16",
                     use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
                     recompute_granularity=cfg.model.recompute_granularity or "none",
                     ref="offloaded" if ref.ref_offload else "cached" if ref.ref_cache else "resident",
                     transformer_impl=impl, fused_kernels=True, attention="fused",
                     flex_attention=impl == "local" and cfg.model.flex_attention)
    return layout, work, prec


def cli() -> None:
    """Console-script entry point ([project.scripts] in pyproject.toml)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
