"""Each public dataset schema and TRL dataset type, as 3-row local files: the adapter auto-detection picks, and the
prompt turns / response texts that end up in the prepared shards, per --responses mode."""

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from data_fixtures import run_prepare, write_jsonl

from megatron_var.data.groups import list_shards, read_meta


def user(text):
    return {"content": text, "role": "user"}  # the public sets store content before role


def assistant(text):
    return {"content": text, "role": "assistant"}


def prepared(tmp_path, tok_dir, inputs, name="out", **kw):
    """Run prepare_data with one sample per group; -> (summary, sorted [(prompt turns, response text)], meta)."""
    kw = {"group_size": 1, "valid_fraction": 0.0, **kw}
    summary = run_prepare(inputs, tmp_path / name, tok_dir, **kw)
    rows = [r for s in list_shards(tmp_path / name / "train") for r in pq.read_table(s).to_pylist()]
    samples = ordered((json.loads(r["prompt_messages"]), r["response_text"]) for r in rows)
    return summary, samples, read_meta(tmp_path / name)


def ordered(samples):
    return sorted(samples, key=json.dumps)


def turns(*texts):
    """Alternating user/assistant turns in the role-then-content order prepare_data writes."""
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(texts)]


# ------------------------------------------------------------------ HuggingFaceH4/ultrafeedback_binarized

H4_SPLITS = ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")


def h4_row(split, k, score_chosen=8.0, score_rejected=5.0):
    prompt = f"{split} question {k}"
    chosen, rejected = [user(prompt), assistant(f"good answer {k}")], [user(prompt), assistant(f"bad answer {k}")]
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "chosen": chosen,
            "rejected": rejected, "messages": chosen, "score_chosen": score_chosen, "score_rejected": score_rejected}


@pytest.fixture()
def h4_dir(tmp_path):
    import datasets

    dd = datasets.DatasetDict({s: datasets.Dataset.from_list([h4_row(s, k, 8.0, 5.0 if k else 8.0) for k in range(3)])
                               for s in H4_SPLITS})
    assert dd["train_prefs"].features["chosen"].feature["role"].dtype == "string"  # list of {content, role} structs
    dd.save_to_disk(str(tmp_path / "h4"))
    return tmp_path / "h4"


def test_h4_ultrafeedback_binarized_split_and_preference(tmp_path, tok_dir, h4_dir):
    with pytest.raises(ValueError, match=r"several splits and none is 'train' \(train_prefs, test_prefs.*--split"):
        prepared(tmp_path, tok_dir, [h4_dir])
    s, samples, meta = prepared(tmp_path, tok_dir, [h4_dir], split="train_prefs")
    assert s.input_formats == {f"{h4_dir}[train_prefs]": "preference"} and meta["split"] == "train_prefs"
    assert samples == [(turns(f"train_prefs question {k}"), f"good answer {k}") for k in range(3)]
    # pairs: chosen first; row 0 has equal scores and is dropped as a tie, counted
    s, samples, _ = prepared(tmp_path, tok_dir, [h4_dir], "pairs", split="test_prefs", responses="pairs",
                             group_size=2)
    assert dict(s.rows_dropped) == {"tied_pair": 1} and s.samples_written == 4
    assert samples == ordered((turns(f"test_prefs question {k}"), f"{q} answer {k}") for k in (1, 2)
                             for q in ("good", "bad"))
    with pytest.raises(ValueError, match=r"no split 'train' \(splits: train_prefs"):
        prepared(tmp_path, tok_dir, [h4_dir], "x", split="train")


def test_h4_rows_as_jsonl_and_as_messages(tmp_path, tok_dir):
    f = write_jsonl(tmp_path / "h4.jsonl", [h4_row("train_sft", k) for k in range(3)])
    s, samples, _ = prepared(tmp_path, tok_dir, [f], responses="all", group_size=2)
    assert s.input_formats == {str(f): "preference"}
    assert samples == ordered((turns(f"train_sft question {k}"), f"{q} answer {k}") for k in range(3)
                             for q in ("good", "bad"))
    # forcing --input-format messages reads these rows (chosen/rejected are message lists) as the same samples,
    # instead of failing with "field 'rejected' must be a string, got list"
    s, samples2, _ = prepared(tmp_path, tok_dir, [f], "m", responses="all", group_size=2, input_format="messages")
    assert samples2 == samples


# ------------------------------------------------------------------------------------ Anthropic/hh-rlhf

def hh_rows():
    return [{"chosen": f"\n\nHuman: hi {k}\n\nAssistant: hello {k}\n\nHuman: what is the sky?\n\nAssistant: blue {k}",
             "rejected": f"\n\nHuman: hi {k}\n\nAssistant: hello {k}\n\nHuman: what is the sky?\n\nAssistant: no {k}"}
            for k in range(3)]


def test_anthropic_hh_rlhf_gzipped_jsonl(tmp_path, tok_dir):
    f = tmp_path / "train.jsonl.gz"  # how hh-rlhf ships
    with gzip.open(f, "wt", encoding="utf-8") as g:
        g.writelines(json.dumps(r) + "\n" for r in hh_rows())
    s, samples, _ = prepared(tmp_path, tok_dir, [f], responses="pairs", group_size=2)
    assert s.input_formats == {str(f): "hh"}
    assert samples == ordered((turns(f"hi {k}", f"hello {k}", "what is the sky?"), f"{q} {k}") for k in range(3)
                             for q in ("blue", "no"))


# ------------------------------------------------------------------------------ openbmb/UltraFeedback, OffsetBias

def test_openbmb_ultrafeedback(tmp_path, tok_dir):
    def completion(text, fine, overall):
        ratings = {a: {"Rating": str(int(fine)), "Rationale": "r"} for a in ("helpfulness", "honesty")}
        return {"annotations": ratings, "critique": "c", "custom_system_prompt": "", "fine-grained_score": fine,
                "model": "m", "overall_score": overall, "principle": "helpfulness", "response": text}

    rows = [{"source": "evol_instruct", "instruction": f"task {k}", "models": ["a", "b", "c"],
             "completions": [completion(f"ok {k}", 3.0, 6.0), completion(f"best {k}", 4.5, 7.0),
                             completion(f"worst {k}", 1.0, 2.0)],
             "correct_answers": ["None"], "incorrect_answers": ["None"]} for k in range(3)]
    f = write_jsonl(tmp_path / "uf.jsonl", rows)
    s, samples, _ = prepared(tmp_path, tok_dir, [f])
    assert s.input_formats == {str(f): "ultrafeedback"}
    assert samples == [(turns(f"task {k}"), f"best {k}") for k in range(3)]


def test_offsetbias(tmp_path, tok_dir):
    rows = [{"instruction": f"task {k}", "output_1": f"one {k}", "output_2": f"two {k}", "label": 1 + k % 2}
            for k in range(3)]
    f = write_jsonl(tmp_path / "ob.jsonl", rows)
    s, samples, _ = prepared(tmp_path, tok_dir, [f])
    assert s.input_formats == {str(f): "offsetbias"}
    assert samples == [(turns(f"task {k}"), f"{'one' if k % 2 == 0 else 'two'} {k}") for k in range(3)]


# ---------------------------------------------------------------------------------------- TRL dataset types

def test_trl_preference_standard_and_conversational(tmp_path, tok_dir):
    std = write_jsonl(tmp_path / "std.jsonl", [{"prompt": f"sky {k}?", "chosen": f"blue {k}", "rejected": f"red {k}"}
                                               for k in range(3)])
    conv_rows = [{"prompt": [user(f"hi {k}"), assistant("hello"), user(f"sky {k}?")],
                  "chosen": [assistant(f"blue {k}")], "rejected": [assistant(f"red {k}")]} for k in range(3)]
    conv = write_jsonl(tmp_path / "conv.jsonl", conv_rows)
    s, samples, _ = prepared(tmp_path, tok_dir, [std, conv], responses="pairs", group_size=2)
    assert s.input_formats == {str(std): "preference", str(conv): "preference"}
    expect = [(turns(f"sky {k}?"), f"{c} {k}") for k in range(3) for c in ("blue", "red")]
    expect += [(turns(f"hi {k}", "hello", f"sky {k}?"), f"{c} {k}") for k in range(3) for c in ("blue", "red")]
    assert samples == ordered(expect)


def test_trl_implicit_prompt_preference(tmp_path, tok_dir):
    std = write_jsonl(tmp_path / "std.jsonl", [{"chosen": f"The sky {k} is blue.", "rejected": f"The sky {k} is green."}
                                               for k in range(3)])
    # trl-lib/ultrafeedback_binarized: chosen/rejected whole conversations, scores alongside
    conv_rows = [{"chosen": [user(f"q {k}"), assistant(f"good {k}")],
                  "rejected": [user(f"q {k}"), assistant(f"bad {k}")], "score_chosen": 9.0, "score_rejected": 2.0}
                 for k in range(3)]
    conv = write_jsonl(tmp_path / "conv.jsonl", conv_rows)
    s, samples, _ = prepared(tmp_path, tok_dir, [std, conv], responses="all", group_size=2)
    assert s.input_formats == {str(std): "implicit_preference", str(conv): "implicit_preference"}
    # standard text: the shared beginning is the prompt, prompt + response is the original text
    expect = [(turns(f"The sky {k} is"), f" {c}.") for k in range(3) for c in ("blue", "green")]
    expect += [(turns(f"q {k}"), f"{c} {k}") for k in range(3) for c in ("good", "bad")]
    assert samples == ordered(expect)


def test_trl_prompt_completion_standard_and_conversational(tmp_path, tok_dir):
    std = write_jsonl(tmp_path / "std.jsonl", [{"prompt": f"The sky {k} is", "completion": " blue."} for k in range(3)])
    conv = write_jsonl(tmp_path / "conv.jsonl", [
        {"prompt": [{"role": "system", "content": "be brief"}, user(f"hi {k}"), assistant("hey"), user("sky?")],
         "completion": [assistant(f"blue {k}")]} for k in range(3)])
    s, samples, _ = prepared(tmp_path, tok_dir, [std, conv])
    assert s.input_formats == {str(std): "prompt_completion", str(conv): "prompt_completion"}
    expect = [(turns(f"The sky {k} is"), " blue.") for k in range(3)]
    expect += [([{"role": "system", "content": "be brief"}, *turns(f"hi {k}", "hey", "sky?")], f"blue {k}")
               for k in range(3)]
    assert samples == ordered(expect)
    with pytest.raises(ValueError, match="prompt_completion rows hold one response each; --responses pairs"):
        prepared(tmp_path, tok_dir, [std], "p", responses="pairs", group_size=2)


def test_trl_unpaired_preference_kto_mix(tmp_path, tok_dir):
    """trl-lib/kto-mix-14k: conversational prompt/completion and a bool label (True = desirable)."""
    import datasets

    rows = [{"prompt": [user(f"q {k}")], "completion": [assistant(f"{'good' if k != 1 else 'bad'} {k}")],
             "label": k != 1} for k in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "kto.parquet"))
    f = tmp_path / "kto.parquet"
    std = write_jsonl(tmp_path / "std.jsonl", [{"prompt": "q 9", "completion": "good 9", "label": True}])
    s, samples, _ = prepared(tmp_path, tok_dir, [f, std])
    assert s.input_formats == {str(f): "unpaired_preference", str(std): "unpaired_preference"}
    assert samples == [(turns("q 0"), "good 0"), (turns("q 2"), "good 2"), (turns("q 9"), "good 9")]
    assert dict(s.rows_dropped) == {"undesirable_completion": 1} and s.rows_read == 4  # counted, not lost
    s, samples, _ = prepared(tmp_path, tok_dir, [f], "all", responses="all")
    assert sorted(r for _, r in samples) == ["bad 1", "good 0", "good 2"] and not s.rows_dropped
    with pytest.raises(ValueError, match="unpaired_preference rows hold one response each"):
        prepared(tmp_path, tok_dir, [f], "p", responses="pairs", group_size=2)


def test_trl_conversational_language_modeling_capybara(tmp_path, tok_dir):
    """trl-lib/Capybara-like: multi-turn messages; the whole conversation before the last assistant turn is the
    prompt (never cut to the first user turn)."""
    rows = [{"source": "General-Instruct", "messages": turns(f"hi {k}", "hello", "and then?", f"the end {k}")}
            for k in range(3)]
    f = write_jsonl(tmp_path / "capy.jsonl", rows)
    s, samples, _ = prepared(tmp_path, tok_dir, [f])
    assert s.input_formats == {str(f): "messages"}
    assert samples == [(turns(f"hi {k}", "hello", "and then?"), f"the end {k}") for k in range(3)]


@pytest.mark.parametrize("rows,match", [
    ([{"text": "The sky is blue."}], "language-modeling dataset .*no prompt/response split"),
    ([{"prompt": "The sky is"}], "prompt-only dataset .*generate responses first"),
    ([{"prompt": [user("What color is the sky?")]}], "prompt-only dataset"),
    ([{"prompt": "p", "completion": "c", "response": "r"}], r"fit several formats \(plain, prompt_completion\).*"
                                                            "--input-format"),
])
def test_formats_without_responses_or_ambiguous_are_refused(tmp_path, tok_dir, rows, match):
    f = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(ValueError, match=f"{f}: .*{match}"):
        prepared(tmp_path, tok_dir, [f])
    assert not (tmp_path / "out").exists()


def test_conversational_mismatch_and_bad_label_are_bad_rows(tmp_path, tok_dir):
    rows = [{"prompt": "q 0", "chosen": [user("q 0"), assistant("a")], "rejected": [user("q 0"), assistant("b")]},
            {"prompt": "q 1", "chosen": [user("another question"), assistant("a")], "rejected": [assistant("b")]},
            {"prompt": "q 2", "chosen": [user("q 2"), assistant("a")], "rejected": [user("q 2"), user("b")]}]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{f}:2: 'chosen' does not answer the prompt.*\[prompt_mismatch\]"):
        prepared(tmp_path, tok_dir, [f])
    s, samples, _ = prepared(tmp_path, tok_dir, [f], on_bad_row="skip")
    assert dict(s.rows_dropped) == {"prompt_mismatch": 1, "bad_turns": 1} and samples == [(turns("q 0"), "a")]
    kto = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "c", "label": "maybe"}])
    with pytest.raises(ValueError, match=r"k.jsonl:1: label must be true or false.*\[bad_label\]"):
        prepared(tmp_path, tok_dir, [kto], "k")


def test_readme_format_table_lists_every_adapter():
    """docs and --help name every adapter (a new one cannot be left undocumented)."""
    from megatron_var.data.adapters import FORMATS
    from megatron_var.cli.prepare_data import DESCRIPTION

    doc = (Path(__file__).resolve().parents[2] / "docs" / "data-format.md").read_text()
    for fmt in FORMATS:
        assert f"| `{fmt}` |" in doc and f"  {fmt} " in DESCRIPTION, fmt
