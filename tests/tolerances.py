"""Float32 tolerances that grow with the number of terms a compared value sums.

A float32 sum of n terms can be off by about n * eps times the size of its terms (Higham,
"Accuracy and Stability of Numerical Algorithms", 2nd ed., Sec. 4.2: |error| <= (n - 1) u
sum |x_i|), however small the sum itself is when its terms cancel. Two programs that compute
the same gradient in different orders (dispatch backends, devices, remat, scan, two processes)
therefore agree to about `n * eps * (size of the terms)`, not to a fixed absolute tolerance: a
fixed `atol=1e-6` fails on an entry whose O(1) terms cancel to 0.03, while it is far looser
than float32 rounding for a leaf of size 1e-3.

The size of the terms is not visible after the fact; a leaf's largest magnitude stands in for
it, since the terms of a cancelling entry are as large as those of the leaf's uncancelled ones.
Each caller names what its values sum (a contraction length, a token count) as `num_summed`.
"""

import jax
import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def summed_atol(expected, num_summed: int) -> float:
    """Absolute tolerance for float32 entries of `expected` that each sum `num_summed` terms:
    `num_summed * eps * max|expected|` (0.0 for an all-zero leaf, where rtol alone applies)."""
    if num_summed < 1:
        raise ValueError(f"num_summed must be >= 1, got {num_summed!r}.")
    scale = float(np.max(np.abs(np.asarray(expected, np.float64)), initial=0.0))
    return num_summed * FLOAT32_EPS * scale


def assert_trees_close(actual, expected, *, num_summed: int, rtol: float = 1e-5, err_msg=""):
    """Same tree structure, and every leaf of `actual` equals `expected`'s to `rtol` and
    `summed_atol(leaf, num_summed)`."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(
            np.asarray(got),
            np.asarray(want),
            rtol=rtol,
            atol=summed_atol(want, num_summed),
            err_msg=err_msg,
        )
