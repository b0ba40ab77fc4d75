"""Logits only at loss-masked positions (megatron's ``output_processor``) give the same token log-probs and the same
gradients as full logits, at TP=1, TP=2 and TP=2 with sequence parallelism, and really skip the unmasked rows.

Reference: the full-logits path of the same layout (itself checked against transformers' forward in
test_convert_logprobs), and a float64 log-softmax of the full output over the true (unpadded) vocabulary.
"""

import pytest
import torch
from megatron.core import parallel_state

from megatron_var.models.full_state import gather_full, load_full
from megatron_var.models.gpt import ModelOptions, build_model_chunks
from megatron_var.runtime.engine import OptimConfig, run_schedule, wrap_ddp
from megatron_var.runtime.forward_step import make_forward_step

from helpers import LLAMA, QWEN_TIED, layout, max_rel_err, sft_microbatches

N_MICRO, MBS, SEQ = 2, 2, 16


def _report_tokens(token_logps, batch):
    total = token_logps.sum()
    return total, torch.ones((), dtype=torch.int), {"token_logps": token_logps.detach().clone()}


def _run(arch, pc, init, micro, select: bool):
    """Token log-probs, full gradients, and the rows the output layer saw, for one fwd+bwd pass."""
    chunks = build_model_chunks(arch, pc, ModelOptions())
    load_full(chunks, init)
    model = wrap_ddp(chunks, OptimConfig(lr=1e-3))
    rows = []
    last = parallel_state.is_pipeline_last_stage()
    if last:
        hook = chunks[-1].output_layer.register_forward_hook(
            lambda m, args, out: rows.append(args[0].shape[0] * args[0].shape[1]))
    reports = run_schedule(make_forward_step(_report_tokens, arch.vocab_size, select_positions=select), micro,
                           model, forward_only=False, seq_length=SEQ, micro_batch_size=MBS)
    if last:
        hook.remove()
    return [r["token_logps"] for r in reports], gather_full(chunks, lambda p: p.main_grad), rows


@pytest.mark.parametrize("arch", [LLAMA, QWEN_TIED], ids=["llama", "qwen2-tied"])
@pytest.mark.parametrize("name,lay", [("tp1", dict()), ("tp2", dict(tp=2)), ("tp2sp", dict(tp=2, sp=True)),
                                      ("pp2", dict(pp=2))])
def test_selected_positions_match_full_logits(arch, name, lay):
    micro = sft_microbatches(N_MICRO, MBS, SEQ, arch.vocab_size, seed=3)
    micro[1]["loss_mask"][0] = 0.0  # one row without any response token
    with layout(1, 1) as pc:
        init = gather_full(build_model_chunks(arch, pc, ModelOptions()))
    with layout(**lay) as pc:
        full_lp, full_grads, full_rows = _run(arch, pc, init, micro, select=False)
        sel_lp, sel_grads, sel_rows = _run(arch, pc, init, micro, select=True)
        last_stage = parallel_state.is_pipeline_last_stage()
        if pc.tensor_model_parallel_size == 1 and pc.pipeline_model_parallel_size == 1:
            chunks = build_model_chunks(arch, pc, ModelOptions())
            load_full(chunks, init)
            with torch.no_grad():
                logits = chunks[0](micro[0]["tokens"], None, None)[..., :arch.vocab_size].double()
            ref = torch.log_softmax(logits, -1).gather(-1, micro[0]["labels"].unsqueeze(-1)).squeeze(-1)
            ref = ref * micro[0]["loss_mask"]
            assert torch.allclose(sel_lp[0].double(), ref, atol=1e-5), (sel_lp[0] - ref).abs().max()
    err, where = max_rel_err(sel_grads, full_grads)
    assert err <= 1e-5, f"gradient {where}: rel err {err:.2e}"
    if not last_stage:
        assert sel_lp == [] and sel_rows == []
        return
    assert full_rows == [MBS * SEQ // (2 if lay.get("sp") else 1)] * N_MICRO  # SP: each rank's s/tp slice
    assert sel_rows == [int(m["loss_mask"].count_nonzero()) for m in micro], sel_rows
    for a, b, m in zip(sel_lp, full_lp, micro):
        assert torch.equal(a == 0, m["loss_mask"] == 0)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()
