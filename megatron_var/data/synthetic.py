"""A prepared VAR data directory of random token groups with reward matrices, written without a tokenizer.

Why: the trainer's own tests (step-1 reference/policy identity at every layout) and the GPU check's training part
need real ``--data-path`` directories in seconds, with no tokenizer or reward function in the way. The format is
exactly what ``tools/prepare_data.py`` + ``tools/score_rewards.py`` write (docs/data-format.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megatron_var.data.groups import FORMAT_VERSION, REWARD_SCHEMA, META_FILE
from megatron_var.data.writer import Sample, write_split


def write_random_groups(out: Path, vocab_size: int, groups: int, group_size: int, *, prompt_len=(3, 9),
                        response_len=(2, 7), seed: int = 0) -> Path:
    """``out`` (created) holding a train split of ``groups`` groups of ``group_size`` random (prompt, response)
    pairs (token ids 1..vocab-1, lengths uniform in [lo, hi)) and N(0, 1) reward matrices; returns ``out``."""
    rng = np.random.default_rng(seed)

    def tokens(lo_hi):
        return rng.integers(1, vocab_size, int(rng.integers(*lo_hi))).astype(np.int32)

    data = [[Sample(tokens(prompt_len), tokens(response_len), "", "[]", "") for _ in range(group_size)]
            for _ in range(groups)]
    out = Path(out)
    write_split(out / "train", data, 0, shard_size=groups)
    b2 = group_size * group_size
    rewards = rng.normal(size=(groups, b2)).astype(np.float32)
    offsets = pa.array(np.arange(groups + 1, dtype=np.int32) * b2)
    pq.write_table(pa.Table.from_arrays([pa.array(np.arange(groups, dtype=np.int64)),
                                         pa.ListArray.from_arrays(offsets, pa.array(rewards.ravel()))],
                                        schema=REWARD_SCHEMA), out / "train" / "rewards-00000.parquet")
    # the ids come from no tokenizer: a fingerprint of their own, so the trainer's data check (ids within the
    # model's vocabulary, the same data "tokenizer" on resume) applies as to any prepared directory
    tokenizer = {"name_or_path": None, "fingerprint": f"synthetic-random-ids-{vocab_size}", "vocab_size": vocab_size}
    (out / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "group_size": group_size,
                                             "tokenizer": tokenizer, "splits": {"train": {"groups": groups}},
                                             "synthetic": True}))
    return out
