"""Test-suite wiring.

tests/distributed/ holds tests that need a real multi-process world; they run inside one
``torchrun --nproc_per_node 4 -m pytest tests/distributed`` started by tests/test_distributed_suite.py, so a
plain ``pytest`` runs them too but never collects them in a single process.
"""

import os

import torch

torch.set_num_threads(1)

collect_ignore = [] if os.environ.get("MEGATRON_VAR_IN_TORCHRUN") == "1" else ["distributed"]
