"""The embedded CPU demo, end to end, through the same commands a user runs (``python -m megatron_var.demo.run``).

Stages: tiny HF Llama + bundled task -> hf_to_megatron -> prepare_data (+ score_rewards) -> SFT (TP=2, torchrun)
-> SFT+VAR, SFT+DPO and SFT+A-LoL from the SFT model -> megatron_to_hf -> eval_reward on held-out prompts (3 seeds) ->
table, summary.json and a PNG of held-out reward over VAR training steps. Hyper-parameters: demo/defaults.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_var.demo import defaults

REWARD_FN = "megatron_var.demo.task:reward"


def _cli(tool: str) -> list[str]:
    """Arguments after the interpreter that run one of the package's commands (``megatron_var/cli/<tool>.py``):
    by module name, so the demo runs from any working directory and does not need a source checkout."""
    return ["-m", f"megatron_var.cli.{tool}"]


class Runner:
    def __init__(self, work: Path, nproc: int):
        self.work, self.nproc = work, nproc
        self.env = dict(os.environ, OMP_NUM_THREADS="1")
        self.timings: dict[str, float] = {}

    def run_stage(self, stage: str, args: list[str], torchrun: bool = False) -> None:
        """Run one stage as a child process (torchrun: under torchrun with ``nproc`` ranks), its output in
        ``logs/<stage>.log``; a failed stage ends the demo with the log's tail."""
        cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                   str(self.nproc)] if torchrun else []) + args
        print(f"[demo] {stage}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        log = self.work / "logs" / f"{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            r = subprocess.run(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        self.timings[stage] = round(time.perf_counter() - t0, 1)
        if r.returncode:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"[demo] stage {stage} failed (exit {r.returncode}), log {log}:\n{tail}")


def _train(runner: Runner, demo: defaults.DemoDefaults, stage: str, objective: str, load: Path, data: Path,
           save: Path, iters: int | None = None, save_interval: int | None = None) -> None:
    args = [*_cli("train"), "--load", str(load), "--finetune", "--data-path", str(data),
            "--save", str(save), "--overwrite", "--tensor-model-parallel-size", str(runner.nproc),
            "--log-interval", "25", *demo.train_args(objective)]
    if iters is not None:
        args[args.index("--train-iters") + 1] = str(iters)
        warm = args.index("--lr-warmup-iters") + 1
        args[warm] = str(min(int(args[warm]), iters // 4))
    if save_interval:
        args += ["--save-interval", str(save_interval)]
    runner.run_stage(stage, args, torchrun=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work-dir", default="runs/demo")
    p.add_argument("--nproc", type=int, default=2, help="processes = tensor-parallel size")
    p.add_argument("--scale", type=float, default=1.0, help="multiply training iterations (e2e test: < 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(defaults.DEMO.eval_seeds),
                   help="sampling seeds of the evaluation")
    p.add_argument("--seed", type=int, default=defaults.DEMO.seed,
                   help="model init, data generation and shuffling seed (the demo's default run uses 0)")
    p.add_argument("--curve-points", type=int, default=3, help="VAR checkpoints evaluated for the plot")
    args = p.parse_args(argv)
    demo = dataclasses.replace(defaults.DEMO, seed=args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work, args.nproc)
    it = {k: max(2, int(getattr(demo, f"{k}_iters") * args.scale)) for k in ("sft", "var", "dpo", "alol")}

    from megatron_var.demo.task import corpus_texts, write_dataset
    from megatron_var.demo.tiny_model import build_tiny_hf_model

    t0 = time.perf_counter()
    paths = write_dataset(work / "task", demo.n_train_prompts, demo.n_test_prompts, demo.seed)
    build_tiny_hf_model(work / "hf_base", family=demo.family, texts=corpus_texts(), seed=demo.seed, cfg=demo.model)
    runner.timings["make_model_and_data"] = round(time.perf_counter() - t0, 1)
    runner.run_stage("hf_to_megatron", [*_cli("hf_to_megatron"), "--hf-dir", str(work / "hf_base"),
                                        "--out", str(work / "meg_base"),
                                        "--tensor-model-parallel-size", str(args.nproc), "--overwrite"])
    common = ["--tokenizer", str(work / "hf_base"), "--template", demo.template, "--seq-length",
              str(demo.seq_length), "--seed", str(demo.seed), "--valid-fraction", str(demo.valid_fraction),
              "--no-progress", "--overwrite"]
    runner.run_stage("prepare_all", [*_cli("prepare_data"), "--input", str(paths["train"]), "--responses", "all",
                                     "--group-size", str(demo.group_size), "--output", str(work / "data_all"),
                                     *common])
    runner.run_stage("score_rewards", [*_cli("score_rewards"), "--data", str(work / "data_all"), "--split", "all",
                                       "--reward-fn", REWARD_FN, "--no-progress"])
    runner.run_stage("prepare_pairs", [*_cli("prepare_data"), "--input", str(paths["train"]), "--responses", "pairs",
                                       "--group-size", "2", "--output", str(work / "data_pairs"), *common])
    _train(runner, demo, "sft", "sft", work / "meg_base", work / "data_all", work / "meg_sft", it["sft"])
    interval = max(1, it["var"] // max(1, args.curve_points))
    _train(runner, demo, "var", "var", work / "meg_sft", work / "data_all", work / "meg_var", it["var"], interval)
    _train(runner, demo, "dpo", "dpo", work / "meg_sft", work / "data_pairs", work / "meg_dpo", it["dpo"])
    _train(runner, demo, "alol", "alol", work / "meg_sft", work / "data_all", work / "meg_alol", it["alol"])

    export = [*_cli("megatron_to_hf"), "--overwrite"]
    for name in ("sft", "var", "dpo", "alol"):
        runner.run_stage(f"export_{name}", [*export, "--load", str(work / f"meg_{name}"),
                                            "--out", str(work / f"hf_{name}")])
    curve_iters = sorted({k for k in range(interval, it["var"] + 1, interval)} | {it["var"]})
    for k in curve_iters:
        if k != it["var"]:
            runner.run_stage(f"export_var_{k}", [*export, "--load", str(work / "meg_var"), "--iteration", str(k),
                                                 "--out", str(work / f"hf_var_{k}")])
    ev = [*_cli("eval_reward"), "--prompts", str(paths["test"]), "--reward-fn", REWARD_FN, "--template",
          demo.template, "--max-new-tokens", str(demo.eval_max_new_tokens), "--batch-size",
          str(demo.eval_batch_size)]
    names = ["base", "SFT", "SFT+VAR", "SFT+DPO", "SFT+A-LoL"]
    models = [str(work / d) for d in ("hf_base", "hf_sft", "hf_var", "hf_dpo", "hf_alol")]
    runner.run_stage("eval", [*ev, "--model", *models, "--names", *names, "--seeds", *map(str, args.seeds),
                              "--output", str(work / "eval.json")])
    curve_models = [work / "hf_sft"] + [work / (f"hf_var_{k}" if k != it["var"] else "hf_var") for k in curve_iters]
    runner.run_stage("eval_curve", [*ev, "--model", *map(str, curve_models), "--names", *map(str, [0] + curve_iters),
                                    "--seeds", str(args.seeds[0]), "--output", str(work / "eval_curve.json")])

    from megatron_var.demo.report import write_report

    summary = write_report(work, names, runner.timings, it)
    print(json.dumps({k: summary[k] for k in ("table", "var_beats_sft", "var_beats_base")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
