"""score_rewards: batched [B,B] matrices vs a one-by-one loop, reward fns, resume, rank sharding, bad scores."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from data_fixtures import make_tokenizer, plain_rows, run_prepare, write_jsonl

from megatron_var.data.groups import GroupDataset, list_shards, rewards_path_for
from megatron_var.data.rewards import ScoreConfig, score_rewards

REPO = Path(__file__).resolve().parents[2]
B = 3

FN_SOURCE = '''
import math
def score(prompts, responses):
    return [len(p) * 0.01 + len(r) * 0.1 for p, r in zip(prompts, responses)]
def nan_for_r3(prompts, responses):
    return [math.nan if r.startswith("a3 ") else 1.0 for p, r in zip(prompts, responses)]
def wrong_length(prompts, responses):
    return [0.0]
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rw")
    make_tokenizer(root / "tok")
    write_jsonl(root / "in.jsonl", plain_rows(30))
    run_prepare([root / "in.jsonl"], root / "data", root / "tok", group_size=B, valid_fraction=0.2, shard_size=3)
    (root / "rfn.py").write_text(FN_SOURCE)
    return root


@pytest.fixture
def data(root, tmp_path):
    shutil.copytree(root / "data", tmp_path / "data")
    return tmp_path / "data"


def _samples(data_dir, split):
    return [r for s in list_shards(Path(data_dir) / split) for r in pq.read_table(s).to_pylist()]


def _tiny_rm(root: Path, chat: bool) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out = root / f"rm_chat{int(chat)}"
    if out.exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    if not chat:
        tok.chat_template = None
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _loop_reference(rm_dir: Path, data_dir: Path, split: str, chat: bool, max_length: int) -> dict[int, np.ndarray]:
    """Score every (x_i, y_j) alone: no batching, no padding, the RM's own tokenizer and forward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(rm_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(rm_dir), dtype=torch.float32).eval()
    rows = _samples(data_dir, split)
    out = {}
    for k in range(0, len(rows), B):
        grp = rows[k:k + B]
        mat = np.zeros((B, B))
        for i in range(B):
            for j in range(B):
                if chat:
                    msgs = json.loads(grp[i]["prompt_messages"]) + [{"role": "assistant",
                                                                     "content": grp[j]["response_text"]}]
                    ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
                else:  # prompt_text already starts with bos: the tokenizer must not add another
                    ids = tok(grp[i]["prompt_text"] + grp[j]["response_text"], add_special_tokens=False)["input_ids"]
                ids = ids[-max_length:]  # over-long inputs keep their end (the response)
                with torch.no_grad():
                    mat[i, j] = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        out[grp[0]["group_id"]] = mat
    return out


@pytest.mark.parametrize("chat,max_length", [(True, 4096), (False, 4096), (True, 12)])
def test_reward_model_batched_equals_loop(root, data, chat, max_length):
    rm = _tiny_rm(root, chat)
    s = score_rewards(ScoreConfig(data=str(data), reward_model=str(rm), batch_size=4, max_length=max_length,
                                  progress=False))
    n_groups = sum(len(GroupDataset(data, sp)) for sp in ("train", "valid"))
    assert s.groups_scored == n_groups and s.pairs == n_groups * B * B
    for split in ("train", "valid"):
        ref = _loop_reference(rm, data, split, chat, max_length)
        ds = GroupDataset(data, split, require_rewards=True)
        assert len(ref) == len(ds) > 0
        for k in range(len(ds)):
            g = ds[k]
            np.testing.assert_allclose(g.rewards, ref[g.group_id], atol=1e-5, rtol=0)
        # negative control: the matrix is not symmetric/constant, so a transposed layout would be caught
        assert not np.allclose(g.rewards, g.rewards.T, atol=1e-4)


def test_reward_fn_module_and_path(root, data, monkeypatch):
    monkeypatch.syspath_prepend(str(root))
    score_rewards(ScoreConfig(data=str(data), split="train", reward_fn="rfn:score", progress=False))
    rows = _samples(data, "train")
    ds = GroupDataset(data, "train", require_rewards=True)
    for k in range(len(ds)):
        grp = rows[k * B:(k + 1) * B]
        expect = np.array([[len(grp[i]["prompt_text"]) * 0.01 + len(grp[j]["response_text"]) * 0.1
                            for j in range(B)] for i in range(B)], dtype=np.float32)
        np.testing.assert_allclose(ds[k].rewards, expect, rtol=1e-6)
    assert not any(rewards_path_for(s).exists() for s in list_shards(data / "valid"))
    s = score_rewards(ScoreConfig(data=str(data), split="valid", reward_fn="rfn:score", progress=False))
    assert s.groups_scored == len(GroupDataset(data, "valid"))
    path_form = score_rewards(ScoreConfig(data=str(data), reward_fn=f"{root / 'rfn.py'}:score", overwrite=True,
                                          progress=False))
    assert path_form.groups_scored == len(ds) + s.groups_scored
    np.testing.assert_allclose(GroupDataset(data, "train", require_rewards=True)[0].rewards, ds[0].rewards)
    with pytest.raises(ValueError, match="returned 1 scores"):
        score_rewards(ScoreConfig(data=str(data), reward_fn=f"{root / 'rfn.py'}:wrong_length", overwrite=True,
                                  progress=False))
    with pytest.raises(ValueError, match="no callable 'nope'"):
        score_rewards(ScoreConfig(data=str(data), reward_fn=f"{root / 'rfn.py'}:nope", overwrite=True, progress=False))


def _reward_files(data_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("rewards-*.parquet"))}


def test_ranks_split_by_group_identical_to_one_rank_and_resume(root, data, tmp_path):
    fn = f"{root / 'rfn.py'}:score"
    shards = list_shards(data / "train") + list_shards(data / "valid")
    n_groups = sum(len(GroupDataset(data, sp)) for sp in ("train", "valid"))
    assert len(shards) >= 3 and n_groups > len(shards)  # several groups per shard: chunks cut across shards
    one = tmp_path / "one"
    shutil.copytree(data, one)
    s = score_rewards(ScoreConfig(data=str(one), reward_fn=fn, groups_per_chunk=2, progress=False))
    assert s.groups_scored == n_groups and s.shards_scored == len(shards)
    reference = _reward_files(one)
    assert len(reference) == len(shards)
    # two "ranks" one after the other: rank 0 alone writes parts but cannot finish a shard it shares with rank 1
    s0 = score_rewards(ScoreConfig(data=str(data), reward_fn=fn, groups_per_chunk=2, rank=0, world_size=2,
                                   progress=False))
    s1 = score_rewards(ScoreConfig(data=str(data), reward_fn=fn, groups_per_chunk=2, rank=1, world_size=2,
                                   progress=False))
    assert s0.chunks_scored > 0 and s1.chunks_scored > 0 and s0.groups_scored + s1.groups_scored == n_groups
    assert abs(s0.chunks_total - s1.chunks_total) <= 1
    assert s1.shards_scored > 0 and s0.shards_scored + s1.shards_scored == len(shards)
    assert _reward_files(data) == reference  # byte-identical to the one-rank run
    assert not list(data.rglob("*.parts-*")) and not list(data.rglob("*.tmp-*"))
    # resume: an interrupted 2-rank run (only rank 0 finished) is completed by a 1-rank run, chunk by chunk
    shutil.rmtree(data)
    shutil.copytree(root / "data", data)
    s0 = score_rewards(ScoreConfig(data=str(data), reward_fn=fn, groups_per_chunk=2, rank=0, world_size=2,
                                   progress=False))
    parts = list(data.rglob("groups-*.parquet"))
    assert len(parts) > 0
    s = score_rewards(ScoreConfig(data=str(data), reward_fn=fn, groups_per_chunk=2, progress=False))
    assert s.chunks_done_before == len(parts) and s.groups_scored == n_groups - s0.groups_scored
    assert _reward_files(data) == reference
    # negative control: another scorer gives other files, so the equality above is not vacuous
    other = tmp_path / "other"
    shutil.copytree(root / "data", other)
    score_rewards(ScoreConfig(data=str(other), reward_fn=f"{root / 'rfn.py'}:nan_for_r3", on_bad_score="skip",
                              groups_per_chunk=2, progress=False))
    assert _reward_files(other) != reference
    # finished shards are skipped; a removed rewards file is re-scored alone
    mtimes = {s: rewards_path_for(s).stat().st_mtime_ns for s in shards}
    os.remove(rewards_path_for(shards[1]))
    s = score_rewards(ScoreConfig(data=str(data), reward_fn=fn, progress=False))
    assert s.shards_done_before == len(shards) - 1 and s.shards_scored == 1
    assert all(rewards_path_for(sh).stat().st_mtime_ns == mtimes[sh] for sh in shards if sh != shards[1])
    assert _reward_files(data) == reference
    with pytest.raises(ValueError, match="scored with"):  # resuming with another scorer would mix matrices
        os.remove(rewards_path_for(shards[0]))
        score_rewards(ScoreConfig(data=str(data), reward_fn=f"{root / 'rfn.py'}:nan_for_r3", progress=False))
    s = score_rewards(ScoreConfig(data=str(data), reward_fn=fn, overwrite=True, progress=False))
    assert s.shards_scored == len(shards) and not list(data.rglob("*.tmp-*"))


def test_two_concurrent_ranks_share_a_single_shard(root, tmp_path):
    """Two real processes (RANK/WORLD_SIZE as torchrun sets them) on a one-shard data set: both score groups."""
    run_prepare([root / "in.jsonl"], tmp_path / "one", root / "tok", group_size=B, valid_fraction=0.0,
                shard_size=1000)
    assert len(list_shards(tmp_path / "one" / "train")) == 1
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    score_rewards(ScoreConfig(data=str(tmp_path / "one"), reward_fn=f"{root / 'rfn.py'}:score", groups_per_chunk=3,
                              progress=False))
    cmd = [sys.executable, str(REPO / "tools" / "score_rewards.py"), "--data", str(tmp_path / "two"),
           "--reward-fn", f"{root / 'rfn.py'}:score", "--groups-per-chunk", "3", "--no-progress"]
    env = {**os.environ, "WORLD_SIZE": "2", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    for rank, (stdout, _) in enumerate(outs):  # 10 groups in chunks of 3: 4 chunks, 2 per rank
        assert f"rank {rank}/2:" in stdout and "chunks 2 (already done 0)" in stdout, stdout
    assert _reward_files(tmp_path / "two") == _reward_files(tmp_path / "one") != {}


def test_non_finite_scores_error_or_skip(root, data):
    fn = f"{root / 'rfn.py'}:nan_for_r3"
    rows = _samples(data, "train") + _samples(data, "valid")
    bad_gid = next(r["group_id"] for r in rows if r["response_text"].startswith("a3 "))
    with pytest.raises(ValueError, match=rf"shard-\d+\.parquet: group_id {bad_gid} has a non-finite reward"):
        score_rewards(ScoreConfig(data=str(data), reward_fn=fn, progress=False))
    s = score_rewards(ScoreConfig(data=str(data), reward_fn=fn, on_bad_score="skip", progress=False))
    assert s.groups_bad == 1
    split = "train" if any(r["group_id"] == bad_gid for r in _samples(data, "train")) else "valid"
    with pytest.raises(ValueError, match=rf"no reward matrix for group_id {bad_gid}"):
        GroupDataset(data, split, require_rewards=True)
    ds = GroupDataset(data, split, require_rewards=True, drop_unscored=True)
    assert bad_gid not in {ds[k].group_id for k in range(len(ds))}


def test_cli_errors_are_one_line(root, data):
    cmd = [sys.executable, str(REPO / "tools" / "score_rewards.py"), "--data", str(data), "--no-progress"]
    r = subprocess.run(cmd + ["--reward-fn", "no_such_module_xyz:f"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        "error: --reward-fn 'no_such_module_xyz:f': cannot import no_such_module_xyz (No module named "
        "'no_such_module_xyz')"]
    r = subprocess.run(cmd + ["--reward-fn", f"{root / 'rfn.py'}:score"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "groups scored" in r.stdout
