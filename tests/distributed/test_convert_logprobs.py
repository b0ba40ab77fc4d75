"""A converted checkpoint scores exactly like the HF model it came from, at every layout, and survives a
megatron save at TP=2×PP=2 + export bitwise.

Reference: transformers' own float32 forward of the original HF model (per pair). Models: an untied GQA Llama with
Llama-3 RoPE scaling and vocab 120 (padded to 128: TP=2's second shard holds padding rows) and a tied Qwen2 with QKV
biases and vocab 130 (padded to 256). Weights have a large std so a wrong interleave or RoPE shows far above 1e-5.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from safetensors.torch import load_file

import hf_tiny
from megatron_var.convert.export_hf import convert_megatron_to_hf
from megatron_var.convert.import_hf import convert_hf_to_megatron
from megatron_var.checkpoint import io as checkpoint_io
from megatron_var.checkpoint import layout as ckpt_layout
from megatron_var.models.gpt import ModelOptions, build_model_chunks
from megatron_var.runtime.pair_logprobs import score_pairs

from helpers import layout

TOL = 1e-5
LAYOUTS = {"tp1": dict(), "tp2": dict(tp=2), "pp2": dict(pp=2), "tp2pp2": dict(tp=2, pp=2),
           "pp2vpp2": dict(pp=2, vpp=2)}


def _shared_dir(tmp_path_factory, name: str) -> Path:
    box = [str(tmp_path_factory.mktemp(name)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _all_ranks_ok(ok: bool) -> bool:
    """Rank-0-only checks: share the verdict so every rank passes or fails together (no hang, no skew)."""
    box = [ok]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@pytest.fixture(scope="module", params=["llama-gqa-rope3", "qwen2-tied"])
def case(request, tmp_path_factory):
    if request.param == "llama-gqa-rope3":
        config = hf_tiny.llama_config(tied=False, rope_scaling=True, layers=4)
    else:
        config = hf_tiny.qwen2_config(tied=True, layers=4)
    model = hf_tiny.build_model(config, seed=3)  # same seed on every rank: the same model everywhere
    pairs = hf_tiny.random_pairs(10, config.vocab_size, seed=5)
    ref = hf_tiny.hf_token_logps(model, pairs)
    root = _shared_dir(tmp_path_factory, request.param)
    if dist.get_rank() == 0:
        hf_tiny.save_model(model, root / "hf")
        convert_hf_to_megatron(root / "hf", root / "meg")
    dist.barrier()
    return root, pairs, ref


def _max_rel_err(got: list[list[float]], ref: list[list[float]]) -> float:
    assert [len(g) for g in got] == [len(r) for r in ref]
    return max(abs(a - b) / abs(b) for g, r in zip(got, ref) for a, b in zip(g, r))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_logprobs_match_hf(case, name):
    root, pairs, ref = case
    arch = ckpt_layout.read_arch(root / "meg")
    with layout(**LAYOUTS[name]) as pc:
        chunks = build_model_chunks(arch, pc, ModelOptions())
        checkpoint_io.load_model(chunks, root / "meg")
        got = score_pairs(chunks, arch, pairs, micro_batch_size=3)
    err = _max_rel_err(got, ref)
    assert err <= TOL, f"{name}: per-token log-prob rel err {err:.2e}"


def test_wrong_weights_are_detected(case):
    """Negative control: swapping two query heads of one layer must break the comparison by far."""
    root, pairs, ref = case
    arch = ckpt_layout.read_arch(root / "meg")
    d = arch.kv_channels
    with layout() as pc:
        chunks = build_model_chunks(arch, pc, ModelOptions())
        checkpoint_io.load_model(chunks, root / "meg")
        w = chunks[0].decoder.layers[1].self_attention.linear_qkv.weight
        with torch.no_grad():
            w[:2 * d] = torch.cat([w[d:2 * d], w[:d]]).clone()
        got = score_pairs(chunks, arch, pairs, micro_batch_size=3)
    assert _max_rel_err(got, ref) > 1e-3


def test_load_into_a_different_shape_is_refused(case):
    root, _, _ = case
    arch = ckpt_layout.read_arch(root / "meg")
    arch.ffn_hidden_size = 128
    with layout() as pc:
        chunks = build_model_chunks(arch, pc, ModelOptions())
        with pytest.raises(ValueError, match=r"different model shape: decoder.layers.mlp.linear_fc2.weight is \["):
            checkpoint_io.load_model(chunks, root / "meg")


def _meta(ckpt_dir: Path) -> tuple[dict, set]:
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    tensors = {k: (tuple(v.size), v.properties.dtype) for k, v in md.items() if hasattr(v, "size")}
    return tensors, {k for k, v in md.items() if not hasattr(v, "size")}


def test_round_trip_through_tp2pp2_megatron_save(case, tmp_path_factory):
    """Load at TP=2×PP=2, save with megatron's own dist_checkpointing (as training does), export: bitwise HF.
    The converter's checkpoint also has exactly the keys, global shapes and dtypes megatron writes."""
    root, _, _ = case
    arch = ckpt_layout.read_arch(root / "meg")
    saved = _shared_dir(tmp_path_factory, "resaved")
    with layout(tp=2, pp=2) as pc:
        chunks = build_model_chunks(arch, pc, ModelOptions())
        checkpoint_io.load_model(chunks, root / "meg")
        if dist.get_rank() == 0:
            ckpt_layout.iteration_dir(saved, 5).mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save({"model": chunks[0].sharded_state_dict()}, str(ckpt_layout.iteration_dir(saved, 5)))
    ok = True
    if dist.get_rank() == 0:
        ckpt_layout.write_arch(saved, arch)
        ckpt_layout.copy_hf_files(ckpt_layout.hf_dir(root / "meg"), ckpt_layout.hf_dir(saved))
        ckpt_layout.write_latest(saved, 5)
        back = convert_megatron_to_hf(saved, saved / "export")
        orig = {}
        for f in (root / "hf").glob("*.safetensors"):
            orig.update(load_file(str(f)))
        got = {}
        for f in back.glob("*.safetensors"):
            got.update(load_file(str(f)))
        ok = set(orig) == set(got) and all(torch.equal(orig[k], got[k]) for k in orig)
        ok &= json.loads((back / "config.json").read_text()) == json.loads((root / "hf" / "config.json").read_text())
        conv_t, conv_o = _meta(ckpt_layout.iteration_dir(root / "meg", 0))
        meg_t, meg_o = _meta(ckpt_layout.iteration_dir(saved, 5))
        ok &= conv_t == meg_t and conv_o == meg_o
    assert _all_ranks_ok(ok), "export of the TP2xPP2 megatron save differs from the original HF checkpoint"
