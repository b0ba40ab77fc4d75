"""Which adapter reads a file: from its column names (and, for ``chosen``/``rejected`` only, the first row).

Rule: among the formats whose required columns are all present, those with several responses per prompt
(preference data) beat those with one (SFT data), which beat those with none (refused: VAR needs responses);
within that tier a format whose columns are a strict subset of another match's is less specific and dropped.
Two matches left means the columns are ambiguous: the user must say ``--input-format``.
"""

from __future__ import annotations

from megatron_var.data.adapters import looks_hh

RANKED, SINGLE, NO_RESPONSE = 0, 1, 2

# (format, required columns, tier); a format may have several signatures
SIGNATURES = (
    ("offsetbias", {"instruction", "output_1", "output_2", "label"}, RANKED),
    ("ultrafeedback", {"prompt", "completions"}, RANKED),
    ("ultrafeedback", {"instruction", "completions"}, RANKED),
    ("preference", {"prompt", "chosen", "rejected"}, RANKED),
    ("implicit_preference", {"chosen", "rejected"}, RANKED),
    ("unpaired_preference", {"prompt", "completion", "label"}, RANKED),
    ("prompt_completion", {"prompt", "completion"}, SINGLE),
    ("plain", {"prompt", "response"}, SINGLE),
    ("plain", {"prompt", "chosen"}, SINGLE),
    ("messages", {"messages"}, SINGLE),
    ("language_modeling", {"text"}, NO_RESPONSE),
    ("prompt_only", {"prompt"}, NO_RESPONSE),
)

REFUSED = {
    "language_modeling": "a language-modeling dataset (a 'text' column) has no prompt/response split, and VAR "
                         "trains on (prompt, response) samples; give prompt/completion columns, or 'messages' "
                         "(the last assistant turn is the response)",
    "prompt_only": "a prompt-only dataset (a 'prompt' column, no response column) has no responses to train on; "
                   "generate responses first (e.g. B samples per prompt from the policy) and pass prompt/completion "
                   "rows",
}

# formats with exactly one response per row: --responses pairs cannot be made from them
SINGLE_RESPONSE = ("prompt_completion", "unpaired_preference")


def _expected() -> str:
    by_format: dict[str, list[str]] = {}
    for fmt, cols, _ in SIGNATURES:
        by_format.setdefault(fmt, []).append("+".join(sorted(cols)))
    return "; ".join(f"{fmt} ({' | '.join(sigs)})" for fmt, sigs in by_format.items())


def detect_format(columns: set[str], where: str, first_row: dict | None = None) -> str:
    """The adapter name for these columns; ValueError (one line) when nothing fits, it is ambiguous, or the data
    has no responses."""
    matches = [(fmt, cols, tier) for fmt, cols, tier in SIGNATURES if cols <= columns]
    if not matches:
        raise ValueError(f"{where}: cannot detect the input format from columns {sorted(columns)}; expected "
                         f"one of {_expected()}; or pass --input-format")
    best = min(tier for _, _, tier in matches)
    tied = [(fmt, cols) for fmt, cols, tier in matches if tier == best]
    names = sorted({fmt for fmt, cols in tied if not any(cols < other for _, other in tied)})
    if len(names) > 1:
        raise ValueError(f"{where}: columns {sorted(columns)} fit several formats ({', '.join(names)}); "
                         "pass --input-format to choose one")
    name = names[0]
    if name in REFUSED:
        raise ValueError(f"{where}: {REFUSED[name]}")
    if name == "implicit_preference" and first_row is not None and looks_hh(first_row.get("chosen")):
        return "hh"
    return name
