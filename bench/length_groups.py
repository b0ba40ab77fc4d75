"""The groups of the length-realistic benchmark (``bench/length_benchmark.py``) and what their steps need.

Lengths (``LengthDistribution``), seeded: prompt and response lengths are independent lognormals,
    L = max(1, round(median · exp(σ·Z))), Z ~ N(0, 1), σ = ln(4) / z_0.95 = 0.8428 (z_0.95 = 1.6449),
so p95 = 4 × median (mean = median · exp(σ²/2) = 1.43 × median); each (prompt, response) is then fitted to the
preset's ``seq_length`` as ``tools/prepare_data.py`` fits a sample (``data.formatting.fit_length``, truncate: the
prompt is cut from the left). Medians (``Preset.length_medians``): prompt 150, response 250 for llama3.2-1b
(seq_length 2048); the CPU presets scale them with their seq_length (tiny: 19 / 31 at 256). ``--lengths-from DATA``
instead draws groups (seeded, distinct within a step) from DATA's train split (``data.groups.GroupDataset``) with
their own lengths (fitted the same way), group size and reward matrices; token ids outside the preset's vocabulary
are folded into it (what is measured depends on lengths only).

Token counts (what a step needs, no padding): the policy's Σ_i |x_i| + |y_i|; the shared-prefix reference's rows
Σ_i (|x_i| − 1 + Σ_j (|y_j| + 1)); the naive B² pairs' Σ_ij |x_i| + |y_j| (what a naive reference computes).
``Tally`` turns counted steps into per-step means.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from megatron_var.data.formatting import fit_length
from megatron_var.data.groups import Group, GroupDataset

Z95 = 1.6448536269514722
"""Standard normal 95th percentile: σ = ln(p95 / median) / Z95."""


@dataclasses.dataclass(frozen=True)
class LengthDistribution:
    """Independent lognormal prompt and response lengths with p95 = ``p95_over_median`` × median, fitted to
    ``seq_length`` (prompt + response) as prepare_data fits a sample."""

    prompt_median: float
    response_median: float
    seq_length: int
    p95_over_median: float = 4.0

    @property
    def sigma(self) -> float:
        return math.log(self.p95_over_median) / Z95

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (prompt, response) lengths before fitting, each >= 1."""
        def one(median):
            return np.maximum(1, np.rint(median * np.exp(self.sigma * rng.standard_normal(n)))).astype(np.int64)
        return one(self.prompt_median), one(self.response_median)

    def describe(self) -> dict:
        return {"kind": "lognormal", "prompt_median": self.prompt_median, "response_median": self.response_median,
                "p95_over_median": self.p95_over_median, "sigma": self.sigma,
                "mean_over_median": math.exp(self.sigma ** 2 / 2), "fitted_to_seq_length": self.seq_length,
                "fit": "data.formatting.fit_length(truncate): prompt cut from the left"}


def _fit(prompt: np.ndarray, response: np.ndarray, seq_length: int) -> tuple[list[int], list[int]]:
    p, r, _ = fit_length(prompt, response, seq_length, "truncate")
    return [int(t) for t in p], [int(t) for t in r]


def lognormal_groups(dist: LengthDistribution, n_groups: int, group_size: int, vocab: int, seed: int) -> list[Group]:
    """``n_groups`` groups of ``group_size`` random-token samples with lengths from ``dist``; N(0, 1) rewards."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        plen, rlen = dist.draw(group_size, rng)
        pairs = [_fit(rng.integers(1, vocab, p), rng.integers(1, vocab, r), dist.seq_length)
                 for p, r in zip(plen, rlen)]
        rewards = rng.standard_normal((group_size, group_size)).astype(np.float32)
        groups.append(Group(g, [p for p, _ in pairs], [r for _, r in pairs], rewards))
    return groups


def data_groups(data_dir: str, n_groups: int, per_step: int, vocab: int, seq_length: int, seed: int) -> list[Group]:
    """``n_groups`` groups of DATA's train split, ``per_step`` distinct ones per step (seeded), fitted to
    ``seq_length``, ids folded into [1, vocab); the data's reward matrices (N(0, 1) where it has none)."""
    ds = GroupDataset(data_dir, "train")
    if len(ds) < per_step:
        raise ValueError(f"--lengths-from {data_dir}: {len(ds)} train groups, a step needs {per_step}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(-(-n_groups // per_step)):
        for k in rng.choice(len(ds), size=per_step, replace=False):
            src = ds[int(k)]
            fold = (lambda ids: ids) if max(max(s) for s in src.prompt_ids + src.response_ids if s) < vocab else \
                (lambda ids: 1 + np.asarray(ids) % (vocab - 1))
            pairs = [_fit(np.asarray(fold(x)), np.asarray(fold(y)), seq_length)
                     for x, y in zip(src.prompt_ids, src.response_ids)]
            b = len(pairs)
            rewards = src.rewards if src.rewards is not None else \
                rng.standard_normal((b, b)).astype(np.float32)
            out.append(Group(len(out), [p for p, _ in pairs], [r for _, r in pairs], rewards))
    return out[:n_groups]


def length_stats(groups: list[Group]) -> dict:
    def stats(lens):
        a = np.asarray(lens)
        return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean()),
                "min": int(a.min()), "max": int(a.max())}
    return {"samples": sum(len(g.prompt_ids) for g in groups),
            "prompt": stats([len(p) for g in groups for p in g.prompt_ids]),
            "response": stats([len(r) for g in groups for r in g.response_ids])}


# ---- token counts -------------------------------------------------------------------------------------------------
def policy_real_tokens(groups: list[Group]) -> int:
    """Σ |x_i| + |y_i|: the tokens of the policy's rows [x_i; y_i] without padding."""
    return sum(len(x) + len(y) for g in groups for x, y in zip(g.prompt_ids, g.response_ids))


def shared_prefix_real_tokens(group: Group) -> int:
    """Σ_i (|x_i| − 1 + Σ_j (|y_j| + 1)): the group's shared-prefix rows [x_i[:-1]; x_i[-1], y_1; ...] unpadded."""
    seg = sum(len(y) + 1 for y in group.response_ids)
    return sum(len(x) - 1 + seg for x in group.prompt_ids)


def naive_pair_tokens(group: Group) -> int:
    """Σ_ij |x_i| + |y_j|: the B² naive rows unpadded (what a naive reference computes, for information)."""
    b = len(group.prompt_ids)
    return b * sum(len(x) for x in group.prompt_ids) + b * sum(len(y) for y in group.response_ids)


class Tally:
    """Counted steps of one method: times, parts and token counts; ``summary`` gives per-step means."""

    def __init__(self):
        self.steps: list[dict] = []

    def add(self, **rec) -> None:
        self.steps.append(rec)

    def summary(self) -> dict:
        n = len(self.steps)
        if not n:
            return {"error": "no step counted"}
        total = {k: sum(s[k] for s in self.steps) for k in self.steps[0]}
        out = {"steps": n, "step_s": total["step_s"] / n, "step_s_each": [s["step_s"] for s in self.steps]}
        for part in ("reference_s", "fwd_bwd_s", "optimizer_s"):
            out[part] = total[part] / n
        for side in ("policy", "reference"):
            real, computed = total[side + "_real"], total[side + "_computed"]
            out[side] = {"real_tokens": real / n, "computed_tokens": computed / n,
                         "computed_over_real": computed / real if real else None}
        if "naive_pair_tokens" in total:
            out["reference"]["naive_pair_tokens"] = total["naive_pair_tokens"] / n
        out["model_flops"] = total["model_flops"] / n
        out["model_flops_per_s"] = total["model_flops"] / total["step_s"]
        return out
