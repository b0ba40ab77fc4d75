"""``python -m megatron_var.train``: the trainer under Megatron-LM's spelling (``pretrain_gpt.py``-style module);
the code, flags and ``--help`` are megatron_var/cli/train.py's."""

from megatron_var.cli.train import cli

if __name__ == "__main__":
    cli()
