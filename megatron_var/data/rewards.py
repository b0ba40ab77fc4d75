"""score_rewards: the [B, B] cross-pair reward matrix r(x_i, y_j) of every group, written next to its shard.

Data parallelism needs no process group. The groups of every shard are cut into chunks of ``groups_per_chunk``
consecutive groups (boundaries depend only on that number, never on the world size); rank r scores chunks
r::world of the global chunk list, so every rank has work even when the data is a single shard. A scored chunk
is written atomically as ``rewards-XXXXX.parts-KEY/groups-SSSSSS-EEEEEE.parquet`` (KEY: a hash of the scorer
flags, so parts of another scorer are never merged in); whichever rank finds the last chunk of a shard written
merges the parts into ``rewards-XXXXX.parquet`` (atomic rename) and removes them. Runs are therefore resumable
at chunk granularity, and a chunk's scores do not depend on which rank computed them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from megatron_var.common.atomic import atomic_write, atomic_write_text
from megatron_var.data.groups import REWARD_SCHEMA, SPLITS, read_meta, rewards_path_for, split_shards

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
    groups_per_chunk: int = 16  # unit of work split over ranks, of resume, and of one scorer call
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
        if self.groups_per_chunk < 1:
            raise ValueError("--groups-per-chunk must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK {self.rank} outside WORLD_SIZE {self.world_size}")


@dataclass
class ScoreSummary:
    shards_total: int = 0  # shards of the chosen splits
    shards_done_before: int = 0  # skipped: rewards file already there
    shards_scored: int = 0  # rewards files this rank wrote (merged from all ranks' chunks)
    chunks_total: int = 0  # chunks assigned to this rank
    chunks_done_before: int = 0  # already scored by an earlier (interrupted) run
    chunks_scored: int = 0
    groups_scored: int = 0  # groups this rank scored and kept
    groups_bad: int = 0  # non-finite scores, left out (--on-bad-score skip)
    pairs: int = 0  # (x_i, y_j) pairs scored
    seconds: float = 0.0
    t_start: float = field(default_factory=time.perf_counter, repr=False)


@dataclass(frozen=True)
class Chunk:
    """Groups [start, end) of one shard (indices in the shard's group order)."""

    shard: Path
    start: int
    end: int
    key: str  # scorer key of the parts directory

    @property
    def part_path(self) -> Path:
        return parts_dir(self.shard, self.key) / f"groups-{self.start:06d}-{self.end:06d}.parquet"


def parts_dir(shard: Path, key: str) -> Path:
    return shard.with_name(rewards_path_for(shard).name.replace(".parquet", f".parts-{key}"))


def scorer_key(cfg: ScoreConfig) -> str:
    """Short hash of what decides the scores (not batch size or dtype of the run: those resume fine)."""
    what = {"reward_model": str(Path(cfg.reward_model).resolve()) if cfg.reward_model else None,
            "reward_fn": cfg.reward_fn, "max_length": cfg.max_length}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]


def shard_chunks(shard: Path, n_groups: int, per_chunk: int, key: str) -> list[Chunk]:
    return [Chunk(shard, s, min(s + per_chunk, n_groups), key) for s in range(0, n_groups, per_chunk)]


def make_scorer(cfg: ScoreConfig):
    from megatron_var.data.reward_scorers import FunctionScorer, HFRewardModel

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
    # every rank writes the same content, each through its own temporary: the race is harmless
    atomic_write_text(path, json.dumps({"scorer": identity}, indent=2) + "\n")


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


def _write_table(ids: list[int], flat_rows: list[np.ndarray], B: int, out: Path) -> None:
    """REWARD_SCHEMA table written through a temporary file and an atomic rename."""
    values = np.concatenate(flat_rows).astype(np.float32) if flat_rows else np.zeros(0, np.float32)
    offsets = np.arange(len(flat_rows) + 1, dtype=np.int32) * (B * B)
    table = pa.Table.from_arrays(
        [pa.array(np.asarray(ids, dtype=np.int64)),
         pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()))],
        schema=REWARD_SCHEMA,
    )
    with atomic_write(out, "wb") as f:
        pq.write_table(table, f)


def score_chunk(chunk: Chunk, groups, scorer, B: int, cfg: ScoreConfig, summary: ScoreSummary) -> None:
    """Score one chunk and write its part file; non-finite groups stop the run or are left out (counted)."""
    gids, prompts, messages, responses = (x[chunk.start:chunk.end] for x in groups)
    mats_GBB = score_groups(scorer, prompts, messages, responses).astype(np.float32)  # check what is stored
    keep_ids, keep_rows = [], []
    for gid, mat_BB in zip(gids.tolist(), mats_GBB):
        if not np.isfinite(mat_BB).all():
            where = np.argwhere(~np.isfinite(mat_BB))[0].tolist()
            msg = f"{chunk.shard}: group_id {gid} has a non-finite reward r(x_{where[0]}, y_{where[1]}) = " \
                  f"{mat_BB[tuple(where)]}"
            if cfg.on_bad_score == "error":
                raise ValueError(msg + " (pass --on-bad-score skip to leave such groups out)")
            logger.warning("%s; group left out", msg)
            summary.groups_bad += 1
            continue
        keep_ids.append(gid)
        keep_rows.append(mat_BB.reshape(-1))
    chunk.part_path.parent.mkdir(exist_ok=True)
    _write_table(keep_ids, keep_rows, B, chunk.part_path)
    summary.groups_scored += len(keep_ids)
    summary.pairs += len(mats_GBB) * B * B
    summary.chunks_scored += 1


def merge_shard(shard: Path, chunks: list[Chunk], B: int) -> bool:
    """Merge a shard's parts into its rewards file once every chunk is there; True if this call wrote it.

    Several ranks may merge the same shard at once: they write identical content through atomic renames, and a
    part vanishing under one of them means another rank has already finished the merge."""
    if not all(c.part_path.is_file() for c in chunks):
        return False
    try:
        tables = [pq.read_table(c.part_path) for c in chunks]
    except FileNotFoundError:  # merged and removed by another rank meanwhile
        return False
    ids = [i for t in tables for i in t.column("group_id").to_pylist()]
    rows = [np.asarray(r, dtype=np.float32) for t in tables for r in t.column("rewards").to_pylist()]
    _write_table(ids, rows, B, rewards_path_for(shard))
    for stale in shard.parent.glob(parts_dir(shard, "*").name):  # this scorer's parts and any older ones
        shutil.rmtree(stale, ignore_errors=True)
    return True


def score_rewards(cfg: ScoreConfig) -> ScoreSummary:
    """Score this rank's chunks (rank::world_size over the chunks of all unscored shards of the chosen splits)."""
    data_dir = Path(cfg.data)
    meta = read_meta(data_dir)
    B = int(meta["group_size"])
    splits = SPLITS if cfg.split == "all" else (cfg.split,)
    shards = [s for split in splits for s in split_shards(data_dir, meta, split)]  # every grouping of a split
    summary = ScoreSummary(shards_total=len(shards))
    key = scorer_key(cfg)
    done = {s for s in shards if not cfg.overwrite and rewards_path_for(s).is_file()}
    summary.shards_done_before = len(done)
    if done:
        logger.info("rank %d: %d of %d shards already scored, skipped", cfg.rank, len(done), len(shards))
    # chunks of all shards, finished or not: the assignment must not change while other ranks finish shards
    by_shard = {s: shard_chunks(s, pq.ParquetFile(s).metadata.num_rows // B, cfg.groups_per_chunk, key)
                for s in shards}
    mine = [c for chunks in by_shard.values() for c in chunks][cfg.rank :: cfg.world_size]
    mine = [c for c in mine if c.shard not in done]
    summary.chunks_total = len(mine)
    pending = [c for c in mine if cfg.overwrite or not c.part_path.is_file()]
    summary.chunks_done_before = len(mine) - len(pending)
    if pending:
        scorer = make_scorer(cfg)
        check_info(data_dir, scorer.identity, cfg.overwrite)
        _score_pending(pending, scorer, B, cfg, summary)
    for shard in dict.fromkeys(c.shard for c in mine):  # shards this rank touched, in order
        if merge_shard(shard, by_shard[shard], B):
            summary.shards_scored += 1
    summary.seconds = time.perf_counter() - summary.t_start
    logger.info("rank %d: scored %d groups in %d chunks, wrote %d rewards files (%.1f s)", cfg.rank,
                summary.groups_scored, summary.chunks_scored, summary.shards_scored, summary.seconds)
    return summary


def _score_pending(pending: list[Chunk], scorer, B: int, cfg: ScoreConfig, summary: ScoreSummary) -> None:
    """Score chunks shard by shard (each shard read once), with a groups/s and ETA progress bar on rank 0."""
    bar = tqdm(total=sum(c.end - c.start for c in pending), unit="group", desc=f"rank {cfg.rank} rewards",
               dynamic_ncols=True, disable=None if (cfg.progress and cfg.rank == 0) else True)
    with bar:
        for shard in dict.fromkeys(c.shard for c in pending):
            groups = read_groups(shard, B)
            for chunk in (c for c in pending if c.shard == shard):
                score_chunk(chunk, groups, scorer, B, cfg, summary)
                bar.update(chunk.end - chunk.start)
                bar.set_postfix(pairs_per_s=f"{summary.pairs / max(time.perf_counter() - summary.t_start, 1e-9):.1f}")
