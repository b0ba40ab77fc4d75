"""tools/bench.py --preset tiny runs on CPU and reports every measurement (no timing is asserted: timings are not
test material); the cross-pair matrices it scores agree between naive and shared-prefix packing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_preset_reports_every_part(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "tools/bench.py", "--preset", "tiny", "--iters", "1", "--warmup", "0",
                        "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    written = list(tmp_path.glob("tiny_*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["preset"] == "tiny"
    assert out["peak"]["flops_per_s"] > 0
    pol = out["policy_step"]
    for impl in ("megatron", "transformers"):
        # MFU is tokens/s x FLOPs per token over a peak measured once: on a shared CPU either timing can be off,
        # so check the arithmetic, not a bound
        assert pol[impl]["tokens_per_s"] > 0 and pol[impl]["mfu"] == pytest.approx(
            pol[impl]["tokens_per_s"] * pol["flops_per_token"] / out["peak"]["flops_per_s"], rel=1e-9), pol[impl]
    assert pol["megatron"]["params"] == pol["transformers"]["params"]  # same model shape on both sides
    sc = out["reference_scoring"]
    assert set(sc) >= {"B", "P", "R", "naive", "naive_per_prompt", "shared_prefix_dense"}
    for name in ("naive", "naive_per_prompt"):
        assert sc[name]["s"] > 0 and sc[name]["max_rel_diff_vs_shared_prefix_dense"] < 1e-5
    assert sc["shared_prefix_dense"]["speedup_vs_naive"] > 0
    st = out["var_vs_sft"]
    assert st["sft"]["step_s"] > 0 and st["sft_full_logits"]["step_s"] > 0
    for name in ("shared_prefix_dense", "naive", "naive_per_prompt", "cached"):
        entry = st["var_" + name]
        assert entry["ratio_to_sft"] > 0 and entry["reference_s"] >= 0, entry
    assert set(out["targets"]) == {"policy_vs_transformers", "policy_mfu", "var_over_sft", "shared_prefix_speedup"}


def test_unknown_preset_is_a_clean_error():
    r = subprocess.run([sys.executable, "tools/bench.py", "--preset", "huge"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_lengths_preset_reports_consistent_numbers(tmp_path):
    """tools/bench.py --lengths: every method reports tokens and times that add up (no timing is asserted)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "tools/bench.py", "--preset", "tiny", "--lengths", "--iters", "1",
                        "--warmup", "0", "--out-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    written = list(tmp_path.glob("tiny_*_lengths.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["speedup_vs_trl_style"] == \
        out["speedup_vs_trl_style"]
    assert "TRL-style var_online" in r.stderr  # the printed table
    assert out["lengths"]["kind"] == "lognormal" and out["counted_steps"] == 1
    stats = out["length_stats"]  # warmup 0, one step: the drawn groups are the counted step's
    real_policy = stats["samples"] * (stats["prompt"]["mean"] + stats["response"]["mean"])
    entries = {("ours", m): out["ours"][m] for m in ("sft", "var_online", "var_cached", "dpo")}
    entries.update({("trl_style", m): out["trl_style"][m] for m in ("var_online", "var_cached")})
    for key, e in entries.items():
        assert "error" not in e, (key, e)
        assert e["step_s"] == pytest.approx(e["reference_s"] + e["fwd_bwd_s"] + e["optimizer_s"], rel=1e-9), key
        assert e["policy"]["real_tokens"] == pytest.approx(real_policy), key  # the same groups everywhere
        for side in ("policy", "reference"):
            s = e[side]
            assert s["computed_tokens"] >= s["real_tokens"] >= 0, (key, side, s)
            if s["real_tokens"]:
                assert s["computed_over_real"] == pytest.approx(s["computed_tokens"] / s["real_tokens"]), key
        assert e["model_flops"] > 0
    for side in ("ours", "trl_style"):  # cached: no reference pass inside the step
        assert out[side]["var_cached"]["reference"]["computed_tokens"] == 0
    ours_ref, trl_ref = out["ours"]["var_online"]["reference"], out["trl_style"]["var_online"]["reference"]
    assert ours_ref["real_tokens"] == trl_ref["real_tokens"] > 0  # one definition of what the step needs
    assert trl_ref["computed_tokens"] >= trl_ref["naive_pair_tokens"] > trl_ref["real_tokens"]
    assert out["ours"]["dpo"]["reference"]["real_tokens"] == pytest.approx(real_policy)
    # reference and policy start from the same weights: the first VAR step's diagonal gap is fp32 rounding
    assert out["ours"]["var_online"]["ref_policy_logp_gap_step1"] <= 1e-4
    assert out["trl_style"]["var_online"]["ref_policy_logp_gap_step1"] <= 1e-4
    for mode in ("online", "cached"):
        sp = out["speedup_vs_trl_style"][mode]
        assert sp["value"] == pytest.approx(out["trl_style"]["var_" + mode]["step_s"] /
                                            out["ours"]["var_" + mode]["step_s"], rel=1e-12)
    # the attention part times the same micro-batches as the steps: same tokens, same needed score entries
    att = out["attention"]
    for layout, side in (("padded", "ours_padded"), ("packed", "ours"), ("token_budget", "ours_token_budget")):
        assert att[layout]["computed_tokens"] == out[side]["sft"]["policy"]["computed_tokens"], layout
        assert att[layout]["row_score_entries"] >= att[layout]["needed_score_entries"] > 0
        assert att[layout]["needed_score_entries"] == att["packed"]["needed_score_entries"]
    assert att["padded_over_packed"] == pytest.approx(att["padded"]["ms_per_step"] / att["packed"]["ms_per_step"])


def test_length_distribution_and_token_counts():
    """The lognormal's p95 is 4x its median (before fitting); the reference's real tokens are its shared-prefix
    rows without padding; every drawn pair fits the preset's seq_length."""
    from bench.length_groups import LengthDistribution, lognormal_groups, shared_prefix_real_tokens
    from megatron_var.batching.pairs import build_shared_prefix

    dist = LengthDistribution(150, 250, seq_length=2048)
    p, r = dist.draw(200_000, np.random.default_rng(0))
    for lens, median in ((p, 150), (r, 250)):
        assert np.median(lens) == pytest.approx(median, rel=0.02)
        assert np.percentile(lens, 95) == pytest.approx(4 * median, rel=0.03)
    groups = lognormal_groups(LengthDistribution(19, 31, seq_length=64), 3, 4, vocab=100, seed=1)
    assert groups[0].prompt_ids != lognormal_groups(LengthDistribution(19, 31, 64), 3, 4, 100, seed=2)[0].prompt_ids
    for g in groups:
        assert all(len(x) + len(y) <= 64 for x, y in zip(g.prompt_ids, g.response_ids))
        rows = build_shared_prefix(g.prompt_ids, g.response_ids, pad_id=0)
        assert shared_prefix_real_tokens(g) == int((rows.attn_segments >= 0).sum())


def test_score_entries_count_rows_and_sequences():
    """Causal score entries by hand: padded rows S(S+1)/2 each; the sequences alone l(l+1)/2 each, packed or not."""
    from types import SimpleNamespace

    from bench.packed_attention import score_entries
    from megatron_var.runtime.microbatches import policy_microbatches

    group = SimpleNamespace(prompt_ids=[[5] * 3, [6] * 1, [7] * 2], response_ids=[[1] * 4, [2] * 2, [3] * 1])
    needed = 7 * 8 // 2 + 3 * 4 // 2 + 3 * 4 // 2  # lengths 7, 3, 3
    (padded,) = policy_microbatches([[group]], 0, 1, same_length=False, pack=False)
    assert score_entries(padded) == (3 * 7 * 8 // 2, needed)
    (packed,) = policy_microbatches([[group]], 0, 1, same_length=False, pack=True)  # rows [7], [3, 3]
    assert score_entries(packed) == (2 * 7 * 8 // 2, needed)


def test_lengths_from_a_prepared_directory(tmp_path):
    """--lengths-from DATA: distinct groups within a step, the data's lengths fitted to seq_length, ids folded into
    the preset's vocabulary, the data's reward matrices."""
    from bench.length_groups import data_groups
    from megatron_var.data.groups import GroupDataset
    from megatron_var.data.synthetic import write_random_groups

    data = write_random_groups(tmp_path / "d", vocab_size=5000, groups=5, group_size=4, prompt_len=(20, 60),
                               response_len=(10, 40))
    ds = GroupDataset(data)
    groups = data_groups(str(data), n_groups=6, per_step=3, vocab=100, seq_length=64, seed=0)
    assert len(groups) == 6 and [g.group_id for g in groups] == list(range(6))
    sources = []
    for g in groups:
        src = next(s for s in (ds[k] for k in range(len(ds))) if np.array_equal(s.rewards, g.rewards))
        sources.append(src.group_id)
        for x, y, sx, sy in zip(g.prompt_ids, g.response_ids, src.prompt_ids, src.response_ids):
            assert len(x) + len(y) <= 64 and len(y) == min(len(sy), 63) and len(x) <= len(sx)
            assert max(x + y) < 100 and min(x + y) >= 1
    assert len(set(sources[:3])) == 3 and len(set(sources[3:])) == 3
