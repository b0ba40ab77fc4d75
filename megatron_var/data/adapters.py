"""Adapters from public preference/instruction formats to one ``Example``: prompt turns + ranked responses.

Every adapter only checks structure (fields present, right types) and raises ``BadRow`` with a reason code, so
``--on-bad-row skip`` can count skips by reason; emptiness and lengths are checked later on the texts actually used.
TRL's dataset types are accepted in both their standard (strings) and conversational (``{role, content}`` message
lists) forms; which adapter a file gets is decided in ``detection.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

FORMATS = ("offsetbias", "ultrafeedback", "preference", "implicit_preference", "hh", "unpaired_preference",
           "prompt_completion", "plain", "messages")


class BadRow(ValueError):
    """A user-data problem in one input row; ``reason`` is a short code for the summary table."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail} [{reason}]")
        self.where, self.reason = where, reason


@dataclass
class Example:
    """One prompt with its responses ranked best first: responses[0] = chosen, responses[-1] = rejected."""

    messages: list[dict]  # prompt turns [{"role", "content"}], the response is not among them
    responses: list[str]
    scores: list[float] | None = None  # aligned with responses when the source has scores (ties detectable)
    where: str = ""
    extra: dict = field(default_factory=dict)
    label: bool | None = None  # unpaired preference: whether the single response is a desirable one


def _get(row: dict, key: str, where: str, kind=str):
    if key not in row or row[key] is None:
        raise BadRow(where, "missing_field", f"missing field {key!r}")
    value = row[key]
    if kind is str and not isinstance(value, str):
        raise BadRow(where, "bad_field", f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _user(text: str, row: dict, where: str) -> list[dict]:
    turns = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        turns.append({"role": "system", "content": row["system"]})
    return turns + [{"role": "user", "content": text}]


def offsetbias(row: dict, where: str, **_) -> Example:
    """OffsetBias: ``label`` 1 means output_1 is the better response, 2 means output_2 (dataset card)."""
    prompt = _get(row, "instruction", where)
    out1, out2 = _get(row, "output_1", where), _get(row, "output_2", where)
    label = _get(row, "label", where, kind=None)
    try:
        label = int(label)
    except (TypeError, ValueError):
        label = None
    if label not in (1, 2):
        raise BadRow(where, "bad_label", f"label must be 1 or 2, got {row['label']!r}")
    responses = [out1, out2] if label == 1 else [out2, out1]
    return Example(_user(prompt, row, where), responses, where=where)


def _completion_score(comp: dict, key: str) -> float | None:
    """UltraFeedback score: 'fine-grained' = fine-grained_score, else the mean of the per-aspect ratings."""
    if key == "overall":
        value = comp.get("overall_score")
        return float(value) if isinstance(value, (int, float)) else None
    value = comp.get("fine-grained_score")
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    ratings = []
    for aspect in (comp.get("annotations") or {}).values():
        rating = aspect.get("Rating") if isinstance(aspect, dict) else None
        try:
            ratings.append(float(rating))
        except (TypeError, ValueError):
            continue  # "N/A" ratings are left out of the mean
    return sum(ratings) / len(ratings) if ratings else None


def ultrafeedback(row: dict, where: str, score_key: str = "fine-grained", **_) -> Example:
    """UltraFeedback: completions ranked by score (best = chosen, worst = rejected), as the VAR paper does."""
    prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else None
    prompt = prompt if prompt is not None else _get(row, "instruction", where)
    completions = _get(row, "completions", where, kind=None)
    if not isinstance(completions, list) or not completions:
        raise BadRow(where, "bad_field", "field 'completions' must be a non-empty list")
    scored = []
    for k, comp in enumerate(completions):
        if not isinstance(comp, dict) or not isinstance(comp.get("response"), str):
            raise BadRow(where, "bad_field", f"completions[{k}] has no string 'response'")
        score = _completion_score(comp, score_key)
        if score is None:
            raise BadRow(where, "missing_score", f"completions[{k}] has no usable {score_key} score")
        scored.append((score, k, comp["response"]))
    scored.sort(key=lambda t: (-t[0], t[1]))  # stable: ties keep source order
    return Example(
        _user(prompt, row, where), [t[2] for t in scored], scores=[t[0] for t in scored], where=where
    )


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def looks_hh(value) -> bool:
    """Anthropic HH text (``"\\n\\nHuman: ..."``), as opposed to a plain text or a message list."""
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def parse_hh(text: str, where: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b..."`` -> chat messages (user/assistant)."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip()
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRow(where, "bad_turns", "HH text must be '\\n\\nHuman: ...\\n\\nAssistant: ...' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _check_messages(value, key: str, where: str) -> list[dict]:
    """A conversational field: a non-empty list of ``{role, content}`` (other keys, e.g. tool ids, are dropped)."""
    if not isinstance(value, list) or not value:
        raise BadRow(where, "bad_turns", f"field {key!r} must be a string or a non-empty list of {{role, content}}")
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow(where, "bad_turns", f"{key}[{k}] needs string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_last_assistant(messages, where: str, key: str = "messages") -> tuple[list[dict], str]:
    """A whole dialogue -> (every turn before the last, the last assistant turn): the full history is the prompt."""
    msgs = _check_messages(messages, key, where)
    if msgs[-1]["role"] != "assistant":
        raise BadRow(where, "bad_turns", f"the last message of {key!r} must be the assistant's response")
    prompt = msgs[:-1]
    if not any(m["role"] == "user" for m in prompt):
        raise BadRow(where, "bad_turns", f"{key!r}: no user turn before the response")
    return prompt, msgs[-1]["content"]


def _prompt(row: dict, where: str) -> list[dict]:
    """The ``prompt`` field: a string (one user turn, after the row's ``system`` if any) or a message list."""
    value = _get(row, "prompt", where, kind=None)
    if isinstance(value, str):
        return _user(value, row, where)
    return _check_messages(value, "prompt", where)


def _last_user(msgs: list[dict]) -> str | None:
    users = [m["content"].strip() for m in msgs if m["role"] == "user"]
    return users[-1] if users else None


def _response(row: dict, key: str, prompt: list[dict], where: str) -> tuple[list[dict], str]:
    """A response field -> (prompt turns, response text).

    A string, or assistant message(s) after ``prompt`` (TRL conversational), or the whole dialogue ending with the
    response (HuggingFaceH4/ultrafeedback_binarized repeats the prompt in ``chosen``). A dialogue must end on the
    same user turn as ``prompt``; the longer of the two histories is kept, so no earlier turn is lost."""
    value = _get(row, key, where, kind=None)
    if isinstance(value, str):
        return prompt, value
    msgs = _check_messages(value, key, where)
    if msgs[-1]["role"] != "assistant":
        raise BadRow(where, "bad_turns", f"the last message of {key!r} must be the assistant's response")
    head, response = msgs[:-1], msgs[-1]["content"]
    if not head or head == prompt:
        return prompt, response
    if _last_user(head) is None or _last_user(head) != _last_user(prompt):
        raise BadRow(where, "prompt_mismatch", f"{key!r} does not answer the prompt: its last user turn differs "
                                               "from the one in 'prompt'")
    return (head if len(head) >= len(prompt) else prompt), response


def _pair_scores(row: dict) -> list[float] | None:
    """``score_chosen``/``score_rejected`` when both are finite numbers, so ``--responses pairs`` can drop ties."""
    scores = [row.get("score_chosen"), row.get("score_rejected")]
    if all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
        return [float(s) for s in scores]
    return None


def _dialogue_pair(row: dict, where: str) -> Example:
    """chosen/rejected as whole dialogues (HH text or message lists) that differ only in the last assistant turn."""
    dialogues = []
    for key in ("chosen", "rejected"):
        value = _get(row, key, where, kind=None)
        msgs = parse_hh(value, where) if isinstance(value, str) else value
        dialogues.append(_split_last_assistant(msgs, where, key))
    (prompt, chosen), (prompt_r, rejected) = dialogues
    if prompt != prompt_r:
        raise BadRow(where, "prompt_mismatch", "chosen and rejected dialogues differ before the last turn")
    return Example(prompt, [chosen, rejected], scores=_pair_scores(row), where=where)


def _split_common_prefix(a: str, b: str, where: str) -> tuple[str, str, str]:
    """Standard implicit prompt: the shared beginning, cut before the whitespace that precedes the first differing
    word (no word is split; prompt + response is the original text, as TRL's " blue." / " green.")."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    if not all(n == len(t) or t[n].isspace() for t in (a, b)):  # the texts part inside a word: keep it whole
        while n > 0 and not a[n - 1].isspace():
            n -= 1
    while n > 0 and a[n - 1].isspace():
        n -= 1  # the separating whitespace stays with the responses
    if n == 0:
        raise BadRow(where, "no_common_prompt", "chosen and rejected share no beginning to use as the prompt "
                                                "(implicit-prompt preference needs the prompt at the start of both)")
    return a[:n], a[n:], b[n:]


def hh(row: dict, where: str, **_) -> Example:
    """Anthropic HH-RLHF: chosen/rejected are whole dialogues sharing a prefix; the last assistant turn differs.

    Also accepts chosen/rejected given as message lists (e.g. binarized UltraFeedback)."""
    return _dialogue_pair(row, where)


def implicit_preference(row: dict, where: str, **_) -> Example:
    """TRL preference with an implicit prompt (``chosen``, ``rejected`` only), e.g. trl-lib/ultrafeedback_binarized.

    Conversational (message lists) or HH text: the prompt is every turn before the last assistant turn (identical in
    both). Standard text: the prompt is the shared beginning (``_split_common_prefix``), a user turn."""
    chosen, rejected = _get(row, "chosen", where, kind=None), _get(row, "rejected", where, kind=None)
    if isinstance(chosen, str) and isinstance(rejected, str) and not (looks_hh(chosen) and looks_hh(rejected)):
        prompt, c, r = _split_common_prefix(chosen, rejected, where)
        return Example(_user(prompt, row, where), [c, r], scores=_pair_scores(row), where=where)
    return _dialogue_pair(row, where)


def preference(row: dict, where: str, **_) -> Example:
    """TRL preference with an explicit prompt, standard or conversational; HuggingFaceH4/ultrafeedback_binarized
    (prompt string, chosen/rejected whole dialogues, score_chosen/score_rejected)."""
    prompt = _prompt(row, where)
    prompt_c, chosen = _response(row, "chosen", prompt, where)
    prompt_r, rejected = _response(row, "rejected", prompt, where)
    if prompt_c != prompt_r:
        raise BadRow(where, "prompt_mismatch", "chosen and rejected continue different conversations")
    return Example(prompt_c, [chosen, rejected], scores=_pair_scores(row), where=where)


def _label(row: dict, where: str) -> bool:
    value = _get(row, "label", where, kind=None)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # CSV
        return value.strip().lower() == "true"
    raise BadRow(where, "bad_label", f"label must be true or false, got {value!r}")


def unpaired_preference(row: dict, where: str, **_) -> Example:
    """TRL unpaired preference (KTO, e.g. trl-lib/kto-mix-14k): one completion per row, ``label`` true when it is a
    desirable response. Which rows become samples depends on ``--responses`` (prepare.py)."""
    prompt, completion = _response(row, "completion", _prompt(row, where), where)
    return Example(prompt, [completion], where=where, label=_label(row, where))


def prompt_completion(row: dict, where: str, **_) -> Example:
    """TRL prompt-completion, standard (strings) or conversational (prompt turns + assistant completion)."""
    prompt, completion = _response(row, "completion", _prompt(row, where), where)
    return Example(prompt, [completion], where=where)


def plain(row: dict, where: str, **_) -> Example:
    """``{prompt, response}`` (or ``chosen``), optional ``rejected`` and ``system``."""
    prompt, response = _response(row, "response" if "response" in row else "chosen", _prompt(row, where), where)
    responses = [response]
    if row.get("rejected") is not None:
        prompt_r, rejected = _response(row, "rejected", prompt, where)
        if prompt_r != prompt:
            raise BadRow(where, "prompt_mismatch", "'rejected' continues a different conversation than the response")
        responses.append(rejected)
    return Example(prompt, responses, where=where)


def messages(row: dict, where: str, **_) -> Example:
    """``{messages: [...]}`` (TRL conversational language modeling): the last assistant turn is the response, every
    turn before it the prompt; an optional ``rejected`` (string or dialogue) is a worse alternative."""
    prompt, response = _split_last_assistant(_get(row, "messages", where, kind=None), where)
    responses = [response]
    if row.get("rejected") is not None:
        prompt_r, rejected = _response(row, "rejected", prompt, where)
        if prompt_r != prompt:
            raise BadRow(where, "prompt_mismatch", "'rejected' continues a different conversation than 'messages'")
        responses.append(rejected)
    return Example(prompt, responses, where=where)


ADAPTERS = {
    "offsetbias": offsetbias, "ultrafeedback": ultrafeedback, "preference": preference,
    "implicit_preference": implicit_preference, "hh": hh, "unpaired_preference": unpaired_preference,
    "prompt_completion": prompt_completion, "plain": plain, "messages": messages,
}
