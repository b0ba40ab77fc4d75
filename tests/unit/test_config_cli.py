"""The trainer's command line is generated from TrainConfig (megatron_var/cli/config_args.py): every field has one
documented option, an unset flag leaves the dataclass default, and bad values or combinations end in one error:
line with exit code 2 before any process group exists."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_var.cli import config_args
from megatron_var.cli import train
from megatron_var.training.config import DataConfig, ModelConfig, OptimizerConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ["--data-path", "data", "--model-arch", "arch.json", "--train-iters", "3"]
GROUPS = ("objective", "data", "optimizer", "model", "parallel", "reference", "checkpoint", "logging")


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f))
    return out


def _cfg(*argv: str) -> TrainConfig:
    return train.config_from_args(train.build_parser().parse_args([*REQUIRED, *argv]))


def test_every_field_has_exactly_one_documented_option():
    parser = train.build_parser()
    actions = [a for a in parser._actions if a.dest != "help"]
    fields = _leaf_fields(TrainConfig)
    assert len(actions) == len(fields)  # nothing on the command line that is not a field
    for path, f in fields:
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        owners = [a for a in actions if flag in a.option_strings]
        assert len(owners) == 1, (path, flag)
        (action,) = owners
        assert sum(a.dest == action.dest for a in actions) == 1, path
        doc = re.sub(r" \((default: .*|required)\)$", "", action.help or "")
        assert doc.strip(), (path, action.help)
    # the runtime layer's OptimConfig documents its fields, and the subclass inherits those docstrings
    docs = config_args.attribute_docs(OptimizerConfig)
    assert docs["adam_eps"].startswith("Adam's epsilon") and docs["lr_decay_iters"].startswith("Reach --min-lr")


def test_no_flags_means_the_dataclass_defaults():
    args = train.build_parser().parse_args(REQUIRED)
    assert set(vars(args)) == {"data_path", "model_arch", "train_iters", "train_samples", "epochs"}
    built = train.config_from_args(args)
    direct = TrainConfig(data=DataConfig(data_path="data", train_iters=3), model=ModelConfig(model_arch="arch.json"))
    assert built == direct
    # and field by field, against the declared defaults (not against another construction of the same code)
    flat = {p: f.default for p, f in _leaf_fields(TrainConfig)}
    flat.update({"data.data_path": "data", "model.model_arch": "arch.json", "data.train_iters": 3})
    for path, default in flat.items():
        obj = built
        for part in path.split("."):
            obj = getattr(obj, part)
        assert obj == default, path


def test_values_reach_their_fields():
    cfg = _cfg("--objective", "dpo", "--lr", "3e-4", "--adam-eps", "1e-6", "--tensor-model-parallel-size", "2",
               "--sequence-parallel", "--lr-decay-iters", "7", "--lr-warmup-fraction", "0.1", "--ref-offload",
               "--overlap-grad-reduce", "--overlap-param-gather", "--var-logp-reduction", "mean")
    assert (cfg.objective.name, cfg.objective.logp_reduction) == ("dpo", "mean")
    assert (cfg.optimizer.lr, cfg.optimizer.adam_eps, cfg.optimizer.lr_decay_iters) == (3e-4, 1e-6, 7)
    assert cfg.optimizer.lr_warmup_fraction == 0.1 and cfg.optimizer.overlap_param_gather
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel) == (2, True)
    assert cfg.reference.ref_offload


def test_recompute_activations_is_selective():
    assert _cfg().model.recompute_granularity is None
    assert _cfg("--recompute-activations").model.recompute_granularity == "selective"
    assert _cfg("--recompute-granularity", "full").model.recompute_granularity == "full"
    assert _cfg("--recompute-granularity", "full").model.options(on_gpu=False).recompute_granularity == "full"


@pytest.mark.parametrize("argv,message", [
    (["--recompute-activations", "--recompute-granularity", "full"],
     "error: --recompute-activations means --recompute-granularity selective; "
     "it conflicts with --recompute-granularity full"),
    (["--bf16", "--fp16"], "error: --bf16 and --fp16 exclude each other"),
    (["--overlap-param-gather", "--overlap-grad-reduce", "--no-use-distributed-optimizer"],
     "error: --overlap-param-gather needs the distributed optimizer (drop --no-use-distributed-optimizer)"),
    (["--overlap-param-gather"], "error: --overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)"),
    (["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"],
     "error: give one of --lr-warmup-iters and --lr-warmup-fraction"),
    (["--train-samples", "1", "--global-batch-size", "2"],
     "error: --train-samples 1 is less than one --global-batch-size (2 groups)"),
    (["--train-iters", "0"], "error: --train-iters must be > 0, got 0"),
    (["--epochs", "0"], "error: --epochs must be > 0, got 0.0"),
])
def test_bad_combination_is_one_error_line_before_any_process_group(argv, message, monkeypatch, capsys):
    from megatron_var.runtime import parallel

    def no_world(*a, **k):
        raise AssertionError("a process group was started for a bad command line")

    monkeypatch.setattr(parallel, "init_distributed", no_world)
    assert train.main([*REQUIRED, *argv]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [message]
    assert not dist.is_initialized()


def test_last_run_length_wins():
    """A launcher's --epochs is replaced by --train-iters / --train-samples appended after it, in any order."""
    d = _cfg("--epochs", "2").data
    assert (d.train_iters, d.train_samples, d.epochs) == (None, None, 2.0)
    d = _cfg("--epochs", "2", "--train-samples", "64").data
    assert (d.train_iters, d.train_samples, d.epochs) == (None, 64, None)
    d = _cfg("--train-samples", "64", "--epochs", "1.5", "--train-iters", "9").data
    assert (d.train_iters, d.train_samples, d.epochs) == (9, None, None)


def test_distributed_optimizer_has_both_megatron_forms():
    assert _cfg().optimizer.use_distributed_optimizer is True
    assert _cfg("--no-use-distributed-optimizer").optimizer.use_distributed_optimizer is False
    assert _cfg("--no-use-distributed-optimizer", "--use-distributed-optimizer").optimizer.use_distributed_optimizer
    assert _cfg("--no-flex-attention").model.flex_attention is False  # kept from the old parser


def test_unknown_and_abbreviated_flags_exit_2(capsys):
    for argv in (["--no-such-flag"], ["--lr-warmup", "2"], ["--epochs", "two"]):
        with pytest.raises(SystemExit) as e:
            train.build_parser().parse_args([*REQUIRED, *argv])
        assert e.value.code == 2, argv
    assert "unrecognized arguments: --lr-warmup" in capsys.readouterr().err


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the default warning filters
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_var.train", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_shows_the_groups_and_defaults():
    r = _run("--help")
    assert r.returncode == 0, r.stderr[-2000:]
    titles = [ln[:-1] for ln in r.stdout.splitlines() if re.fullmatch(r"[a-z]+:", ln)]
    assert titles == ["options", *GROUPS]
    assert "--use-distributed-optimizer, --no-use-distributed-optimizer" in r.stdout
    assert re.search(r"--lr LR\s+Peak learning rate \(after warmup\)\. \(default: 1e-05\)", r.stdout)


# torch's own log lines (glog format), e.g. "No CUDA runtime is found" on a machine with a CUDA toolkit and no GPU
TORCH_LOG = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d")


def test_conflict_from_the_command_line_is_one_line_without_traceback():
    r = _run(*REQUIRED, "--bf16", "--fp16")
    assert r.returncode == 2
    assert [ln for ln in r.stderr.splitlines() if not TORCH_LOG.match(ln)] == \
        ["error: --bf16 and --fp16 exclude each other"], r.stderr  # no traceback, no warnings, no set-up logs
