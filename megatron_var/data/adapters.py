"""Adapters from public preference/instruction formats to one ``Example``: prompt turns + ranked responses.

Every adapter only checks structure (fields present, right types) and raises ``BadRow`` with a reason code, so
``--on-bad-row skip`` can count skips by reason; emptiness and lengths are checked later on the texts actually used.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

FORMATS = ("offsetbias", "ultrafeedback", "hh", "plain", "messages")


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


def detect_format(columns: set[str], where: str) -> str:
    """Pick an adapter from column names (first match wins, most specific first)."""
    if {"instruction", "output_1", "output_2", "label"} <= columns:
        return "offsetbias"
    if "completions" in columns and columns & {"prompt", "instruction"}:
        return "ultrafeedback"
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and columns & {"response", "chosen"}:
        return "plain"
    if {"chosen", "rejected"} <= columns:
        return "hh"
    raise ValueError(
        f"{where}: cannot detect the input format from columns {sorted(columns)}; expected one of "
        "offsetbias (instruction, output_1, output_2, label), ultrafeedback (prompt|instruction, completions), "
        "messages (messages), plain (prompt, response|chosen[, rejected]), hh (chosen, rejected); "
        "or pass --input-format"
    )


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


def parse_hh(text: str, where: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b..."`` -> chat messages (user/assistant)."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip()
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRow(where, "bad_turns", "HH text must be '\\n\\nHuman: ...\\n\\nAssistant: ...' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _split_last_assistant(messages, where: str) -> tuple[list[dict], str]:
    if not isinstance(messages, list) or not messages:
        raise BadRow(where, "bad_turns", "messages must be a non-empty list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow(where, "bad_turns", f"message {k} needs string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise BadRow(where, "bad_turns", "the last message must be the assistant's response")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    if not any(m["role"] == "user" for m in prompt):
        raise BadRow(where, "bad_turns", "no user turn before the response")
    return prompt, messages[-1]["content"]


def hh(row: dict, where: str, **_) -> Example:
    """Anthropic HH-RLHF: chosen/rejected are whole dialogues sharing a prefix; the last assistant turn differs.

    Also accepts chosen/rejected given as message lists (e.g. binarized UltraFeedback)."""
    dialogues = []
    for key in ("chosen", "rejected"):
        value = _get(row, key, where, kind=None)
        msgs = parse_hh(value, where) if isinstance(value, str) else value
        dialogues.append(_split_last_assistant(msgs, where))
    (prompt, chosen), (prompt_r, rejected) = dialogues
    if prompt != prompt_r:
        raise BadRow(where, "prompt_mismatch", "chosen and rejected dialogues differ before the last turn")
    return Example(prompt, [chosen, rejected], where=where)


def plain(row: dict, where: str, **_) -> Example:
    """``{prompt, response}`` (or ``chosen``), optional ``rejected`` and ``system``."""
    prompt = _get(row, "prompt", where)
    response = _get(row, "response" if "response" in row else "chosen", where)
    responses = [response]
    if row.get("rejected") is not None:
        responses.append(_get(row, "rejected", where))
    return Example(_user(prompt, row, where), responses, where=where)


def messages(row: dict, where: str, **_) -> Example:
    """``{messages: [...]}``: the last assistant turn is the response; optional ``rejected`` alternative."""
    prompt, response = _split_last_assistant(_get(row, "messages", where, kind=None), where)
    responses = [response]
    if row.get("rejected") is not None:
        responses.append(_get(row, "rejected", where))
    return Example(prompt, responses, where=where)


ADAPTERS = {"offsetbias": offsetbias, "ultrafeedback": ultrafeedback, "hh": hh, "plain": plain, "messages": messages}
