"""The VAR step written the way a TRL user would on transformers, for ``tools/bench.py --lengths``.

``trl_style``: policy and reference are two
``LlamaForCausalLM`` (SDPA; ``measure_steps.build_hf_model``, same ``ModelArch``, dtype: bf16 on GPU, fp32 on CPU);
per group the B² pairs [x_i; y_j] as right-padded rows (a collator pads each forward's rows to their longest; at most
``Preset.trl_ref_rows`` rows per forward), reference forward under no_grad with full logits, log_softmax over the
vocabulary (float32), gather, sum over the response -> [B, B]; w = softmax_j(ref + r/λ)[i]; the policy's forward
with full logits over the B rows [x_i; y_i], the same log-prob sum, loss -Σ w_i log π(y_i|x_i), backward; after the
step's groups: gradient clipping at 1.0 and ``torch.optim.AdamW`` (the megatron optimizer's lr, betas, eps, weight
decay). "Cached" gets the [B, B] matrices precomputed. Speed-up = TRL-style step time / ours.
"""

from __future__ import annotations

import copy
import time

import torch

from bench.length_groups import Tally, naive_pair_tokens, policy_real_tokens, shared_prefix_real_tokens
from bench.measure_steps import PAD_ID, VAR_LAMBDA, build_hf_model, guarded, sync
from megatron_var.data.groups import Group
from megatron_var.models.arch import ModelArch
from megatron_var.objectives import ref_gap
from megatron_var.runtime.engine import OptimConfig
from megatron_var.training.throughput import mean_row_length, step_flops


def _pad(pairs: list[tuple[list[int], list[int]]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows [x; y]: input_ids, attention_mask and the response mask (a data collator's output)."""
    s = max(len(x) + len(y) for x, y in pairs)
    ids = torch.full((len(pairs), s), PAD_ID, dtype=torch.long)
    attn = torch.zeros(len(pairs), s, dtype=torch.long)
    resp = torch.zeros(len(pairs), s)
    for n, (x, y) in enumerate(pairs):
        ids[n, :len(x) + len(y)] = torch.tensor(x + y)
        attn[n, :len(x) + len(y)] = 1
        resp[n, len(x):len(x) + len(y)] = 1
    return ids.to(device), attn.to(device), resp.to(device)


def _sequence_logps(model, ids, attn, resp) -> torch.Tensor:
    """Σ over the response of log softmax(logits)[next token], full logits: [rows]."""
    logits = model(input_ids=ids, attention_mask=attn).logits  # [rows, S, V]
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logps * resp[:, 1:]).sum(-1)


def trl_reference_matrix(ref, group: Group, rows_per_forward: int, device) -> tuple[torch.Tensor, int]:
    """The naive [B, B] matrix log π_ref(y_j|x_i) (B² padded rows, full logits) and the tokens it computed."""
    pairs = [(x, y) for x in group.prompt_ids for y in group.response_ids]
    out, computed = [], 0
    with torch.no_grad():
        for k in range(0, len(pairs), rows_per_forward):
            ids, attn, resp = _pad(pairs[k:k + rows_per_forward], device)
            computed += ids.numel()
            out.append(_sequence_logps(ref, ids, attn, resp))
    b = len(group.prompt_ids)
    return torch.cat(out).view(b, b), computed


def trl_style(arch: ModelArch, steps: list[list[Group]], warmup: int, rows_per_forward: int, optim: OptimConfig
              ) -> dict:
    """The VAR step on transformers as a TRL user writes it (module docstring), online and with cached matrices;
    ``optim``: the megatron optimizer's settings, given to ``torch.optim.AdamW``."""
    policy = build_hf_model(arch)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)  # the reference = the policy's start weights
    device = next(policy.parameters()).device
    opt = torch.optim.AdamW(policy.parameters(), lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2),
                            eps=optim.adam_eps, weight_decay=optim.weight_decay)
    cache = {g.group_id: trl_reference_matrix(ref, g, rows_per_forward, device)[0] for s in steps for g in s}
    gaps: list[float] = []

    def step(groups: list[Group], online: bool) -> dict:
        t0 = time.perf_counter()
        ref_computed, weights = 0, []
        for g in groups:
            if online:
                ref_bb, n = trl_reference_matrix(ref, g, rows_per_forward, device)
                ref_computed += n
            else:
                ref_bb = cache[g.group_id]
            r = torch.as_tensor(g.rewards, dtype=torch.float32, device=device)
            weights.append((torch.softmax(ref_bb.float() + r / VAR_LAMBDA, dim=-1).diagonal(), ref_bb.diagonal()))
        sync()
        t1 = time.perf_counter()
        n_samples = sum(len(g.prompt_ids) for g in groups)
        computed, row_batches = 0, []
        for g, (w, ref_diag) in zip(groups, weights):
            ids, attn, resp = _pad(list(zip(g.prompt_ids, g.response_ids)), device)
            computed += ids.numel()
            row_batches.append({"tokens": ids})
            logps = _sequence_logps(policy, ids, attn, resp)
            if online and not gaps:
                gaps.append(float(ref_gap.logp_gap(ref_diag, logps)))
            (-(w * logps).sum() / n_samples).backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        ref_real = sum(shared_prefix_real_tokens(g) for g in groups) if online else 0
        return {"step_s": t3 - t0, "reference_s": t1 - t0, "fwd_bwd_s": t2 - t1, "optimizer_s": t3 - t2,
                "policy_real": policy_real_tokens(groups), "policy_computed": computed,
                "reference_real": ref_real, "reference_computed": ref_computed,
                "naive_pair_tokens": sum(naive_pair_tokens(g) for g in groups) if online else 0,
                "model_flops": step_flops(arch, computed, ref_computed, mean_row_length(row_batches))}

    def run(online: bool) -> dict:
        tally = Tally()
        for k, groups in enumerate(steps):
            rec = step(groups, online)
            if k >= warmup:
                tally.add(**rec)
        return tally.summary()

    out = {"var_online": guarded(lambda: run(True), "lengths/trl_style/var_online")}
    if gaps:
        out["var_online"]["ref_policy_logp_gap_step1"] = gaps[0]
    out["var_cached"] = guarded(lambda: run(False), "lengths/trl_style/var_cached")
    out["reference_rows_per_forward"] = rows_per_forward
    out["attn_implementation"] = policy.config._attn_implementation
    del policy, ref, opt, cache
    return out
