"""Writing a prepared data directory: shards and ``meta.json`` (the last file written). The directory is written
atomically by the caller (``megatron_var.common.atomic.atomic_directory``: a staging directory renamed at the very
end), so an interrupted run leaves nothing that looks like valid data."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megatron_var.common.atomic import atomic_write_text
from megatron_var.data.groups import META_FILE, SAMPLE_SCHEMA, shard_name

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One (prompt, response) pair ready for training."""

    prompt_ids: np.ndarray  # [P] int32
    response_ids: np.ndarray  # [R] int32
    prompt_text: str
    prompt_messages: str  # JSON list of chat messages
    response_text: str


def check_output_dir(output: Path, overwrite: bool, sources: dict[str, list] | None = None) -> None:
    """Refuse to clobber existing data unless asked, and always refuse an output that holds an input (replacing
    it would delete that input, ``--overwrite`` or not); ``sources`` maps a flag to its paths. Called before any
    expensive work."""
    out = output.resolve()
    for flag, paths in (sources or {}).items():
        for src in paths:
            if not Path(src).exists():  # e.g. a tokenizer name, not a path
                continue
            src = Path(src).resolve()
            if src == out or out in src.parents:
                raise ValueError(f"--output {output} contains {flag} {src}: writing it would delete that input; "
                                 "choose another --output")
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output {output}: directory exists and is not empty (pass --overwrite to replace it)")


def _list_array(arrays: list[np.ndarray]) -> pa.Array:
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def shard_table(groups: list[list[Sample]], first_group_id: int) -> pa.Table:
    """Rows = samples, whole groups in order, index_in_group 0..B-1."""
    samples = [s for g in groups for s in g]
    group_ids = np.repeat(np.arange(first_group_id, first_group_id + len(groups), dtype=np.int64),
                          [len(g) for g in groups])
    index = np.concatenate([np.arange(len(g), dtype=np.int32) for g in groups]) if groups else np.zeros(0, np.int32)
    columns = [
        pa.array(group_ids, type=pa.int64()),
        pa.array(index, type=pa.int32()),
        _list_array([s.prompt_ids for s in samples]),
        _list_array([s.response_ids for s in samples]),
        pa.array([s.prompt_text for s in samples], type=pa.string()),
        pa.array([s.prompt_messages for s in samples], type=pa.string()),
        pa.array([s.response_text for s in samples], type=pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=SAMPLE_SCHEMA)


def write_split(split_dir: Path, groups: list[list[Sample]], first_group_id: int, shard_size: int) -> int:
    """Write ``groups`` as shards of ``shard_size`` groups; returns the number of shard files."""
    split_dir.mkdir(parents=True, exist_ok=True)
    n_shards = 0
    for start in range(0, len(groups), shard_size):
        table = shard_table(groups[start : start + shard_size], first_group_id + start)
        pq.write_table(table, split_dir / shard_name(n_shards))
        n_shards += 1
    return n_shards


def write_meta(directory: Path, meta: dict) -> None:
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
