"""The demo task: hand-scored rewards (bare, chat-, raw- and HH-formatted prompts), deterministic data that
prepare_data accepts in --responses all and pairs modes, and the tiny HF model builder."""

import json

import numpy as np
import pytest
import torch

from megatron_var.data.groups import GroupDataset
from megatron_var.data.prepare import PrepareConfig, prepare
from megatron_var.data.rewards import ScoreConfig, score_rewards
from megatron_var.demo import task
from megatron_var.demo.task import MIDDLE_KINDS, all_requests, candidate, parse_request, reward, write_dataset
from megatron_var.demo.tiny_model import TinyModelConfig, build_tiny_hf_model

REWARD_FN = "megatron_var.demo.task:reward"

# (prompt, response, hand-computed reward): 0.2 comma list + 0.2 count + 0.4 category items + 0.2 case
# (lists), 0.2 comma list + 0.2 count + 0.6 numbers in place (counting).
HAND = [
    ("List 3 fruits.", "apple, banana, cherry", 1.0),
    ("List 3 fruits.", "apple, banana, cherry.", 1.0),  # a final period is fine
    ("List 3 fruits.", "APPLE, BANANA, CHERRY", 0.8),  # wrong case
    ("List 3 fruits.", "apple, banana", 0.2 + 0.4 * 2 / 3 + 0.2 * 2 / 3),  # one missing
    ("List 3 fruits.", "apple, banana, cherry, grape", 0.2 + 0.4 * 3 / 4 + 0.2 * 3 / 4),  # one too many
    ("List 3 fruits.", "apple, apple, apple", 0.2 + 0.2 + 0.4 / 3 + 0.2 / 3),  # repeats count once
    ("List 3 fruits.", "red, blue, green", 0.4),  # wrong category
    ("List 3 fruits.", "apple banana cherry", 0.6),  # not a comma list
    ("List 3 fruits.", "I do not know.", 0.0),
    ("List 3 fruits.", "", 0.0),
    ("Name 2 colors in capital letters.", "RED, BLUE", 1.0),
    ("Give me 4 animals in uppercase.", "cat, dog, cow, goat", 0.8),
    ("Give me 4 animals in uppercase.", "CAT, dog, COW, GOAT", 0.2 + 0.2 + 0.4 + 0.2 * 3 / 4),
    ("Count from 4 to 7.", "4, 5, 6, 7", 1.0),
    ("Count up from 4 to 7.", "4 5 6 7", 0.6),
    ("Write the numbers from 4 to 7.", "5, 6, 7, 8", 0.4),
    ("Count from 4 to 7.", "4, 5, 6", 0.2 + 0.6 * 3 / 4),
    ("Count from 4 to 7.", "4, 5, 6, 7, 8", 0.2 + 0.6 * 4 / 5),
    ("Count from 4 to 7.", "apple, banana", 0.2),
]


@pytest.mark.parametrize("prompt,response,expected", HAND)
def test_reward_hand_scored(prompt, response, expected):
    assert reward([prompt], [response]) == [pytest.approx(expected, abs=1e-12)]


def test_reward_reads_templated_prompts():
    from megatron_var.data.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(task.corpus_texts()[:200])
    chat = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "List 2 colors in uppercase."}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<s>") and chat.endswith("<|assistant|>")
    prompts = [
        chat,
        "### Instruction:\nList 2 colors in uppercase.\n\n### Response:\n",
        "\n\nHuman: List 2 colors in uppercase.\n\nAssistant:",
        # multi-turn: the last instruction is the one being answered
        "\n\nHuman: Count from 1 to 3.\n\nAssistant: 1, 2, 3\n\nHuman: List 2 colors in uppercase.\n\nAssistant:",
    ]
    assert reward(prompts, ["RED, BLUE"] * 4) == [1.0] * 4
    assert reward(prompts, ["red, blue"] * 4) == [pytest.approx(0.8)] * 4
    # decoded special tokens / a hallucinated next turn end the response
    assert reward([chat], ["RED, BLUE</s><|user|>more, words, here"]) == [1.0]
    assert parse_request(chat) == task.Request("upper", n=2, category="colors")


def test_reward_rejects_foreign_prompts_and_bad_lengths():
    with pytest.raises(ValueError, match="not a demo-task instruction"):
        reward(["What is the capital of France?"], ["Paris"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward(["List 2 fruits.", "List 2 fruits."], ["apple, pear"])


def test_candidate_kinds_rank_as_designed():
    """Every prompt of the task: correct = 1, off-topic = 0, the partially right kinds strictly in between."""
    import random

    rng = random.Random(0)
    for req, phrasing in all_requests():
        prompt = req.text(phrasing)
        assert parse_request(prompt) == req
        assert reward([prompt], [candidate(req, "correct", rng)]) == [1.0]
        assert reward([prompt], [candidate(req, "off_topic", rng)]) == [0.0]
        for kind in MIDDLE_KINDS[req.subset]:
            (r,) = reward([prompt], [candidate(req, kind, rng)])
            assert 0.0 < r < 1.0, (prompt, kind)


def test_dataset_deterministic_and_test_prompts_held_out(tmp_path):
    a = write_dataset(tmp_path / "a", n_train=40, n_test=12, seed=3)
    b = write_dataset(tmp_path / "b", n_train=40, n_test=12, seed=3)
    c = write_dataset(tmp_path / "c", n_train=40, n_test=12, seed=4)
    for key in ("train", "test"):
        assert a[key].read_bytes() == b[key].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()
    rows = [json.loads(x) for x in a["train"].read_text().splitlines()]
    tests = [json.loads(x) for x in a["test"].read_text().splitlines()]
    assert len(rows) == 80 and len(tests) == 12
    assert {t["subset"] for t in tests} == {"list", "upper", "count"}
    assert not {t["prompt"] for t in tests} & {r["prompt"] for r in rows}
    for t in tests:
        assert parse_request(t["prompt"]).subset == t["subset"]
    # every row's response beats its rejected one, so DPO pairs are never tied
    chosen = reward([r["prompt"] for r in rows], [r["response"] for r in rows])
    rejected = reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert all(c > r for c, r in zip(chosen, rejected))
    with pytest.raises(ValueError, match="n_train"):
        write_dataset(tmp_path / "d", n_train=0, n_test=1, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_hf_model(out / "model", "llama", seed=0, cfg=TinyModelConfig(hidden_size=32, num_layers=1))
    paths = write_dataset(out / "task", n_train=24, n_test=6, seed=0)
    return out, paths


@pytest.mark.parametrize("mode", ["all", "pairs"])
def test_prepare_data_accepts_the_dataset(tiny, mode):
    out, paths = tiny
    data = out / f"data_{mode}"
    summary = prepare(PrepareConfig(inputs=[str(paths["train"])], output=str(data), tokenizer=str(out / "model"),
                                    responses=mode, seq_length=64, valid_fraction=0.0, progress=False))
    assert sum(summary.rows_dropped.values()) == 0 and not summary.samples_truncated
    ds = GroupDataset(data, "train")
    if mode == "all":  # 24 prompts x 4 candidates = 96 samples = 12 groups of 8
        assert summary.samples_written == 96 and len(ds) == 12
    else:  # 2 strictly ordered pairs per prompt
        assert len(ds) == 48 and ds.meta["group_size"] == 2
    score_rewards(ScoreConfig(data=str(data), reward_fn=REWARD_FN, progress=False))
    ds = GroupDataset(data, "train", require_rewards=True)
    for k in range(len(ds)):
        r = ds[k].rewards
        assert np.isfinite(r).all() and (r >= 0).all() and (r <= 1).all()
        if mode == "pairs":  # the matrix was scored on chat-templated prompt_text: chosen > rejected
            assert r[0, 0] > r[0, 1]
    if mode == "all":  # each prompt's 4 candidates carry the designed rewards: one 1.0, one 0.0
        diag = np.concatenate([np.diag(ds[k].rewards) for k in range(len(ds))])
        assert (diag == 1.0).sum() == 24 and (diag == 0.0).sum() == 24


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_model_builds_saves_and_reloads(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64)
    model, tok = build_tiny_hf_model(tmp_path / "m", family, seed=7, cfg=cfg)
    again, _ = build_tiny_hf_model(None, family, seed=7, cfg=cfg)
    other, _ = build_tiny_hf_model(None, family, seed=8, cfg=cfg)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(loaded).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    c = loaded.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (32, 2, 4, 2)
    assert c.vocab_size == len(tok) == len(AutoTokenizer.from_pretrained(tmp_path / "m"))
    assert c.eos_token_id == tok.eos_token_id and c.pad_token_id == tok.pad_token_id
    assert loaded.dtype == torch.float32 and loaded.generation_config.top_k == 50
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())  # same seed, same weights
    assert not torch.equal(sd["model.embed_tokens.weight"], other.state_dict()["model.embed_tokens.weight"])
    assert ("model.layers.0.self_attn.q_proj.bias" in sd) == (family == "qwen2")
    ids = tok("List 3 fruits.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(loaded(ids).logits).all()


def test_tiny_model_bad_arguments():
    with pytest.raises(ValueError, match="family"):
        build_tiny_hf_model(None, "gpt2", texts=["a b c"])
    with pytest.raises(ValueError, match="num_kv_heads"):
        TinyModelConfig(num_heads=4, num_kv_heads=3)


def test_demo_defaults_train_args():
    from megatron_var.demo.defaults import DEMO

    var = DEMO.train_args("var")
    flags = dict(zip(var[::2], var[1::2]))
    assert flags["--objective"] == "var" and float(flags["--var-lambda"]) == DEMO.var_lambda
    assert int(flags["--global-batch-size"]) == DEMO.var_groups_per_iter and flags["--micro-batch-size"] == "1"
    assert float(flags["--min-lr"]) == pytest.approx(DEMO.var_lr * DEMO.min_lr_ratio)
    assert "--dpo-beta" in DEMO.train_args("dpo") and "--var-lambda" not in DEMO.train_args("sft")
