"""Hyper-parameters of the CPU demo, chosen with bench/demo_effect_prototype.py (numbers in its docstring).

In that plain-PyTorch prototype, over 3 model/data seeds: base ~0.02, SFT 0.59-0.64, SFT+VAR 0.78-0.85 mean
held-out reward (3 sampling seeds each, SE <= 0.04); VAR's gain needs lambda <= ~0.05 with these [0, 1] rewards.

One frozen dataclass so the demo script, the prototype and the e2e test use exactly the same values. Batch sizes
count *groups* of ``group_size`` samples, as the trainer's --micro/--global-batch-size do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megatron_var.demo.tiny_model import TinyModelConfig


@dataclass(frozen=True)
class DemoDefaults:
    # model and data
    family: str = "llama"
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    seed: int = 0  # model init, data generation, prepare_data shuffle
    n_train_prompts: int = 600  # x4 candidates = samples with --responses all
    n_test_prompts: int = 60  # held-out prompts, balanced over the 3 subsets
    seq_length: int = 64  # prompt + response tokens (longest sample is ~40)
    group_size: int = 8  # B (the paper's)
    valid_fraction: float = 0.05
    template: str = "chat"
    # SFT on all 4 candidates of every prompt (the "mixture" starting point)
    sft_iters: int = 600
    sft_lr: float = 3e-3
    sft_groups_per_iter: int = 2
    # VAR from the SFT model; the reference is the SFT model
    var_iters: int = 150
    var_lr: float = 1e-3
    var_lambda: float = 0.02  # rewards in [0, 1]: r/lambda in [0, 50] outweighs log-prob gaps of ~10 nats
    var_logp_reduction: str = "sum"
    var_groups_per_iter: int = 2
    # DPO from the SFT model on (better, worse) pairs of the same prompts
    dpo_iters: int = 150
    dpo_lr: float = 2e-4
    dpo_beta: float = 0.1
    dpo_pairs_per_iter: int = 4
    # A-LoL from the SFT model on the VAR groups (advantage = reward - the prompt's mean reward over its group)
    alol_iters: int = 150
    alol_lr: float = 1e-3
    alol_clip: float = 0.2
    alol_groups_per_iter: int = 2
    # shared optimiser settings (the trainer's flags)
    warmup_iters: int = 10
    lr_decay_style: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    # evaluation (tools/eval_reward.py)
    eval_seeds: tuple[int, ...] = (0, 1, 2)
    eval_max_new_tokens: int = 32
    eval_batch_size: int = 32

    def as_dict(self) -> dict:
        return asdict(self)

    def train_args(self, objective: str) -> list[str]:
        """``megatron_var.cli.train`` flags for one stage (sft | var | dpo | alol); data/load/save/parallel flags are the
        caller's. Micro-batch = 1 group, so a stage runs the same math at any TP."""
        iters, lr, per_iter = {
            "sft": (self.sft_iters, self.sft_lr, self.sft_groups_per_iter),
            "var": (self.var_iters, self.var_lr, self.var_groups_per_iter),
            "dpo": (self.dpo_iters, self.dpo_lr, self.dpo_pairs_per_iter),
            "alol": (self.alol_iters, self.alol_lr, self.alol_groups_per_iter),
        }[objective]
        args = ["--objective", objective, "--train-iters", iters, "--lr", lr, "--min-lr", lr * self.min_lr_ratio,
                "--lr-warmup-iters", self.warmup_iters, "--lr-decay-style", self.lr_decay_style,
                "--micro-batch-size", 1, "--global-batch-size", per_iter, "--weight-decay", self.weight_decay,
                "--adam-beta1", self.adam_beta1, "--adam-beta2", self.adam_beta2, "--clip-grad", self.clip_grad,
                "--seed", self.seed]
        if objective == "var":
            args += ["--var-lambda", self.var_lambda, "--var-logp-reduction", self.var_logp_reduction]
        if objective == "dpo":
            args += ["--dpo-beta", self.dpo_beta]
        if objective == "alol":
            args += ["--alol-clip", self.alol_clip, "--var-logp-reduction", self.var_logp_reduction]
        return [f"{a:.6g}" if isinstance(a, float) else str(a) for a in args]


DEMO = DemoDefaults()
