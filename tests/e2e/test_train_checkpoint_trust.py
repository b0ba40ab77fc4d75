"""Checkpoints you can trust, through the training entry point (single process, CPU, the bundled tiny task).

One short SFT run saves iterations 0, 1, 2 (each with a checksum manifest); copies of it are then damaged or
crafted and loaded: a damaged latest checkpoint falls back to the newest intact one (bitwise the same losses as
the original run from there), no intact checkpoint or a damaged ``--ckpt-step`` is a one-line error (exit 2), a
crafted ``.metadata`` never runs (``--load`` and ``--ref-load``), and a checkpoint of another architecture is one
line naming both shapes.
"""

import json
import shutil

import pytest

from test_train_resume import _losses, _run, tiny  # noqa: F401  (tiny: the shared tiny-task fixture)

import hf_tiny
from checkpoint_damage import craft_metadata, flip64
from megatron_var.convert.import_hf import convert_hf_to_megatron
from megatron_var.checkpoint import integrity as integrity
from megatron_var.checkpoint import layout as layout


def _train(tiny, *extra, objective="sft"):  # noqa: F811
    return _run(["-m", "megatron_var.cli.train", "--objective", objective, "--var-lambda", "0.5",
                 "--data-path", str(tiny / "data"), "--global-batch-size", "1", "--lr", "1e-3", *extra], timeout=300)


def _one_line_error(r) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):  # noqa: F811
    save = tmp_path_factory.mktemp("trained") / "run"
    r = _train(tiny, "--model-arch", str(tiny / "model_arch.json"), "--train-iters", "2", "--save", str(save),
               "--save-interval", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GB/s" in r.stderr  # the hashing rate is logged at every save
    for it in (0, 1, 2):
        assert integrity.verify(layout.iteration_dir(save, it)) == (True, [])
    return save


@pytest.fixture
def copy(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


def _distcp(root, it):
    return next(layout.iteration_dir(root, it).glob("*.distcp"))


def test_damaged_latest_falls_back_to_the_newest_intact(tiny, trained, copy):  # noqa: F811
    bad = _distcp(copy, 2)
    flip64(bad)
    r = _train(tiny, "--load", str(copy), "--save", str(copy), "--save-interval", "1", "--train-iters", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{bad}: hash mismatch" in r.stderr, r.stderr[-3000:]
    assert "falling back to iter_0000001" in r.stderr, r.stderr[-3000:]
    # resumed from iteration 1: iteration 2 is retrained bitwise like the original run, then iteration 3
    assert _losses(copy)[:2] == _losses(trained) and len(_losses(copy)) == 3


def test_no_intact_checkpoint_is_a_one_line_error(tiny, copy):  # noqa: F811
    _distcp(copy, 2).write_bytes(b"")  # emptied
    truncated = _distcp(copy, 1)
    truncated.write_bytes(truncated.read_bytes()[:100])
    (layout.iteration_dir(copy, 0) / ".metadata").unlink()
    line = _one_line_error(_train(tiny, "--load", str(copy), "--train-iters", "3"))
    assert "no intact checkpoint" in line and "size mismatch (0 bytes" in line and str(truncated) in line
    assert "iter_0000000/.metadata: missing file" in line


def test_damaged_explicit_step_does_not_fall_back(tiny, copy):  # noqa: F811
    flip64(_distcp(copy, 1))
    line = _one_line_error(_train(tiny, "--load", str(copy), "--ckpt-step", "1", "--train-iters", "3"))
    assert "--ckpt-step 1: checkpoint is damaged" in line and "hash mismatch" in line


def test_unverified_damage_is_a_one_line_error(tiny, copy):  # noqa: F811
    """A checkpoint without a manifest (older) loads with a warning; a file truncated inside its tensors then fails
    inside torch DCP (CheckpointException, a BaseException): still one error line, exit 2."""
    for it in (0, 1, 2):
        (layout.iteration_dir(copy, it) / integrity.MANIFEST).unlink()
    bad = _distcp(copy, 2)
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])  # the object items at its start stay readable
    r = _train(tiny, "--load", str(copy), "--train-iters", "3")
    line = _one_line_error(r)
    assert "not verified" in r.stderr and "iter_0000002: cannot load it (EOFError" in line, line


def test_crafted_metadata_is_refused_on_load(tiny, copy, tmp_path):  # noqa: F811
    marker = tmp_path / "pwned"
    craft_metadata(layout.iteration_dir(copy, 2), marker)
    line = _one_line_error(_train(tiny, "--load", str(copy), "--train-iters", "3"))
    assert "refuses global posix.system" in line and "iter_0000002/.metadata" in line
    assert not marker.exists()


def test_crafted_metadata_is_refused_on_ref_load(tiny, copy, tmp_path):  # noqa: F811
    marker = tmp_path / "pwned"
    craft_metadata(layout.iteration_dir(copy, 2), marker)
    line = _one_line_error(_train(tiny, "--model-arch", str(tiny / "model_arch.json"), "--ref-load", str(copy),
                                  "--train-iters", "1", objective="var"))
    assert "refuses global posix.system" in line
    assert not marker.exists()


def test_ref_load_of_another_architecture_names_both_shapes(tiny, tmp_path):  # noqa: F811
    other = convert_hf_to_megatron(hf_tiny.make_hf_dir("llama-untied", tmp_path / "hf"), tmp_path / "meg")
    line = _one_line_error(_train(tiny, "--model-arch", str(tiny / "model_arch.json"), "--ref-load", str(other),
                                  "--train-iters", "1", objective="var"))
    assert "different model shape" in line and line.count("[") >= 2, line  # "X is [a, b] in ..., expects [c, d]"


def test_load_of_another_architecture_names_both_shapes(tiny, copy):  # noqa: F811
    arch = json.loads((copy / "model_arch.json").read_text())
    arch["ffn_hidden_size"] = 96  # the tensors on disk have 128
    (copy / "model_arch.json").write_text(json.dumps(arch))
    line = _one_line_error(_train(tiny, "--load", str(copy), "--train-iters", "3"))
    assert "different model shape" in line and "[2, 64, 128]" in line and "[2, 64, 96]" in line, line

