"""Flat [s, b]-order loss positions and their scatter back to [b, s] (models.selected_logits), by hand."""

import torch

from megatron_var.models.selected_logits import loss_positions, scatter_positions


def test_positions_are_flat_s_major_and_scatter_back():
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.float)  # [b=2, s=3]
    pos = loss_positions(mask)
    assert pos.tolist() == [1, 2, 4]  # (s=0,b=1), (s=1,b=0), (s=2,b=0) in s*b + b order
    back = scatter_positions(torch.tensor([[10.0, 20.0, 30.0]]), pos, b=2, s=3)
    assert back.tolist() == [[0.0, 20.0, 30.0], [10.0, 0.0, 0.0]]
    assert loss_positions(torch.ones(2, 3)) is None
    assert loss_positions(torch.zeros(2, 3)).tolist() == [0]
