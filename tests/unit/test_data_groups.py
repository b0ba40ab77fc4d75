"""The group loader: round trip, reward validation, group-size checks, tokenizer fingerprint, one read per shard."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import make_tokenizer, plain_rows, run_prepare, write_jsonl

from megatron_var.data.groups import REWARD_SCHEMA, GroupDataset, list_shards, tokenizer_fingerprint
from megatron_var.data.writer import Sample, write_meta, write_split

B = 4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    make_tokenizer(root / "tok")
    write_jsonl(root / "in.jsonl", plain_rows(40))
    run_prepare([root / "in.jsonl"], root / "data", root / "tok", group_size=B, valid_fraction=0.1, shard_size=4)
    return root


def _write_rewards(shard, rows):
    gids = [g for g, _ in rows]
    table = pa.table({"group_id": pa.array(gids, pa.int64()),
                      "rewards": pa.array([r for _, r in rows], pa.list_(pa.float32()))}, schema=REWARD_SCHEMA)
    pq.write_table(table, shard.with_name(shard.name.replace("shard-", "rewards-")))


def _good_rewards(shard):
    gids = pq.read_table(shard).column("group_id").to_pylist()[::B]
    return [(g, (np.arange(B * B, dtype=np.float32) + g).tolist()) for g in gids]


def test_round_trip_matches_parquet_rows(prepared):
    ds = GroupDataset(prepared / "data", "train")
    rows = [r for s in list_shards(prepared / "data" / "train") for r in pq.read_table(s).to_pylist()]
    assert len(ds) == len(rows) // B == ds.meta["splits"]["train"]["groups"]
    for k in range(len(ds)):
        g = ds[k]
        chunk = rows[k * B:(k + 1) * B]
        assert g.group_id == chunk[0]["group_id"] and g.rewards is None
        assert g.prompt_ids == [r["prompt_ids"] for r in chunk]
        assert g.response_ids == [r["response_ids"] for r in chunk]
    assert ds[-1].group_id == ds[len(ds) - 1].group_id
    with pytest.raises(IndexError):
        ds[len(ds)]
    valid = GroupDataset(prepared / "data", "valid")
    assert len(valid) == ds.meta["splits"]["valid"]["groups"] >= 1
    assert not {valid[k].group_id for k in range(len(valid))} & {ds[k].group_id for k in range(len(ds))}


def test_rewards_required_and_validated(prepared, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared / "data", data)
    shards = list_shards(data / "train")
    with pytest.raises(ValueError, match=r"rewards-00000\.parquet: reward file missing"):
        GroupDataset(data, require_rewards=True)
    for s in shards:
        _write_rewards(s, _good_rewards(s))
    ds = GroupDataset(data, require_rewards=True)
    g = ds[0]
    np.testing.assert_array_equal(g.rewards, (np.arange(B * B, dtype=np.float32) + g.group_id).reshape(B, B))
    assert g.rewards.dtype == np.float32 and ds.has_rewards

    bad = _good_rewards(shards[1])
    bad_gid = bad[1][0]
    bad[1] = (bad_gid, [float("nan")] + bad[1][1][1:])
    _write_rewards(shards[1], bad)
    for require in (True, False):  # a present but non-finite matrix is never used silently
        with pytest.raises(ValueError, match=rf"rewards-00001\.parquet: group_id {bad_gid} has a non-finite"):
            GroupDataset(data, require_rewards=require)
    bad[1] = (bad_gid, [1.0] * (B * B - 1))
    _write_rewards(shards[1], bad)
    with pytest.raises(ValueError, match=rf"group_id {bad_gid} has {B * B - 1} rewards, expected B\*B = {B * B}"):
        GroupDataset(data, require_rewards=True)
    del bad[1]
    _write_rewards(shards[1], bad)
    with pytest.raises(ValueError, match=rf"no reward matrix for group_id {bad_gid}"):
        GroupDataset(data, require_rewards=True)
    kept = GroupDataset(data, require_rewards=True, drop_unscored=True)
    assert len(kept) == len(ds) - 1 and bad_gid not in {kept[k].group_id for k in range(len(kept))}


def test_group_size_mismatch_on_disk(prepared, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared / "data", data)
    shard = list_shards(data / "train")[0]
    t = pq.read_table(shard)
    pq.write_table(t.slice(0, t.num_rows - 1), shard)  # last group has B-1 samples
    with pytest.raises(ValueError, match=rf"shard-00000\.parquet: {t.num_rows - 1} rows is not a multiple"):
        GroupDataset(data)
    idx = t.column("index_in_group").to_pylist()
    idx[1], idx[2] = idx[2], idx[1]
    pq.write_table(t.set_column(1, "index_in_group", pa.array(idx, pa.int32())), shard)
    with pytest.raises(ValueError, match="group size mismatch"):
        GroupDataset(data)


def test_tokenizer_fingerprint(prepared, tmp_path):
    from transformers import AutoTokenizer

    ds = GroupDataset(prepared / "data")
    same = AutoTokenizer.from_pretrained(str(prepared / "tok"))
    ds.check_tokenizer(same)
    same.pad_token = same.eos_token  # trainers often do this; it changes no id in the data
    ds.check_tokenizer(same)
    other = make_tokenizer(tmp_path / "other", seed=1)  # trained on other text: other merges
    assert tokenizer_fingerprint(other) != ds.meta["tokenizer"]["fingerprint"]
    with pytest.raises(ValueError, match="fingerprint"):
        ds.check_tokenizer(other)


def test_groups_are_served_from_memory_after_one_read_per_shard(tmp_path, monkeypatch):
    """What keeps loading thousands of groups fast: each shard is read once, as whole Arrow columns, at
    construction; indexing a group touches no file. Checked by counting reads, not by timing."""
    rng = np.random.default_rng(0)
    G, Bb = 4000, 8

    def sample():
        return Sample(rng.integers(0, 1000, rng.integers(20, 200), dtype=np.int32),
                      rng.integers(0, 1000, rng.integers(10, 100), dtype=np.int32), "p", "[]", "r")

    groups = [[sample() for _ in range(Bb)] for _ in range(G)]
    write_split(tmp_path / "train", groups, 0, shard_size=1000)
    write_meta(tmp_path, {"format_version": 1, "group_size": Bb, "tokenizer": {"fingerprint": "x"},
                          "splits": {"train": {"groups": G}}})
    opened = []
    real_parquet_file = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda path, *a, **k: opened.append(Path(path).name)
                        or real_parquet_file(path, *a, **k))
    ds = GroupDataset(tmp_path)
    assert sorted(opened) == [f"shard-{k:05d}.parquet" for k in range(4)]  # once per shard (no rewards here)
    monkeypatch.setattr(pq, "ParquetFile", lambda *a, **k: pytest.fail("a group access read a file"))
    got = [ds[k] for k in range(len(ds))]
    assert len(got) == G and got[123].prompt_ids[5] == groups[123][5].prompt_ids.tolist()
    assert got[3999].response_ids[7] == groups[3999][7].response_ids.tolist()
