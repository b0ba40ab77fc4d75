"""The on-disk VAR group format and its loader: the contract between data preparation and the trainer.

A prepared directory (see docs/data-format.md) holds ``meta.json`` and, per split, Parquet shards of samples
(``shard-XXXXX.parquet``, one row per sample, whole groups per shard) plus optional reward matrices
(``rewards-XXXXX.parquet``, one row per group, ``[B, B]`` row-major). Group membership is fixed on disk so that
cross-pair rewards ``r(x_i, y_j)`` can be precomputed once; the trainer only shuffles group order.

Legend: B = group size, i = prompt index, j = response index within a group.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "valid")
SHARD_RE = re.compile(r"^shard-(\d{5})\.parquet$")

SAMPLE_SCHEMA = pa.schema(
    [
        ("group_id", pa.int64()),
        ("index_in_group", pa.int32()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("prompt_text", pa.string()),
        ("prompt_messages", pa.string()),
        ("response_text", pa.string()),
    ]
)
REWARD_SCHEMA = pa.schema([("group_id", pa.int64()), ("rewards", pa.list_(pa.float32()))])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def rewards_path_for(shard_path: Path) -> Path:
    """``train/shard-00003.parquet`` -> ``train/rewards-00003.parquet``."""
    return shard_path.with_name(shard_path.name.replace("shard-", "rewards-", 1))


def list_shards(split_dir: Path) -> list[Path]:
    """Sample shards of one split, in index order (empty if the split directory is absent)."""
    if not split_dir.is_dir():
        return []
    return sorted(p for p in split_dir.iterdir() if SHARD_RE.match(p.name))


def num_groupings(meta: dict, split: str) -> int:
    """How many groupings of the same samples ``split`` has (``prepare_data --regroup-epochs``; 1 for old data)."""
    return int(meta.get("splits", {}).get(split, {}).get("groupings", 1))


def grouping_dir(split: str, grouping: int) -> str:
    """Directory of one grouping: grouping 0 is ``train/`` itself (so every older reader still finds it),
    grouping e >= 1 is ``train.g<e>/``."""
    return split if grouping == 0 else f"{split}.g{grouping}"


def split_shards(data_dir: Path, meta: dict, split: str) -> list[Path]:
    """Sample shards of every grouping of ``split``, grouping by grouping."""
    return [s for e in range(num_groupings(meta, split)) for s in list_shards(Path(data_dir) / grouping_dir(split, e))]


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise ValueError(f"{data_dir}: not a prepared data directory ({META_FILE} missing; run tools/prepare_data.py)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return meta


def tokenizer_fingerprint(tokenizer) -> str:
    """Stable hash of what decides token ids: the vocabulary (added tokens included) and the bos/eos/unk tokens.

    The pad token and chat template are left out on purpose: trainers often set pad = eos, which changes no id
    in the prepared data.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token")}
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


@dataclass
class Group:
    """One group of B samples; sample i is (prompt_ids[i], response_ids[i]). rewards[i, j] = r(x_i, y_j)."""

    group_id: int
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rewards: np.ndarray | None  # [B, B] float32, or None if not scored


@dataclass
class _Shard:
    path: Path
    row_start: np.ndarray  # [G_shard] first row of each group
    p_off: np.ndarray  # [rows + 1] offsets into p_val
    p_val: np.ndarray  # [tokens] int32
    r_off: np.ndarray
    r_val: np.ndarray


def _flat_list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<int32> column as (offsets [rows+1], values) numpy arrays: slicing these is far cheaper than to_pylist."""
    arr = table.column(name).combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


class GroupDataset:
    """Random access to the groups of one split; pure python/numpy, no process group.

    ``require_rewards=True`` checks every group's ``[B, B]`` matrix at construction (present, right size, finite)
    and raises ValueError naming the file and group_id otherwise. ``drop_unscored=True`` (with require_rewards)
    leaves out groups that have no matrix (e.g. skipped by ``score_rewards --on-bad-score skip``) instead of raising;
    a present but malformed matrix is always an error. ``grouping``: which of the split's groupings
    (``prepare_data --regroup-epochs``) to read; 0 is the one every split has.
    """

    def __init__(self, data_dir, split: str = "train", require_rewards: bool = False, drop_unscored: bool = False,
                 grouping: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = read_meta(self.data_dir)
        n = num_groupings(self.meta, split)
        if not 0 <= grouping < n:
            raise ValueError(f"{self.data_dir}: split {split} has {n} grouping(s), no grouping {grouping}")
        self.grouping = grouping
        self.group_size = int(self.meta["group_size"])
        self._shards: list[_Shard] = []
        self._index: list[tuple[int, int, int]] = []  # (shard k, group row in shard, group_id)
        self._rewards: list[np.ndarray | None] = []  # per indexed group
        split_dir = self.data_dir / grouping_dir(split, grouping)
        shards = list_shards(split_dir)
        if not shards and self.meta.get("splits", {}).get(split, {}).get("groups", 0) > 0:
            raise ValueError(f"{split_dir}: meta.json lists groups but no shard files were found")
        for path in shards:
            self._load_shard(path, require_rewards, drop_unscored)

    def _load_shard(self, path: Path, require_rewards: bool, drop_unscored: bool) -> None:
        B = self.group_size
        table = pq.ParquetFile(path).read(columns=["group_id", "index_in_group", "prompt_ids", "response_ids"])
        gid = table.column("group_id").to_numpy()
        idx = table.column("index_in_group").to_numpy()
        if len(gid) % B != 0:
            raise ValueError(f"{path}: {len(gid)} rows is not a multiple of group_size {B}")
        gid_BG = gid.reshape(-1, B)
        bad = np.nonzero((gid_BG != gid_BG[:, :1]).any(1) | (idx.reshape(-1, B) != np.arange(B)).any(1))[0]
        if len(bad):
            raise ValueError(
                f"{path}: group_id {int(gid_BG[bad[0], 0])} does not have {B} contiguous samples "
                f"with index_in_group 0..{B - 1} (group size mismatch)"
            )
        p_off, p_val = _flat_list_column(table, "prompt_ids")
        r_off, r_val = _flat_list_column(table, "response_ids")
        k = len(self._shards)
        self._shards.append(_Shard(path, np.arange(0, len(gid), B), p_off, p_val, r_off, r_val))
        rewards = self._load_rewards(path, gid_BG[:, 0], require_rewards)
        for g, group_id in enumerate(gid_BG[:, 0].tolist()):
            matrix = rewards.get(group_id)
            if matrix is None and require_rewards:
                if not drop_unscored:
                    raise ValueError(f"{rewards_path_for(path)}: no reward matrix for group_id {group_id}")
                logger.warning("%s: group_id %d has no reward matrix; left out", path, group_id)
                continue
            self._index.append((k, g, group_id))
            self._rewards.append(matrix)

    def _load_rewards(self, shard: Path, group_ids: np.ndarray, required: bool) -> dict[int, np.ndarray]:
        path = rewards_path_for(shard)
        if not path.is_file():
            if required:
                raise ValueError(f"{path}: reward file missing for {shard.name} (run tools/score_rewards.py)")
            return {}
        table = pq.ParquetFile(path).read()
        B = self.group_size
        known = set(group_ids.tolist())
        out: dict[int, np.ndarray] = {}
        rows = table.column("rewards").to_pylist()
        for group_id, flat in zip(table.column("group_id").to_pylist(), rows):
            if group_id not in known:
                raise ValueError(f"{path}: group_id {group_id} is not a group of {shard.name}")
            if flat is None or len(flat) != B * B:
                n = None if flat is None else len(flat)
                raise ValueError(f"{path}: group_id {group_id} has {n} rewards, expected B*B = {B * B}")
            matrix_BB = np.asarray(flat, dtype=np.float32).reshape(B, B)
            if not np.isfinite(matrix_BB).all():
                raise ValueError(f"{path}: group_id {group_id} has a non-finite reward matrix")
            out[group_id] = matrix_BB
        return out

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, k: int) -> Group:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        s, g, group_id = self._index[k]
        shard = self._shards[s]
        rows = range(int(shard.row_start[g]), int(shard.row_start[g]) + self.group_size)
        prompts = [shard.p_val[shard.p_off[r] : shard.p_off[r + 1]].tolist() for r in rows]
        responses = [shard.r_val[shard.r_off[r] : shard.r_off[r + 1]].tolist() for r in rows]
        return Group(group_id, prompts, responses, self._rewards[k])

    @property
    def has_rewards(self) -> bool:
        """True when every group in this dataset carries a reward matrix."""
        return len(self) > 0 and all(r is not None for r in self._rewards)

    def group_ids(self) -> list[int]:
        """group_id of every indexed group, in index order (no token slicing)."""
        return [gid for _, _, gid in self._index]

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError unless ``tokenizer`` produces the same ids as the one the data was prepared with."""
        expected = self.meta["tokenizer"]["fingerprint"]
        got = tokenizer_fingerprint(tokenizer)
        if got != expected:
            raise ValueError(
                f"{self.data_dir}: prepared with tokenizer {self.meta['tokenizer'].get('name_or_path')!r} "
                f"(fingerprint {expected}), but the given tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} "
                f"has fingerprint {got}; re-run tools/prepare_data.py with the model's tokenizer"
            )


class EpochGroupings:
    """Every grouping of one split as one sequence: index ``e * G + k`` is group k of grouping e.

    Why: VAR estimates Z(x_i) from the other responses of x_i's group, so the trainer reads grouping ``e % N`` in
    epoch e (``batching/steps.step_groups``), and the reference cache must cover the groups of all groupings.
    Groupings hold the same samples, so they must have the same number of groups G (checked here; a
    ``drop_unscored`` that leaves out groups of one grouping only is refused rather than silently unbalancing epochs).
    """

    def __init__(self, data_dir, split: str = "train", require_rewards: bool = False, drop_unscored: bool = False):
        meta = read_meta(data_dir)
        self.groupings = [GroupDataset(data_dir, split, require_rewards, drop_unscored, grouping=e)
                          for e in range(num_groupings(meta, split))]
        first = self.groupings[0]
        self.data_dir, self.split, self.meta, self.group_size = first.data_dir, split, first.meta, first.group_size
        sizes = [len(g) for g in self.groupings]
        if len(set(sizes)) > 1:
            raise ValueError(f"{self.data_dir}: the groupings of split {split} have different group counts {sizes} "
                             "(groups left out of some grouping?); every epoch must see the same samples")
        self.groups_per_epoch = sizes[0]

    @property
    def num_groupings(self) -> int:
        return len(self.groupings)

    def __len__(self) -> int:
        return self.groups_per_epoch * len(self.groupings)

    def __getitem__(self, k: int) -> Group:
        if not 0 <= k < len(self):
            raise IndexError(k)
        e, i = divmod(k, self.groups_per_epoch)
        return self.groupings[e][i]

    @property
    def has_rewards(self) -> bool:
        return all(g.has_rewards for g in self.groupings)

    def group_ids(self) -> list[int]:
        return [gid for g in self.groupings for gid in g.group_ids()]

    def check_tokenizer(self, tokenizer) -> None:
        self.groupings[0].check_tokenizer(tokenizer)
