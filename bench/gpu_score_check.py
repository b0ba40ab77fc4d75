#!/usr/bin/env python
"""GPU check of the conversion + scoring path: HF -> Megatron -> tools/score_logprobs.py on CUDA (NCCL) vs
transformers' float32 forward on CPU, for a tiny GQA Llama with Llama-3 RoPE scaling and a tied Qwen2.

    python bench/gpu_score_check.py [--out DIR] [--nproc 1]

Prints a JSON summary: max per-token error for --params-dtype fp32 and bf16 against HF fp32 on the CPU and on the
same GPU (GPU fp32 kernels round differently: expect ~1e-5 relative there, ~1e-7 on CPU). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _hf_token_logps_cuda(model, pairs) -> list[list[float]]:
    """transformers' float32 forward on the GPU (the fair reference for GPU kernels' rounding)."""
    import torch

    model = model.cuda()
    out = []
    with torch.no_grad():
        for x, y in pairs:
            logp = torch.log_softmax(model(torch.tensor([list(x) + list(y)]).cuda()).logits[0].float(), dim=-1)
            out.append([logp[len(x) - 1 + t, tok].item() for t, tok in enumerate(y)])
    model.cpu()
    return out


def main() -> None:
    import torch

    import hf_tiny
    from megatron_var.convert.import_hf import convert_hf_to_megatron

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None, help="where to write gpu_score_check.json")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (TP size) to score with")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []}
    for name, config in (("llama-gqa-rope3", hf_tiny.llama_config(tied=False, layers=4)),
                         ("qwen2-tied", hf_tiny.qwen2_config(tied=True, layers=4))):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = hf_tiny.build_model(config, seed=3)
            hf_tiny.save_model(model, tmp / "hf")
            convert_hf_to_megatron(tmp / "hf", tmp / "meg")
            pairs = hf_tiny.random_pairs(64, config.vocab_size, seed=5, max_len=40)
            ref = hf_tiny.hf_token_logps(model, pairs)
            ref_gpu = _hf_token_logps_cuda(model, pairs)
            (tmp / "pairs.jsonl").write_text("".join(json.dumps({"prompt_ids": x, "response_ids": y}) + "\n"
                                                     for x, y in pairs))
            for dtype in ("fp32", "bf16"):
                start = time.time()
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(args.nproc), str(ROOT / "tools" / "score_logprobs.py"), "--load", str(tmp / "meg"),
                       "--tensor-model-parallel-size", str(args.nproc), "--input", str(tmp / "pairs.jsonl"),
                       "--output", str(tmp / f"out_{dtype}.jsonl"), "--micro-batch-size", "8",
                       "--params-dtype", dtype]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
                if proc.returncode != 0:
                    print(proc.stdout[-3000:], proc.stderr[-6000:])
                    raise SystemExit(f"{name} {dtype}: score_logprobs failed")
                lines = (tmp / f"out_{dtype}.jsonl").read_text().splitlines()
                got = [json.loads(line)["token_logps"] for line in lines]
                run = {"model": name, "params_dtype": dtype, "pairs": len(pairs),
                       "wall_s": round(time.time() - start, 1)}
                for where, r in (("hf_fp32_cpu", ref), ("hf_fp32_same_gpu", ref_gpu)):
                    diffs = [(abs(a - b), abs(b)) for g, rr in zip(got, r) for a, b in zip(g, rr)]
                    run[f"max_rel_err_vs_{where}"] = max(d / m for d, m in diffs)
                    run[f"max_abs_err_vs_{where}"] = max(d for d, _ in diffs)
                summary["runs"].append(run)
                print(json.dumps(summary["runs"][-1]), flush=True)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_score_check.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
