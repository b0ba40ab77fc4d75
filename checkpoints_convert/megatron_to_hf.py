#!/usr/bin/env python
"""Export a megatron_var checkpoint (converted or trained, any TP/PP) as an HF model directory.

    python checkpoints_convert/megatron_to_hf.py --load MEG_DIR --out HF_DIR [--dtype bf16|fp16|fp32]

Writes config.json, generation_config.json and tokenizer files (kept in MEG_DIR/hf), sharded *.safetensors and
model.safetensors.index.json.

The same command as `megatron-var-megatron-to-hf`; the code is megatron_var/cli/megatron_to_hf.py."""

from megatron_var.cli.megatron_to_hf import cli

if __name__ == "__main__":
    cli()
