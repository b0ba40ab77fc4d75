"""tools/score_logprobs.py end to end (single process, CPU) against transformers' forward, plus its input rules."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import hf_tiny
from megatron_var.convert.import_hf import convert_hf_to_megatron
from data_fixtures import make_tokenizer, write_jsonl
from megatron_var.cli.common import run_cli
from megatron_var.cli.score_logprobs import main, read_pairs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def meg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    model = hf_tiny.build_model(hf_tiny.llama_config(tied=True), seed=1)
    hf_tiny.save_model(model, tmp / "hf")
    return model, convert_hf_to_megatron(tmp / "hf", tmp / "meg")


def test_cli_scores_like_hf(meg, tmp_path):
    model, root = meg
    pairs = hf_tiny.random_pairs(5, 120, seed=2)
    rows = [{"prompt_ids": x, "response_ids": y, "id": f"row{i}"} for i, (x, y) in enumerate(pairs)]
    inp = write_jsonl(tmp_path / "pairs.jsonl", rows)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "score_logprobs.py"), "--load", str(root),
                           "--input", str(inp), "--output", str(tmp_path / "out.jsonl"), "--micro-batch-size", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    ref = hf_tiny.hf_token_logps(model, pairs)
    assert [o["id"] for o in out] == [r["id"] for r in rows]  # order and extra fields kept
    for o, r in zip(out, ref):
        assert o["prompt_ids"] and len(o["token_logps"]) == len(r)
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(o["token_logps"], r))
        assert o["logp"] == pytest.approx(sum(o["token_logps"]), rel=1e-12)


def test_text_pairs_use_the_stored_tokenizer(tmp_path):
    root = tmp_path / "meg"
    tok = make_tokenizer(root / "hf")
    inp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world", "response": " the answer", "k": 1}])
    records, pairs = read_pairs(inp, root)
    assert records == [{"prompt": "hello world", "response": " the answer", "k": 1}]
    assert pairs == [(tok("hello world")["input_ids"], tok(" the answer", add_special_tokens=False)["input_ids"])]
    assert pairs[0][0][0] == tok.bos_token_id


@pytest.mark.parametrize("line,expect", [
    ("{bad", "line 2: invalid JSON"),
    ('{"prompt_ids": [1]}', "line 2: needs prompt_ids + response_ids or prompt + response"),
    ('{"prompt_ids": [1], "response_ids": []}', "line 2: empty prompt or response"),
    ('{"prompt_ids": [1], "response_ids": ["a"]}', "line 2: prompt_ids/response_ids must be lists of ints"),
    ('{"prompt_ids": [1], "response_ids": [500]}', "pair 1: response token id 500 outside the vocabulary [0, 120)"),
])
def test_bad_input_is_a_clean_error(meg, tmp_path, capsys, line, expect):
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt_ids": [1, 2], "response_ids": [3]}\n' + line + "\n")
    argv = ["--load", str(meg[1]), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and expect in err, err
    assert not (tmp_path / "o.jsonl").exists()
