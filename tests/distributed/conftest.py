"""Fixtures for tests that run inside a 4-rank gloo world (see tests/test_distributed_suite.py).

Every rank runs the same tests in the same order; a test builds each layout it needs with ``layout(...)``, which
creates megatron's TP/PP/DP groups and tears them down afterwards, so many layouts share one world and pay the
process start-up once.
"""

import os

import pytest
import torch
import torch.distributed as dist

from megatron_var.runtime import parallel

import helpers

WORLD = 4


@pytest.fixture(scope="session", autouse=True)
def world():
    torch.set_num_threads(1)
    parallel.init_distributed(timeout_minutes=float(os.environ.get("MEGATRON_VAR_TEST_TIMEOUT_MIN", "4")))
    assert dist.get_world_size() == WORLD, f"run with torchrun --nproc_per_node {WORLD}"
    yield
    dist.barrier()


@pytest.fixture
def layout():
    """``with layout(tp=2, pp=2) as pc:`` builds megatron's groups for one layout of the 4-rank world."""
    return helpers.layout


@pytest.fixture
def tmp_shared(tmp_path_factory):
    """A directory that is the same on every rank (rank 0 chooses it)."""
    box = [str(tmp_path_factory.mktemp("shared")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
