"""Bundled tiny default for the CPU smoke run: a counting task, a locally trained tokenizer, a tiny Llama shape.

Writes OUT/train.jsonl ({prompt, response}: several responses of varying quality per prompt),
OUT/tokenizer/ and OUT/model_arch.json. Nothing is downloaded.
"""

import json
import random
import sys
from pathlib import Path

from megatron_var.data.tiny_tokenizer import build_tiny_tokenizer
from megatron_var.models.arch import ModelArch

WORDS = "zero one two three four five six seven eight nine ten".split()


def rows(n_prompts: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n_prompts):
        a = rng.randint(0, 5)
        b = a + rng.randint(2, 5)
        prompt = f"count from {WORDS[a]} to {WORDS[b]}"
        good = " ".join(WORDS[a:b + 1])
        for resp in (good, " ".join(WORDS[a:b]), " ".join(reversed(WORDS[a:b + 1])),
                     " ".join(rng.sample(WORDS, 3))):
            yield {"prompt": prompt, "response": resp}


def main(out: str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = list(rows(64, seed=0))
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    tok = build_tiny_tokenizer([r["prompt"] + " " + r["response"] for r in data], out_dir=str(out / "tokenizer"))
    ModelArch(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
              num_query_groups=2, kv_channels=16, vocab_size=len(tok), max_position_embeddings=512
              ).save(out / "model_arch.json")


if __name__ == "__main__":
    main(sys.argv[1])
