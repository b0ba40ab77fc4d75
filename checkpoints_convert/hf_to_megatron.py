#!/usr/bin/env python
"""Convert an HF Llama 2/3.x or Qwen2/2.5 checkpoint into a megatron_var (megatron-core dist) checkpoint.

    python checkpoints_convert/hf_to_megatron.py --hf-dir HF_DIR --out MEG_DIR [--dtype bf16|fp16|fp32]

The same command as `megatron-var-hf-to-megatron`; the code is megatron_var/cli/hf_to_megatron.py."""

from megatron_var.cli.hf_to_megatron import cli

if __name__ == "__main__":
    cli()
