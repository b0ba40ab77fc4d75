"""The memory estimator (megatron_var/memory/estimate.py): the example launchers fit, and the formula matches reality.

* Every GPU launcher in examples/ (each ``launch ...`` line, parsed with the trainer's own parser) must fit an
  80 GB GPU with >= 10% free at the documented sequence length: prepare_data's ``--seq-length`` default of 2048
  (README, docs/data-format.md; the headers name none), split evenly, P = R = 1024, Transformer Engine, bf16.
  The model comes from the header ("VAR on Llama-3.1-8B") via the bundled public HF configs, the GPU count from
  "N node(s) of/x Mx".
* CPU validation: the real peaks of a VAR step of tiny fp32 models (measured in a fresh process by
  tests/unit/memory_probe.py) against the same formula with fp32 sizes, within 20%.
* A hand-computed small configuration (independent arithmetic) and a negative control.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_var.cli import memory as memory_cli
from megatron_var.memory.estimate import GIB, Layout, Precision, Workload, estimate
from megatron_var.models.arch import ModelArch

ROOT = Path(__file__).resolve().parents[2]
SEQ_LENGTH = 2048  # prepare_data --seq-length default, the documented one
GPU_GIB, MARGIN = 80.0, 0.10


def launchers() -> list[Path]:
    """The GPU launchers (the tiny CPU one trains a 4-layer model)."""
    return sorted(p for p in (ROOT / "examples").glob("*.sh")
                  if re.search(r"^launch ", p.read_text(), re.M) and p.name != "var_tiny_cpu.sh")


def trainer_flags(path: Path, tmp: Path) -> list[str]:
    """The trainer argv the launcher builds (examples/_launch.sh in print mode), as torchrun mode gets it: a fresh
    run (--load LOAD_DIR --finetune)."""
    (tmp / "data").mkdir(exist_ok=True)
    (tmp / "load").mkdir(exist_ok=True)
    env = dict(os.environ, MEGATRON_VAR_PRINT_ARGS="1", DATA_DIR=str(tmp / "data"), SAVE_DIR=str(tmp / "save"),
               LOAD_DIR=str(tmp / "load"))
    env.pop("REF_LOAD", None)
    env.pop("EXTRA_ARGS", None)
    r = subprocess.run(["bash", str(path)], env=env, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return [a.decode() for a in r.stdout.split(b"\0")[:-1]]


def launcher_setup(path: Path, tmp: Path):
    """(arch, layout, workload, precision) of one launcher, from its header and its ``launch`` flags."""
    from megatron_var.cli.train import build_parser, config_from_args

    text = path.read_text()
    model = re.search(r"^# \w+ on (Llama-[\d.]+-\d+B|Qwen[\d.]+-\d+B)", text, re.M)
    assert model, f"{path.name}: header names no model ('# VAR on <Model>')"
    preset = model.group(1).lower().replace("llama-", "llama")
    hw = re.search(r"(\d+) nodes? (?:of|x) (\d+)x", text)
    assert hw, f"{path.name}: header names no hardware ('N node(s) of Mx ...')"
    seq = re.search(r"--seq-length (\d+)", text)
    cfg = config_from_args(build_parser().parse_args(trainer_flags(path, tmp)))  # the trainer's own checks too
    arch = memory_cli.load_arch(preset=preset)
    return (arch,) + memory_cli.from_train_args(cfg, arch, int(hw.group(1)) * int(hw.group(2)),
                                                int(seq.group(1)) if seq else SEQ_LENGTH)


def test_every_launcher_is_checked():
    names = {p.name for p in launchers()}
    assert {"var_llama3_8b.sh", "var_llama13b.sh", "var_qwen2.5_32b.sh", "sft_llama3_8b.sh",
            "dpo_llama3_8b.sh"} <= names, names


@pytest.mark.parametrize("path", launchers(), ids=lambda p: p.name)
def test_launcher_fits_80gb_with_margin(path, tmp_path):
    arch, layout, work, prec = launcher_setup(path, tmp_path)
    est = estimate(arch, layout, work, prec)
    print(f"\n{path.name}\n{est.table(GPU_GIB, MARGIN)}")
    assert est.fits(GPU_GIB, MARGIN), (
        f"{path.name} needs {est.total / GIB:.1f} GiB per GPU at --seq-length {SEQ_LENGTH} (P=R={SEQ_LENGTH // 2}); "
        f"limit {GPU_GIB * (1 - MARGIN):.0f} GiB:\n{est.table(GPU_GIB, MARGIN)}")


# ---- CPU validation -------------------------------------------------------------------------------------------
TINY = dict(family="llama", num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8,
            num_query_groups=4, kv_channels=32, vocab_size=4096, max_position_embeddings=4096)
CASES = [  # micro-batch (groups), P, R, full recompute; B = 4
    (1, 64, 64, False),
    (2, 32, 96, False),
    (1, 128, 128, True),
]


def _cpu_estimate(mbs, p, r, recompute, tp=1):
    return estimate(ModelArch(**TINY), Layout(tp, sequence_parallel=tp > 1),
                    Workload("var", 4, mbs, p, r, num_microbatches=1),
                    Precision(params_dtype="fp32", recompute_granularity="full" if recompute else "none",
                              transformer_impl="local", fused_kernels=False, flex_attention=False, overhead_gib=0))


def _probe(cases, tp=1) -> list[list[dict]]:
    """Measured peaks per rank (tests/unit/memory_probe.py in a fresh process; torchrun for TP > 1)."""
    cfgs = [dict(arch=TINY, micro_batch_size=m, group_size=4, prompt_length=p, response_length=r, recompute=rc,
                 tp=tp, sp=tp > 1) for m, p, r, rc in cases]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    launcher = [sys.executable] if tp == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(tp)]
    out = subprocess.run(launcher + [str(ROOT / "tests/unit/memory_probe.py"), json.dumps(cfgs)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("[", "rank"))]
    assert len(lines) == tp, out.stdout
    return [json.loads(ln.split(" ", 1)[-1] if ln.startswith("rank") else ln) for ln in lines]


def test_estimate_matches_measured_cpu_peaks():
    (measured,) = _probe(CASES)
    mib = 2 ** 20
    rows = []
    for case, m in zip(CASES, measured):
        est = _cpu_estimate(*case)
        c = est.components
        static = c["weights"] + c["grads"] + c["optimizer"] + c["reference"]
        pred = {"static": static, "reference_peak": c["weights"] + c["grads"] + c["optimizer"] + est.reference_phase,
                "policy_peak": c["weights"] + c["grads"] + c["optimizer"] + est.policy_phase}
        rows.append((case, pred, m))
        print(f"{case}: " + ", ".join(f"{k} predicted {pred[k] / mib:.1f} MiB measured {m[k] / mib:.1f} MiB"
                                      for k in pred))
        for k in pred:
            assert abs(pred[k] - m[k]) <= 0.20 * m[k], (case, k, pred[k] / mib, m[k] / mib)
        # what the step adds above the static state, alone: the activation/logit terms themselves
        for k in ("reference_peak", "policy_peak"):
            assert abs((pred[k] - static) - (m[k] - m["static"])) <= 0.25 * (m[k] - m["static"]), (case, k)
    # the measurement moves where the formula says: full recompute keeps less at twice the rows, and the
    # reference's shared-prefix rows grow with B·R
    assert rows[2][2]["policy_peak"] < rows[0][2]["policy_peak"]
    assert rows[2][2]["reference_peak"] > rows[0][2]["reference_peak"]


def test_estimate_matches_measured_cpu_peaks_tp2_sequence_parallel():
    """The /TP and sequence-parallel terms: two gloo ranks, each measuring its own peaks."""
    cases = [(1, 64, 64, False), (1, 128, 128, True)]
    per_rank = _probe(cases, tp=2)
    mib = 2 ** 20
    for rank, measured in enumerate(per_rank):
        for case, m in zip(cases, measured):
            est = _cpu_estimate(*case, tp=2)
            c = est.components
            persistent = c["weights"] + c["grads"] + c["optimizer"]
            pred = {"static": persistent + c["reference"], "reference_peak": persistent + est.reference_phase,
                    "policy_peak": persistent + est.policy_phase}
            print(f"TP2+SP rank {rank} {case}: " + ", ".join(
                f"{k} predicted {pred[k] / mib:.1f} MiB measured {m[k] / mib:.1f} MiB" for k in pred))
            for k in pred:
                assert abs(pred[k] - m[k]) <= 0.20 * m[k], (rank, case, k, pred[k] / mib, m[k] / mib)


# ---- hand-computed reference and negative control -------------------------------------------------------------
def test_hand_computed_small_config():
    """h=64, 2 layers, F=128, 4 heads / 2 KV heads of 16, V=256; TP=PP=DP=1, bf16, TE, B=2, P=R=8, VAR.

    Parameters: per layer qkv 64·(4+2·2)·16 = 8192, proj 4·16·64 = 4096, MLP 64·256 + 128·64 = 24576, norms 128
    -> 36992; x2 + embedding 16384 + output 16384 + final norm 64 = 106816.
    Static: weights 2 B, grads 4 B, optimizer 12 B (fp32 main + m + v, DP=1), reference 2 B per parameter.
    Policy micro-batch: 2 rows x 16 tokens = 32 tokens; per layer and token (bytes): norms 2·(2·2·64) = 512,
    attention 2·(8·16 + 6·16 + 4·16) + 4·4 = 592, MLP 3·2·128 = 768 -> 1872; x32 = 59904 per layer; two layers in
    flight + one in backward = 179712; final norm 2·2·64·32 = 8192 -> 187904.
    Logits: 2 x 8 = 16 rows x 256 x (2 + 4) B = 24576 + output-layer input 2·16·64 = 2048 -> 26624.
    Largest weight gradient: 256·64·2 B = 32768. Policy phase: 247296 (+ the resident reference 213632).
    The reference phase (48 tokens, 32 logit rows) is smaller. Total: 213632 + 427264 + 1281792 + 247296 + 213632.
    """
    arch = ModelArch(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=2, kv_channels=16, vocab_size=256, max_position_embeddings=64)
    est = estimate(arch, Layout(), Workload("var", 2, 1, 8, 8, num_microbatches=1),
                   Precision(params_dtype="bf16", flex_attention=False, overhead_gib=0))
    c = est.components
    assert c["weights"] == 213632 and c["grads"] == 427264 and c["optimizer"] == 1281792
    assert c["reference"] == 213632
    assert c["activations"] == 187904
    assert c["logits"] == 26624 + 32768
    assert est.phase == "policy"
    assert est.total == 213632 + 427264 + 1281792 + 247296 + 213632


def test_negative_control_8b_on_one_gpu_does_not_fit(capsys):
    """Llama-3.1-8B VAR on one GPU (TP=PP=DP=1, no recompute): ~16 GB of bf16 weights, 32 GB of fp32 grads and
    96 GB of optimizer state alone; flagged, and the CLI says so with exit code 1."""
    arch = memory_cli.load_arch(preset="llama3.1-8b")
    est = estimate(arch, Layout(), Workload("var", 8, 1, 1024, 1024), Precision())
    assert not est.fits(80.0) and est.total > 150 * GIB
    rc = memory_cli.main(["--preset", "llama3.1-8b", "--seq-length", "2048"])
    out = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in out
    # the same model split as the docs recommend fits, exit 0
    rc = memory_cli.main(["--preset", "llama3.1-8b", "--seq-length", "2048", "--num-gpus", "8",
                          "--tensor-model-parallel-size", "4", "--sequence-parallel", "--global-batch-size", "16"])
    assert rc == 0 and "FITS" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--seq-length", "2048"], "exactly one of --hf-config"),
    (["--preset", "nope", "--seq-length", "2048"], "unknown --preset"),
    (["--preset", "llama3.1-8b", "--seq-length", "2048", "--tensor-model-parallel-size", "3"], "does not divide"),
    (["--preset", "llama3.1-8b", "--seq-length", "2048", "--prompt-length", "5"], "not both"),
    (["--preset", "llama3.1-8b"], "give --seq-length"),
    (["--preset", "llama3.1-8b", "--seq-length", "2048", "--num-gpus", "6", "--tensor-model-parallel-size", "4"],
     "not a multiple"),
    (["--preset", "llama3.1-8b", "--seq-length", "2048", "--ref-offload", "--ref-cache"], "exclude each other"),
    (["--preset", "llama3.1-8b", "--seq-length", "2048", "--response-length", "2048"], "--response-length"),
    (["--preset", "llama3.1-8b", "--seq-length", "2048", "--recompute-activations", "--recompute-granularity",
      "full"], "conflicts with --recompute-granularity full"),
])
def test_cli_bad_flags(argv, message, capsys):
    assert memory_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_recompute_flags_mean_what_the_trainers_mean():
    """--recompute-activations is Megatron-LM's shorthand for selective recomputation, in the trainer and here."""
    base = ["--preset", "llama3.1-8b", "--seq-length", "2048"]
    for extra, granularity in (([], "none"), (["--recompute-activations"], "selective"),
                               (["--recompute-granularity", "full"], "full")):
        _, _, _, prec = memory_cli.from_args(memory_cli.build_parser().parse_args(base + extra))
        assert prec.recompute_granularity == granularity, extra
