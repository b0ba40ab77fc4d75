"""Checksums in a 4-rank world: the hashing split over the ranks gives the single-process manifest, and damage
that only one rank's share of the files sees still reaches every rank as the same verdict (same error or the same
fallback), so no rank is left waiting in a collective."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import hf_tiny
from checkpoint_damage import flip64
from megatron_var.convert.import_hf import convert_hf_to_megatron
from helpers import LLAMA, layout
from megatron_var.checkpoint import integrity as integrity
from megatron_var.checkpoint import layout as ckpt_layout
from megatron_var.models.gpt import ModelOptions, build_model_chunks
from megatron_var.checkpoint import io as checkpointing


def _same_everywhere(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _on_rank0(fn) -> None:
    """Run ``fn`` on rank 0 only; every rank raises if it failed (instead of waiting for it in a collective)."""
    err = None
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:  # reported on every rank below
            err = f"{type(e).__name__}: {e}"
    err = _same_everywhere(err)[0]
    assert err is None, f"rank 0 failed: {err}"


@pytest.fixture
def converted(tmp_shared):
    root = Path(tmp_shared)
    _on_rank0(lambda: convert_hf_to_megatron(hf_tiny.make_hf_dir("llama-untied", root / "hf"), root / "meg"))
    return root / "meg"


def test_split_hashing_matches_one_process(converted):
    ckpt = ckpt_layout.iteration_dir(converted, 0)
    single = json.loads((ckpt / integrity.MANIFEST).read_text())  # the converter's, one process
    dist.barrier()
    assert integrity.write_manifest(ckpt, collective=True) == single
    assert len(single["files"]) > dist.get_world_size()  # every rank had files to hash


def test_damage_seen_by_one_rank_fails_every_rank_alike(converted):
    ckpt = ckpt_layout.iteration_dir(converted, 0)
    files = sorted(json.loads((ckpt / integrity.MANIFEST).read_text())["files"])
    victim = ckpt / files[3::4][0]  # hashed by rank 3 only
    _on_rank0(lambda: flip64(victim))
    arch = ckpt_layout.read_arch(converted)
    with layout(tp=2) as pc:
        chunks = build_model_chunks(arch, pc, ModelOptions())
        with pytest.raises(ValueError) as e:
            checkpointing.load_model(chunks, converted)
    msgs = _same_everywhere(str(e.value))
    assert len(set(msgs)) == 1 and f"{victim}: hash mismatch" in msgs[0], msgs


def test_unverified_damage_is_one_error_on_every_rank(converted):
    """Without a manifest (an older checkpoint) a truncated file surfaces inside torch DCP, whose
    CheckpointException derives from BaseException: still one ValueError, the same on every rank."""
    ckpt = ckpt_layout.iteration_dir(converted, 0)
    victim = max(ckpt.glob("*.distcp"), key=lambda f: f.stat().st_size)
    _on_rank0(lambda: ((ckpt / integrity.MANIFEST).unlink(), victim.write_bytes(victim.read_bytes()[:100])))
    arch = ckpt_layout.read_arch(converted)
    with layout(tp=2) as pc:
        chunks = build_model_chunks(arch, pc, ModelOptions())
        with pytest.raises(ValueError, match="cannot load model tensors") as e:
            checkpointing.load_model(chunks, converted)
    msgs = _same_everywhere(str(e.value).split(" (")[0])
    assert len(set(msgs)) == 1 and "\n" not in str(e.value), (msgs, str(e.value))


def test_trainer_falls_back_on_every_rank(tmp_shared):
    tmp_shared = Path(tmp_shared)
    with layout(tp=2) as pc:
        chunks = build_model_chunks(LLAMA, pc, ModelOptions())
        for it in (1, 2):
            with torch.no_grad():
                for p in chunks[0].parameters():
                    p.fill_(float(it))
            checkpointing.save_checkpoint(tmp_shared, it, chunks)
        files = sorted(json.loads((ckpt_layout.iteration_dir(tmp_shared, 2) / integrity.MANIFEST).read_text())
                       ["files"])
        _on_rank0(lambda: (ckpt_layout.iteration_dir(tmp_shared, 2) / files[-1]).write_bytes(b""))
        state = checkpointing.load_checkpoint(tmp_shared, chunks)
        value = next(chunks[0].parameters()).flatten()[0].item()
    assert _same_everywhere((state["checkpoint_iteration"], value)) == [(1, 1.0)] * dist.get_world_size()
    _on_rank0(lambda: shutil.rmtree(tmp_shared))
