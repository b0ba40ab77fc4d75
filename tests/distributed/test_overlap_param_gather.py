"""--overlap-grad-reduce / --overlap-param-gather (megatron DDP's asynchronous reduce-scatter and all-gather) on
the CPU/gloo world: the same losses, gradient norms and weights as the synchronous distributed optimizer, and
``engine.sync_params`` is what makes the last step's weights visible before a checkpoint reads them."""

import pytest
import torch

from megatron_var.models.full_state import gather_full, load_full
from megatron_var.models.gpt import ModelOptions, build_model_chunks
from megatron_var.objectives.reducers import sft_reduce
from megatron_var.runtime.engine import OptimConfig, build_optimizer, run_schedule, sum_reports, sync_params, wrap_ddp
from megatron_var.runtime.forward_step import make_forward_step

from helpers import LLAMA, dp_share, global_sum, sft_microbatches

STEPS, N_MICRO, MBS, SEQ = 3, 4, 2, 16


def _run(pc, init, overlap: bool, sync: bool = True):
    chunks = build_model_chunks(LLAMA, pc, ModelOptions())
    load_full(chunks, init)
    optim = OptimConfig(lr=1e-2, adam_eps=1e-3, use_distributed_optimizer=True, overlap_grad_reduce=overlap,
                        overlap_param_gather=overlap)
    model = wrap_ddp(chunks, optim)
    optimizer = build_optimizer(model, optim)
    assert {g["eps"] for g in optimizer.optimizer.param_groups} == {1e-3}  # --adam-eps reaches torch's AdamW
    history = []
    for step in range(STEPS):
        optimizer.zero_grad()
        micro = dp_share(sft_microbatches(N_MICRO, MBS, SEQ, LLAMA.vocab_size, seed=step))
        s = sum_reports(run_schedule(make_forward_step(sft_reduce, LLAMA.vocab_size), micro, model,
                                     forward_only=False, seq_length=SEQ, micro_batch_size=MBS))
        loss_sum, units = global_sum([s.get("loss_sum", 0.0), s.get("units", 0.0)])
        ok, grad_norm, _ = optimizer.step()
        assert ok
        history.append((loss_sum / units, float(grad_norm)))
    if sync:
        sync_params(model)
    return history, gather_full(chunks)


@pytest.mark.parametrize("name,kw", [("dp4", {}), ("pp2dp2", dict(pp=2))])
def test_overlapped_param_gather_matches_synchronous(layout, name, kw):
    with layout(**kw) as pc:
        init = gather_full(build_model_chunks(LLAMA, pc, ModelOptions()))
        plain, w_plain = _run(pc, init, overlap=False)
        overlapped, w_overlapped = _run(pc, init, overlap=True)
        stale_history, w_stale = _run(pc, init, overlap=True, sync=False)
    assert overlapped == plain  # same collectives, only issued asynchronously: bitwise equal
    assert all(torch.equal(w_overlapped[k], w_plain[k]) for k in w_plain)
    # negative control: without sync_params the shards of the last step that other ranks own are not here yet
    assert stale_history == plain
    assert any(not torch.equal(w_stale[k], w_plain[k]) for k in w_plain)
