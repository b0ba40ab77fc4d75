"""eval_reward at scale: multi-turn HH prompts rendered whole, the engine choice, and transformers generation
data-parallel over 2 gloo processes (torchrun) equal to one process."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_var.cli.common import run_cli
from megatron_var.demo.tiny_model import TinyModelConfig, build_tiny_hf_model
from megatron_var.eval.reward_eval import EvalConfig, evaluate
from megatron_var.cli.eval_reward import main as cli_main
from megatron_var.eval.generation import rank_batches, resolve_engine

ROOT = Path(__file__).resolve().parents[2]
REWARD_FN = "megatron_var.demo.task:reward"
pytestmark = pytest.mark.timeout(180)

HH_TWO_TURNS = {"chosen": "\n\nHuman: Name 2 fruits.\n\nAssistant: Apple, pear.\n\nHuman: Two more?\n\n"
                          "Assistant: Plum, fig.",
                "rejected": "\n\nHuman: Name 2 fruits.\n\nAssistant: Apple, pear.\n\nHuman: Two more?\n\n"
                            "Assistant: No."}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    _, tok = build_tiny_hf_model(out / "model", "llama", seed=0,
                                 cfg=TinyModelConfig(hidden_size=32, num_layers=1, ffn_hidden_size=64))
    prompts = out / "prompts.jsonl"
    rows = [HH_TWO_TURNS, *({"prompt": f"Count from {k} to {k + 3}."} for k in range(4))]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out, tok, prompts


def test_hh_two_turns_rendered_whole_with_reference(tiny, tmp_path):
    out, tok, _ = tiny
    hh = tmp_path / "helpful-base" / "test.jsonl.gz"
    hh.parent.mkdir()
    with gzip.open(hh, "wt") as f:
        f.write(json.dumps(HH_TWO_TURNS) + "\n")
    report = evaluate(EvalConfig(models=[str(out / "model")], prompts=[str(hh)], reward_fn=REWARD_FN, seeds=[0],
                                 max_new_tokens=4, progress=False))
    (g,) = report["generations"]
    history = [{"role": "user", "content": "Name 2 fruits."}, {"role": "assistant", "content": "Apple, pear."},
               {"role": "user", "content": "Two more?"}]
    assert g["messages"] == history and g["reference"] == "Plum, fig." and g["subset"] == "helpful-base"
    assert g["prompt"] == tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    # negative control: the first-turn-only prompt is a different text
    assert g["prompt"] != tok.apply_chat_template(history[:1], tokenize=False, add_generation_prompt=True)


def test_rank_batches_partition_in_global_batch_order():
    n, bs = 11, 3  # batches [0,3) [3,6) [6,9) [9,11)
    r0, r1 = rank_batches(n, bs, 0, 2), rank_batches(n, bs, 1, 2)
    assert r0 == [(0, 0, 3), (2, 6, 9)] and r1 == [(1, 3, 6), (3, 9, 11)]
    assert rank_batches(n, bs, 0, 1) == sorted(r0 + r1)
    assert rank_batches(2, 3, 1, 2) == []  # more ranks than batches: an idle rank, not an error


def test_engine_choice_and_errors(tiny, capsys):
    assert resolve_engine("auto", 1) == "transformers"  # no vLLM on this machine
    with pytest.raises(ValueError, match="vllm is not installed"):
        resolve_engine("vllm", 1)
    out, _, prompts = tiny
    code = run_cli(cli_main, ["--model", str(out / "model"), "--prompts", str(prompts), "--reward-fn", REWARD_FN,
                              "--engine", "vllm", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --engine vllm: vllm is not installed") and "Traceback" not in err


def test_two_gloo_ranks_equal_one_process(tiny, tmp_path):
    out, _, prompts = tiny
    common = dict(seeds=[0, 1], max_new_tokens=6, batch_size=2, progress=False)
    one = evaluate(EvalConfig(models=[str(out / "model")], prompts=[str(prompts)], reward_fn=REWARD_FN, **common))
    gens = tmp_path / "gens.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tools" / "eval_reward.py"), "--model", str(out / "model"), "--prompts", str(prompts),
         "--reward-fn", REWARD_FN, "--seeds", "0", "1", "--max-new-tokens", "6", "--batch-size", "2",
         "--engine", "transformers", "--output", str(tmp_path / "r.json"), "--save-generations", str(gens),
         "--no-progress"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "r.json").read_text())
    assert two["world_size"] == 2 and proc.stdout.count("wrote") == 2  # only rank 0 writes
    rows = [json.loads(x) for x in gens.read_text().splitlines()]
    key = ("seed", "index", "prompt", "response", "reward", "tokens", "finished", "reference")
    assert [tuple(r[k] for k in key) for r in rows] == [tuple(g[k] for k in key) for g in one["generations"]]
    assert two["results"][0]["per_seed"] == one["results"][0]["per_seed"]
    # negative control: the outputs depend on the seeds, so equal outputs are not a given
    assert {g["response"] for g in one["generations"] if g["seed"] == 0} != \
           {g["response"] for g in one["generations"] if g["seed"] == 1}
