"""prepare_data end to end on tiny inputs: templates, length handling, packing, splits, bad input, the CLI."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from data_fixtures import make_tokenizer, plain_rows, run_prepare, write_jsonl

from megatron_var.data.groups import GroupDataset, list_shards, read_meta

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def _rows(data_dir, split="train"):
    return [r for s in list_shards(Path(data_dir) / split) for r in pq.read_table(s).to_pylist()]


def test_chat_template_ids_and_eos(tmp_path, tok_dir, tok):
    rows = plain_rows(16)
    write_jsonl(tmp_path / "in.jsonl", rows)
    s = run_prepare([tmp_path / "in.jsonl"], tmp_path / "out", tok_dir, group_size=4, valid_fraction=0.0,
                    system_prompt="be brief")
    assert s.samples_written == 16 and dict(s.groups_written) == {"train": 4, "valid": 0}
    by_prompt = {json.loads(r["prompt_messages"])[-1]["content"]: r for r in _rows(tmp_path / "out")}
    for row in rows:
        out = by_prompt[row["prompt"]]
        # hand-rendered tiny template: bos, <|role|>content</s> per turn, then the generation prompt
        expect_text = f"<s><|system|>be brief</s><|user|>{row['prompt']}</s><|assistant|>"
        assert out["prompt_text"] == expect_text
        assert out["prompt_ids"] == tok(expect_text, add_special_tokens=False)["input_ids"]
        assert out["response_ids"][-1] == tok.eos_token_id
        assert tok.decode(out["response_ids"][:-1]) == row["response"] == out["response_text"]
        assert json.loads(out["prompt_messages"]) == [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": row["prompt"]}]
    meta = read_meta(tmp_path / "out")
    assert meta["template"]["kind"] == "chat" and meta["group_size"] == 4 and meta["responses"] == "chosen"


def test_raw_template_adds_bos(tmp_path, tok_dir, tok):
    write_jsonl(tmp_path / "in.jsonl", plain_rows(4))
    run_prepare([tmp_path / "in.jsonl"], tmp_path / "out", tok_dir, group_size=2, valid_fraction=0.0,
                template="raw", raw_template="Q: {prompt}\nA:")
    for r in _rows(tmp_path / "out"):
        assert r["prompt_text"].startswith("Q: q") and r["prompt_text"].endswith("\nA:")
        assert r["prompt_ids"][0] == tok.bos_token_id
        assert r["prompt_ids"][1:] == tok(r["prompt_text"], add_special_tokens=False)["input_ids"]


def test_truncate_and_drop_counts(tmp_path, tok_dir, tok):
    long_prompt = " ".join(["hello world"] * 30)
    rows = [{"prompt": long_prompt, "response": "short answer"},  # prompt cut from the left
            {"prompt": "hi", "response": " ".join(["the quick fox"] * 40)},  # response alone too long
            {"prompt": "hi", "response": "ok"}, {"prompt": "why", "response": "because"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    S = 24
    s = run_prepare([tmp_path / "in.jsonl"], tmp_path / "t", tok_dir, group_size=1, valid_fraction=0.0, seq_length=S)
    assert dict(s.samples_truncated) == {"prompt": 1, "response": 1} and s.samples_written == 4
    out = {r["response_text"][:5]: r for r in _rows(tmp_path / "t")}
    full_p = tok(tok.apply_chat_template([{"role": "user", "content": long_prompt}], tokenize=False,
                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    cut = out["short"]
    assert len(cut["prompt_ids"]) + len(cut["response_ids"]) == S
    assert full_p[-len(cut["prompt_ids"]):] == cut["prompt_ids"]
    longr = out["the q"]
    assert len(longr["prompt_ids"]) + len(longr["response_ids"]) == S
    assert tok.eos_token_id not in longr["response_ids"]  # a cut response does not teach stopping
    assert longr["response_text"] == tok.decode(longr["response_ids"])
    for r in _rows(tmp_path / "t"):
        assert len(r["prompt_ids"]) + len(r["response_ids"]) <= S
    s = run_prepare([tmp_path / "in.jsonl"], tmp_path / "d", tok_dir, group_size=1, valid_fraction=0.0,
                    seq_length=S, overlong="drop")
    assert dict(s.samples_dropped) == {"overlong": 2} and s.samples_written == 2 and not s.samples_truncated


def test_packing_deterministic_and_complete(tmp_path, tok_dir):
    write_jsonl(tmp_path / "in.jsonl", plain_rows(43, rejected=True))
    kw = dict(group_size=4, valid_fraction=0.2, responses="all", shard_size=3)
    a = run_prepare([tmp_path / "in.jsonl"], tmp_path / "a", tok_dir, seed=7, **kw)
    run_prepare([tmp_path / "in.jsonl"], tmp_path / "b", tok_dir, seed=7, **kw)
    run_prepare([tmp_path / "in.jsonl"], tmp_path / "c", tok_dir, seed=8, **kw)
    train_a, valid_a = _rows(tmp_path / "a"), _rows(tmp_path / "a", "valid")
    assert train_a == _rows(tmp_path / "b") and valid_a == _rows(tmp_path / "b", "valid")
    assert train_a != _rows(tmp_path / "c")
    # 86 samples -> 21 groups; valid about 20% of them; every kept sample appears exactly once
    assert a.samples_built == 86 and a.samples_written + a.samples_dropped["partial_group"] == 86
    assert a.groups_written["valid"] >= 1 and sum(a.groups_written.values()) == a.samples_written // 4
    texts = Counter(r["response_text"] for r in train_a + valid_a)
    assert max(texts.values()) == 1
    # a prompt never lands in both splits, and groups are whole and ordered
    prompts = lambda rows: {r["prompt_text"] for r in rows}  # noqa: E731
    assert not prompts(train_a) & prompts(valid_a)
    for rows in (train_a, valid_a):
        for k in range(0, len(rows), 4):
            assert [r["index_in_group"] for r in rows[k:k + 4]] == [0, 1, 2, 3]
            assert len({r["group_id"] for r in rows[k:k + 4]}) == 1
    ids = [r["group_id"] for r in train_a + valid_a][::4]
    assert sorted(ids) == list(range(len(ids)))
    assert len(list_shards(tmp_path / "a" / "train")) == -(-a.groups_written["train"] // 3)


def test_pairs_mode(tmp_path, tok_dir):
    rows = [{"instruction": f"task {k}", "output_1": f"one {k}", "output_2": f"two {k}", "label": 1 + k % 2}
            for k in range(6)]
    write_jsonl(tmp_path / "ob.jsonl", rows)
    run_prepare([tmp_path / "ob.jsonl"], tmp_path / "p", tok_dir, responses="pairs", valid_fraction=0.0)
    ds = GroupDataset(tmp_path / "p")
    assert ds.meta["group_size"] == 2 and len(ds) == 6
    out = _rows(tmp_path / "p")
    for k in range(0, 12, 2):
        chosen, rejected = out[k], out[k + 1]
        n = int(json.loads(chosen["prompt_messages"])[0]["content"].split()[1])
        assert chosen["prompt_text"] == rejected["prompt_text"]
        assert chosen["response_text"] == (f"one {n}" if n % 2 == 0 else f"two {n}")
        assert rejected["response_text"] == (f"two {n}" if n % 2 == 0 else f"one {n}")
    with pytest.raises(ValueError, match="exactly 2"):
        run_prepare([tmp_path / "ob.jsonl"], tmp_path / "q", tok_dir, responses="pairs", group_size=8)
    uf = [{"prompt": "p", "completions": [{"response": "a", "fine-grained_score": 3.0},
                                          {"response": "b", "fine-grained_score": 3.0}]},
          {"prompt": "q", "completions": [{"response": "c", "fine-grained_score": 1.0},
                                          {"response": "d", "fine-grained_score": 2.0}]}]
    write_jsonl(tmp_path / "uf.jsonl", uf)
    s = run_prepare([tmp_path / "uf.jsonl"], tmp_path / "u", tok_dir, responses="pairs", valid_fraction=0.0)
    assert dict(s.rows_dropped) == {"tied_pair": 1}
    assert [r["response_text"] for r in _rows(tmp_path / "u")] == ["d", "c"]


def test_input_formats_via_datasets_agree(tmp_path, tok_dir):
    import datasets

    rows = plain_rows(12)
    write_jsonl(tmp_path / "in.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "in.parquet"))
    ds.to_csv(str(tmp_path / "in.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "in.json").write_text(json.dumps(rows))
    kw = dict(group_size=4, valid_fraction=0.0)
    run_prepare([tmp_path / "in.jsonl"], tmp_path / "ref", tok_dir, **kw)
    ref = _rows(tmp_path / "ref")
    for name in ("in.parquet", "in.csv", "disk", "in.json"):
        run_prepare([tmp_path / name], tmp_path / f"o_{name}", tok_dir, **kw)
        assert _rows(tmp_path / f"o_{name}") == ref, name


def test_bad_rows_error_or_skip(tmp_path, tok_dir):
    good = plain_rows(8)
    lines = [json.dumps(r) for r in good[:2]] + ["{not json", json.dumps({"prompt": "p"}),
                                                   json.dumps({"prompt": "p", "response": "   "}),
                                                   json.dumps({"prompt": "", "response": "r"})]
    lines += [json.dumps(r) for r in good[2:]]
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{f}:3: malformed JSON line"):
        run_prepare([f], tmp_path / "o", tok_dir, group_size=4)
    assert not (tmp_path / "o").exists()  # nothing that looks valid is left behind
    s = run_prepare([f], tmp_path / "o", tok_dir, group_size=4, valid_fraction=0.0, on_bad_row="skip")
    assert dict(s.rows_dropped) == {"malformed_json": 1, "missing_field": 1, "empty_response": 1, "empty_prompt": 1}
    assert s.rows_read == 12 and s.rows_kept == 8 and s.samples_written == 8
    assert read_meta(tmp_path / "o")["summary"]["rows_dropped"]["malformed_json"] == 1
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        run_prepare([f], tmp_path / "o", tok_dir, group_size=4, on_bad_row="skip")
    run_prepare([f], tmp_path / "o", tok_dir, group_size=2, valid_fraction=0.0, on_bad_row="skip", overwrite=True)
    assert read_meta(tmp_path / "o")["group_size"] == 2
    with pytest.raises(ValueError, match="no complete group"):
        run_prepare([f], tmp_path / "x", tok_dir, group_size=64, on_bad_row="skip")


def test_cli_errors_and_success(tmp_path, tok_dir):
    f = write_jsonl(tmp_path / "in.jsonl", plain_rows(8))
    (tmp_path / "bad.jsonl").write_text(f.read_text() + "{oops\n")
    cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--tokenizer", str(tok_dir), "--group-size", "4",
           "--no-progress"]
    bad = subprocess.run(cmd + ["--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    err_lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and f"{tmp_path / 'bad.jsonl'}:9" in err_lines[0]
    ok = subprocess.run(cmd + ["--input", str(f), "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "rows read          8" in ok.stdout and "groups written" in ok.stdout


def test_output_holding_an_input_is_refused_even_with_overwrite(tmp_path, tok_dir):
    """``--input D/train.jsonl --output D --overwrite`` would replace D and delete its own input: refused (so is
    a tokenizer kept inside --output), and the input is untouched."""
    data = tmp_path / "D"
    data.mkdir()
    f = write_jsonl(data / "train.jsonl", plain_rows(8))
    before = f.read_bytes()
    with pytest.raises(ValueError, match=r"contains --input .*train\.jsonl.*delete"):
        run_prepare([f], data, tok_dir, group_size=4, overwrite=True)
    assert f.read_bytes() == before
    make_tokenizer(tmp_path / "E" / "tok")
    with pytest.raises(ValueError, match="contains --tokenizer"):
        run_prepare([f], tmp_path / "E", tmp_path / "E" / "tok", group_size=4, overwrite=True)
    assert (tmp_path / "E" / "tok").is_dir()
    run_prepare([f], tmp_path / "out", tok_dir, group_size=4)  # another output is fine
