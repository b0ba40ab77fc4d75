"""Bad input gives one clear error naming the file / tensor / flag, and never leaves a half-written output.

Negative paths of both converters; the CLI contract (one ``error:`` line, exit code 2, no traceback) is checked
in-process for every case and once through a real subprocess.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hf_tiny
from megatron_var.cli import hf_to_megatron, megatron_to_hf
from megatron_var.cli.common import run_cli_cleaning_up
from megatron_var.convert import export_hf, import_hf
from megatron_var.convert.hf_io import ShardedSafetensorsWriter
from megatron_var.checkpoint import layout as layout

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    src = hf_tiny.make_hf_dir("qwen2-untied", tmp / "hf")
    meg = import_hf.convert_hf_to_megatron(src, tmp / "meg")
    return src, meg


@pytest.fixture
def src(base, tmp_path):
    return Path(shutil.copytree(base[0], tmp_path / "hf"))


def _import_error(capsys, argv) -> str:
    assert run_cli_cleaning_up(hf_to_megatron.main, argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and not any("Traceback" in line for line in err), err
    return err[-1]


def _nothing_left(tmp_path: Path, out: str = "out") -> None:
    assert not (tmp_path / out).exists()
    assert not list(tmp_path.glob(f"{out}.tmp-*")), "partial output left behind"


def _edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def test_missing_shard(src, tmp_path, capsys):
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = _import_error(capsys, ["--hf-dir", str(src), "--out", str(tmp_path / "out")])
    assert "missing shard" in msg and shard.name in msg
    _nothing_left(tmp_path)


@pytest.mark.parametrize("damage", ["garbled_header", "truncated"])
def test_corrupt_shard(src, tmp_path, capsys, damage):
    shard = sorted(src.glob("model-*.safetensors"))[2]
    data = shard.read_bytes()
    shard.write_bytes(b"\xff" * 16 + data[16:] if damage == "garbled_header" else data[:-100])
    msg = _import_error(capsys, ["--hf-dir", str(src), "--out", str(tmp_path / "out")])
    assert "corrupt shard" in msg and shard.name in msg
    _nothing_left(tmp_path)


@pytest.mark.parametrize("change,expect", [
    ({"intermediate_size": 128}, "model.layers.0.mlp.gate_proj.weight"),
    ({"num_hidden_layers": 3}, "model.layers.2."),
    ({"num_hidden_layers": 1}, "model.layers.1."),
    ({"tie_word_embeddings": True}, "lm_head.weight"),
])
def test_config_does_not_match_tensors(src, tmp_path, capsys, change, expect):
    _edit_config(src, **change)
    msg = _import_error(capsys, ["--hf-dir", str(src), "--out", str(tmp_path / "out")])
    assert expect in msg, msg
    _nothing_left(tmp_path)


@pytest.mark.parametrize("change,expect", [
    ({"num_experts": 8}, "mixture-of-experts"),
    ({"use_sliding_window": True, "sliding_window": 64, "layer_types": None}, "sliding-window"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"architectures": ["Qwen2ForSequenceClassification"]}, "not a causal LM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
])
def test_unsupported_config_refused(src, tmp_path, capsys, change, expect):
    _edit_config(src, **change)
    msg = _import_error(capsys, ["--hf-dir", str(src), "--out", str(tmp_path / "out")])
    assert expect in msg, msg
    _nothing_left(tmp_path)


@pytest.mark.parametrize("flags,expect", [
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3 does not divide 4 heads"),
    (["--tensor-model-parallel-size", "4"], "--tensor-model-parallel-size 4 does not divide 2 KV heads"),
    (["--pipeline-model-parallel-size", "3"], "not divisible by --pipeline-model-parallel-size 3"),
    (["--tensor-model-parallel-size", "0"], "must be >= 1"),
])
def test_layout_that_does_not_split_the_model(src, tmp_path, capsys, flags, expect):
    msg = _import_error(capsys, ["--hf-dir", str(src), "--out", str(tmp_path / "out")] + flags)
    assert expect in msg, msg
    _nothing_left(tmp_path)


def test_existing_output_refused(src, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    msg = _import_error(capsys, ["--hf-dir", str(src), "--out", str(tmp_path / "out")])
    assert "already exists" in msg and "--overwrite" in msg
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    msg = _import_error(capsys, ["--hf-dir", str(src), "--out", str(src), "--overwrite"])
    assert "would overwrite the input" in msg and (src / "config.json").is_file()


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_import_leaves_nothing(src, tmp_path, monkeypatch, exc):
    calls = []
    real = import_hf._make_chunk

    def flaky(*args):
        calls.append(1)
        if len(calls) == 6:
            raise exc
        return real(*args)

    monkeypatch.setattr(import_hf, "_make_chunk", flaky)
    with pytest.raises(type(exc)):
        import_hf.convert_hf_to_megatron(src, tmp_path / "out")
    assert len(calls) == 6
    _nothing_left(tmp_path)


def _no_space(*args, **kwargs):
    raise OSError("no space left on device")


def test_interrupted_overwrite_keeps_the_old_output(base, tmp_path, monkeypatch):
    """--overwrite replaces OUT only once the new one is complete."""
    old = Path(shutil.copytree(base[1], tmp_path / "out"))
    monkeypatch.setattr(ShardedSafetensorsWriter, "finish", _no_space)
    with pytest.raises(OSError):
        export_hf.convert_megatron_to_hf(base[1], tmp_path / "hfout")
    _nothing_left(tmp_path, "hfout")
    monkeypatch.setattr(import_hf, "write_checkpoint", _no_space)
    with pytest.raises(OSError):
        import_hf.convert_hf_to_megatron(base[0], old, overwrite=True)
    assert layout.latest_iteration(old) == 0 and (old / "iter_0000000" / ".metadata").is_file()
    assert not list(tmp_path.glob("out.*-*"))


def _export_error(capsys, argv) -> str:
    assert run_cli_cleaning_up(megatron_to_hf.main, argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and not any("Traceback" in line for line in err), err
    return err[-1]


def test_export_bad_inputs(base, tmp_path, capsys):
    meg = Path(shutil.copytree(base[1], tmp_path / "meg"))
    out = ["--out", str(tmp_path / "hfout")]
    assert "does not exist" in _export_error(capsys, ["--load", str(tmp_path / "nope")] + out)
    assert "model_arch.json not found" in _export_error(capsys, ["--load", str(base[0])] + out)
    (meg / layout.TRACKER).rename(tmp_path / "tracker")
    assert "no latest_checkpointed_iteration.txt" in _export_error(capsys, ["--load", str(meg)] + out)
    (tmp_path / "tracker").rename(meg / layout.TRACKER)
    assert "iter_0000007" in _export_error(capsys, ["--load", str(meg), "--iteration", "7"] + out)
    assert "--max-shard-size" in _export_error(capsys, ["--load", str(meg), "--max-shard-size", "lots"] + out)
    arch = json.loads((meg / "model_arch.json").read_text())
    arch["ffn_hidden_size"] = 128
    (meg / "model_arch.json").write_text(json.dumps(arch))
    msg = _export_error(capsys, ["--load", str(meg)] + out)
    assert "different model shape" in msg and "linear_fc1.weight" in msg
    _nothing_left(tmp_path, "hfout")


def test_cli_subprocess_clean_error(src, tmp_path):
    (src / "config.json").write_text("{not json")
    proc = subprocess.run([sys.executable, str(ROOT / "checkpoints_convert" / "hf_to_megatron.py"),
                           "--hf-dir", str(src), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "config.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    help_text = subprocess.run([sys.executable, str(ROOT / "checkpoints_convert" / "hf_to_megatron.py"), "--help"],
                               capture_output=True, text=True).stdout
    assert "loads at any TP/PP" in help_text
