"""A crafted checkpoint whose ``.metadata`` (or a pickled object item) runs code on unpickling is refused on every
load path of the converters and scoring, and the code never runs; real checkpoint metadata still loads.

The trainer's ``--load`` / ``--ref-load`` paths are checked in tests/e2e/test_train_checkpoint_trust.py. The crafted
checkpoints carry a matching checksum manifest (an attacker writes one too), so the restricted unpickler, not the
manifest, is what stops them.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemReader

import hf_tiny
from checkpoint_damage import Payload, craft_metadata
from megatron_var.convert.dcp_io import CheckpointReader, write_checkpoint
from megatron_var.convert.export_hf import convert_megatron_to_hf
from megatron_var.convert.import_hf import convert_hf_to_megatron
from data_fixtures import write_jsonl
from megatron_var.checkpoint import integrity as integrity
from megatron_var.checkpoint import layout as layout
from megatron_var.checkpoint import safe_unpickle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def meg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unpickle")
    model = hf_tiny.build_model(hf_tiny.llama_config(tied=True), seed=1)
    hf_tiny.save_model(model, tmp / "hf")
    return convert_hf_to_megatron(tmp / "hf", tmp / "meg")


@pytest.fixture
def crafted(meg, tmp_path):
    """(root, marker): a copy of ``meg`` whose .metadata hides the payload inside otherwise real metadata."""
    root = shutil.copytree(meg, tmp_path / "meg")
    marker = tmp_path / "pwned"
    craft_metadata(layout.iteration_dir(root, 0), marker)
    return root, marker


def test_real_metadata_loads(meg):
    ckpt = layout.iteration_dir(meg, 0)
    ours = safe_unpickle.check_checkpoint(ckpt)
    theirs = FileSystemReader(str(ckpt)).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata and ours.storage_data == theirs.storage_data


def test_the_crafted_file_really_runs_code(crafted):
    """Positive control: torch's own reader runs the payload (so the refusals below mean something)."""
    root, marker = crafted
    FileSystemReader(str(layout.iteration_dir(root, 0))).read_metadata()
    assert marker.exists()


def test_restricted_readers_refuse_it(crafted):
    root, marker = crafted
    ckpt = layout.iteration_dir(root, 0)
    for read in (safe_unpickle.load_metadata, layout.checkpoint_tensor_shapes, layout.checkpoint_object_keys,
                 CheckpointReader, integrity.ensure_intact):
        with pytest.raises(safe_unpickle.UnsafeCheckpointError, match=r"refuses global posix\.system"):
            read(ckpt)
    with pytest.raises(safe_unpickle.UnsafeCheckpointError, match=r"\.metadata: not loaded"):
        convert_megatron_to_hf(root, root.parent / "out")
    assert not marker.exists() and not (root.parent / "out").exists()


def _cli(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))


def test_export_cli_refuses_it(crafted):
    root, marker = crafted
    r = _cli(ROOT / "checkpoints_convert" / "megatron_to_hf.py", "--load", root, "--out", root.parent / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "error:" in r.stderr and "refuses global posix.system" in r.stderr
    assert not marker.exists()


def test_scoring_cli_refuses_it(crafted, tmp_path):
    root, marker = crafted
    rows = [{"prompt_ids": x, "response_ids": y} for x, y in hf_tiny.random_pairs(2, 120, seed=2)]
    inp = write_jsonl(tmp_path / "pairs.jsonl", rows)
    r = _cli(ROOT / "tools" / "score_logprobs.py", "--load", root, "--input", inp, "--output", tmp_path / "o.jsonl")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "error:" in r.stderr and "refuses global posix.system" in r.stderr
    assert not marker.exists()


def test_a_pickled_object_item_that_runs_code_is_refused(tmp_path):
    """DCP unpickles ShardedObjects (here megatron's common state) with weights_only=False: checked first."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "iter_0000000"
    write_checkpoint(ckpt, [], {}, common_state=Payload(marker))
    with pytest.raises(safe_unpickle.UnsafeCheckpointError, match="common_state.*not loaded"):
        integrity.ensure_intact(ckpt)
    assert not marker.exists()


def test_a_legacy_common_pt_that_runs_code_is_refused(meg, tmp_path):
    """megatron loads a ``common.pt`` (its older layout) when one is there: a crafted one is refused too."""
    import torch

    root = shutil.copytree(meg, tmp_path / "meg")
    ckpt, marker = layout.iteration_dir(root, 0), tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, ckpt / "common.pt")
    integrity.write_manifest(ckpt)
    with pytest.raises(safe_unpickle.UnsafeCheckpointError, match="common.pt not loaded"):
        integrity.ensure_intact(ckpt)
    assert not marker.exists()
