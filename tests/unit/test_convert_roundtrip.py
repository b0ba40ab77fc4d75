"""HF -> Megatron -> HF is a permutation: every tensor comes back bitwise, with its dtype, config and side files.

References: the original safetensors (bitwise), the original config.json (dict equality), hand-written row
permutations for the Megatron layout (QKV interleave per group, [gate; up], zero vocab padding), and transformers'
own forward of the exported directory.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import hf_tiny
from megatron_var.convert.dcp_io import CheckpointReader
from megatron_var.convert.export_hf import convert_megatron_to_hf
from megatron_var.convert.import_hf import convert_hf_to_megatron
from megatron_var.checkpoint import layout as layout


def _tensors(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module", params=list(hf_tiny.CONFIGS))
def converted(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    src = hf_tiny.make_hf_dir(request.param, tmp / "hf")
    meg = convert_hf_to_megatron(src, tmp / "meg", 2, 2)
    back = convert_megatron_to_hf(meg, tmp / "back", max_shard_size="40KB")
    return request.param, src, meg, back


def test_round_trip_is_bitwise(converted):
    _, src, _, back = converted
    a, b = _tensors(src), _tensors(back)
    assert len(list(src.glob("*.safetensors"))) > 1 and len(list(back.glob("*.safetensors"))) > 1
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.loads((src / "config.json").read_text()) == json.loads((back / "config.json").read_text())
    for side in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (src / side).read_bytes() == (back / side).read_bytes(), side
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    assert all((back / f).is_file() for f in index["weight_map"].values())


def test_exported_model_runs_like_the_original(converted):
    from transformers import AutoModelForCausalLM

    _, src, _, back = converted
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()(ids).logits
        out = AutoModelForCausalLM.from_pretrained(str(back)).eval()(ids).logits
    assert torch.equal(ref, out)


def test_megatron_layout_by_hand(converted):
    """The stored tensors are the documented permutations of the HF ones (written out by hand here)."""
    name, src, meg, _ = converted
    hf = _tensors(src)
    arch = layout.read_arch(meg)
    assert layout.latest_iteration(meg) == 0
    reader = CheckpointReader(layout.iteration_dir(meg, 0))
    n_layers, g, d = arch.num_layers, arch.num_query_groups, arch.kv_channels
    per = arch.num_attention_heads // g
    for layer in (0, n_layers - 1):
        p = f"model.layers.{layer}.self_attn."
        rows = []
        for grp in range(g):  # [q heads of group, k, v] for each KV group
            rows += [hf[p + "q_proj.weight"][(grp * per + h) * d:(grp * per + h + 1) * d] for h in range(per)]
            rows += [hf[p + "k_proj.weight"][grp * d:(grp + 1) * d], hf[p + "v_proj.weight"][grp * d:(grp + 1) * d]]
        qkv = reader.read("decoder.layers.self_attention.linear_qkv.weight", (layer, 0, 0), (1, g * (per + 2) * d, 64))
        assert torch.equal(qkv[0], torch.cat(rows))
        part = reader.read("decoder.layers.self_attention.linear_qkv.weight", (layer, 5, 3), (1, 7, 11))
        assert torch.equal(part[0], qkv[0, 5:12, 3:14])  # a sub-region (DCP's resharding read) agrees
        fc1 = reader.read("decoder.layers.mlp.linear_fc1.weight", (layer, 0, 0), (1, 2 * 96, 64))[0]
        assert torch.equal(fc1, torch.cat([hf[f"model.layers.{layer}.mlp.gate_proj.weight"],
                                           hf[f"model.layers.{layer}.mlp.up_proj.weight"]]))
        if arch.add_qkv_bias:
            bias = reader.read("decoder.layers.self_attention.linear_qkv.bias", (layer, 0), (1, g * (per + 2) * d))[0]
            brow = []
            for grp in range(g):
                brow += [hf[p + "q_proj.bias"][grp * per * d:(grp + 1) * per * d],
                         hf[p + "k_proj.bias"][grp * d:(grp + 1) * d], hf[p + "v_proj.bias"][grp * d:(grp + 1) * d]]
            assert torch.equal(bias, torch.cat(brow))
    emb = reader.read("embedding.word_embeddings.weight", (0, 0), (arch.padded_vocab_size, 64))
    assert arch.padded_vocab_size % 128 == 0 and arch.padded_vocab_size > arch.vocab_size
    assert torch.equal(emb[:arch.vocab_size], hf["model.embed_tokens.weight"])
    assert not emb[arch.vocab_size:].any()
    keys = set(reader.metadata.state_dict_metadata)
    assert ("output_layer.weight" in keys) == (not arch.tie_word_embeddings)
    assert (meg / "hf" / "tokenizer_config.json").is_file() and not list((meg / "hf").glob("*.safetensors"))


def test_dtype_option(tmp_path):
    src = hf_tiny.make_hf_dir("qwen2-tied", tmp_path / "hf")
    meg = convert_hf_to_megatron(src, tmp_path / "meg", dtype="bf16")
    reader = CheckpointReader(layout.iteration_dir(meg, 0))
    assert {m.properties.dtype for m in reader.metadata.state_dict_metadata.values()
            if hasattr(m, "properties")} == {torch.bfloat16}
    assert layout.read_arch(meg).torch_dtype == "float32"  # the original dtype is what export restores
    back = convert_megatron_to_hf(meg, tmp_path / "back")
    a, b = _tensors(src), _tensors(back)
    assert all(b[k].dtype == torch.float32 and torch.equal(b[k], a[k].bfloat16().float()) for k in a)
    back16 = convert_megatron_to_hf(meg, tmp_path / "back16", dtype="bf16")
    assert json.loads((back16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in _tensors(back16).values())
    assert (back16 / "model.safetensors").is_file()  # one shard: no index, as transformers does


def test_overwrite_replaces(tmp_path):
    src = hf_tiny.make_hf_dir("llama-untied", tmp_path / "hf")
    meg = convert_hf_to_megatron(src, tmp_path / "meg")
    (meg / "stale.txt").write_text("x")
    convert_hf_to_megatron(src, tmp_path / "meg", overwrite=True)
    assert not (meg / "stale.txt").exists() and layout.latest_iteration(meg) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "meg"]
