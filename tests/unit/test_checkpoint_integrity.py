"""Checksum manifests on a real (converter) checkpoint: written with it, intact verifies, and each kind of damage
(truncated, emptied, 64 flipped bytes, missing file, scrambled metadata) is named by file; loads refuse it."""

import json
import logging
import shutil

import pytest

import hf_tiny
from checkpoint_damage import flip64, truncate
from megatron_var.convert.export_hf import convert_megatron_to_hf
from megatron_var.convert.import_hf import convert_hf_to_megatron
from megatron_var.checkpoint import integrity as integrity
from megatron_var.checkpoint import layout as layout


@pytest.fixture(scope="module")
def meg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("integrity")
    return convert_hf_to_megatron(hf_tiny.make_hf_dir("llama-untied", tmp / "hf"), tmp / "meg")


@pytest.fixture
def copy(meg, tmp_path):
    """A private copy of the converted checkpoint to damage; (root, iter_0000000 dir)."""
    root = shutil.copytree(meg, tmp_path / "meg")
    return root, layout.iteration_dir(root, 0)


def _largest_distcp(ckpt):
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_converter_writes_a_manifest_of_every_file(copy):
    _, ckpt = copy
    manifest = json.loads((ckpt / integrity.MANIFEST).read_text())
    files = {p.name for p in ckpt.iterdir() if p.name != integrity.MANIFEST}
    assert manifest["algorithm"] == "xxh3_64" and set(manifest["files"]) == files
    assert {".metadata", "metadata.json"} <= files
    for rel, entry in manifest["files"].items():
        assert entry == {"size": (ckpt / rel).stat().st_size, "hash": integrity.file_hash(ckpt / rel)}
    assert integrity.verify(ckpt) == (True, [])
    assert integrity.check(ckpt) == []


DAMAGE = {"truncated": (truncate, "size mismatch"), "emptied": (lambda p: p.write_bytes(b""), "size mismatch"),
          "flipped64": (flip64, "hash mismatch"), "missing": (lambda p: p.unlink(), "missing file")}


@pytest.mark.parametrize("kind", list(DAMAGE))
@pytest.mark.parametrize("target", ["distcp", ".metadata"])
def test_damage_is_named_by_file(copy, kind, target):
    root, ckpt = copy
    path = _largest_distcp(ckpt) if target == "distcp" else ckpt / ".metadata"
    damage, what = DAMAGE[kind]
    damage(path)
    has_manifest, problems = integrity.verify(ckpt)
    assert has_manifest and len(problems) == 1 and str(path) in problems[0] and what in problems[0], problems
    with pytest.raises(ValueError, match=f"is damaged: {path}: {what}") as e:
        integrity.ensure_intact(ckpt)
    assert "\n" not in str(e.value)
    if target == "distcp":  # export refuses it up front (a missing .metadata is refused even earlier)
        with pytest.raises(ValueError, match=f"{path}: {what}"):
            convert_megatron_to_hf(root, root.parent / "out")


def test_unreadable_manifest_is_damage(copy):
    _, ckpt = copy
    (ckpt / integrity.MANIFEST).write_text('{"files": ')
    problems = integrity.check(ckpt)
    assert len(problems) == 1 and "unreadable manifest" in problems[0] and integrity.MANIFEST in problems[0]


def test_no_manifest_loads_with_a_warning(copy, caplog):
    _, ckpt = copy
    (ckpt / integrity.MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        assert integrity.check(ckpt) == []
    assert "not verified" in caplog.text and str(ckpt) in caplog.text


def test_no_manifest_still_catches_a_scrambled_metadata(copy):
    _, ckpt = copy
    (ckpt / integrity.MANIFEST).unlink()
    truncate(ckpt / ".metadata")
    problems = integrity.check(ckpt)
    assert len(problems) == 1 and f"{ckpt / '.metadata'} is unreadable" in problems[0], problems


def test_manifest_is_written_atomically(copy):
    _, ckpt = copy
    (ckpt / integrity.MANIFEST).unlink()
    manifest = integrity.write_manifest(ckpt)
    assert json.loads((ckpt / integrity.MANIFEST).read_text()) == manifest
    assert [p.name for p in ckpt.iterdir() if p.name.startswith(integrity.MANIFEST)] == [integrity.MANIFEST]
