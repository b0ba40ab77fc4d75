#!/usr/bin/env python
"""Export a megatron_var checkpoint (converted or trained, any TP/PP) as an HF model directory.

    python checkpoints_convert/megatron_to_hf.py --load MEG_DIR --out HF_DIR [--dtype bf16|fp16|fp32]

Writes config.json, generation_config.json and tokenizer files (kept in MEG_DIR/hf), sharded *.safetensors and
model.safetensors.index.json. Logic in megatron_var/convert/export_hf.py.
"""

import argparse
import sys
from pathlib import Path

from megatron_var.cli.common import run_cli_cleaning_up


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="megatron_var checkpoint directory (converter or --save of training)")
    p.add_argument("--out", required=True, help="HF model directory to create")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="weights dtype (default: the original HF checkpoint's dtype)")
    p.add_argument("--iteration", type=int, default=None,
                   help="iteration to export (default: latest_checkpointed_iteration.txt)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB, as transformers)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megatron_var.convert.export_hf import convert_megatron_to_hf

    args = parse_args(argv)
    out = convert_megatron_to_hf(args.load, args.out, args.dtype, args.iteration, args.overwrite,
                                 args.max_shard_size, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def cli() -> None:
    """Console-script entry point ([project.scripts] in pyproject.toml)."""
    sys.exit(run_cli_cleaning_up(main))


if __name__ == "__main__":
    cli()
