"""End to end: the model ``--transformer-impl te`` builds (TE faked with local stand-ins,
tests/fake_te.py) scores shared-prefix cross pairs exactly like naive per-pair rows, at TP=2. Negative controls:
with TE's causal-only core attention the shared-prefix batch is refused, and a core attention that drops the mask
while claiming to apply it gives a visibly different matrix (so the equality is not vacuous)."""

import pytest
import torch
from fake_te import FakeTEDotProductAttention, fake_te

from megatron_var.models.gpt import ModelOptions, build_model_chunks
from megatron_var.models.mask_guard import MaskNotAppliedError
from megatron_var.reference.online import FrozenReference

from helpers import LLAMA

TOL = 1e-5


def _prompts_responses(seed=5):
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: torch.randint(1, LLAMA.vocab_size, (int(torch.randint(lo, hi, (1,), generator=g)),),
                                        generator=g).tolist()
    return [[rand(3, 8) for _ in range(4)]], [[rand(2, 7) for _ in range(4)]]


def _matrices(pc, core=None):
    prompts, responses = _prompts_responses()
    chunks = build_model_chunks(LLAMA, pc, ModelOptions(transformer_impl="te"))
    out = {}
    for method in ("naive", "shared_prefix"):
        ref = FrozenReference(chunks, LLAMA.vocab_size, pad_id=0, method=method)
        out[method] = ref.score_cross_pairs(prompts, responses)[0]
    return out


class _DropsMaskButClaims(FakeTEDotProductAttention):
    applies_segment_masks = True


def test_te_spec_scores_shared_prefix_like_naive(monkeypatch, layout):
    with fake_te(monkeypatch), layout(tp=2) as pc:
        m = _matrices(pc)
        chunks = build_model_chunks(LLAMA, pc, ModelOptions(transformer_impl="te"))
    assert type(chunks[0].decoder.layers[0].mlp.linear_fc1).__name__ == "FakeTELayerNormColumnParallelLinear"
    assert torch.allclose(m["shared_prefix"], m["naive"], rtol=TOL, atol=0), \
        (m["shared_prefix"] - m["naive"]).abs().max()


def test_te_core_attention_refuses_the_mask(monkeypatch, layout):
    from megatron.core.models.gpt import gpt_layer_specs

    with fake_te(monkeypatch), layout(tp=2) as pc:
        monkeypatch.setattr("megatron_var.models.specs.layer_spec", lambda backend, **kw:
                            gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec())
        with pytest.raises(MaskNotAppliedError):
            _matrices(pc)


def test_a_dropped_mask_changes_the_matrix(monkeypatch, layout):
    from megatron.core.models.gpt import gpt_layer_specs

    with fake_te(monkeypatch, core=_DropsMaskButClaims), layout(tp=2) as pc:
        monkeypatch.setattr("megatron_var.models.specs.layer_spec", lambda backend, **kw:
                            gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec())
        m = _matrices(pc)
    gap = (m["shared_prefix"] - m["naive"]).abs()
    assert gap[:, 0].max() < 1e-4 * m["naive"].abs().max()  # y_1 sees only x_i either way
    assert gap[:, 1:].max() > 1e-2, gap  # y_j, j >= 2, sees y_1..y_{j-1}: wrong
