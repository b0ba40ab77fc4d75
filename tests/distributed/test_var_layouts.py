"""The VAR step is layout-invariant: the frozen reference's [B, B] cross-pair matrices (packed rows of all groups,
the default, vs one padded micro-batch per group at TP=1), the weights, the loss and
the policy gradients are the same at TP=1/PP=1 as at TP=2, PP=2, TP=2×PP=2, DP=4, and in the layouts the examples
use: TP=2 with sequence parallelism, interleaved PP=2×VPP=2, and full and selective activation recomputation (each
with shared-prefix scoring); shared-prefix scoring equals
naive scoring; the matrix diagonal equals the reference's own log π(y_i|x_i); and the gradient of a global batch
does not depend on how it is split into micro-batches.
"""

from typing import Optional

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer import transformer_block
from megatron.core.transformer.attention import Attention

from megatron_var.data.groups import Group
from megatron_var.models.full_state import gather_full, load_full
from megatron_var.models.gpt import ModelOptions, build_model_chunks
from megatron_var.objectives.var import var_weights
from megatron_var.reference.online import FrozenReference
from megatron_var.batching.pairs import DOC_STRIDE
from megatron_var.batching.steps import rewards_tensor, split_by_tokens
from megatron_var.models.segment_mask import SegmentMask
from megatron_var.runtime.microbatches import as_microbatch, policy_microbatches
from megatron_var.runtime.engine import OptimConfig, run_schedule, sum_reports, wrap_ddp, install_schedule_hooks
from megatron_var.objectives.alol import alol_advantages
from megatron_var.objectives.reducers import alol_reduce, var_reduce
from megatron_var.runtime.forward_step import make_forward_step

from helpers import LLAMA, dp_share, global_sum, layout, max_rel_err

G, GROUP, LAM = 4, 4, 0.7
TOL = 1e-5


def _groups(vocab: int, seed: int = 3) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(G):
        rand = lambda lo, hi: torch.randint(1, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g)
        prompts = [rand(2, 7).tolist() for _ in range(GROUP)]
        responses = [rand(1, 6).tolist() for _ in range(GROUP)]
        rewards = torch.randn(GROUP, GROUP, generator=g).numpy()
        out.append(Group(group_id=k, prompt_ids=prompts, response_ids=responses, rewards=rewards))
    return out


def _var_step(pc, init, groups_per_micro: int, method: str = "shared_prefix", replicate: bool = False,
              recompute: Optional[str] = None, objective: str = "var", pack: bool = False,
              merge_packed_docs: bool = False, budget: Optional[int] = None, ref_pack: bool = True):
    arch = LLAMA
    options = ModelOptions(recompute_granularity=recompute)
    chunks = build_model_chunks(arch, pc, options)
    load_full(chunks, init)
    assert len(chunks) == (pc.virtual_pipeline_model_parallel_size or 1)
    assert chunks[0].config.sequence_parallel == pc.sequence_parallel
    model = wrap_ddp(chunks, OptimConfig(use_distributed_optimizer=False))
    install_schedule_hooks(model)
    ref_chunks = build_model_chunks(arch, pc, options)
    load_full(ref_chunks, init)
    pad = pc.tensor_model_parallel_size if pc.sequence_parallel else 1  # SP splits the sequence over TP
    ref = FrozenReference(ref_chunks, arch.vocab_size, pad_id=0, method=method, pad_to_multiple_of=pad,
                          pack=ref_pack, row_tokens=budget)
    groups = dp_share(_groups(arch.vocab_size), replicate=replicate)
    mats = ref.score_cross_pairs([g.prompt_ids for g in groups], [g.response_ids for g in groups])
    diag = ref.score_diagonal([g.prompt_ids for g in groups], [g.response_ids for g in groups])
    micro = split_by_tokens(groups, budget) if budget else \
        [groups[i:i + groups_per_micro] for i in range(0, len(groups), groups_per_micro)]
    batches = policy_microbatches(micro, 0, pad, same_length=pc.pipeline_model_parallel_size > 1, pack=pack,
                                  row_tokens=budget)
    if merge_packed_docs:  # negative control: packed rows whose sequences may attend to each other
        for b in batches:
            seg = b["cross"].attn_segments
            b["attention_mask"] = SegmentMask(torch.where(seg >= 0, seg % DOC_STRIDE, -1))
    holder = mats is not None
    if holder:
        w = var_weights(torch.stack(mats), rewards_tensor(groups), LAM)
        for b, wm in zip(batches, w.split([len(m) for m in micro])):
            b["weights"] = wm.reshape(-1)
        if objective == "alol":  # reference log-probs moved off the policy's so that some ratios are clipped
            shift = torch.tensor([0.05, -0.5, 0.5, 0.0]).repeat(len(groups))
            ref_logps = torch.stack(diag).reshape(-1) + shift
            adv = alol_advantages(rewards_tensor(groups), "alol").reshape(-1)
            per = [len(m) * GROUP for m in micro]
            for b, rl, a in zip(batches, ref_logps.split(per), adv.split(per)):
                b["ref_logps"], b["advantages"] = rl, a
    # the policy's layers (full) / core attentions (selective) really run under megatron's activation checkpointing
    recomputed = {"full": [], "selective": []}
    checkpointed = transformer_block.checkpointed_forward
    transformer_block.checkpointed_forward = lambda *a, **k: recomputed["full"].append(1) or checkpointed(*a, **k)
    attention = Attention._checkpointed_attention_forward
    Attention._checkpointed_attention_forward = \
        lambda *a, **k: recomputed["selective"].append(1) or attention(*a, **k)
    try:
        reduce_fn = var_reduce() if objective == "var" else alol_reduce(0.2, positive_only=True)
        reports = run_schedule(make_forward_step(reduce_fn, arch.vocab_size), batches, model, forward_only=False,
                               seq_length=max(b["tokens"].size(1) for b in batches),
                               micro_batch_size=batches[0]["tokens"].size(0))
    finally:
        transformer_block.checkpointed_forward = checkpointed
        Attention._checkpointed_attention_forward = attention
    assert {k for k, v in recomputed.items() if v} == ({recompute} if recompute else set())
    s = sum_reports(reports)
    loss_sum, units = global_sum([s.get("loss_sum", 0.0), s.get("units", 0.0)])
    # the matrices of all groups, in global group order, on every rank
    local = [torch.stack(mats), torch.stack(diag), w] if holder and \
        parallel_state.get_tensor_model_parallel_rank() == 0 else None
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, (parallel_state.get_data_parallel_rank(), local))
    per_dp = {}
    for dp_rank, item in everything:
        if item is not None:
            per_dp[dp_rank] = item
    mats_all = torch.cat([per_dp[r][0] for r in sorted(per_dp)]) if not replicate else per_dp[0][0]
    diag_all = torch.cat([per_dp[r][1] for r in sorted(per_dp)]) if not replicate else per_dp[0][1]
    w_all = torch.cat([per_dp[r][2] for r in sorted(per_dp)]) if not replicate else per_dp[0][2]
    return loss_sum / units, mats_all, diag_all, w_all, gather_full(chunks, lambda p: p.main_grad)


@pytest.fixture(scope="module")
def reference():
    with layout(1, 1) as pc:
        init = gather_full(build_model_chunks(LLAMA, pc, ModelOptions()))
        res = _var_step(pc, init, groups_per_micro=1, replicate=True, ref_pack=False)  # one padded group per row
    return init, res


VAR_LAYOUTS = {"tp2": dict(tp=2), "pp2": dict(pp=2), "tp2pp2": dict(tp=2, pp=2), "dp4": dict(),
               "tp2sp": dict(tp=2, sp=True), "pp2vpp2": dict(pp=2, vpp=2),
               "tp2sp_recompute": dict(tp=2, sp=True, recompute="full"),
               "pp2vpp2_recompute": dict(pp=2, vpp=2, recompute="full"),
               "tp2sp_selective_recompute": dict(tp=2, sp=True, recompute="selective")}


@pytest.mark.parametrize("name", list(VAR_LAYOUTS))
def test_var_step_is_layout_invariant(reference, name):
    init, (ref_loss, ref_mats, _, ref_w, ref_grads) = reference
    kw = dict(VAR_LAYOUTS[name])
    recompute = kw.pop("recompute", None)
    with layout(**kw) as pc:
        loss, mats, _, w, grads = _var_step(pc, init, groups_per_micro=1, recompute=recompute)
    assert torch.allclose(mats, ref_mats, rtol=TOL, atol=0), (mats - ref_mats).abs().max()
    assert torch.allclose(w, ref_w, rtol=TOL, atol=1e-7)
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
    err, where = max_rel_err(grads, ref_grads)
    assert err <= TOL, f"gradient {where}: rel err {err:.2e}"


PACKED_LAYOUTS = {"tp1": dict(tp=1, pp=1), "tp2": dict(tp=2), "pp2": dict(pp=2), "tp2pp2": dict(tp=2, pp=2),
                  "tp2sp": dict(tp=2, sp=True), "pp2vpp2": dict(pp=2, vpp=2)}


@pytest.mark.parametrize("name", list(PACKED_LAYOUTS))
def test_packed_policy_step_equals_padded(reference, name):
    """Policy rows packed end to end (runtime.microbatches, the trainer's default) give the padded step's loss and
    gradients in every layout; two groups per micro-batch so rows hold pairs of different groups (one under the
    interleaved schedule, which needs at least PP micro-batches)."""
    init, (ref_loss, _, _, _, ref_grads) = reference
    with layout(**PACKED_LAYOUTS[name]) as pc:
        per_micro = 1 if pc.virtual_pipeline_model_parallel_size else 2
        loss, _, _, _, grads = _var_step(pc, init, groups_per_micro=per_micro, pack=True)
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (loss, ref_loss)
    err, where = max_rel_err(grads, ref_grads)
    assert err <= TOL, f"gradient {where}: rel err {err:.2e}"


BUDGET_LAYOUTS = {"tp1": dict(tp=1, pp=1), "tp2pp2": dict(tp=2, pp=2), "tp2sp": dict(tp=2, sp=True)}


@pytest.mark.parametrize("name", list(BUDGET_LAYOUTS))
def test_token_budget_micro_batches_equal_padded(reference, name):
    """--max-tokens-per-micro-batch: whole groups up to the budget per micro-batch, packed into one row (under
    PP all micro-batches padded to one shape) give the padded step's loss and gradients; the reference's rows of
    all groups packed into one-row micro-batches of the budget give the padded matrices."""
    init, (ref_loss, ref_mats, _, _, ref_grads) = reference
    with layout(**BUDGET_LAYOUTS[name]) as pc:
        loss, mats, _, _, grads = _var_step(pc, init, groups_per_micro=1, pack=True, budget=40)
    assert torch.allclose(mats, ref_mats, rtol=TOL, atol=0), (mats - ref_mats).abs().max()
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (loss, ref_loss)
    err, where = max_rel_err(grads, ref_grads)
    assert err <= TOL, f"gradient {where}: rel err {err:.2e}"


def test_packed_rows_need_their_doc_boundaries(reference):
    """Negative control: the same packed rows with the boundaries between their sequences removed (each pair may
    attend to the pairs before it in the row) give another loss."""
    init, (ref_loss, *_) = reference
    with layout(tp=1, pp=1) as pc:
        loss, *_ = _var_step(pc, init, groups_per_micro=2, pack=True, merge_packed_docs=True)
    assert abs(loss - ref_loss) > 1e-3 * abs(ref_loss), (loss, ref_loss)


def test_shared_prefix_equals_naive_and_diagonal(reference):
    init, (_, ref_mats, ref_diag, _, _) = reference
    with layout(tp=2, pp=2) as pc:
        _, naive, diag, _, _ = _var_step(pc, init, groups_per_micro=1, method="naive")
    assert torch.allclose(naive, ref_mats, rtol=TOL, atol=0)
    # the reference's own log pi(y_i|x_i) is the diagonal of its cross-pair matrix
    assert torch.allclose(torch.diagonal(ref_mats, dim1=1, dim2=2), ref_diag, rtol=TOL, atol=0)
    assert torch.allclose(diag, ref_diag, rtol=TOL, atol=0)
    # negative control: the off-diagonal really differs (a wrong mask would make rows equal)
    assert (ref_mats - ref_mats.transpose(1, 2)).abs().max() > 1e-2


def test_microbatch_split_invariance(reference):
    """1 group per micro-batch × 4 accumulation steps == 4 groups in one micro-batch."""
    init, (ref_loss, _, _, _, ref_grads) = reference
    with layout(pp=2) as pc:  # DP=2: each rank takes 2 groups in one micro-batch
        loss, _, _, _, grads = _var_step(pc, init, groups_per_micro=2)
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
    err, where = max_rel_err(grads, ref_grads)
    assert err <= TOL, f"gradient {where}: rel err {err:.2e}"


def _policy_diag(model, groups, vocab):
    from megatron_var.batching.pairs import build_diagonal
    from megatron_var.reference.online import _matrix_reduce

    batches = [as_microbatch(build_diagonal(g.prompt_ids, g.response_ids, 0)) for g in groups]
    seq = max(b["tokens"].size(1) for b in batches)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        batches = [as_microbatch(build_diagonal(g.prompt_ids, g.response_ids, 0, seq_length=seq)) for g in groups]
    with torch.no_grad():
        reports = run_schedule(make_forward_step(_matrix_reduce("sum"), vocab), batches, model, forward_only=True,
                               seq_length=seq, micro_batch_size=GROUP)
    box = [torch.stack([r["matrix"] for r in reports]) if reports else None]
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(box, src=src, group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def test_var_step_moves_policy_towards_high_weights(reference):
    """One VAR update raises log π(y|x) of each group's highest-weight response more than of its lowest-weight one."""
    from megatron_var.runtime.engine import build_optimizer

    init, _ = reference
    with layout(tp=2, pp=2) as pc:
        chunks = build_model_chunks(LLAMA, pc, ModelOptions())
        load_full(chunks, init)
        optim = OptimConfig(lr=3e-3, clip_grad=0.0)
        model = wrap_ddp(chunks, optim)
        optimizer = build_optimizer(model, optim)
        groups = _groups(LLAMA.vocab_size, seed=11)  # every DP replica takes all groups
        ref_chunks = build_model_chunks(LLAMA, pc, ModelOptions())
        load_full(ref_chunks, init)
        ref = FrozenReference(ref_chunks, LLAMA.vocab_size, pad_id=0)
        mats = ref.score_cross_pairs([g.prompt_ids for g in groups], [g.response_ids for g in groups])
        before = _policy_diag(model, groups, LLAMA.vocab_size)
        batches = policy_microbatches([[g] for g in groups], 0, 1, same_length=True, pack=False)
        box = [var_weights(torch.stack(mats), rewards_tensor(groups), LAM) if mats is not None else None]
        dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
        w = box[0]
        for b, wg in zip(batches, w):
            b["weights"] = wg
        run_schedule(make_forward_step(var_reduce(), LLAMA.vocab_size), batches, model, forward_only=False,
                     seq_length=batches[0]["tokens"].size(1), micro_batch_size=GROUP)
        assert optimizer.step()[0]
        after = _policy_diag(model, groups, LLAMA.vocab_size)
    delta = after - before  # [G, B]
    hi, lo = w.argmax(dim=1), w.argmin(dim=1)
    rows = torch.arange(G)
    gain_hi, gain_lo = delta[rows, hi], delta[rows, lo]
    assert (gain_hi > gain_lo).all(), (gain_hi, gain_lo, w)


@pytest.mark.parametrize("name", ["tp2", "pp2", "tp2pp2", "dp4"])
def test_alol_step_is_layout_invariant(name):
    """The A-LoL objective (clipped importance weights, advantage filter) gives the same loss and gradients in
    every layout as at TP1."""
    with layout(1, 1) as pc:
        init = gather_full(build_model_chunks(LLAMA, pc, ModelOptions()))
        ref_loss, _, _, _, ref_grads = _var_step(pc, init, groups_per_micro=1, replicate=True, objective="alol")
    with layout(**VAR_LAYOUTS[name]) as pc:
        loss, _, _, _, grads = _var_step(pc, init, groups_per_micro=1, objective="alol")
    assert ref_loss != 0 and abs(loss - ref_loss) <= TOL * abs(ref_loss)
    err, where = max_rel_err(grads, ref_grads)
    assert err <= TOL, f"gradient {where}: rel err {err:.2e}"
