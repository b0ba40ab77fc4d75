"""``tools/score_logprobs.py``: per-token log-probs of (prompt, response) pairs from a megatron_var checkpoint.

Input JSONL lines: ``{"prompt_ids": [...], "response_ids": [...]}`` or ``{"prompt": "...", "response": "..."}``
(text is tokenized with the checkpoint's stored tokenizer, MEG_DIR/hf: the prompt with the tokenizer's special
tokens, e.g. BOS, the response without). Output: each input record, with every field kept, plus ``logp`` (sum over
response tokens) and ``token_logps``; rank 0 writes it (atomically), in input order.
"""

from __future__ import annotations

import argparse
import sys
import json
import logging

from megatron_var.cli.common import run_cli
from megatron_var.common.atomic import atomic_write
from megatron_var.checkpoint import layout as layout

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="megatron_var checkpoint directory (converted or trained)")
    p.add_argument("--iteration", type=int, default=None, help="default: latest_checkpointed_iteration.txt")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--input", required=True, help="pairs.jsonl")
    p.add_argument("--output", required=True, help="out.jsonl (input records + logp + token_logps)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="pairs per forward pass per DP replica")
    p.add_argument("--params-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="model dtype for scoring (log-probs are always computed in float32)")
    p.add_argument("--transformer-impl", choices=["auto", "te", "local"], default="auto")
    return p.parse_args(argv)


def read_pairs(path, root) -> tuple[list[dict], list[tuple[list[int], list[int]]]]:
    """Records and their (prompt ids, response ids); ValueError naming the line for malformed input."""
    records, pairs, tokenizer = [], [], None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path} line {n}: expected a JSON object")
            if "prompt_ids" in rec and "response_ids" in rec:
                x, y = rec["prompt_ids"], rec["response_ids"]
                if not all(isinstance(t, int) for t in list(x) + list(y)):
                    raise ValueError(f"{path} line {n}: prompt_ids/response_ids must be lists of ints")
            elif "prompt" in rec and "response" in rec:
                tokenizer = tokenizer or _tokenizer(root)
                x = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
                y = tokenizer(rec["response"], add_special_tokens=False)["input_ids"]
            else:
                raise ValueError(f"{path} line {n}: needs prompt_ids + response_ids or prompt + response")
            if not x or not y:
                raise ValueError(f"{path} line {n}: empty prompt or response")
            records.append(rec)
            pairs.append((list(x), list(y)))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return records, pairs


def _tokenizer(root):
    from transformers import AutoTokenizer

    path = layout.hf_dir(root)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"text input needs the tokenizer stored in {path}: {e}") from e


def write_scored(path, records: list[dict], scores: list[list[float]]) -> None:
    with atomic_write(path) as f:
        for rec, token_logps in zip(records, scores):
            f.write(json.dumps({**rec, "logp": float(sum(token_logps)), "token_logps": token_logps}) + "\n")


def main(argv=None) -> int:
    import torch.distributed as dist

    from megatron_var.runtime import parallel
    from megatron_var.checkpoint.io import load_model
    from megatron_var.models.gpt import ModelOptions, build_model_chunks
    from megatron_var.runtime.pair_logprobs import check_pairs, score_pairs

    args = parse_args(argv)
    arch = layout.read_arch(args.load)
    layout.resolve_checkpoint(args.load, args.iteration)  # clear error before any process group work
    records, pairs = read_pairs(args.input, args.load)
    check_pairs(pairs, arch.vocab_size)
    pc = parallel.ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                 pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    arch.check_layout(pc.tensor_model_parallel_size, pc.pipeline_model_parallel_size)
    parallel.init_distributed()
    parallel.init_model_parallel(pc)
    parallel.seed_everything(1234)
    longest = max(len(x) + len(y) for x, y in pairs)
    options = ModelOptions(params_dtype=args.params_dtype, transformer_impl=args.transformer_impl,
                           seq_length=longest)
    chunks = build_model_chunks(arch, pc, options)
    load_model(chunks, args.load, args.iteration)
    scores = score_pairs(chunks, arch, pairs, args.micro_batch_size)
    if dist.get_rank() == 0:
        write_scored(args.output, records, scores)
        print(f"scored {len(pairs)} pairs -> {args.output}")
    dist.barrier()
    parallel.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


def cli() -> None:
    """Console-script entry point ([project.scripts] in pyproject.toml)."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
