"""The suite's tolerance helper: its bound follows the magnitude of the values compared."""

from __future__ import annotations

import pytest
import torch

from tiny import REORDERED, assert_close_ulps


@pytest.mark.parametrize("scale", [1e-2, 1.0, 100.0])
def test_the_bound_is_ulps_of_the_largest_value(scale):
    expected = scale * torch.tensor([1.0, -0.5, 0.25])
    step = torch.finfo(torch.float32).eps * scale  # one ulp of max|expected|
    assert_close_ulps(expected + (REORDERED - 1) * step, expected)
    with pytest.raises(AssertionError):
        assert_close_ulps(expected + (REORDERED + 8) * step, expected)


def test_it_compares_in_the_dtype_of_the_expected_values():
    expected = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert_close_ulps([1.0, 2.0 + 2 * torch.finfo(torch.bfloat16).eps], expected, ulps=2)
    with pytest.raises(AssertionError):
        assert_close_ulps([1.0, 2.5], expected, ulps=2)
