"""Shared helpers for the data tests: a tiny local tokenizer and small hand-made inputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_var.data.prepare import PrepareConfig, prepare
from megatron_var.data.tiny_tokenizer import build_tiny_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog hello world how are you what is the answer "
         "to life please explain why sky blue because light scatters").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_tokenizer(out_dir: Path, seed: int = 0):
    rng = random.Random(seed)
    return build_tiny_tokenizer([sentence(rng, 30) for _ in range(100)], vocab_size=400, out_dir=out_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plain_rows(n: int, seed: int = 0, rejected: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        row = {"prompt": f"q{k} " + sentence(rng, rng.randint(2, 8)),
               "response": f"a{k} " + sentence(rng, rng.randint(1, 6))}
        if rejected:
            row["rejected"] = f"r{k} " + sentence(rng, rng.randint(1, 6))
        rows.append(row)
    return rows


def run_prepare(inputs, output, tokenizer_dir, **kw):
    kw.setdefault("progress", False)
    cfg = PrepareConfig(inputs=[str(p) for p in inputs], output=str(output), tokenizer=str(tokenizer_dir), **kw)
    return prepare(cfg)
