"""The foundation's promise: one tiny Llama/Qwen2 GPTModel gives the same loss, the same gradients and the same
AdamW step at TP=1/PP=1 as at TP=2, PP=2, TP=2×PP=2, DP, interleaved PP and sequence parallel — through
megatron-core's own schedule, DDP and distributed optimizer, with the same global weights loaded everywhere.

Reference: every rank of a TP=1/PP=1 layout runs the whole global batch, which is a single-process run (megatron
sums identical gradients over DP and divides by the global unit count).
"""

import pytest
import torch

from megatron_var.models.full_state import gather_full, load_full
from megatron_var.models.gpt import ModelOptions, build_model_chunks
from megatron_var.runtime.engine import OptimConfig, build_optimizer, run_schedule, sum_reports, wrap_ddp
from megatron_var.objectives.reducers import sft_reduce
from megatron_var.runtime.forward_step import make_forward_step

from helpers import LLAMA, layout, QWEN_TIED, dp_share, global_sum, max_rel_err, max_update_err, sft_microbatches

N_MICRO, MBS, SEQ = 4, 2, 16
TOL = 1e-5


def _train_step(arch, pc, full_state, replicate: bool, distributed_optimizer: bool, lr: float = 1e-2):
    """Loss, full gradients and full post-step weights for one global batch in layout ``pc``."""
    chunks = build_model_chunks(arch, pc, ModelOptions())
    load_full(chunks, full_state)
    # adam_eps well above the tiniest gradients: Adam's first step is ~sign(g), which turns float32 rounding of
    # near-zero gradients into O(1) update differences; a large eps keeps the comparison well conditioned.
    optim = OptimConfig(lr=lr, weight_decay=0.1, clip_grad=1.0, adam_eps=1e-2,
                        use_distributed_optimizer=distributed_optimizer)
    model = wrap_ddp(chunks, optim)
    optimizer = build_optimizer(model, optim)
    micro = dp_share(sft_microbatches(N_MICRO, MBS, SEQ, arch.vocab_size, seed=7), replicate=replicate)
    reports = run_schedule(make_forward_step(sft_reduce, arch.vocab_size), micro, model,
                           forward_only=False, seq_length=SEQ, micro_batch_size=MBS)
    s = sum_reports(reports)
    loss_sum, units = global_sum([s.get("loss_sum", 0.0), s.get("units", 0.0)])
    grads = None if distributed_optimizer else gather_full(chunks, lambda p: p.main_grad)
    ok, _, _ = optimizer.step()
    assert ok
    return loss_sum / units, grads, gather_full(chunks)


@pytest.fixture(scope="module", params=[LLAMA, QWEN_TIED], ids=["llama", "qwen2-tied"])
def reference(request):
    arch = request.param
    with layout(1, 1) as pc:
        chunks = build_model_chunks(arch, pc, ModelOptions())
        init = gather_full(chunks)
        del chunks
        loss, grads, _ = _train_step(arch, pc, init, replicate=True, distributed_optimizer=False)
        _, _, stepped = _train_step(arch, pc, init, replicate=True, distributed_optimizer=True)
    return arch, init, loss, grads, stepped


LAYOUTS = {
    "tp2": dict(tp=2), "pp2": dict(pp=2), "tp2pp2": dict(tp=2, pp=2), "dp4": dict(),
    "pp2vpp2": dict(pp=2, vpp=2), "tp2sp": dict(tp=2, sp=True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_rank(reference, name):
    arch, init, ref_loss, ref_grads, ref_stepped = reference
    with layout(**LAYOUTS[name]) as pc:
        loss, grads, _ = _train_step(arch, pc, init, replicate=False, distributed_optimizer=False)
        _, _, stepped = _train_step(arch, pc, init, replicate=False, distributed_optimizer=True)
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (loss, ref_loss)
    err, where = max_rel_err(grads, ref_grads)
    assert err <= TOL, f"gradient {where}: rel err {err:.2e}"
    err, where = max_update_err(stepped, ref_stepped, init, TOL)
    assert err <= 1.0, f"AdamW update {where}: {err:.2f}x the float32 bound"


def test_wrong_shard_is_detected(reference):
    """Negative control: a TP=2 run whose weights are loaded with one tensor perturbed must fail the check."""
    arch, init, _, ref_grads, _ = reference
    bad = dict(init)
    key = "decoder.layers.1.self_attention.linear_qkv.weight"
    bad[key] = init[key].flip(0)
    with layout(tp=2) as pc:
        _, grads, _ = _train_step(arch, pc, bad, replicate=False, distributed_optimizer=False)
    err, _ = max_rel_err(grads, ref_grads)
    assert err > 1e-2


def test_wrong_update_is_detected(reference):
    """Negative control for the update check: an AdamW step with a learning rate 0.1% off must fail it."""
    arch, init, _, _, ref_stepped = reference
    with layout(tp=2) as pc:
        _, _, stepped = _train_step(arch, pc, init, replicate=False, distributed_optimizer=True, lr=1.001e-2)
    err, _ = max_update_err(stepped, ref_stepped, init, TOL)
    assert err > 1.0
