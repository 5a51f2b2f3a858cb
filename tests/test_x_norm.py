"""x_norm is written lazily by the Python layer: it must always read as if forward wrote it."""
import numpy as np
import pytest

import darknet_bn


def darknet_x_norm(x):
    """docs/reference.md §3 in float64: (x - mean) / (sqrt(unbiased var) + 1e-6) per channel."""
    xd = x.astype(np.float64)
    mean = xd.mean(axis=(0, 2, 3), keepdims=True)
    var = xd.var(axis=(0, 2, 3), ddof=1, keepdims=True)
    return (xd - mean) / (np.sqrt(var) + 1e-6)


@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (16, 8, 1, 1), (1, 2, 3, 3)])
@pytest.mark.parametrize("numerics", ["darknet", "standard"])
def test_lazy_x_norm_equals_eager_bit_for_bit(shape, numerics):
    """The x_norm filled on access equals, bit for bit, the x_norm forward writes when it is watched."""
    b, c, h, w = shape
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)
    lazy = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)
    eager = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)
    watched = eager.x_norm  # alive during forward: forward writes x_norm itself
    lazy.forward(x)
    eager.forward(x)
    np.testing.assert_array_equal(lazy.x_norm.view(np.uint32), watched.view(np.uint32))


def test_view_taken_before_forward_follows_every_training_forward():
    """An x_norm array held across forwards shows each training forward's x_norm."""
    rng = np.random.default_rng(12)
    layer = darknet_bn.BatchNormLayer(6, 4, 4, 3)
    held = layer.x_norm
    for step in range(3):
        x = (rng.standard_normal((6, 3, 4, 4)) * (step + 1)).astype(np.float32)
        layer.forward(x)
        np.testing.assert_allclose(held, darknet_x_norm(x), rtol=1e-5, atol=1e-5)


def test_x_norm_read_after_inference_forward_is_last_training_one():
    """Reading x_norm after an inference forward gives the last training forward's x_norm."""
    rng = np.random.default_rng(13)
    layer = darknet_bn.BatchNormLayer(5, 3, 3, 2)
    x = rng.standard_normal((5, 2, 3, 3)).astype(np.float32)
    layer.forward(x)
    layer.forward(rng.standard_normal((5, 2, 3, 3)).astype(np.float32) + 100, train=False)
    np.testing.assert_allclose(layer.x_norm, darknet_x_norm(x), rtol=1e-5, atol=1e-5)
