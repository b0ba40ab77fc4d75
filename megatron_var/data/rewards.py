"""score_rewards: the [B, B] cross-pair reward matrix r(x_i, y_j) of every group, written next to its shard.

Shards are independent files, so data parallelism needs no process group: under torchrun, rank r scores shards
r::world. A finished ``rewards-XXXXX.parquet`` appears only through an atomic rename, which makes runs resumable
(finished shards are skipped) and interrupted ones harmless.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from megatron_var.data.groups import REWARD_SCHEMA, SPLITS, list_shards, read_meta, rewards_path_for

logger = logging.getLogger(__name__)

INFO_FILE = "rewards_info.json"


@dataclass
class ScoreConfig:
    """What score_rewards needs; mirrors the CLI flags. Exactly one of reward_model / reward_fn."""

    data: str
    split: str = "all"  # train | valid | all
    reward_model: str | None = None  # local HF dir (AutoModelForSequenceClassification)
    reward_fn: str | None = None  # module:function or path/to/file.py:function
    batch_size: int = 16  # sequences per reward-model forward
    max_length: int = 4096  # reward-model tokens per sequence (longer ones keep their end)
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    overwrite: bool = False  # re-score shards that already have rewards
    on_bad_score: str = "error"  # error | skip (the group is left out of the rewards file, counted)
    groups_per_call: int = 32  # groups scored per scorer call (progress granularity)
    progress: bool = True
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", 0)))
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", 1)))

    def __post_init__(self):
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError("pass exactly one of --reward-model or --reward-fn")
        if self.split not in (*SPLITS, "all"):
            raise ValueError(f"--split must be train, valid or all, got {self.split!r}")
        if self.on_bad_score not in ("error", "skip"):
            raise ValueError("--on-bad-score must be error or skip")
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError("--batch-size must be >= 1 and --max-length >= 2")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK {self.rank} outside WORLD_SIZE {self.world_size}")


@dataclass
class ScoreSummary:
    shards_total: int = 0  # shards assigned to this rank
    shards_done_before: int = 0  # skipped: rewards file already there
    shards_scored: int = 0
    groups_scored: int = 0
    groups_bad: int = 0  # non-finite scores, left out (--on-bad-score skip)
    pairs: int = 0  # (x_i, y_j) pairs scored
    seconds: float = 0.0
    t_start: float = field(default_factory=time.perf_counter, repr=False)


def make_scorer(cfg: ScoreConfig):
    from megatron_var.data.scorers import FunctionScorer, HFRewardModel

    if cfg.reward_fn is not None:
        return FunctionScorer(cfg.reward_fn)
    return HFRewardModel(cfg.reward_model, cfg.batch_size, cfg.max_length, cfg.dtype)


def check_info(data_dir: Path, identity: dict, overwrite: bool) -> None:
    """Refuse to mix matrices from different scorers in one directory (a resume with another model)."""
    path = data_dir / INFO_FILE
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text()).get("scorer")
        if old != identity:
            raise ValueError(f"{path}: existing rewards were scored with {old}, not {identity}; "
                             "pass --overwrite to re-score everything")
    tmp = path.with_name(f"{INFO_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"scorer": identity}, indent=2) + "\n")
    os.replace(tmp, path)  # every rank writes the same content: the race is harmless


def read_groups(shard: Path, B: int) -> tuple[np.ndarray, list[list[str]], list[list[list[dict]]], list[list[str]]]:
    """(group_ids [G], prompt_texts [G][B], prompt_messages [G][B], response_texts [G][B]) of one shard."""
    columns = ["group_id", "index_in_group", "prompt_text", "prompt_messages", "response_text"]
    t = pq.ParquetFile(shard).read(columns=columns)
    gid, idx = t.column("group_id").to_numpy(), t.column("index_in_group").to_numpy()
    if len(gid) % B or (idx.reshape(-1, B) != np.arange(B)).any() or (gid.reshape(-1, B) != gid[::B, None]).any():
        raise ValueError(f"{shard}: rows are not whole groups of {B} ordered by index_in_group (group size mismatch)")

    def by_group(values: list) -> list[list]:
        return [values[g * B : (g + 1) * B] for g in range(len(gid) // B)]

    messages = [json.loads(m) for m in t.column("prompt_messages").to_pylist()]
    return (gid[::B], by_group(t.column("prompt_text").to_pylist()), by_group(messages),
            by_group(t.column("response_text").to_pylist()))


def score_groups(
    scorer, prompts: list[list[str]], messages: list[list[list[dict]]], responses: list[list[str]]
) -> np.ndarray:
    """[G, B, B] with [g, i, j] = r(x_i, y_j) of group g; one scorer call for all G*B*B pairs."""
    G, B = len(prompts), len(prompts[0])
    p_txt, p_msg, r_txt = [], [], []
    for g in range(G):
        for i in range(B):
            for j in range(B):
                p_txt.append(prompts[g][i])
                p_msg.append(messages[g][i])
                r_txt.append(responses[g][j])
    return np.asarray(scorer(p_txt, p_msg, r_txt), dtype=np.float64).reshape(G, B, B)


def score_shard(shard: Path, scorer, B: int, cfg: ScoreConfig, summary: ScoreSummary, bar) -> None:
    gids, prompts, messages, responses = read_groups(shard, B)
    keep_ids, keep_rows = [], []
    for start in range(0, len(gids), cfg.groups_per_call):
        end = start + cfg.groups_per_call
        mats_GBB = score_groups(scorer, prompts[start:end], messages[start:end], responses[start:end])
        mats_GBB = mats_GBB.astype(np.float32)  # finiteness checked on what is stored
        for gid, mat_BB in zip(gids[start:end].tolist(), mats_GBB):
            if not np.isfinite(mat_BB).all():
                where = np.argwhere(~np.isfinite(mat_BB))[0].tolist()
                msg = f"{shard}: group_id {gid} has a non-finite reward r(x_{where[0]}, y_{where[1]}) = " \
                      f"{mat_BB[tuple(where)]}"
                if cfg.on_bad_score == "error":
                    raise ValueError(msg + " (pass --on-bad-score skip to leave such groups out)")
                logger.warning("%s; group left out", msg)
                summary.groups_bad += 1
                continue
            keep_ids.append(gid)
            keep_rows.append(mat_BB.reshape(-1))
        bar.update(len(mats_GBB))
        summary.pairs += len(mats_GBB) * B * B
        bar.set_postfix(pairs_per_s=f"{summary.pairs / max(time.perf_counter() - summary.t_start, 1e-9):.1f}")
    values = np.concatenate(keep_rows) if keep_rows else np.zeros(0, np.float32)
    offsets = np.arange(len(keep_rows) + 1, dtype=np.int32) * (B * B)
    table = pa.Table.from_arrays(
        [pa.array(np.asarray(keep_ids, dtype=np.int64)),
         pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()))],
        schema=REWARD_SCHEMA,
    )
    out = rewards_path_for(shard)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    summary.groups_scored += len(keep_ids)
    summary.shards_scored += 1


def score_rewards(cfg: ScoreConfig) -> ScoreSummary:
    """Score this rank's shards (rank::world_size over the sorted shard list of the chosen splits)."""
    data_dir = Path(cfg.data)
    meta = read_meta(data_dir)
    B = int(meta["group_size"])
    splits = SPLITS if cfg.split == "all" else (cfg.split,)
    shards = [s for split in splits for s in list_shards(data_dir / split)]
    mine = shards[cfg.rank :: cfg.world_size]
    summary = ScoreSummary(shards_total=len(mine))
    todo = [s for s in mine if cfg.overwrite or not rewards_path_for(s).is_file()]
    summary.shards_done_before = len(mine) - len(todo)
    if summary.shards_done_before:
        logger.info("rank %d: %d of %d shards already scored, skipped", cfg.rank, summary.shards_done_before, len(mine))
    if not todo:
        return summary
    scorer = make_scorer(cfg)
    check_info(data_dir, scorer.identity, cfg.overwrite)
    total = sum(pq.ParquetFile(s).metadata.num_rows // B for s in todo)
    bar = tqdm(total=total, unit="group", desc=f"rank {cfg.rank} rewards", dynamic_ncols=True,
               disable=None if (cfg.progress and cfg.rank == 0) else True)
    with bar:
        for shard in todo:
            score_shard(shard, scorer, B, cfg, summary, bar)
    summary.seconds = time.perf_counter() - summary.t_start
    logger.info("rank %d: scored %d groups in %d shards (%.1f s)", cfg.rank, summary.groups_scored,
                summary.shards_scored, summary.seconds)
    return summary
