"""tools/eval_reward.py: numbers equal a hand loop (transformers generate one prompt at a time + the reward),
left-padded batches equal unpadded greedy decoding, SE by hand, prompt formats, reward model scoring, CLI errors."""

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_var.cli.common import run_cli
from megatron_var.demo.task import make_test_prompts, reward
from megatron_var.demo.tiny_model import TinyModelConfig, build_tiny_hf_model
from megatron_var.eval.reward_eval import EvalConfig, evaluate, load_prompts, mean_se, seed_for, summarize
from megatron_var.cli.eval_reward import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
REWARD_FN = "megatron_var.demo.task:reward"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    model, tok = build_tiny_hf_model(out / "model", "llama", seed=0,
                                     cfg=TinyModelConfig(hidden_size=32, num_layers=1, ffn_hidden_size=64))
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in make_test_prompts(6, seed=0)))
    return out, model, tok, prompts


def _hand_generate(model, tok, text: str, max_new: int, **sampling) -> str:
    """One prompt, no padding, straight transformers generate; cut at eos."""
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **sampling)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True)


def test_numbers_equal_a_hand_loop(setup):
    out, model, tok, prompts = setup
    seeds, max_new = [0, 1, 2], 12
    cfg = EvalConfig(models=[str(out / "model")], prompts=[str(prompts)], reward_fn=REWARD_FN, seeds=seeds,
                     max_new_tokens=max_new, batch_size=1, progress=False)
    report = evaluate(cfg)
    rows = [json.loads(x) for x in prompts.read_text().splitlines()]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    per_seed, per_seed_subset = [], {}
    for s in seeds:
        rewards = []
        for k, text in enumerate(texts):
            torch.manual_seed(seed_for(s, k))  # batch k of seed s (batch size 1)
            resp = _hand_generate(model, tok, text, max_new, do_sample=True, temperature=0.8, top_p=0.9, top_k=50)
            rewards.append(reward([text], [resp])[0])
            gen = next(g for g in report["generations"] if g["seed"] == s and g["index"] == k)
            assert gen["response"] == resp and gen["prompt"] == text
        per_seed.append(sum(rewards) / len(rewards))
        for sub in {r["subset"] for r in rows}:
            vals = [x for x, r in zip(rewards, rows) if r["subset"] == sub]
            per_seed_subset.setdefault(sub, []).append(sum(vals) / len(vals))
    res = report["results"][0]
    mean = sum(per_seed) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in per_seed) / 2) / math.sqrt(3)
    assert res["per_seed"] == pytest.approx(per_seed, abs=1e-12)
    assert res["mean"] == pytest.approx(mean, abs=1e-12) and res["se"] == pytest.approx(se, abs=1e-12)
    for sub, vals in per_seed_subset.items():
        assert res["subsets"][sub]["per_seed"] == pytest.approx(vals, abs=1e-12)
    # negative control: a different seed gives different generations for this random model
    assert len({g["response"] for g in report["generations"] if g["index"] == 0}) > 1


def test_left_padded_batches_equal_unpadded_greedy(setup):
    """top_k=1 makes sampling greedy: batched left-padded generation must equal one-prompt-at-a-time."""
    out, model, tok, prompts = setup
    prompts2 = out / "mixed.jsonl"  # prompts of different lengths -> real padding in every batch
    prompts2.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                ["List 2 fruits.", "Write the numbers from 10 to 13.", "Name 4 colors in capital "
                                 "letters.", "Count from 1 to 3.", "Give me 3 animals in uppercase."]))
    report = evaluate(EvalConfig(models=[str(out / "model")], prompts=[str(prompts2)], reward_fn=REWARD_FN,
                                 seeds=[0], top_k=1, max_new_tokens=10, batch_size=4, progress=False))
    for g in report["generations"]:
        assert g["response"] == _hand_generate(model, tok, g["prompt"], 10, do_sample=False)


def test_mean_se_and_summarize_by_hand():
    mean, se = mean_se([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(math.sqrt(((0.3**2) + (0.1**2) + (0.4**2)) / 2) / math.sqrt(3))
    assert mean_se([0.7]) == (pytest.approx(0.7), None)
    r = np.array([[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])  # [seeds, prompts]
    s = summarize(r, ["a", "b", "a"])
    assert s["per_seed"] == pytest.approx([0.5, 1 / 3]) and s["n_prompts"] == 3
    assert s["subsets"]["a"]["per_seed"] == pytest.approx([0.75, 0.5])
    assert s["subsets"]["b"]["mean"] == 0.0 and s["subsets"]["b"]["se"] == 0.0


def test_prompt_formats_and_subsets(tmp_path):
    (tmp_path / "helpful-base").mkdir()
    hh = tmp_path / "helpful-base" / "test.jsonl.gz"
    with gzip.open(hh, "wt") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: More?\n\nAssistant: Ok",
                            "rejected": "\n\nHuman: Hi there\n\nAssistant: No."}) + "\n")
    mixed = tmp_path / "mine.jsonl"
    mixed.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "List 2 fruits.", "system": "Be brief.", "subset": "s1"},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ]) + "\n")
    items = load_prompts([str(hh), str(mixed)])
    assert [it.subset for it in items] == ["helpful-base", "s1", "mine"]
    # the whole conversation before the last assistant reply; that reply is the reference answer
    assert items[0].messages == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "More?"}]
    assert items[0].reference == "Ok"
    assert items[1].messages == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "List 2 fruits."}]
    assert items[2].messages == [{"role": "user", "content": "Q"}] and items[2].reference == "A"
    assert items[1].reference is None
    assert len(load_prompts([str(mixed)], max_prompts=1)) == 1


def test_reward_model_scoring_equals_one_by_one_forward(setup, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    out, _, tok, prompts = setup
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)).eval()
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(out / "model").save_pretrained(tmp_path / "rm")
    report = evaluate(EvalConfig(models=[str(out / "model")], prompts=[str(prompts)], reward_model=str(tmp_path / "rm"),
                                 seeds=[0, 1], max_new_tokens=8, batch_size=3, rm_batch_size=5, progress=False))
    for g in report["generations"][:6]:
        user = g["prompt"].split("<|user|>")[1].split("</s>")[0]
        text = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant",
                                                                            "content": g["response"]}], tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert g["reward"] == pytest.approx(rm(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    assert report["scorer"]["kind"] == "reward_model"


def _cli(argv, capsys) -> tuple[int, str]:
    code = run_cli(cli_main, argv)
    return code, capsys.readouterr().err


def test_cli_bad_input_exits_2(setup, tmp_path, capsys):
    out, _, _, prompts = setup
    model = str(out / "model")
    base = ["--prompts", str(prompts), "--max-new-tokens", "4", "--no-progress"]
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps({"prompt": "List 2 fruits."}) + "\n{not json\n")
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text(json.dumps({"question": "x"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--model", str(tmp_path / "nope"), "--reward-fn", REWARD_FN, *base], "not a directory"),
        (["--model", model, "--reward-fn", REWARD_FN, "--reward-model", model, *base], "exactly one"),
        (["--model", model, model, "--names", "a", "--reward-fn", REWARD_FN, *base], "--names has 1 labels"),
        (["--model", model, "--reward-fn", "no_such_module:f", *base], "--reward-fn"),
        (["--model", model, "--reward-fn", REWARD_FN, "--seeds", "1", "1", *base], "--seeds"),
        (["--model", model, "--reward-fn", REWARD_FN, "--prompts", str(bad_line)], "bad.jsonl:2: malformed JSON"),
        (["--model", model, "--reward-fn", REWARD_FN, "--prompts", str(no_field)], "nofield.jsonl:1: a prompt row"),
        (["--model", model, "--reward-fn", REWARD_FN, "--prompts", str(empty)], "no prompts found"),
        (["--model", model, "--reward-fn", REWARD_FN, "--prompts", str(tmp_path / "x.jsonl")], "no such file"),
    ]
    for argv, message in cases:
        code, err = _cli(argv, capsys)
        assert code == 2 and message in err and err.startswith("error: "), (argv, err)
    with pytest.raises(SystemExit) as e:  # argparse: missing --prompts
        cli_main(["--model", model, "--reward-fn", REWARD_FN])
    assert e.value.code == 2


def test_cli_subprocess_end_to_end(setup, tmp_path):
    out, _, _, prompts = setup
    tool = [sys.executable, str(ROOT / "tools" / "eval_reward.py")]
    res_json, gens = tmp_path / "r" / "results.json", tmp_path / "gens.jsonl"
    proc = subprocess.run([*tool, "--model", str(out / "model"), str(out / "model"), "--names", "a", "b",
                           "--prompts", str(prompts), "--reward-fn", REWARD_FN, "--seeds", "0", "1",
                           "--max-new-tokens", "6", "--output", str(res_json), "--save-generations", str(gens),
                           "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(res_json.read_text())
    assert [r["name"] for r in report["results"]] == ["a", "b"]
    a, b = report["results"]
    assert a["per_seed"] == b["per_seed"]  # same model, same seeds: same numbers
    assert set(a["subsets"]) == {"list", "upper", "count"} and "a" in proc.stdout and "±" in proc.stdout
    assert len(gens.read_text().splitlines()) == 2 * 2 * 6
    bad = subprocess.run([*tool, "--model", str(tmp_path / "missing"), "--prompts", str(prompts), "--reward-fn",
                          REWARD_FN], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --model")


def test_overlong_prompts_keep_their_end():
    from types import SimpleNamespace

    from megatron_var.eval.reward_eval import fit_prompts

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=10))
    long, short = list(range(1, 13)), [1, 2]
    assert fit_prompts([long, short], model, 4, "m") == [long[-6:], short]
    with pytest.raises(ValueError, match="--max-new-tokens 10 leaves no room"):
        fit_prompts([short], model, 10, "m")
