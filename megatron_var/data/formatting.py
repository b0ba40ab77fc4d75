"""Turning an Example's prompt and a response into policy token ids: chat or raw template, eos, length fitting.

The prompt is rendered once as text (``apply_chat_template(..., add_generation_prompt=True)`` or the raw template)
and tokenized without adding special tokens again (chat templates already hold bos); the response is tokenized
alone and ends with eos, so the loss on response tokens teaches the model to stop.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_var.data.adapters import BadRow, Example

logger = logging.getLogger(__name__)

DEFAULT_RAW_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
FIT_OK, FIT_PROMPT, FIT_RESPONSE, FIT_DROP = "ok", "prompt", "response", "overlong"


@dataclass
class TemplateConfig:
    """How prompts are rendered for the policy."""

    kind: str = "chat"  # "chat": the tokenizer's chat template; "raw": raw_template (base models)
    raw_template: str = DEFAULT_RAW_TEMPLATE  # must contain {prompt}; may contain {system}
    system_prompt: str | None = None  # prepended as a system turn unless the example already has one

    def __post_init__(self):
        if self.kind not in ("chat", "raw"):
            raise ValueError(f"--template must be chat or raw, got {self.kind!r}")
        if self.kind == "raw" and "{prompt}" not in self.raw_template:
            raise ValueError(f"--raw-template must contain {{prompt}}, got {self.raw_template!r}")


def load_tokenizer(path: str | Path):
    """A local HF tokenizer dir, or a megatron_var checkpoint dir holding one under ``hf/``."""
    from transformers import AutoTokenizer

    path = Path(path)
    if (path / "hf").is_dir():
        path = path / "hf"
    if not path.is_dir():
        raise ValueError(f"--tokenizer {path}: not a directory (need a local HF tokenizer or checkpoint dir)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for unusable dirs
        raise ValueError(f"--tokenizer {path}: cannot load a tokenizer ({type(e).__name__}: {e})") from None


class Formatter:
    """Renders prompts and tokenizes prompt/response texts in batches."""

    def __init__(self, tokenizer, cfg: TemplateConfig):
        self.tok, self.cfg = tokenizer, cfg
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token; responses must end with one")
        if cfg.kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template; use --template raw for base models"
            )

    def prompt_messages(self, ex: Example) -> list[dict]:
        msgs = list(ex.messages)
        if self.cfg.system_prompt and not (msgs and msgs[0]["role"] == "system"):
            msgs.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return msgs

    def prompt_text(self, msgs: list[dict], where: str) -> str:
        if self.cfg.kind == "chat":
            try:
                return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # jinja raise_exception in templates, e.g. roles not alternating
                raise BadRow(where, "chat_template", f"chat template rejected the messages ({e})") from None
        system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
        turns = [m for m in msgs if m["role"] != "system"]
        if len(turns) == 1:
            prompt = turns[0]["content"]
        else:  # multi-turn history in a base-model template: label each turn
            prompt = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)
        template = self.cfg.raw_template
        if system and "{system}" not in template:
            template = system + "\n\n" + template
        return template.replace("{system}", system).replace("{prompt}", prompt)

    def encode_prompts(self, texts: list[str]) -> list[np.ndarray]:
        # chat: the template already wrote bos; raw: let the tokenizer add bos as it does for base models.
        add_special = self.cfg.kind == "raw"
        ids = self.tok(texts, add_special_tokens=add_special)["input_ids"]
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def encode_responses(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        eos = self.tok.eos_token_id
        return [np.asarray([*x, eos], dtype=np.int32) for x in ids]

    def decode(self, ids: np.ndarray) -> str:
        return self.tok.decode(ids.tolist(), skip_special_tokens=True)


def fit_length(
    prompt_ids: np.ndarray, response_ids: np.ndarray, seq_length: int, overlong: str
) -> tuple[np.ndarray, np.ndarray, str]:
    """Make ``len(prompt) + len(response) <= seq_length``.

    truncate: cut the prompt from the left (its end, next to the response, matters most) and keep the whole
    response; if the response alone leaves no room for a single prompt token, keep the last
    ``min(len(prompt), seq_length // 2)`` prompt tokens and cut the response's tail (its eos goes with it).
    drop: return FIT_DROP. Returns (prompt_ids, response_ids, status in FIT_OK/FIT_PROMPT/FIT_RESPONSE/FIT_DROP).
    """
    P, R = len(prompt_ids), len(response_ids)
    if P + R <= seq_length:
        return prompt_ids, response_ids, FIT_OK
    if overlong == "drop":
        return prompt_ids, response_ids, FIT_DROP
    if R <= seq_length - 1:
        return prompt_ids[P - (seq_length - R) :], response_ids, FIT_PROMPT
    keep_p = min(P, seq_length // 2)
    return prompt_ids[P - keep_p :], response_ids[: seq_length - keep_p], FIT_RESPONSE


def messages_json(msgs: list[dict]) -> str:
    return json.dumps(msgs, ensure_ascii=False)
