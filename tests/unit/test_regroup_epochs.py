"""prepare_data --regroup-epochs: N groupings of the same samples, scored by score_rewards, one per epoch in the
trainer's step selection (no step holds a group twice), and covered by the reference cache."""

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from data_fixtures import make_tokenizer, plain_rows, run_prepare, write_jsonl

from megatron_var.reference import cache as reference_cache
from megatron_var.data.groups import EpochGroupings, GroupDataset, list_shards, rewards_path_for, split_shards
from megatron_var.cli.prepare_data import build_parser
from megatron_var.data.rewards import ScoreConfig, score_rewards
from megatron_var.batching.steps import global_order, step_groups, step_start

B, N = 3, 3
FN = "def score(prompts, responses):\n    return [len(p) * 0.01 + len(r) * 0.1 for p, r in zip(prompts, responses)]\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("regroup")
    make_tokenizer(root / "tok")
    write_jsonl(root / "in.jsonl", plain_rows(40))
    run_prepare([root / "in.jsonl"], root / "data", root / "tok", group_size=B, valid_fraction=0.2, shard_size=3,
                regroup_epochs=N)
    (root / "rfn.py").write_text(FN)
    return root


def _groups(data: Path, directory: str) -> list[list[tuple[str, str]]]:
    rows = [r for s in list_shards(data / directory) for r in pq.read_table(s).to_pylist()]
    by_id: dict[int, list] = {}
    for r in rows:
        by_id.setdefault(r["group_id"], []).append((r["prompt_text"], r["response_text"]))
    return list(by_id.values())


def test_groupings_hold_the_same_samples_differently_grouped(root):
    data = root / "data"
    dirs = ["train", "train.g1", "train.g2"]
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == [*dirs, "valid"]
    groupings = [_groups(data, d) for d in dirs]
    samples = [Counter(s for g in gs for s in g) for gs in groupings]
    assert max(samples[0].values()) == 1  # every sample once per grouping ...
    assert samples[1] == samples[0] and samples[2] == samples[0]  # ... and the same samples in every grouping
    members = [{frozenset(g) for g in gs} for gs in groupings]
    assert members[0] != members[1] and members[1] != members[2] and members[0] != members[2]
    ds = EpochGroupings(data)
    G = ds.groups_per_epoch
    assert (ds.num_groupings, len(ds), G) == (N, N * G, len(groupings[0]))
    ids = ds.group_ids() + GroupDataset(data, "valid").group_ids()
    assert len(set(ids)) == len(ids)  # unique over all groupings and valid
    assert ds.groupings[0].group_ids() == list(range(G))  # grouping 0 and its ids are where they always were
    assert ds.meta["splits"]["train"]["groupings"] == N and "groupings" not in ds.meta["splits"]["valid"]
    with pytest.raises(ValueError, match="has 3 grouping\\(s\\), no grouping 3"):
        GroupDataset(data, "train", grouping=3)


def test_bad_flags_are_one_line_errors(root, tmp_path):
    with pytest.raises(ValueError, match="--regroup-epochs must be at least 1, got 0"):
        run_prepare([root / "in.jsonl"], tmp_path / "d", root / "tok", regroup_epochs=0)
    write_jsonl(tmp_path / "p.jsonl", plain_rows(10, rejected=True))
    with pytest.raises(ValueError, match="--regroup-epochs needs --responses chosen or all"):
        run_prepare([tmp_path / "p.jsonl"], tmp_path / "d", root / "tok", responses="pairs", regroup_epochs=2)
    assert "--regroup-epochs" in build_parser().format_help()


def test_score_rewards_scores_every_grouping_and_resumes(root, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    cfg = dict(data=str(data), reward_fn=f"{root / 'rfn.py'}:score", groups_per_chunk=2, progress=False)
    first = score_rewards(ScoreConfig(**cfg))
    shards = split_shards(data, EpochGroupings(data).meta, "train") + list_shards(data / "valid")
    assert first.shards_total == len(shards) and all(rewards_path_for(s).is_file() for s in shards)
    assert {s.parent.name for s in shards} == {"train", "train.g1", "train.g2", "valid"}
    ds = EpochGroupings(data, require_rewards=True)
    assert ds.has_rewards
    before = {s: pq.read_table(rewards_path_for(s)) for s in shards}
    victim = list_shards(data / "train.g2")[-1]
    rewards_path_for(victim).unlink()  # an interrupted run: one grouping's shard not scored yet
    again = score_rewards(ScoreConfig(**cfg))
    assert (again.shards_done_before, again.shards_scored) == (len(shards) - 1, 1)
    assert all(pq.read_table(rewards_path_for(s)).equals(before[s]) for s in shards)
    assert score_rewards(ScoreConfig(**cfg, split="train")).shards_total == len(shards) - len(
        list_shards(data / "valid"))


def _step_groups_across_epochs(G, seed, consumed, gbs):
    """A selection that lets a step cross an epoch boundary: it continues into the next epoch's order."""
    return [int(global_order(G, seed, k // G)[k % G]) for k in range(consumed, consumed + gbs)]


@pytest.mark.parametrize("n_groupings,dp", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_each_epoch_reads_its_grouping_and_no_step_repeats_a_group(n_groupings, dp):
    G, seed, consumed = 7, 0, 0
    per_epoch: dict[int, list[int]] = {}
    for gbs in [4, 2, 6, 4, 2, 2, 6] * 6:  # batch sizes change as on resumes; none divides 7 but 7's divisors
        start = step_start(consumed, gbs, G)
        epoch = start // G
        step = [k for r in range(dp) for k in step_groups(G, seed, consumed, gbs, r, dp, n_groupings)]
        assert len(set(step)) == len(step) == gbs  # never a group twice in one step
        grouping = epoch % n_groupings
        assert all(grouping * G <= k < (grouping + 1) * G for k in step)  # epoch e reads grouping e % N
        assert start - consumed < gbs  # only a tail shorter than the batch is skipped
        per_epoch.setdefault(epoch, []).extend(step)
        consumed = start + gbs
    assert len(per_epoch) > n_groupings * 3
    for epoch, seen in per_epoch.items():
        assert len(set(seen)) == len(seen)  # each group at most once per epoch
        assert len(seen) > G - 6  # and the skipped tail is shorter than a batch


def test_a_step_across_an_epoch_boundary_would_repeat_a_group():
    """Negative control: a selection that lets a step cross an epoch boundary puts a group twice into it
    (G = 7, --global-batch-size 3); step_groups never does at the same positions."""
    G, gbs = 7, 3
    crossing_dups = [c for c in range(0, 40 * G, gbs) if len(set(_step_groups_across_epochs(G, 0, c, gbs))) < gbs]
    assert crossing_dups
    for c in crossing_dups:
        assert len(set(step_groups(G, 0, c, gbs, 0, 1))) == gbs


def _fake_dist(monkeypatch):
    """One process, no process group: what load_or_build/build_cache call on torch.distributed."""
    fake = SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: 1, barrier=lambda: None,
                           all_reduce=lambda t, op=None: None, ReduceOp=SimpleNamespace(MIN=None),
                           all_gather_object=lambda out, obj: out.__setitem__(0, obj))
    monkeypatch.setattr(reference_cache, "dist", fake)
    monkeypatch.setattr(reference_cache, "parallel_state", SimpleNamespace(
        get_data_parallel_world_size=lambda: 1, get_data_parallel_rank=lambda: 0))
    monkeypatch.setattr(reference_cache, "holds_results", lambda: True)


class _FakeRef:
    calls = 0

    def score_cross_pairs(self, prompts, responses, reduction):
        _FakeRef.calls += 1
        return [torch.full((B, B), float(len(p[0]))) for p in prompts]


def test_reference_cache_covers_every_grouping(root, tmp_path, monkeypatch):
    _fake_dist(monkeypatch)
    data = root / "data"
    ds = EpochGroupings(data)
    src = {"root": None, "iteration": 0}
    meta = reference_cache.cache_meta(str(data), "train", len(ds), "sum", src, "cross", groupings=N)
    assert meta != reference_cache.cache_meta(str(data), "train", ds.groups_per_epoch, "sum", src, "cross")
    # negative control: a cache of grouping 0 only (as before --regroup-epochs), saved under this meta, is rebuilt
    only_first = reference_cache.load_or_build([str(tmp_path)], meta, _FakeRef, ds.groupings[0], reduction="sum")
    assert set(only_first) == set(ds.groupings[0].group_ids())
    calls = _FakeRef.calls
    cache = reference_cache.load_or_build([str(tmp_path)], meta, _FakeRef, ds, reduction="sum")
    assert _FakeRef.calls > calls and set(cache) == set(ds.group_ids())  # rebuilt over all groupings
    for k in (0, ds.groups_per_epoch + 1, len(ds) - 1):
        g = ds[k]
        assert torch.equal(cache[g.group_id], torch.full((B, B), float(len(g.prompt_ids[0]))))
    calls = _FakeRef.calls
    again = reference_cache.load_or_build([str(tmp_path)], meta, _FakeRef, ds, reduction="sum")
    assert _FakeRef.calls == calls and set(again) == set(cache)  # reused: it covers every grouping
    assert np.array_equal(sorted(again), sorted(ds.group_ids()))
