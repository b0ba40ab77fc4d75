"""Demo report: the base / SFT / SFT+VAR / SFT+DPO / SFT+A-LoL table, summary.json and a PNG of held-out reward vs VAR steps."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(work: Path, names: list[str], timings: dict, iters: dict) -> dict:
    results = json.loads((work / "eval.json").read_text())["results"]
    by_name = {r["name"]: r for r in results}
    table = {n: {"mean": by_name[n]["mean"], "se": by_name[n]["se"], "per_seed": by_name[n]["per_seed"]}
             for n in names}
    curve = json.loads((work / "eval_curve.json").read_text())["results"]
    steps = [int(r["name"]) for r in curve]
    rewards = [r["mean"] for r in curve]
    var, sft, base = table["SFT+VAR"], table["SFT"], table["base"]
    se = {n: table[n]["se"] or 0.0 for n in names}  # None with a single seed
    summary = {
        "table": table,
        # "clearly beats": the gap exceeds twice the combined standard error over seeds
        "var_beats_sft": var["mean"] - sft["mean"] > 2 * (se["SFT+VAR"] ** 2 + se["SFT"] ** 2) ** 0.5,
        "var_beats_base": var["mean"] - base["mean"] > 2 * (se["SFT+VAR"] ** 2 + se["base"] ** 2) ** 0.5,
        "valid_reward_curve": {"var_step": steps, "mean_reward": rewards},
        "iterations": iters,
        "timings_s": timings,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(work / "var_valid_reward.png", steps, rewards, table)
    print(f"{'model':<10} {'mean reward':>12} {'± s.e.':>8}")
    for n in names:
        print(f"{n:<10} {table[n]['mean']:>12.3f} {se[n]:>8.3f}")
    return summary


def _plot(path: Path, steps: list[int], rewards: list[float], table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(steps, rewards, marker="o", label="SFT+VAR (held-out, seed 0)")
    for name, style in (("base", ":"), ("SFT+DPO", "--"), ("SFT+A-LoL", "-.")):
        ax.axhline(table[name]["mean"], linestyle=style, color="gray", label=name)
    ax.set_xlabel("VAR iteration (0 = SFT model)")
    ax.set_ylabel("mean reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
