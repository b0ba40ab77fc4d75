"""Pair scorers for r(x, y): an HF sequence-classification reward model, or a python function.

A scorer takes parallel lists (prompt_texts, prompt_messages, response_texts) and returns one float per pair.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def load_reward_fn(spec: str):
    """``module:function`` (importable) or ``path/to/file.py:function``."""
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise ValueError(f"--reward-fn {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise ValueError(f"--reward-fn {spec!r}: no such file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"_reward_fn_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward-fn {spec!r}: cannot import {module_name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec!r}: {module_name} has no callable {fn_name!r}")
    return fn


class FunctionScorer:
    """Wraps ``fn(prompts: list[str], responses: list[str]) -> list[float]`` scoring prompt_text/response_text."""

    def __init__(self, spec: str):
        self.fn = load_reward_fn(spec)
        self.identity = {"kind": "function", "spec": spec}

    def __call__(self, prompt_texts: list[str], prompt_messages: list[list[dict]], responses: list[str]) -> np.ndarray:
        out = self.fn(list(prompt_texts), list(responses))
        try:
            scores = np.asarray(out, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"--reward-fn {self.identity['spec']}: returned non-numeric scores") from None
        if len(scores) != len(responses):
            raise ValueError(f"--reward-fn {self.identity['spec']}: returned {len(scores)} scores for "
                             f"{len(responses)} pairs")
        return scores


def pick_device(device: str | None = None):
    import torch

    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class HFRewardModel:
    """``AutoModelForSequenceClassification`` with its own tokenizer; score = logits[:, 0].

    Texts use the reward model's chat template on [prompt messages..., assistant response] when it has one,
    else prompt_text + response_text. Sequences longer than ``max_length`` keep their end (the response, which
    the score is pooled from). Batches are formed from length-sorted sequences, right-padded.
    """

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 4096, dtype: str = "auto",
                 device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise ValueError(f"--reward-model {path}: not a directory (need a local HF model)")
        self.device = pick_device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=getattr(torch, dtype), local_files_only=True
            )
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"--reward-model {path}: cannot load ({type(e).__name__}: {e})") from None
        self.model.to(self.device).eval()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        if self.model.config.pad_token_id is None:
            logger.warning("%s: config has no pad_token_id; using the tokenizer's (%s) for batching",
                           path, self.tok.pad_token_id)
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length
        self.use_chat = bool(getattr(self.tok, "chat_template", None))
        self.n_truncated = 0
        self.identity = {"kind": "reward_model", "path": str(Path(path).resolve()), "max_length": max_length}
        self.dtype = dtype

    def encode(self, prompt_text: str, messages: list[dict], response: str) -> list[int]:
        if self.use_chat:
            text = self.tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
        else:
            text = prompt_text + response
            bos = self.tok.bos_token
            ids = self.tok(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
        if len(ids) > self.max_length:
            self.n_truncated += 1
            if self.n_truncated == 1:
                logger.warning("reward model input over --max-length %d tokens: keeping the end", self.max_length)
            ids = ids[-self.max_length :]
        return ids

    def score_ids(self, seqs: list[list[int]]) -> np.ndarray:
        """[N] float64 scores; padding never changes a score (right padding, causal model, last-token pooling)."""
        import torch

        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k]))
        out = np.empty(len(seqs), dtype=np.float64)
        pad = self.model.config.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(seqs[k]) for k in idx)
            ids_NT = torch.full((len(idx), width), pad, dtype=torch.long)
            mask_NT = torch.zeros((len(idx), width), dtype=torch.long)
            for row, k in enumerate(idx):
                ids_NT[row, : len(seqs[k])] = torch.tensor(seqs[k])
                mask_NT[row, : len(seqs[k])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids_NT.to(self.device), attention_mask=mask_NT.to(self.device)).logits
            out[idx] = logits[:, 0].float().cpu().numpy()
        return out

    def __call__(self, prompt_texts: list[str], prompt_messages: list[list[dict]], responses: list[str]) -> np.ndarray:
        seqs = [self.encode(p, m, r) for p, m, r in zip(prompt_texts, prompt_messages, responses)]
        return self.score_ids(seqs)
