"""The CPU mode maps megatron-core's CUDA calls to CPU while on, and leaves no trace when off."""

import subprocess
import sys

import pytest
import torch

CODE = r"""
import torch
from megatron_var.runtime.platform import cpu
orig_type, orig_cuda, orig_engine = torch.Tensor.type, torch.Tensor.cuda, torch.autograd._engine_run_backward
cpu.enable()
t = torch.zeros(2, device="cuda")
assert t.device.type == "cpu"
assert torch.ones(1).to("cuda:1").device.type == "cpu"
assert torch.ones(1).cuda() is not None and torch.cuda.current_device() == 0
assert torch.ones(1).type() == "torch.cuda.FloatTensor"
torch.cuda.manual_seed(5); a = torch.rand(3); torch.manual_seed(5); b = torch.rand(3)
assert torch.equal(a, b), "cuda RNG must drive the CPU generator"
cpu.disable()
assert torch.Tensor.type is orig_type and torch.Tensor.cuda is orig_cuda
assert torch.autograd._engine_run_backward is orig_engine
assert torch.ones(1).type() == "torch.FloatTensor"
for fn in (lambda: torch.zeros(2, device="cuda"), lambda: torch.cuda.current_device()):
    try:
        fn()
    except (RuntimeError, AssertionError, AttributeError):
        pass
    else:
        raise SystemExit("CUDA call succeeded after disable(): the CPU mode leaked")
print("OK")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode refuses to run where CUDA exists")
def test_cpu_mode_maps_and_restores():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_backend_choice():
    from megatron_var.models.specs import choose_backend

    assert choose_backend("auto", te_available=True, cuda_available=True) == "te"
    assert choose_backend("auto", te_available=False, cuda_available=True) == "local"
    assert choose_backend("auto", te_available=True, cuda_available=False) == "local"
    assert choose_backend("local", te_available=True, cuda_available=True) == "local"
    with pytest.raises(ValueError):
        choose_backend("te", te_available=False, cuda_available=True)
    with pytest.raises(ValueError):
        choose_backend("flash")
    # here: no TE installed, no GPU
    assert choose_backend("auto") == "local"
