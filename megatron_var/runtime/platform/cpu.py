"""CPU (gloo) mode: run unmodified megatron-core without CUDA.

Why: megatron-core hard-codes CUDA in ~250 places (``device="cuda"`` buffers in the pipeline schedules,
``torch.cuda.current_device()`` in rotary embeddings, the CUDA RNG tracker, streams/events in DDP). Tests, CI and
the demo run on CPU, so this module rewrites those calls at run time — nothing in site-packages is edited — and can
undo every change (``disable()``), so it never leaks into a process that has a GPU.

Each patch below is needed by some megatron-core code path on CPU:
1. a TorchFunctionMode that maps CUDA device arguments (str, torch.device, bare int) to CPU, incl. ``Tensor.to``;
2. ``Tensor.cuda()`` / ``Tensor.pin_memory()`` as no-ops (tied embeddings under PP call ``weight.data.cuda()``);
3. ``Tensor.type()`` reporting ``torch.cuda.*Tensor`` (the distributed optimizer checks the type string);
4. the mode re-entered inside autograd's engine (custom autograd Functions allocate in backward);
5. ``torch.cuda.current_device`` -> 0, ``synchronize`` -> no-op;
6. stream / event stand-ins (classes, so ``isinstance`` works);
7. the CUDA RNG API pointed at the CPU default generator, incl. megatron's ``_set_cuda_rng_state``.
``torch.cuda.is_available()`` stays False.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")


def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device('cuda')``, ``1``) to CPU."""
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # a bare int device index means cuda:N
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites the device argument of every torch call from CUDA to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            # t.to("cuda"), t.to(torch.device("cuda")), t.to(0); never touches a dtype argument
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


class _StreamStandIn:
    """No-op stream: CPU ops are synchronous, so waiting and recording have nothing to do."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _EventStandIn()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _EventStandIn:
    """No-op event, see ``_StreamStandIn``."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_DEFAULT_STREAM = _StreamStandIn()


def _cuda_type_name(orig_type: Callable) -> Callable:
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = orig_type(self)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if isinstance(dtype, str):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return orig_type(self, dtype, non_blocking, **kwargs)

    return type_


class _Patcher:
    """Records ``setattr`` patches so that ``disable()`` restores the exact originals."""

    def __init__(self):
        self._saved: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def restore(self) -> None:
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved.clear()


_state: dict[str, Any] = {"mode": None, "patcher": None}


def is_enabled() -> bool:
    return _state["mode"] is not None


def enable() -> None:
    """Turn the CPU mode on (idempotent). Refuses when a GPU is present: the patches would hide it."""
    if is_enabled():
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_var CPU mode must not be enabled on a machine with CUDA devices")
    import megatron.core.tensor_parallel.random as mcore_random

    p = _Patcher()
    mode = _CudaToCpuMode()

    # 2, 3: tensor methods
    p.set(torch.Tensor, "cuda", lambda self, *a, **k: self)
    p.set(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    p.set(torch.Tensor, "type", _cuda_type_name(torch.Tensor.type))

    # 4: autograd's engine runs outside the mode (the mode is popped while it handles backward())
    orig_engine = torch.autograd._engine_run_backward

    def engine_in_mode(*args, **kwargs):
        with mode:
            return orig_engine(*args, **kwargs)

    p.set(torch.autograd, "_engine_run_backward", engine_in_mode)

    # 5, 6: device queries, synchronisation, streams and events
    p.set(torch.cuda, "current_device", lambda: 0)
    p.set(torch.cuda, "synchronize", lambda *a, **k: None)
    p.set(torch.cuda, "Stream", _StreamStandIn)
    p.set(torch.cuda, "Event", _EventStandIn)
    p.set(torch.cuda, "current_stream", lambda *a, **k: _DEFAULT_STREAM)
    p.set(torch.cuda, "default_stream", lambda *a, **k: _DEFAULT_STREAM)
    p.set(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())

    # 7: RNG on the CPU default generator
    for owner in (torch.cuda, torch.cuda.random):
        p.set(owner, "get_rng_state", lambda device="cuda": torch.get_rng_state())
        p.set(owner, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
        # the generator itself, not torch.manual_seed (which calls torch.cuda.manual_seed_all back)
        p.set(owner, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    p.set(mcore_random, "_set_cuda_rng_state", lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))

    mode.__enter__()
    _state.update(mode=mode, patcher=p)
    logger.info("megatron_var CPU mode enabled: megatron-core CUDA calls are mapped to CPU (gloo backend)")


def disable() -> None:
    """Undo every patch of ``enable()``; a no-op when the mode is off."""
    if not is_enabled():
        return
    _state["mode"].__exit__(None, None, None)
    _state["patcher"].restore()
    _state.update(mode=None, patcher=None)


def enable_if_no_cuda() -> bool:
    """Enable the CPU mode when CUDA is absent; return whether it is on."""
    if not torch.cuda.is_available():
        enable()
    return is_enabled()
