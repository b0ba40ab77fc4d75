"""RNG state in training checkpoints (Megatron-LM's ``--no-load-rng``), in a 4-rank world: every rank's streams
(python, numpy, torch, megatron's tensor-parallel tracker) are saved and ``load_checkpoint(load_rng=True)`` gives
every rank its own back; ``load_rng=False``, a resume in another layout and a checkpoint saved without RNG state
restore nothing."""

import logging
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from helpers import LLAMA, layout
from megatron_var.checkpoint import io as checkpointing
from megatron_var.models.gpt import ModelOptions, build_model_chunks


def _draws():
    with tensor_parallel.get_cuda_rng_tracker().fork():  # the TP-rank stream (dropout inside TP regions)
        tp = torch.rand(2).tolist()
    return random.random(), float(np.random.rand()), torch.rand(2).tolist(), tp


def _seed_per_rank() -> None:
    r = dist.get_rank()
    random.seed(10 + r)
    np.random.seed(20 + r)
    torch.manual_seed(30 + r)


def _everywhere(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def test_rng_state_is_restored_per_rank_unless_load_rng_is_false(tmp_shared):
    with layout(tp=2) as pc:
        chunks = build_model_chunks(LLAMA, pc, ModelOptions())
        _seed_per_rank()
        checkpointing.save_checkpoint(tmp_shared, 1, chunks)
        expected = _draws()
        _draws()
        state = checkpointing.load_checkpoint(tmp_shared, chunks)
        assert state["checkpoint_iteration"] == 1
        assert _draws() == expected
        assert len({repr(x) for x in _everywhere(expected)}) == dist.get_world_size()  # each rank its own streams
        tp_streams = _everywhere(expected[3])
        assert tp_streams[0] != tp_streams[1]  # TP ranks 0 and 1 of a DP replica: distinct tracker streams
        checkpointing.load_checkpoint(tmp_shared, chunks, load_rng=False)
        assert _draws() != expected


def test_rng_state_is_not_restored_in_another_layout(tmp_shared, caplog):
    caplog.set_level(logging.INFO, logger="megatron_var.checkpoint.io")
    with layout(tp=2) as pc:
        chunks = build_model_chunks(LLAMA, pc, ModelOptions())
        _seed_per_rank()
        checkpointing.save_checkpoint(tmp_shared, 1, chunks)
        saved = _draws()
    with layout(tp=1) as pc:
        chunks = build_model_chunks(LLAMA, pc, ModelOptions())
        checkpointing.load_checkpoint(tmp_shared, chunks)
        assert _draws() != saved
    if dist.get_rank() == 0:
        assert "RNG state not restored" in caplog.text and "PP x TP x DP = 1 x 2 x 2, this run is 1 x 1 x 4" in \
            caplog.text, caplog.text


def test_checkpoint_without_rng_state_loads(tmp_shared, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="megatron_var.checkpoint.io")
    with layout(tp=2) as pc:
        chunks = build_model_chunks(LLAMA, pc, ModelOptions())
        with monkeypatch.context() as m:
            m.setattr(checkpointing, "_rng_object", lambda state: {})  # what saves wrote before RNG states
            checkpointing.save_checkpoint(tmp_shared, 1, chunks, trainer_state={"consumed_groups": 3})
        state = checkpointing.load_checkpoint(tmp_shared, chunks)
    assert state == {"consumed_groups": 3, "iteration": 1, "checkpoint_iteration": 1}
    if dist.get_rank() == 0:
        assert "holds none" in caplog.text, caplog.text
