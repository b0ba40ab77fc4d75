"""Reading inputs as users hold them: non-UTF-8 bytes, DatasetDict splits, dataset names via datasets.load_dataset
(monkeypatched: tests stay offline), and the CLI's one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import plain_rows, run_prepare, write_jsonl

from megatron_var.data.adapters import BadRow
from megatron_var.data.readers import InputSource, is_hub_name

REPO = Path(__file__).resolve().parents[2]


def _lines(rows):
    return [json.dumps(r).encode() for r in rows]


def test_invalid_utf8_line_named_and_skippable(tmp_path, tok_dir):
    lines = _lines(plain_rows(4))
    lines.insert(2, b'{"prompt": "caf\xe9", "response": "latin-1 bytes"}')  # line 3
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # a BOM on line 1 is fine
    with pytest.raises(ValueError, match=rf"{f}:3: line is not valid UTF-8 \(byte 0xe9 .*\[invalid_utf8\].*"
                                         "--on-bad-row skip"):
        run_prepare([f], tmp_path / "o", tok_dir, group_size=2, valid_fraction=0.0)
    s = run_prepare([f], tmp_path / "o", tok_dir, group_size=2, valid_fraction=0.0, on_bad_row="skip")
    assert s.rows_read == 5 and dict(s.rows_dropped) == {"invalid_utf8": 1} and s.samples_written == 4
    where = [w for w, _ in InputSource(f)]
    assert where == [f"{f}:{k}" for k in (1, 2, 3, 4, 5)]


def test_invalid_utf8_in_json_array_item_and_csv(tmp_path, tok_dir):
    rows = plain_rows(4)
    items = [json.dumps(r).encode() for r in rows]
    items[1] = b'{"prompt": "na\xefve", "response": "r"}'
    f = tmp_path / "arr.json"
    f.write_bytes(b"[\n" + b",\n".join(items) + b"\n]")
    got = list(InputSource(f))
    assert isinstance(got[1][1], BadRow) and got[1][1].reason == "invalid_utf8" and got[1][0] == f"{f}:item 2"
    assert [r for _, r in got if not isinstance(r, BadRow)] == [rows[0], *rows[2:]]  # the others are intact
    s = run_prepare([f], tmp_path / "o", tok_dir, group_size=1, valid_fraction=0.0, on_bad_row="skip")
    assert dict(s.rows_dropped) == {"invalid_utf8": 1} and s.samples_written == 3
    c = tmp_path / "in.csv"
    c.write_bytes(b"prompt,response\nhello,world\nbad \xff,x\n")
    with pytest.raises(ValueError, match=rf"{c}:3: line is not valid UTF-8 \(byte 0xff"):
        InputSource(c)


def _saved(tmp_path, name, splits):
    import datasets

    dd = datasets.DatasetDict({s: datasets.Dataset.from_list([{"prompt": f"{s} q", "response": f"{s} a"}])
                               for s in splits})
    dd.save_to_disk(str(tmp_path / name))
    return tmp_path / name


def test_split_selection(tmp_path):
    import datasets

    first = lambda src: next(iter(src))[1]["prompt"]  # noqa: E731
    assert first(InputSource(_saved(tmp_path, "a", ["test", "train"]))) == "train q"  # default: train
    only = InputSource(_saved(tmp_path, "b", ["train_sft"]))  # else the only split
    assert first(only) == "train_sft q" and next(iter(only))[0].endswith("b[train_sft]:row 1")
    several = _saved(tmp_path, "c", ["train_prefs", "test_prefs"])
    with pytest.raises(ValueError, match=r"several splits and none is 'train' \(train_prefs, test_prefs\).*--split"):
        InputSource(several)
    assert first(InputSource(several, "test_prefs")) == "test_prefs q"
    with pytest.raises(ValueError, match=r"no split 'valid' \(splits: train_prefs, test_prefs\)"):
        InputSource(several, "valid")
    f = write_jsonl(tmp_path / "in.jsonl", plain_rows(2))
    with pytest.raises(ValueError, match="--split train applies to save_to_disk DatasetDicts and hub datasets"):
        InputSource(f, "train")
    datasets.Dataset.from_list(plain_rows(2)).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ValueError, match="--split train needs a saved DatasetDict"):
        InputSource(tmp_path / "single", "train")


def test_hub_names_go_to_load_dataset_and_local_paths_never_do(tmp_path, tok_dir, monkeypatch):
    import datasets

    calls = []
    local = datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(plain_rows(4)),
                                  "test_prefs": datasets.Dataset.from_list(plain_rows(2, seed=1))})

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split))
        if name == "no/such-set":
            raise FileNotFoundError("Couldn't find dataset no/such-set on the Hub")
        return local if split is None else local[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    s = run_prepare(["someone/prefs"], tmp_path / "o", tok_dir, split="train_prefs", group_size=2,
                    valid_fraction=0.0)
    assert calls == [("someone/prefs", "train_prefs")] and s.rows_read == 4
    assert s.input_formats == {"someone/prefs[train_prefs]": "plain"}
    with pytest.raises(ValueError, match="someone/prefs: several splits and none is 'train'"):
        InputSource("someone/prefs")  # loaded whole, then the same split rule as for saved DatasetDicts
    with pytest.raises(ValueError, match=r"--input no/such-set: not a local file or directory, and "
                                         r"datasets.load_dataset\('no/such-set'\) failed \(FileNotFoundError"):
        run_prepare(["no/such-set"], tmp_path / "x", tok_dir)
    # local paths, existing or mistyped, never reach load_dataset
    calls.clear()
    f = write_jsonl(tmp_path / "in.jsonl", plain_rows(2))
    _saved(tmp_path, "disk", ["train"])
    assert len(InputSource(f)) == 2 and len(InputSource(tmp_path / "disk")) == 1
    for missing in (tmp_path / "missing.jsonl", "data/missing.jsonl", "a/b/c", "typo.parquet"):
        with pytest.raises(ValueError, match="no such file or directory"):
            InputSource(missing)
        assert not is_hub_name(str(missing))
    assert calls == []
    assert is_hub_name("HuggingFaceH4/ultrafeedback_binarized") and is_hub_name("imdb")


def test_cli_refusals_are_one_error_line(tmp_path, tok_dir):
    f = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "The sky is"}])
    cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--tokenizer", str(tok_dir), "--no-progress",
           "--output", str(tmp_path / "o"), "--input", str(f)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{f}: a prompt-only dataset" in errors[0]
