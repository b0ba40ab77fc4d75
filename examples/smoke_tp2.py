"""TP=2 training smoke run on CPU (gloo): a tiny Llama-shaped megatron-core GPTModel, a few AdamW steps of SFT on a
bundled toy sequence task through megatron's schedule, DDP and distributed optimizer. Prints loss per step.

Run: torchrun --nproc_per_node 2 examples/smoke_tp2.py   (the README's first command wraps it)
"""

import logging
import warnings

import torch

from megatron_var import parallel
from megatron_var.models.arch import ModelArch
from megatron_var.models.gpt import ModelOptions, build_model_chunks
from megatron_var.training.engine import OptimConfig, build_optimizer, run_schedule, sum_reports, wrap_ddp
from megatron_var.training.step import make_forward_step, sft_reduce


def toy_batches(n: int, b: int = 4, s: int = 24, vocab: int = 100) -> list[dict]:
    """Counting sequences (t, t+1, t+2, ...): learnable, so the loss must fall."""
    starts = torch.arange(n * b).reshape(n, b, 1) % (vocab - s - 1)
    seqs = starts + torch.arange(s + 1)
    return [{"tokens": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
             "loss_mask": torch.ones(b, s)} for x in seqs]


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    parallel.init_distributed()
    pc = parallel.ParallelConfig(tensor_model_parallel_size=2)
    parallel.init_model_parallel(pc)
    parallel.seed_everything(0)
    arch = ModelArch(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, kv_channels=16, vocab_size=100, max_position_embeddings=256)
    optim = OptimConfig(lr=3e-3, clip_grad=1.0)
    model = wrap_ddp(build_model_chunks(arch, pc, ModelOptions()), optim)
    optimizer = build_optimizer(model, optim)
    step = make_forward_step(sft_reduce, arch.vocab_size)
    losses = []
    for it in range(1, 31):
        reports = run_schedule(step, toy_batches(2), model, forward_only=False, seq_length=24, micro_batch_size=4)
        s = sum_reports(reports)
        optimizer.step()
        losses.append(s["loss_sum"] / s["units"])
        if torch.distributed.get_rank() == 0 and it % 5 == 0:
            print(f"iter {it:3d} | loss {losses[-1]:.4f}", flush=True)
    if torch.distributed.get_rank() == 0:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({'down' if losses[-1] < losses[0] else 'NOT down'})")


if __name__ == "__main__":
    main()
