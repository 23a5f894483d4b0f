"""Tests for ctu.rl.shaping (DAPO overlong punishment and truncation masking)."""

import chex
import jax
import numpy as np
from absl.testing import absltest, parameterized

from ctu.rl import shaping


def reference_penalty(length, max_length, cache_length):
    if length <= max_length - cache_length:
        return 0.0
    if length <= max_length:
        return (max_length - cache_length - length) / cache_length
    return -1.0


class OverlongTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_piecewise_values(self):
        lengths = np.arange(0, 30)
        fn = self.variant(lambda x: shaping.overlong_penalty(x, max_length=20, cache_length=4))
        expected = [reference_penalty(n, 20, 4) for n in lengths]
        np.testing.assert_allclose(fn(lengths), expected, rtol=1e-6)
        # Boundaries of the three pieces, by hand.
        np.testing.assert_allclose(
            fn(np.array([16, 17, 18, 20, 21])), [0.0, -0.25, -0.5, -1.0, -1.0], rtol=1e-6
        )

    def test_cache_equal_to_max_length(self):
        penalty = shaping.overlong_penalty(np.array([0, 5, 10, 11]), max_length=10, cache_length=10)
        np.testing.assert_allclose(penalty, [0.0, -0.5, -1.0, -1.0])

    @parameterized.parameters(
        dict(max_length=0, cache_length=0),
        dict(max_length=10, cache_length=0),
        dict(max_length=10, cache_length=11),
    )
    def test_invalid_settings(self, **settings):
        with self.assertRaises(ValueError):
            shaping.overlong_penalty(np.array([1]), **settings)

    def test_mask_truncated(self):
        mask = np.array([[0, 1, 1], [0, 1, 0], [0, 1, 1]], np.float32)
        truncated = np.array([False, True, False])
        result = jax.jit(shaping.mask_truncated)(mask, truncated)
        np.testing.assert_array_equal(result, [[0, 1, 1], [0, 0, 0], [0, 1, 1]])
        self.assertEqual(result.dtype, mask.dtype)
        bool_mask = shaping.mask_truncated(mask.astype(bool), truncated)
        self.assertEqual(bool_mask.dtype, bool)


if __name__ == "__main__":
    absltest.main()
