"""int8 weights where mutation testing (bench/mutation.py quant) found them unchecked:
Int8Weight.dequantize, which no other test called.

The reference: absmax quantization puts every element of a column within half a step
(scale / 2) of its value, and a column's scale is its largest magnitude / 127, so dequantizing
gives w back within scale / 2, in the scale's float32.
"""

import numpy as np

from minigpt.nn import quant


def test_dequantize_gives_the_weight_back_within_half_a_step_in_float32():
    w = np.random.default_rng(0).normal(0, 0.3, (6, 5)).astype(np.float32)
    q, scale = quant.quantize(w, axis=0)  # one scale per output column
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    back = quant.Int8Weight(q, scale).dequantize()
    assert back.dtype == np.float32 and back.shape == w.shape
    assert np.all(np.abs(back - w) <= scale / 2 * (1 + 1e-6))
