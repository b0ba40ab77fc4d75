#!/usr/bin/env python
"""Memory and speed of the converters on a synthetic checkpoint with Qwen2.5-32B tensor shapes (a benchmark,
not a test).

    python bench/convert_memory.py [--layers 2] [--dtype bf16] [--workdir /tmp/convert_bench] \\
        [--output bench/results/convert_memory_cpu.json]

Writes a Qwen2 HF checkpoint (hidden 5120, 40 heads, 8 KV heads, FFN 27648, vocab 152064, untied, only --layers
layers) straight with safetensors — no model is instantiated — then runs, each in a fresh subprocess, a bare
import of the converter modules (the constant), a plain copy of the same shard files (read + write + fsync),
HF -> Megatron and Megatron -> HF. Peak RSS is the child's own VmHWM (its address space is new at exec;
``ru_maxrss`` from os.wait4 is kept too, it also counts the parent image copied at fork). The claim under test: peak
RSS <= ~2x the largest single tensor + the import constant, whatever the number of layers. The export is compared
bit by bit with the source. Prints the JSON and saves it; the work directory is removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN25_32B = dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, intermediate_size=27648,
                  vocab_size=152064)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def make_source(out: Path, layers: int, dtype_name: str) -> dict:
    """Qwen2 safetensors written tensor by tensor (one file per layer, embedding, head): no model object."""
    import torch
    from safetensors.torch import save_file

    from megatron_var.convert.core import dims
    from megatron_var.convert.qwen2 import MAPPING
    from megatron_var.models.arch import arch_from_hf_config

    dtype = getattr(torch, DTYPES[dtype_name])
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
              "num_hidden_layers": layers, "max_position_embeddings": 32768, "rope_theta": 1e6,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False,
              "torch_dtype": DTYPES[dtype_name], **QWEN25_32B}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shapes = MAPPING.hf_tensor_shapes(arch_from_hf_config(config))
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else name.split(".")[-2]
        groups.setdefault(f"part-{key}.safetensors", []).append(name)
    g = torch.Generator().manual_seed(0)
    weight_map, largest = {}, 0
    for fname, names in groups.items():
        tensors = {n: torch.randn(shapes[n], generator=g, dtype=torch.float32).to(dtype) for n in names}
        largest = max(largest, *(t.numel() * t.element_size() for t in tensors.values()))
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"largest_tensor_bytes": largest, "num_tensors": len(shapes), "dims": dims(arch_from_hf_config(config))}


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


# ---- children -------------------------------------------------------------------------------------------------
def child(mode: str, src: str, dst: str) -> dict:
    from megatron_var.convert import export_hf, import_hf  # noqa: F401  (the import constant is part of every mode)

    start = time.time()
    if mode == "import":
        import_hf.convert_hf_to_megatron(src, dst)
    elif mode == "export":
        export_hf.convert_megatron_to_hf(src, dst)
    elif mode == "copy":
        Path(dst).mkdir()
        for f in sorted(Path(src).iterdir()):
            shutil.copyfile(f, Path(dst) / f.name)
            with open(Path(dst) / f.name, "rb+") as fh:
                os.fsync(fh.fileno())
    elif mode == "make_source":
        return make_source(Path(dst), int(src), os.environ["BENCH_DTYPE"])
    elif mode == "bitwise":
        equal, n = bitwise_equal(Path(src), Path(dst))
        return {"round_trip_bitwise": equal, "tensors_compared": n}
    return {"seconds": time.time() - start, "peak_rss_bytes": _vm_hwm()}


def _vm_hwm() -> int:
    """This process's peak RSS (VmHWM of its own address space, fresh since exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(mode: str, src=Path("-"), dst=Path("-")) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(src), str(dst)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed with {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["ru_maxrss_bytes"] = usage.ru_maxrss * 1024  # includes the (small) parent image at fork
    if mode in ("copy", "import", "export"):
        result["bytes_written"] = _dir_bytes(dst)
        result["MB_per_s"] = round(result["bytes_written"] / 1e6 / result["seconds"], 1)
    return result


def bitwise_equal(a: Path, b: Path) -> tuple[bool, int]:
    """Compare every tensor of two HF dirs bit by bit, one tensor in memory at a time."""
    import torch

    from megatron_var.convert.hf_io import HFCheckpoint

    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    if set(ca.tensors) != set(cb.tensors):
        return False, 0
    for name in ca.tensors:
        x, y = ca.get(name), cb.get(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.int16 if x.element_size() == 2
                                                                              else torch.int32),
                                                                       y.view(torch.int16 if y.element_size() == 2
                                                                              else torch.int32)):
            return False, 0
    return True, len(ca.tensors)


def bench_one(work: Path, layers: int, dtype: str) -> dict:
    """Source, constant, copy, import, export and the bitwise check for one layer count."""
    t0 = time.time()
    os.environ["BENCH_DTYPE"] = dtype
    info = run_child("make_source", layers, work / "hf")  # the parent never holds a tensor
    info.pop("ru_maxrss_bytes")
    res = {"layers": layers, "dtype": dtype, **info, "source_bytes": _dir_bytes(work / "hf"),
           "make_source_seconds": round(time.time() - t0, 1)}
    res["import_constant"] = run_child("noop")
    res["file_copy"] = run_child("copy", work / "hf", work / "copy")
    shutil.rmtree(work / "copy")
    res["hf_to_megatron"] = run_child("import", work / "hf", work / "meg")
    res["megatron_to_hf"] = run_child("export", work / "meg", work / "back")
    res.update(run_child("bitwise", work / "hf", work / "back"))
    const, largest = res["import_constant"]["peak_rss_bytes"], res["largest_tensor_bytes"]
    for k in ("file_copy", "hf_to_megatron", "megatron_to_hf"):
        r = res[k]
        r["peak_rss_minus_constant_over_largest_tensor"] = round((r["peak_rss_bytes"] - const) / largest, 2)
        r["speed_vs_copy"] = round(r["MB_per_s"] / res["file_copy"]["MB_per_s"], 2)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2], help="one run per layer count (e.g. 2 4)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--workdir", default="/tmp/convert_bench")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "convert_memory_cpu.json"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    work = Path(args.workdir)
    if work.exists():
        raise SystemExit(f"error: --workdir {work} exists")
    out = {"shapes": "Qwen2.5-32B", **QWEN25_32B, "tie_word_embeddings": False, "cpu_count": os.cpu_count(),
           "note": "source files are in the page cache when read (written just before), for the copy as well",
           "runs": []}
    for layers in args.layers:
        try:
            out["runs"].append(bench_one(work / f"layers{layers}", layers, args.dtype))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
