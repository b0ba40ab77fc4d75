"""Each input adapter on hand-written rows, format detection, and the length-fitting rule."""

import numpy as np
import pytest

from megatron_var.data import adapters
from megatron_var.data.detection import detect_format
from megatron_var.data.formatting import fit_length


def test_offsetbias_label_picks_preferred_output():
    row = {"instruction": "fix: teh cat", "output_1": "the cat", "output_2": "a dog", "label": 1}
    ex = adapters.offsetbias(row, "f:1")
    assert ex.messages == [{"role": "user", "content": "fix: teh cat"}]
    assert ex.responses == ["the cat", "a dog"]
    ex2 = adapters.offsetbias({**row, "label": 2}, "f:2")
    assert ex2.responses == ["a dog", "the cat"]
    with pytest.raises(adapters.BadRow) as e:
        adapters.offsetbias({**row, "label": 3}, "f:3")
    assert e.value.reason == "bad_label" and "f:3" in str(e.value)
    with pytest.raises(adapters.BadRow) as e:
        adapters.offsetbias({k: v for k, v in row.items() if k != "output_2"}, "f:4")
    assert e.value.reason == "missing_field" and "output_2" in str(e.value)


def _uf_completion(text, fine=None, ratings=None, overall=None):
    comp = {"response": text, "overall_score": overall}
    if fine is not None:
        comp["fine-grained_score"] = fine
    if ratings is not None:
        comp["annotations"] = {a: {"Rating": r, "Rationale": "..."} for a, r in ratings.items()}
    return comp


def test_ultrafeedback_ranks_by_score():
    row = {"instruction": "write", "completions": [
        _uf_completion("mid", fine=3.5, overall=9), _uf_completion("best", fine=4.75, overall=2),
        _uf_completion("worst", fine=1.25, overall=5)]}
    ex = adapters.ultrafeedback(row, "u:1")
    assert ex.responses == ["best", "mid", "worst"] and ex.scores == [4.75, 3.5, 1.25]
    ex_overall = adapters.ultrafeedback(row, "u:1", score_key="overall")
    assert ex_overall.responses == ["mid", "worst", "best"]
    # no fine-grained_score: mean of the per-aspect ratings, "N/A" left out: (5+4)/2 = 4.5 > (3+3+3)/3
    row2 = {"prompt": "p", "completions": [
        _uf_completion("b", ratings={"helpfulness": "3", "honesty": "3", "truthfulness": "3"}),
        _uf_completion("a", ratings={"helpfulness": "5", "honesty": "4", "truthfulness": "N/A"})]}
    ex2 = adapters.ultrafeedback(row2, "u:2")
    assert ex2.responses == ["a", "b"] and ex2.scores == [4.5, 3.0]
    with pytest.raises(adapters.BadRow) as e:
        adapters.ultrafeedback({"prompt": "p", "completions": [{"response": "x"}]}, "u:3")
    assert e.value.reason == "missing_score"


def test_hh_multi_turn_last_assistant_is_response():
    chosen = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how is the sky?\n\nAssistant: it is blue."
    rejected = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how is the sky?\n\nAssistant: go away"
    ex = adapters.hh({"chosen": chosen, "rejected": rejected}, "h:1")
    assert ex.messages == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"},
                           {"role": "user", "content": "how is the sky?"}]
    assert ex.responses == ["it is blue.", "go away"]
    with pytest.raises(adapters.BadRow) as e:
        adapters.hh({"chosen": chosen, "rejected": rejected.replace("how is", "why is")}, "h:2")
    assert e.value.reason == "prompt_mismatch"
    with pytest.raises(adapters.BadRow) as e:
        adapters.hh({"chosen": "no turns here", "rejected": rejected}, "h:3")
    assert e.value.reason == "bad_turns"


def test_plain_and_messages():
    ex = adapters.plain({"prompt": "p", "response": "r", "rejected": "x", "system": "be nice"}, "p:1")
    assert ex.messages == [{"role": "system", "content": "be nice"}, {"role": "user", "content": "p"}]
    assert ex.responses == ["r", "x"]
    assert adapters.plain({"prompt": "p", "chosen": "c"}, "p:2").responses == ["c"]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    ex = adapters.messages({"messages": msgs}, "m:1")
    assert ex.messages == msgs[:2] and ex.responses == ["a"]
    with pytest.raises(adapters.BadRow) as e:
        adapters.messages({"messages": msgs[:2]}, "m:2")
    assert e.value.reason == "bad_turns" and "m:2" in str(e.value)


@pytest.mark.parametrize("columns,expected", [
    ({"instruction", "output_1", "output_2", "label"}, "offsetbias"),
    ({"source", "instruction", "models", "completions"}, "ultrafeedback"),
    ({"chosen", "rejected"}, "implicit_preference"),
    ({"prompt", "response"}, "plain"),
    ({"prompt", "chosen", "rejected"}, "preference"),
    ({"messages", "id"}, "messages"),
])
def test_detect_format(columns, expected):
    assert detect_format(columns, "x") == expected


def test_detect_format_unknown_names_columns():
    with pytest.raises(ValueError, match=r"x.jsonl: cannot detect.*\['foo'\]"):
        detect_format({"foo"}, "x.jsonl")


def test_fit_length_rules():
    p, r = np.arange(10), np.arange(100, 106)  # P=10, R=6
    assert fit_length(p, r, 16, "truncate")[2] == "ok"
    p2, r2, st = fit_length(p, r, 12, "truncate")  # cut the prompt from the left, keep all of the response
    assert st == "prompt" and p2.tolist() == list(range(4, 10)) and r2.tolist() == r.tolist()
    assert fit_length(p, r, 12, "drop")[2] == "overlong"
    p3, r3, st = fit_length(p, r, 6, "truncate")  # response alone too long: keep S//2 prompt, cut response tail
    assert st == "response" and p3.tolist() == [7, 8, 9] and r3.tolist() == [100, 101, 102]
    p4, r4, st = fit_length(p, r, 7, "truncate")  # R = S-1: exactly one prompt token left
    assert st == "prompt" and p4.tolist() == [9] and len(r4) == 6


def test_implicit_prompt_text_split_keeps_words_whole():
    """Standard implicit-prompt preference: the prompt ends before the first differing word, so "blue"/"black"
    (which share "bl") are not cut, and prompt + response gives back each original text."""
    for chosen, rejected, prompt in [("The sky is blue.", "The sky is green.", "The sky is"),
                                     ("The sky is blue", "The sky is black", "The sky is"),
                                     ("Q: 2+2?\nA: 4", "Q: 2+2?\nA: 5", "Q: 2+2?\nA:")]:
        ex = adapters.implicit_preference({"chosen": chosen, "rejected": rejected}, "i:1")
        assert ex.messages == [{"role": "user", "content": prompt}]
        assert [prompt + r for r in ex.responses] == [chosen, rejected]
    with pytest.raises(adapters.BadRow) as e:
        adapters.implicit_preference({"chosen": "yes", "rejected": "no"}, "i:2")
    assert e.value.reason == "no_common_prompt"


def test_plain_rejected_may_be_a_dialogue():
    u = {"role": "user", "content": "p"}
    ex = adapters.plain({"prompt": "p", "response": "r", "rejected": [u, {"role": "assistant", "content": "x"}]}, "p:1")
    assert ex.messages == [u] and ex.responses == ["r", "x"]
    with pytest.raises(adapters.BadRow) as e:
        adapters.plain({"prompt": "p", "response": "r", "rejected": [{"role": "user", "content": "other"},
                                                             {"role": "assistant", "content": "x"}]}, "p:2")
    assert e.value.reason == "prompt_mismatch"
