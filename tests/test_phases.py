"""The public C phases: a batch split in shards, statistics combined between phases, equals the whole batch."""
import numpy as np
import pytest

import darknet_bn
from darknet_bn._lib import ffi, lib
from conftest import assert_close


def _doubles(n):
    return np.zeros(n, np.float64)


def _dptr(a):
    return ffi.cast("double *", ffi.from_buffer(a))


def _fptr(a):
    return ffi.cast("float *", ffi.from_buffer(a))


@pytest.mark.parametrize("numerics", ["darknet", "standard"])
@pytest.mark.parametrize("shape", [(8, 3, 5, 7), (10, 6, 1, 1)])
def test_two_shards_equal_whole_batch(numerics, shape):
    """Forward and backward over two shards with combined moments and sums match one layer over the batch."""
    b, c, h, w = shape
    rng = np.random.default_rng(41)
    x = (rng.standard_normal(shape) * 2 + 30).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    whole = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)
    whole.scales[:] = rng.uniform(0.5, 2, c).astype(np.float32)
    whole.biases[:] = rng.standard_normal(c).astype(np.float32)
    y_whole = whole.forward(x).copy()
    dx_whole = whole.backward(dy).copy()

    cut = 3
    shards = [(0, cut), (cut, b)]
    layers = []
    for lo, hi in shards:
        layer = darknet_bn.BatchNormLayer(hi - lo, w, h, c, numerics=numerics)
        layer.scales[:] = whole.scales
        layer.biases[:] = whole.biases
        layers.append(layer)
    # forward phase 1: local moments; phase 2: combine
    xs = [np.ascontiguousarray(x[lo:hi]) for lo, hi in shards]
    mean, m2 = _doubles(c), _doubles(c)
    mean_b, m2_b = _doubles(c), _doubles(c)
    lib.dnbn_batchnorm_moments(_fptr(xs[0]), cut, c, h * w, _dptr(mean), _dptr(m2))
    lib.dnbn_batchnorm_moments(_fptr(xs[1]), b - cut, c, h * w, _dptr(mean_b), _dptr(m2_b))
    lib.dnbn_batchnorm_moments_combine(c, cut * h * w, _dptr(mean), _dptr(m2), (b - cut) * h * w, _dptr(mean_b), _dptr(m2_b))
    # phase 3: each shard's elementwise pass with the global statistics
    for layer, xi in zip(layers, xs):
        assert lib.dnbn_batchnorm_layer_forward_moments(layer._layer, _fptr(xi), b * h * w, _dptr(mean), _dptr(m2)) == 0
    assert_close(np.concatenate([layers[0].output, layers[1].output]), y_whole, what="sharded output")
    for layer in layers:
        assert_close(layer.rolling_mean, whole.rolling_mean, what="rolling_mean")
        assert_close(layer.rolling_variance, whole.rolling_variance, what="rolling_variance")

    # backward: local sums, added, then each shard's apply
    dys = [np.ascontiguousarray(dy[lo:hi]) for lo, hi in shards]
    total_s, total_sd = _doubles(c), _doubles(c)
    for layer, d in zip(layers, dys):
        s, sd = _doubles(c), _doubles(c)
        assert lib.dnbn_batchnorm_layer_backward_sums(layer._layer, _fptr(d), _dptr(s), _dptr(sd)) == 0
        total_s += s
        total_sd += sd
    for layer, d in zip(layers, dys):
        assert lib.dnbn_batchnorm_layer_backward_apply(layer._layer, _fptr(d), b * h * w, _dptr(total_s), _dptr(total_sd)) == 0
    assert_close(np.concatenate([layers[0].delta, layers[1].delta]), dx_whole, what="sharded input delta")
    for layer in layers:
        assert_close(layer.bias_updates, whole.bias_updates, what="bias_updates")
        assert_close(layer.scale_updates, whole.scale_updates, what="scale_updates")


def test_phases_check_their_arguments():
    """The phase entry points reject a count below what they need and backward before forward."""
    layer = darknet_bn.BatchNormLayer(2, 2, 2, 2)
    x = np.ones((2, 2, 2, 2), np.float32)
    mean, m2 = _doubles(2), _doubles(2)
    assert lib.dnbn_batchnorm_layer_forward_moments(layer._layer, _fptr(x), 1.0, _dptr(mean), _dptr(m2)) == 1
    assert lib.dnbn_batchnorm_layer_backward_sums(layer._layer, _fptr(x), _dptr(mean), _dptr(m2)) == 3
    assert lib.dnbn_batchnorm_layer_backward_apply(layer._layer, _fptr(x), 8.0, _dptr(mean), _dptr(m2)) == 3
