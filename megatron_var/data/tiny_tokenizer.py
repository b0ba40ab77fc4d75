"""A tiny byte-level BPE tokenizer with a chat template, trained locally, for tests and the CPU demo.

There is no hub access here, so tests need a real ``PreTrainedTokenizerFast`` built from scratch. Byte-level BPE
encodes any text (no unknown tokens) and decodes it back exactly, which keeps round-trip checks meaningful.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Each turn ends with eos, so "response + eos" in the prepared data matches what the template would render.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(
    texts: list[str], vocab_size: int = 384, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (vocab_size is an upper bound; use ``len(tok)`` for the real size).

    Plain encoding adds bos (like Llama), chat rendering uses ``CHAT_TEMPLATE``; pad is its own token (id 0).
    With ``out_dir`` the tokenizer is also saved there, loadable by ``AutoTokenizer.from_pretrained``.
    """
    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        hf_tok.save_pretrained(str(out_dir))
    return hf_tok
