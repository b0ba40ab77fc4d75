"""Resume in another parallel layout, optimizer state included (2 processes, gloo).

Each uninterrupted 4-iteration VAR run also checkpoints at iteration 2 (its schedule is the 4-iteration one); a
resume of that checkpoint in another layout must then give the new layout's uninterrupted losses for iterations 3
and 4. Adam's moments matter: a resume that lost them (or mapped them to the wrong TP shards) changes those losses
far beyond the tolerance. Tolerance: the losses of the same run in two layouts differ by float32 reduction-order
noise only (measured here up to ~3e-7 relative); 1e-5 relative is well above that noise and far below what lost or
misplaced Adam moments change.
"""

import pytest

from tiny_run import losses, run, shared_tiny, torchrun

LAYOUTS = {"tp1dp2": ["--tensor-model-parallel-size", "1"], "tp2": ["--tensor-model-parallel-size", "2"],
           "pp2": ["--pipeline-model-parallel-size", "2"]}


def _cmd(tiny, save, layout, *extra):
    return [*torchrun(2), "--objective", "var", "--var-lambda", "0.5", "--data-path", str(tiny / "data"),
            *LAYOUTS[layout], "--global-batch-size", "2", "--micro-batch-size", "1", "--train-iters", "4",
            "--lr", "1e-3", "--lr-warmup-iters", "1", "--save", str(save), *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """layout -> (save dir, per-step losses) of the uninterrupted run, started lazily. All start from the TP2 run's
    random initial weights (its iteration 0): random init is not the same in every layout (per-stage seeds)."""
    done = {}

    def get(layout):
        if layout not in done:
            save = tmp_path_factory.mktemp(f"full_{layout}")
            start = ["--model-arch", str(tiny / "model_arch.json")] if layout == "tp2" else \
                ["--load", str(get("tp2")[0]), "--ckpt-step", "0", "--finetune"]
            r = run(_cmd(tiny, save, layout, *start, "--save-interval", "2"), timeout=600)
            assert r.returncode == 0, r.stderr[-4000:]
            done[layout] = save, losses(save)
            assert sorted(done[layout][1]) == [1, 2, 3, 4]
        return done[layout]

    return get


@pytest.mark.parametrize("saved,resumed", [("tp1dp2", "tp2"), ("tp2", "tp1dp2"), ("tp2", "pp2")])
def test_resume_in_another_layout_matches_uninterrupted(tiny, uninterrupted, tmp_path, saved, resumed):
    src, _ = uninterrupted(saved)
    _, ref = uninterrupted(resumed)
    out = tmp_path / "resumed"
    r = run(_cmd(tiny, out, resumed, "--load", str(src), "--ckpt-step", "2"), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    got = losses(out)
    assert sorted(got) == [3, 4], got
    rel = {it: abs(got[it] - ref[it]) / abs(ref[it]) for it in (3, 4)}
    print(f"{saved} -> {resumed}: relative loss differences after resume {rel}")
    assert max(rel.values()) <= 1e-5, (saved, resumed, got, ref)
