"""MetricsLogger (metrics.jsonl, TensorBoard, wandb, the log line) and check_wandb, with a stand-in trainer: the
callback reads only the attributes of the Trainer's callback interface."""

import dataclasses
import json
import logging
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_var.models.arch import ModelArch
from megatron_var.training import logging_sinks
from megatron_var.training.config import CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, TrainConfig
from megatron_var.training.metrics_logger import MetricsLogger, check_wandb, format_train_line, truncate_metrics

ARCH = ModelArch(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, kv_channels=16, vocab_size=256, max_position_embeddings=256)


@dataclasses.dataclass
class Sections:
    """TrainConfig's sections that the logger reads (the real classes; the whole TrainConfig needs every section
    valid, which is not this test's concern)."""

    data: DataConfig
    model: ModelConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig


def test_sections_are_train_configs():
    def types(cls):  # config.py's annotations are strings (from __future__ import annotations)
        return {f.name: getattr(f.type, "__name__", f.type) for f in dataclasses.fields(cls)}

    assert types(Sections).items() <= types(TrainConfig).items()


def make_trainer(save, start=0, end=9, rank0=True, **logging_kw):
    cfg = Sections(DataConfig(data_path="data", train_iters=end), ModelConfig(model_arch="arch.json"),
                   CheckpointConfig(save=str(save) if save else None), LoggingConfig(**logging_kw))
    return SimpleNamespace(cfg=cfg, arch=ARCH, iteration=start, start_iteration=start, end_iteration=end,
                           is_logging_rank=rank0)


def record(it):
    return {"iteration": it, "loss": 1.0 / it, "lr": 1e-5, "grad_norm": 0.5, "step_time_s": 0.25, "tokens": 100.0,
            "computed_tokens": 128.0, "ref_computed_tokens": 256.0, "consumed_groups": 4 * it, "epoch": 0,
            "skipped": False, "skipped_groups": 0, "var/ess": 2.5, "ref_policy_logp_gap": 0.0}


def run(trainer, logger, iterations, valid_at=()):
    logger.on_train_start(trainer)
    for it in iterations:
        logger.on_batches(trainer, [{"tokens": torch.zeros(4, 32, dtype=torch.long)}], forward_only=False)
        trainer.iteration = it
        logger.on_step_end(trainer, record(it))
        if it in valid_at:
            logger.on_validation_end(trainer, {"iteration": it, "valid/loss": 0.75, "valid/var/ess": 3.0})
    logger.on_train_end(trainer, None)


def lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_resumed_run_writes_files_sinks_and_log_lines(tmp_path, caplog):
    save, tb = tmp_path / "run", tmp_path / "tb"
    save.mkdir()
    # a run that got to iteration 5, resumed from its checkpoint at 3; the crash tore the last line
    (save / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "old": True}) + "\n" for i in range(1, 6))
                                        + '{"iteration": 6, "lo')
    (save / "valid_metrics.jsonl").write_text(json.dumps({"iteration": 2, "old": True}) + "\n" +
                                              json.dumps({"iteration": 4, "old": True}) + "\n")
    trainer = make_trainer(save, start=3, end=9, log_interval=2, tensorboard_dir=str(tb))
    with caplog.at_level(logging.INFO, logger="megatron_var.training.metrics_logger"):
        run(trainer, MetricsLogger(), range(4, 10), valid_at=(6,))

    recs = lines(save / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == list(range(1, 10)) and all(r.get("old") for r in recs[:3])
    new = recs[3:]
    assert all(r["tokens_per_s"] == 400.0 and r["computed_tokens_per_s"] == 512.0 for r in new)
    assert all("tflops_per_gpu" not in r and "mfu" not in r for r in new)  # CPU: no FLOP rates
    logged = [r["iteration"] for r in new if "perf/ms_per_step" in r]
    assert logged == [4, 6, 8]
    r6 = new[2]
    assert r6["perf/ms_per_step"] == pytest.approx(250.0) and r6["perf/steps"] == 2
    assert r6["perf/eta_s"] == pytest.approx(0.25 * 3) and r6["perf/peak_mem_gib"] > 0
    assert r6["var/ess"] == 2.5 and r6["consumed_groups"] == 24
    assert [r["iteration"] for r in lines(save / "valid_metrics.jsonl")] == [2, 6]

    msgs = [r.getMessage() for r in caplog.records]
    train_lines = [m for m in msgs if m.startswith("iter ")]
    assert [m.split(" |")[0] for m in train_lines] == ["iter 4/9", "iter 6/9", "iter 8/9", "iter 9/9"]
    assert "| 250 ms/it | 400 tok/s |" in train_lines[1] and "| ETA 1s | consumed 24 groups |" in train_lines[1]
    assert "| var/ess 2.5 | ref_policy_logp_gap 0" in train_lines[1]
    assert "validation at iter 6 | loss 0.75000 | valid/var/ess 3" in msgs

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "tokens_per_s", "perf/tokens_per_s", "perf/eta_s", "valid/loss", "var/ess"} <= set(tags)
    assert [e.step for e in acc.Scalars("loss")] == list(range(4, 10))
    assert [e.step for e in acc.Scalars("perf/ms_per_step")] == [4, 6, 8, 9]  # 9: the run's last, partial interval


def test_other_ranks_write_and_log_nothing(tmp_path, caplog):
    trainer = make_trainer(tmp_path / "run", rank0=False, log_interval=1, tensorboard_dir=str(tmp_path / "tb"))
    with caplog.at_level(logging.INFO):
        run(trainer, MetricsLogger(), range(1, 4), valid_at=(2,))
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()
    assert not [r for r in caplog.records if r.name.startswith("megatron_var")]


def test_gpu_line_format():
    rec = dict(record(12), grad_norm=None, loss=1.23456)
    perf = {"perf/ms_per_step": 845.2, "perf/tokens_per_s": 1234.4, "perf/tflops_per_gpu": 12.34, "perf/mfu": 0.41,
            "perf/peak_mem_gib": 3.21, "perf/eta_s": 3720.0, "perf/skipped_steps": 0}
    assert format_train_line(rec, perf, 100) == (
        "iter 12/100 | loss 1.23456 | lr 1e-05 | grad norm - | 845 ms/it | 1234 tok/s | 12.3 TFLOP/s/GPU | MFU 41.0% | "
        "peak mem 3.2 GiB | ETA 1h02m | consumed 48 groups | var/ess 2.5 | ref_policy_logp_gap 0")


def test_truncate_metrics_without_files(tmp_path):
    truncate_metrics(tmp_path, 3)  # nothing to do
    assert list(tmp_path.iterdir()) == []


# ---- wandb ---------------------------------------------------------------------------------------------------
@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No credentials, no WANDB_MODE, and wandb's files under tmp_path (not the user's home)."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(logging_sinks, "_warned_offline", False)
    return tmp_path


def test_check_wandb_needs_the_package(monkeypatch):
    assert check_wandb(LoggingConfig()) is None  # no --wandb-project: wandb is not imported
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match=r"--wandb-project needs wandb: pip install 'megatron_var\[wandb\]'"):
        check_wandb(LoggingConfig(wandb_project="p"))


def test_check_wandb_credentials(wandb_env, monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")
    cfg = LoggingConfig(wandb_project="p")
    with caplog.at_level(logging.WARNING):
        assert check_wandb(cfg, warn=True) == "offline"
        assert check_wandb(cfg, warn=True) == "offline"
    assert len([r for r in caplog.records if "logs offline" in r.getMessage()]) == 1  # once per process

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert check_wandb(cfg) == "online"
    monkeypatch.delenv("WANDB_API_KEY")

    # what `wandb login` leaves behind: a netrc entry for the wandb host, written by wandb itself
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:
        pytest.skip("an older wandb without wbauth: its `wandb login` writer is elsewhere")
    wbauth.write_netrc_auth(host=wandb_setup.singleton().settings.base_url, api_key="a" * 40)
    assert check_wandb(cfg) == "online"

    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's explicit choice wins
    assert check_wandb(cfg) == "disabled"
    assert wandb.__version__


def test_wandb_offline_run_carries_the_whole_config(wandb_env, caplog):
    pytest.importorskip("wandb")
    save = wandb_env / "run"
    trainer = make_trainer(save, end=2, log_interval=1, wandb_project="megatron-var-test", wandb_exp_name="t1")
    logger = MetricsLogger()
    logger.on_train_start(trainer)
    run_ = logger.sinks.wandb
    assert run_.name == "t1" and run_.settings.mode == "offline"
    assert dict(run_.config) == json.loads(json.dumps(dataclasses.asdict(trainer.cfg)))
    for it in (1, 2):
        logger.on_step_end(trainer, record(it))
    logger.on_train_end(trainer, None)
    assert list((save / "wandb").glob("offline-run-*")), list((save / "wandb").iterdir())
