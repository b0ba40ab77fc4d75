"""Win rate with an LLM judge: the verdict table by hand, then tools/eval_winrate.py against a real HTTP judge on
127.0.0.1 (deterministic rules), with server errors, unusable replies, the cache resume and CLI errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from judge_server import FakeJudge

from megatron_var.cli.common import run_cli
from megatron_var.eval.winrate import combine, pair_outcome, parse_verdict, render_question, seed_rates
from megatron_var.cli.eval_winrate import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)


def test_parse_verdict():
    assert parse_verdict("Reasoning... [[A]]") == "A"
    assert parse_verdict("[[B]]") == "B"
    assert parse_verdict("close call [[C]]") == "tie"
    assert parse_verdict("I'd say [[A]] at first, but final verdict: [[B]]") == "B"  # the last tag counts
    for bad in ("[A]", "A is better", "[[D]]", "", None, "[[ A ]]"):
        assert parse_verdict(bad) is None, bad


def test_verdict_table_by_hand():
    # (verdict with the model shown as A, verdict with the model shown as B) -> outcome for the model
    table = {
        ("A", "B"): "win",    # wins both
        ("A", "tie"): "win",  # wins one, ties the other
        ("tie", "B"): "win",
        ("tie", "tie"): "tie",
        ("A", "A"): "tie",    # wins one, loses the other (position bias)
        ("B", "B"): "tie",
        ("tie", "A"): "lose",
        ("B", "tie"): "lose",
        ("B", "A"): "lose",
    }
    assert len(table) == 9
    for (v1, v2), expected in table.items():
        assert pair_outcome(v1, v2) == expected, (v1, v2)
    assert pair_outcome(None, "B") == pair_outcome("A", None) == "error"  # a missing verdict is never a tie
    assert combine("win", "lose") == "tie" and combine("lose", "tie") == "lose"
    r = seed_rates(["win", "win", "tie", "lose", "error"])
    assert (r.win, r.tie, r.lose, r.n, r.errors) == (0.5, 0.25, 0.25, 4, 1)
    assert math.isnan(seed_rates(["error"]).win)


def test_render_question_keeps_the_conversation():
    assert render_question([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]) == "Q"
    two = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
           {"role": "user", "content": "More?"}]
    assert render_question(two) == "User: Hi\n\nAssistant: Hello\n\nUser: More?"


REF = "abcde"  # every reference has 5 characters; the "longer" judge compares lengths
# seed 0: win, win, lose; seed 1: tie, win, lose (answers of 5 characters tie)
ANSWERS = {0: ["longer answer", "longer!", "ab"], 1: ["12345", "much longer", "x"]}


def _write_generations(path: Path, answers=ANSWERS, model: str = "m") -> Path:
    rows = []
    for seed, texts in answers.items():
        for i, text in enumerate(texts):
            msgs = [{"role": "user", "content": f"question {i}"}]
            if i == 1:  # a multi-turn prompt: the judge must see the earlier turns
                msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, *msgs]
            rows.append({"model": model, "seed": seed, "index": i, "messages": msgs, "response": text,
                         "reference": REF, "reward": 0.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(judge: FakeJudge, gens: list[Path], out: Path, *extra: str, capsys=None) -> tuple[int, dict | None]:
    argv = ["--generations", *map(str, gens), "--judge-base-url", judge.base_url, "--judge-model", "judge-x",
            "--output", str(out), "--timeout", "10", "--concurrency", "4", "--no-progress", *extra]
    code = run_cli(cli_main, argv)
    return code, json.loads(out.read_text()) if out.is_file() else None


def test_winrate_against_a_real_http_judge_and_cache_resume(tmp_path):
    gens = _write_generations(tmp_path / "gens.jsonl")
    with FakeJudge("longer") as judge:
        code, rep = _run(judge, [gens], tmp_path / "wr.json")
        assert code == 0 and judge.requests == 2 * 6  # 6 pairs, both orders
        res = rep["results"][0]
        assert res["per_seed"]["0"] == {"win": 2 / 3, "tie": 0.0, "lose": 1 / 3, "n": 3, "errors": 0}
        assert res["per_seed"]["1"] == pytest.approx({"win": 1 / 3, "tie": 1 / 3, "lose": 1 / 3, "n": 3,
                                                      "errors": 0})
        # mean and SE over the two seeds by hand: win rates 2/3 and 1/3 -> 1/2 ± |2/3 - 1/3| / 2
        assert res["win"]["mean"] == pytest.approx(0.5) and res["win"]["se"] == pytest.approx(1 / 6)
        assert res["tie"]["mean"] == pytest.approx(1 / 6) and res["lose"]["se"] == pytest.approx(0.0)
        assert any("User: Hi\n\nAssistant: Hello\n\nUser: question 1" in p for p in judge.prompts)
        ref_as_a = sum("[The Start of Assistant A's Answer]\nabcde\n" in p for p in judge.prompts)
        ref_as_b = sum("[The Start of Assistant B's Answer]\nabcde\n" in p for p in judge.prompts)
        assert ref_as_a == ref_as_b == 6  # every pair in both orders
        # resume: everything is cached, the second run asks nothing and reports the same numbers
        code, again = _run(judge, [gens], tmp_path / "wr.json")
        assert code == 0 and judge.requests == 12 and again["results"] == rep["results"]
        assert again["stats"]["cache_hits"] == 12
        # a cache line lost (e.g. cut by a kill): exactly that judgment is asked again
        cache = tmp_path / "wr.cache.jsonl"
        lines = cache.read_text().splitlines()
        cache.write_text("\n".join(lines[1:]) + "\n" + lines[0][:20])  # the first line torn at the end
        code, third = _run(judge, [gens], tmp_path / "wr.json")
        assert code == 0 and judge.requests == 13 and third["results"] == rep["results"]


def test_position_biased_judge_gives_ties(tmp_path):
    """A judge that always prefers A: each pair is won in one order and lost in the other, i.e. all ties.
    Negative control for the two orders: judging one order only would report a 100% win rate."""
    gens = _write_generations(tmp_path / "gens.jsonl")
    with FakeJudge("first") as judge:
        code, rep = _run(judge, [gens], tmp_path / "wr.json")
    res = rep["results"][0]
    assert code == 0 and res["tie"]["mean"] == 1.0 and res["win"]["mean"] == 0.0 and res["n_pairs"] == 6


def test_server_errors_are_retried(tmp_path):
    gens = _write_generations(tmp_path / "gens.jsonl")
    with FakeJudge("longer", fail_first=3) as judge:
        code, rep = _run(judge, [gens], tmp_path / "wr.json", "--max-retries", "4", "--concurrency", "1")
        assert code == 0 and judge.requests == 12 + 3
    assert rep["results"][0]["per_seed"]["0"]["win"] == pytest.approx(2 / 3)
    assert rep["stats"]["errors"] == 0


def test_unusable_replies_are_retried_then_errors_never_ties(tmp_path, capsys):
    answers = {0: ["longer answer", "GARBAGE here", "NOVERDICT x"]}
    gens = _write_generations(tmp_path / "gens.jsonl", answers)
    with FakeJudge("longer") as judge:
        code, rep = _run(judge, [gens], tmp_path / "wr.json", "--verdict-retries", "1", "--max-error-rate", "0.5")
        # pair 0: 2 requests; pairs 1 and 2: 2 orders x (1 + 1 retry) each
        assert judge.requests == 2 + 4 + 4
    res = rep["results"][0]
    assert code == 1  # 2 of 3 pairs without verdict > 0.5
    assert "2 of 3 pairs have no verdict" in capsys.readouterr().err
    assert res["per_seed"]["0"] == {"win": 1.0, "tie": 0.0, "lose": 0.0, "n": 1, "errors": 2}
    assert rep["stats"]["unusable_replies"] == 8 and rep["stats"]["errors"] == 4
    cache = [json.loads(x) for x in (tmp_path / "wr.cache.jsonl").read_text().splitlines()]
    assert len(cache) == 2 and {c["verdict"] for c in cache} == {"A", "B"}  # errors are not cached: a rerun retries


def test_endpoint_down_is_one_line_error_and_cache_is_kept(tmp_path, capsys):
    gens = _write_generations(tmp_path / "gens.jsonl")
    with FakeJudge("longer", fail_first=10_000, max_requests=50) as judge:
        code, _ = _run(judge, [gens], tmp_path / "wr.json", "--max-retries", "1", "--concurrency", "1")
        assert code == 2 and judge.requests <= 4  # stops at the first request that fails twice
    err = capsys.readouterr().err
    assert err.startswith("error: judge request failed after 1 retries: InternalServerError")


def test_bad_input_is_one_line_error(tmp_path, capsys):
    good = _write_generations(tmp_path / "gens.jsonl")
    no_ref = tmp_path / "noref.jsonl"
    rec = json.loads(good.read_text().splitlines()[0])
    no_ref.write_text(json.dumps({**rec, "reference": ""}) + "\n")
    dup = tmp_path / "dup.jsonl"
    dup.write_text(good.read_text().splitlines()[0] + "\n" + good.read_text().splitlines()[0] + "\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text("{oops\n")
    no_msgs = tmp_path / "nomsgs.jsonl"
    no_msgs.write_text(json.dumps({k: v for k, v in rec.items() if k != "messages"}) + "\n")
    cases = [
        ([str(no_ref)], [], "noref.jsonl:1: no 'reference' answer"),
        ([str(dup)], [], "dup.jsonl:2: duplicate generation"),
        ([str(bad_json)], [], "bad.jsonl:1: malformed JSON"),
        ([str(no_msgs)], [], "nomsgs.jsonl:1: field 'messages'"),
        ([str(tmp_path / "missing.jsonl")], [], "no such file"),
        ([str(good)], ["--models", "other"], "--models other: not in the generations"),
        ([str(good)], ["--concurrency", "0"], "--concurrency must be >= 1"),
    ]
    with FakeJudge("longer") as judge:
        for files, extra, msg in cases:
            argv = ["--generations", *files, "--judge-base-url", judge.base_url, "--judge-model", "j",
                    "--output", str(tmp_path / "o.json"), "--no-progress", *extra]
            assert run_cli(cli_main, argv) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and msg in err, (msg, err)
        assert judge.requests == 0
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_winrate.py"), "--generations", str(no_ref),
                           "--judge-base-url", "ftp://x", "--judge-model", "j", "--output", str(tmp_path / "o.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "need http(s)://" in proc.stderr
