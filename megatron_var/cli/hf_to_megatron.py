#!/usr/bin/env python
"""Convert an HF Llama 2/3.x or Qwen2/2.5 checkpoint into a megatron_var (megatron-core dist) checkpoint.

    python checkpoints_convert/hf_to_megatron.py --hf-dir HF_DIR --out MEG_DIR [--dtype bf16|fp16|fp32]

Logic in megatron_var/convert/import_hf.py; output layout in megatron_var/checkpoint/layout.py.
"""

import argparse
import sys
from pathlib import Path

from megatron_var.cli.common import run_cli_cleaning_up


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors + tokenizer)")
    p.add_argument("--out", required=True, help="megatron_var checkpoint directory to create")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="only checked: the model must split into this many TP ranks (heads, KV heads, FFN). "
                        "The checkpoint itself is layout-free and loads at any TP/PP.")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="only checked: the layers must split into this many pipeline stages")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="stored dtype (default: the HF checkpoint's own, so a round trip is bitwise)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    from megatron_var.convert.import_hf import convert_hf_to_megatron

    args = parse_args(argv)
    out = convert_hf_to_megatron(args.hf_dir, args.out, args.tensor_model_parallel_size,
                                 args.pipeline_model_parallel_size, args.dtype, args.overwrite,
                                 progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def cli() -> None:
    """Console-script entry point ([project.scripts] in pyproject.toml)."""
    sys.exit(run_cli_cleaning_up(main))


if __name__ == "__main__":
    cli()
