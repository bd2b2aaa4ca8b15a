"""The float32 tolerance helpers of tests/tolerances.py, on hand-computed cases."""

import numpy as np
import pytest

from tests.tolerances import FLOAT32_EPS, assert_trees_close, summed_atol


def test_summed_atol_is_terms_times_eps_times_the_largest_magnitude():
    assert FLOAT32_EPS == 2.0**-23
    assert summed_atol(np.array([0.5, -2.0, 0.25], np.float32), 4) == 4 * 2.0**-23 * 2.0
    assert summed_atol(np.zeros(3), 64) == 0.0
    with pytest.raises(ValueError, match="num_summed must be >= 1, got 0"):
        summed_atol(np.ones(2), 0)


def test_assert_trees_close_uses_the_leaf_own_scale():
    want = {"big": np.array([4.0, -0.03]), "small": np.array([1e-3])}
    atol_big = 8 * FLOAT32_EPS * 4.0  # 3.8e-6: the cancelled entry -0.03 gets the leaf's scale
    just_inside = {"big": want["big"] + [0.0, 0.9 * atol_big], "small": want["small"]}
    assert_trees_close(just_inside, want, num_summed=8, rtol=0.0)
    just_outside = {"big": want["big"] + [0.0, 1.1 * atol_big], "small": want["small"]}
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_trees_close(just_outside, want, num_summed=8, rtol=0.0)
    # the small leaf's tolerance is its own: 8 eps * 1e-3, far below a fixed 1e-6
    off_small = {"big": want["big"], "small": want["small"] + 5e-7}
    with pytest.raises(AssertionError):
        assert_trees_close(off_small, want, num_summed=8, rtol=0.0)
    with pytest.raises(AssertionError):
        assert_trees_close({"big": want["big"]}, want, num_summed=8)
