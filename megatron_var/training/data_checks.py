"""Refuse training data that was tokenized for another model.

Why: token ids mean nothing without their tokenizer; data prepared with another tokenizer trains silently into a
useless model (and ids past the embedding would fail deep inside a kernel). ``tools/prepare_data.py`` records the
tokenizer's fingerprint in meta.json (docs/data-format.md); it is compared with the model's tokenizer: the ``hf/``
files of ``--load`` (converted checkpoints and trainer saves carry them) and, for checkpoints without them (runs
from ``--model-arch``), the fingerprint the trainer recorded when it saved them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_var.checkpoint.layout import hf_dir
from megatron_var.data.groups import GroupDataset
from megatron_var.models.arch import ModelArch

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def data_tokenizer(data: GroupDataset) -> dict:
    """What the trainer records in its checkpoints about the data's tokenizer."""
    tok = data.meta["tokenizer"]
    return {"name_or_path": tok.get("name_or_path"), "fingerprint": tok["fingerprint"]}


def check_data_tokenizer(data: GroupDataset, arch: ModelArch, arch_source: str, load: Optional[str],
                         recorded: Optional[dict]) -> None:
    """ValueError (one line naming both sides) when the data cannot be the model's.

    ``recorded``: the data tokenizer a previous training run of ``load`` recorded, if any.
    """
    tok = data.meta["tokenizer"]
    if int(tok["vocab_size"]) > arch.vocab_size:
        raise ValueError(f"--data-path {data.data_dir}: prepared with tokenizer {tok.get('name_or_path')!r} of "
                         f"{tok['vocab_size']} tokens, but the model ({arch_source}) has vocab_size "
                         f"{arch.vocab_size}; re-run tools/prepare_data.py with the model's tokenizer")
    hf = hf_dir(load) if load else None
    if hf is not None and any((hf / f).is_file() for f in _TOKENIZER_FILES):
        from megatron_var.data.formatting import load_tokenizer

        data.check_tokenizer(load_tokenizer(hf))
    elif recorded and recorded.get("fingerprint") != tok["fingerprint"]:
        raise ValueError(
            f"--data-path {data.data_dir}: prepared with tokenizer {tok.get('name_or_path')!r} (fingerprint "
            f"{tok['fingerprint']}), but --load {load} was trained on data of tokenizer "
            f"{recorded.get('name_or_path')!r} (fingerprint {recorded.get('fingerprint')}); re-run "
            "tools/prepare_data.py with the model's tokenizer")


def arch_source(load: Optional[str], model_arch: Optional[str]) -> str:
    return f"{Path(load) / 'model_arch.json'}" if load else f"--model-arch {model_arch}"
