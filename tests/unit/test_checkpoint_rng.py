"""The RNG state a training checkpoint carries (megatron_var.checkpoint.io): plain data that torch's
``weights_only`` loader (so the restricted checkpoint check) admits, and restoring it replays the same numbers.
The save / load_checkpoint(load_rng=...) round trip per rank and across layouts: tests/distributed/
test_checkpoint_rng.py."""

import random

import numpy as np
import torch

from megatron_var.checkpoint import io as checkpoint_io
from megatron_var.common.atomic import atomic_torch_save


def _draws():
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_capture_and_restore_replay_the_same_numbers(tmp_path):
    np.random.randn()  # leaves a cached gaussian in numpy's state, which must round-trip too
    state = checkpoint_io.capture_rng_state()
    expected = _draws()
    atomic_torch_save(state, tmp_path / "rng.pt")
    assert _draws() != expected  # the streams moved on
    checkpoint_io.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected
