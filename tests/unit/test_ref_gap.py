"""The ``ref_policy_logp_gap`` metric and its step-1 warning (training/ref_gap.py) against values worked by hand."""

import logging

import pytest
import torch

from megatron_var.objectives import ref_gap


def test_gap_is_the_largest_relative_difference():
    ref_bb = torch.tensor([[[-10.0, -3.0], [-7.0, -4.0]]])  # diagonal -10, -4
    assert ref_gap.logp_gap(torch.diagonal(ref_bb, dim1=1, dim2=2), torch.tensor([-10.0, -4.0])).item() == 0.0
    got = ref_gap.logp_gap(torch.tensor([-10.0, -4.0]), torch.tensor([-10.5, -4.0])).item()
    assert got == pytest.approx(0.5 / 10.5, rel=1e-12)
    assert ref_gap.logp_gap(torch.zeros(2), torch.zeros(2)).item() == 0.0
    with pytest.raises(ValueError):
        ref_gap.logp_gap(torch.zeros(2), torch.zeros(3))


def test_pop_global_gap_without_a_world():
    reports = [{ref_gap.KEY: torch.tensor(2e-7), "loss_sum": 1.0}, {ref_gap.KEY: torch.tensor(5e-7)}, {}]
    assert ref_gap.pop_global_gap(reports) == pytest.approx(5e-7)
    assert all(ref_gap.KEY not in r for r in reports)
    assert ref_gap.pop_global_gap([{}]) is None


def test_step1_warning_fires_only_above_the_dtype_bound(caplog):
    with caplog.at_level(logging.WARNING):
        assert ref_gap.check_identity(1e-6, torch.float32)
        assert ref_gap.check_identity(1e-2, torch.bfloat16)
        assert not caplog.records
        assert not ref_gap.check_identity(1e-3, torch.float32)  # negative control
    assert "does NOT score what the policy computes" in caplog.text
