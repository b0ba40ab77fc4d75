"""Single-process runs of the training entry point: what a resume continues (LR schedule over the new length and
batch size) and what a run refuses (writing into another run's directory, data of another tokenizer)."""

import json
import shutil

import pytest

from megatron_var.data.tiny_tokenizer import build_tiny_tokenizer
from tiny_run import one_error_line, prepare, records, run, shared_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shared_tiny(tmp_path_factory)


def _cmd(tiny, save, *extra, data="data"):
    return ["-m", "megatron_var.cli.train", "--objective", "sft", "--data-path", str(tiny / data),
            "--global-batch-size", "2", "--lr", "1e-3", "--lr-warmup-iters", "1", "--save", str(save), *extra]


def _train(*args, rc=0):
    r = run(list(args), timeout=600)
    assert r.returncode == rc, r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """A 2-iteration run and an uninterrupted 4-iteration run (checkpoints at 2 and 4), from the same init."""
    short, full = tmp_path_factory.mktemp("short"), tmp_path_factory.mktemp("full")
    arch = ["--model-arch", str(tiny / "model_arch.json")]
    _train(*_cmd(tiny, short, *arch, "--train-iters", "2"))
    _train(*_cmd(tiny, full, *arch, "--train-iters", "4", "--save-interval", "2"))
    return short, full


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_longer_resumed_run_continues_the_lr_schedule(tiny, runs, tmp_path):
    """A 2-iteration run resumed with --train-iters 4 continues as the uninterrupted 4-iteration run (both used the
    same LR for iterations 1-2: warmup, then the peak); before, the saved 2-iteration schedule stayed at min-lr."""
    short, full = runs
    d = _copy(short, tmp_path / "d")
    _train(*_cmd(tiny, d, "--load", str(d), "--train-iters", "4"))
    got, ref = records(d), records(full)
    assert [r["iteration"] for r in got] == [1, 2, 3, 4]
    assert [r["lr"] for r in got[2:]] == [r["lr"] for r in ref[2:]]
    for a, b in zip(got[2:], ref[2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (got, ref)


def test_changed_global_batch_size_continues_in_groups(tiny, runs, tmp_path):
    """Resumed after 2 iterations of 2 groups with --global-batch-size 4: iteration 3 trains on groups 4..7 and
    ends the schedule where the uninterrupted run ends it (after 8 groups), at --min-lr."""
    _, full = runs
    d = tmp_path / "gbs4"
    _train(*_cmd(tiny, d, "--load", str(full), "--ckpt-step", "2", "--train-iters", "3", "--global-batch-size",
                 "4", "--min-lr", "1e-4"))  # another --min-lr too: the schedule follows the current flags
    (rec,) = records(d)
    assert rec["iteration"] == 3 and rec["consumed_groups"] == 8
    assert rec["lr"] == pytest.approx(1e-4, rel=1e-12)


def test_new_run_into_a_run_directory_is_refused(tiny, runs, tmp_path):
    short, _ = runs
    d = _copy(short, tmp_path / "d")
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    r = _train(*_cmd(tiny, d, "--model-arch", str(tiny / "model_arch.json"), "--train-iters", "2"), rc=2)
    line = one_error_line(r.stderr)
    assert f"--save {d} already holds a training run" in line and "--overwrite" in line
    r = _train(*_cmd(tiny, d, "--load", str(d), "--finetune", "--train-iters", "2"), rc=2)
    assert "a new run cannot replace the checkpoint it starts from" in one_error_line(r.stderr)
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before


def _with_tokenizer(tiny, src, dst):
    """``src`` as a converted checkpoint would be: with the model's tokenizer under hf/."""
    d = _copy(src, dst)
    shutil.copytree(tiny / "tokenizer", d / "hf")
    return d


def test_overwrite_deletes_the_old_run_first(tiny, runs, tmp_path):
    """--overwrite: the new run starts from the checkpoint it names, the old run's iterations and metrics are gone
    (none left stale); the matching tokenizer of --load's hf/ passes the data check."""
    short, full = runs
    start = _with_tokenizer(tiny, short, tmp_path / "start")
    d = _copy(full, tmp_path / "d")
    _train(*_cmd(tiny, d, "--load", str(start), "--finetune", "--train-iters", "1", "--lr-warmup-iters", "0",
                 "--overwrite"))
    assert [r["iteration"] for r in records(d)] == [1]
    assert (d / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in d.glob("iter_*")) == ["iter_0000001"]
    assert (d / "hf" / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def other_data(tiny, tmp_path_factory):
    """The tiny rows prepared with another tokenizer (fewer merges: same vocab bound, other ids)."""
    out = tmp_path_factory.mktemp("other")
    shutil.copy(tiny / "train.jsonl", out / "train.jsonl")
    texts = [json.loads(ln)["prompt"] for ln in (tiny / "train.jsonl").read_text().splitlines()]
    build_tiny_tokenizer(texts, vocab_size=290, out_dir=out / "tokenizer")
    return prepare(out, out / "tokenizer")


def test_data_of_another_tokenizer_is_refused(tiny, runs, other_data, tmp_path):
    short, _ = runs
    # against the tokenizer files of the checkpoint (converted checkpoints carry them)
    start = _with_tokenizer(tiny, short, tmp_path / "start")
    r = _train(*_cmd(tiny, tmp_path / "new", "--load", str(start), "--finetune", "--train-iters", "2",
                     data=other_data), rc=2)
    line = one_error_line(r.stderr)
    assert str(other_data) in line and str(other_data.parent / "tokenizer") in line and str(start / "hf") in line
    # against the data a resumed run (from --model-arch: no tokenizer files) was trained on
    d = _copy(short, tmp_path / "d")
    r = _train(*_cmd(tiny, d, "--load", str(d), "--train-iters", "3", data=other_data), rc=2)
    line = one_error_line(r.stderr)
    assert str(tiny / "tokenizer") in line and str(other_data.parent / "tokenizer") in line


def test_model_vocab_smaller_than_the_data_tokenizer_is_refused(tiny, tmp_path):
    arch = json.loads((tiny / "model_arch.json").read_text())
    arch["vocab_size"] = 100
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    r = _train(*_cmd(tiny, tmp_path / "run", "--model-arch", str(tmp_path / "arch.json"), "--train-iters", "2"),
               rc=2)
    line = one_error_line(r.stderr)
    assert "vocab_size 100" in line and str(tiny / "data") in line
    assert not (tmp_path / "run").exists()


def test_save_interval_mins_saves_by_the_clock(tiny, tmp_path):
    """--save-interval-mins saves whenever that much wall time has passed (here: after every iteration), and the
    final iteration is saved once; without it only the end is saved."""
    arch = ["--model-arch", str(tiny / "model_arch.json"), "--train-iters", "3"]
    timed, plain = tmp_path / "timed", tmp_path / "plain"
    _train(*_cmd(tiny, timed, *arch, "--save-interval-mins", "1e-6"))
    _train(*_cmd(tiny, plain, *arch))
    its = lambda d: sorted(p.name for p in d.glob("iter_*"))  # noqa: E731
    assert its(timed) == ["iter_0000000", "iter_0000001", "iter_0000002", "iter_0000003"]
    assert its(plain) == ["iter_0000000", "iter_0000003"]


def test_non_distributed_optimizer_trains_like_the_distributed_one(tiny, tmp_path):
    """Both optimizers step the same AdamW on the same gradients: same losses and gradient norms at every step
    (before the trainer zeroed param.grad each step, the non-distributed one counted every gradient twice from
    iteration 2 on: grad norm 3.46 instead of 2.35)."""
    arch = ["--model-arch", str(tiny / "model_arch.json"), "--train-iters", "3", "--seed", "5"]
    dist_opt, plain = tmp_path / "dist", tmp_path / "plain"
    _train(*_cmd(tiny, dist_opt, *arch))
    _train(*_cmd(tiny, plain, *arch, "--no-use-distributed-optimizer"))
    for a, b in zip(records(dist_opt), records(plain), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a, b)
