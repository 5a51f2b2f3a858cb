"""Folding a batch-norm layer into the preceding convolution / fully connected layer.

conv-then-fold must equal conv-then-batch-norm in inference, in both numerics,
within docs/reference.md §6 (1e-5 relative + 1e-5 absolute) of float64 oracles:

- darknet: y = (z - rm) / (sqrt(rv) + 1e-6) * gamma + beta  (epsilon outside the root)
- standard: y = (z - rm) / sqrt(rv + eps) * gamma + beta
"""
import numpy as np
import pytest

import darknet_bn
from conftest import activations, assert_close, assert_unchanged, snapshot
from darknet_bn.errors import ArgumentError, ArgumentTypeError
from darknet_bn.fold import fold_batchnorm, inference_scale


def conv2d(x, w, b=None):
    """Valid, stride-1 cross-correlation in float64 (Darknet's convolution): x (n, ci, H, W), w (co, ci, kh, kw)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    kh, kw = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # n, ci, oh, ow, kh, kw
    z = np.einsum("nchwij,ocij->nohw", windows, w)
    return z if b is None else z + np.asarray(b, np.float64)[None, :, None, None]


def bn_inference_oracle(z, layer, eps=None):
    """The batch-norm inference formula of the layer's numerics, in float64, channels on axis 1."""
    shape = (1, -1) + (1,) * (z.ndim - 2)
    g = np.float64(layer.scales).reshape(shape)
    beta = np.float64(layer.biases).reshape(shape)
    rm = np.float64(layer.rolling_mean).reshape(shape)
    rv = np.float64(layer.rolling_variance).reshape(shape)
    if layer.numerics == "darknet":
        return (z - rm) / (np.sqrt(rv) + 1e-6) * g + beta
    return (z - rm) / np.sqrt(rv + np.float64(np.float32(layer.eps))) * g + beta


def trained_layer(rng, batch, w, h, c, numerics, steps=30, **kw):
    """A layer whose scales, biases and running statistics are not the initial ones."""
    layer = darknet_bn.BatchNormLayer(batch, w, h, c, numerics=numerics, momentum=0.2, **kw)
    for _ in range(steps):
        layer.forward(activations(rng, (batch, c, h, w), offset_std=2.0))
    layer.scales = rng.uniform(0.5, 2.0, c).astype(np.float32) * rng.choice([-1, 1], c).astype(np.float32)
    layer.biases = rng.standard_normal(c).astype(np.float32)
    return layer


NUMERICS = [("darknet", {}), ("standard", {}), ("standard", {"eps": 1e-3})]
IDS = ["darknet", "standard", "standard-eps1e-3"]


@pytest.mark.parametrize("numerics,kw", NUMERICS, ids=IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_conv_then_fold_equals_conv_then_batchnorm(rng, numerics, kw, with_bias):
    n, ci, co, hw, k = 3, 4, 6, 7, 3
    oh = hw - k + 1
    layer = trained_layer(rng, n, oh, oh, co, numerics, **kw)
    x = rng.standard_normal((n, ci, hw, hw)).astype(np.float32)
    w = (rng.standard_normal((co, ci, k, k)) / np.sqrt(ci * k * k)).astype(np.float32)
    b = rng.standard_normal(co).astype(np.float32) if with_bias else None

    z64 = conv2d(x, w, b)
    oracle = bn_inference_oracle(z64, layer)
    # conv then batch norm, as a network runs them (the convolution's output is float32)
    y = layer.forward(z64.astype(np.float32), train=False)
    assert_close(y, bn_inference_oracle(np.float32(z64).astype(np.float64), layer), what="unfolded inference")
    # the folded convolution alone
    w2, b2 = layer.fold_into(w, b)
    assert w2.dtype == np.float32 and b2.dtype == np.float32
    assert w2.shape == w.shape and b2.shape == (co,)
    assert_close(conv2d(x, w2, b2), oracle, what=f"folded conv ({numerics})")
    assert_close(conv2d(x, w2, b2), np.float64(y), rtol=2e-5, atol=2e-5, what="folded vs unfolded")


@pytest.mark.parametrize("numerics,kw", NUMERICS, ids=IDS)
def test_fully_connected_then_fold(rng, numerics, kw):
    batch, n_in, c = 16, 10, 8
    layer = trained_layer(rng, batch, 1, 1, c, numerics, **kw)
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    w = (rng.standard_normal((c, n_in)) / np.sqrt(n_in)).astype(np.float32)  # Darknet: outputs x inputs
    b = rng.standard_normal(c).astype(np.float32)
    z64 = x.astype(np.float64) @ w.astype(np.float64).T + b
    y = layer.forward(z64.astype(np.float32), train=False)  # the (batch, c*h*w) form
    w2, b2 = layer.fold_into(w, b)
    folded = x.astype(np.float64) @ w2.astype(np.float64).T + b2
    assert_close(folded, bn_inference_oracle(z64, layer), what=f"folded FC ({numerics})")
    assert_close(folded, np.float64(y), rtol=2e-5, atol=2e-5, what="folded vs unfolded FC")


@pytest.mark.parametrize("numerics", ["darknet", "standard"])
def test_fold_is_the_formula_rounded_once(rng, numerics):
    c = 5
    layer = trained_layer(rng, 4, 2, 2, c, numerics)
    w = rng.standard_normal((c, 3, 2)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    g, beta = np.float64(layer.scales), np.float64(layer.biases)
    rm, rv = np.float64(layer.rolling_mean), np.float64(layer.rolling_variance)
    # s = gamma * normalizer, the normalizer as inference computes it (docs/reference.md §3)
    s = g * (1 / (np.sqrt(rv) + 1e-6) if numerics == "darknet" else 1 / np.sqrt(rv + np.float64(np.float32(1e-5))))
    w2, b2 = layer.fold_into(w, b)
    assert np.array_equal(w2, (np.float64(w) * s[:, None, None]).astype(np.float32))
    assert np.array_equal(b2, ((np.float64(b) - rm) * s + beta).astype(np.float32))
    assert np.array_equal(inference_scale(layer.scales, layer.rolling_variance, numerics, float(np.float32(layer.eps))), s)


def test_no_bias_is_zero_bias_and_inputs_are_untouched(rng):
    c = 4
    layer = trained_layer(rng, 4, 2, 2, c, "darknet")
    before = snapshot(layer)
    w = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    w_copy = w.copy()
    b = np.zeros(c, np.float32)
    w_none, b_none = layer.fold_into(w)
    w_zero, b_zero = layer.fold_into(w, b)
    assert np.array_equal(w_none, w_zero) and np.array_equal(b_none, b_zero)
    assert np.array_equal(w, w_copy) and not b.any()
    assert_unchanged(layer, before)
    for out in (w_none, b_none):
        assert not np.shares_memory(out, w) and not np.shares_memory(out, layer.scales)
        assert out.flags.c_contiguous and out.flags.writeable


def test_fold_of_a_fresh_standard_layer_is_nearly_identity(rng):
    """Initial standard state: gamma 1, beta 0, running mean 0, running var 1 -> s = 1/sqrt(1 + eps)."""
    layer = darknet_bn.BatchNormLayer(2, 1, 1, 3, numerics="standard")
    w = rng.standard_normal((3, 4)).astype(np.float32)
    w2, b2 = layer.fold_into(w)
    assert np.allclose(w2, w / np.sqrt(1 + 1e-5), rtol=1e-7)
    assert not b2.any()


def test_weights_of_other_dtypes_and_shapes(rng):
    c = 3
    layer = trained_layer(rng, 4, 2, 2, c, "standard")
    w32 = rng.standard_normal((c, 2)).astype(np.float32)
    ref = layer.fold_into(w32)
    for w in (w32.astype(np.float64), w32.tolist(), np.asfortranarray(w32)):
        got = layer.fold_into(w)
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    w_int = np.arange(c * 2, dtype=np.int32).reshape(c, 2)
    assert layer.fold_into(w_int)[0].dtype == np.float32
    w1, _ = layer.fold_into(np.ones(c, np.float32))  # shape (c,): a per-channel scale
    assert w1.shape == (c,)
    w5, _ = layer.fold_into(np.ones((c, 1, 2, 1, 2), np.float32))
    assert w5.shape == (c, 1, 2, 1, 2)


def test_weights_loaded_from_a_darknet_block_fold_the_same(rng, tmp_path):
    """The usual route: a convolutional layer's batch-norm block from a weights file, then fold."""
    c = 4
    src = trained_layer(rng, 4, 2, 2, c, "darknet")
    path = tmp_path / "conv.weights"
    with open(path, "wb") as f:
        src.save_weights(f, "convolutional")
    dst = darknet_bn.BatchNormLayer(1, 1, 1, c)
    with open(path, "rb") as f:
        dst.load_weights(f, "convolutional")
    w = rng.standard_normal((c, 2, 3, 3)).astype(np.float32)
    a, b = src.fold_into(w), dst.fold_into(w)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("weights,match", [
    (np.zeros((5, 3), np.float32), r"weights must have the layer's 4 channels .*got \(5, 3\)"),
    (np.zeros((3, 4), np.float32), r"got \(3, 4\)"),
    (np.float32(1.0), r"got \(\)"),
    (np.zeros((0,), np.float32), r"got \(0,\)"),
])
def test_weights_shape_errors(rng, weights, match):
    layer = trained_layer(rng, 4, 2, 2, 4, "darknet", steps=2)
    before = snapshot(layer)
    with pytest.raises(ArgumentError, match=match):
        layer.fold_into(weights)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("biases", [np.zeros(3, np.float32), np.zeros((4, 1), np.float32), np.zeros((), np.float32)])
def test_biases_shape_errors(rng, biases):
    layer = trained_layer(rng, 4, 2, 2, 4, "darknet", steps=2)
    with pytest.raises(ArgumentError, match=r"biases must have shape \(4,\)"):
        layer.fold_into(np.zeros((4, 2), np.float32), biases)


@pytest.mark.parametrize("bad", [None, "weights", np.zeros((4, 2), bool), np.zeros((4, 2), complex),
                                 np.array([object()] * 4)])
def test_type_errors(rng, bad):
    layer = trained_layer(rng, 4, 2, 2, 4, "darknet", steps=2)
    with pytest.raises(TypeError) as info:
        layer.fold_into(bad)
    assert isinstance(info.value, ArgumentTypeError) and "weights" in str(info.value)
    if bad is not None:
        with pytest.raises(ArgumentTypeError, match="biases"):
            layer.fold_into(np.zeros((4, 2), np.float32), bad if np.ndim(bad) == 0 else np.zeros(4, bool))


def test_fold_batchnorm_function_directly():
    w, b = fold_batchnorm(np.ones((2, 3)), np.array([1.0, 2.0]), scales=np.array([2.0, 1.0]),
                          bn_biases=np.array([0.5, 0.0]), rolling_mean=np.array([1.0, 0.0]),
                          rolling_variance=np.array([4.0, 1.0]), numerics="standard", eps=0.0)
    assert np.array_equal(w, np.float32([[1, 1, 1], [1, 1, 1]]))
    assert np.array_equal(b, np.float32([0.5, 2.0]))
    with pytest.raises(ArgumentError, match="numerics"):
        fold_batchnorm(np.ones((1, 1)), None, scales=np.ones(1), bn_biases=np.zeros(1), rolling_mean=np.zeros(1),
                       rolling_variance=np.ones(1), numerics="torch")


@pytest.mark.parametrize("numerics", ["darknet", "standard"])
def test_small_running_variances_follow_the_numerics_epsilon(rng, numerics):
    """Where the epsilon matters (variance near 0), folding follows the layer's own formula."""
    batch, n_in, c = 8, 5, 6
    layer = darknet_bn.BatchNormLayer(batch, 1, 1, c, numerics=numerics)
    layer.rolling_variance = np.float32([0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4])
    layer.rolling_mean = rng.standard_normal(c).astype(np.float32)
    layer.scales = rng.uniform(0.5, 1.5, c).astype(np.float32)
    layer.biases = rng.standard_normal(c).astype(np.float32)
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    w = rng.standard_normal((c, n_in)).astype(np.float32)
    z64 = x.astype(np.float64) @ w.astype(np.float64).T
    y = layer.forward(z64.astype(np.float32), train=False)
    w2, b2 = layer.fold_into(w)
    folded = x.astype(np.float64) @ w2.astype(np.float64).T + b2
    oracle = bn_inference_oracle(z64, layer)
    assert_close(folded, oracle, what=f"folded ({numerics}, tiny variances)")
    assert_close(y, bn_inference_oracle(np.float32(z64).astype(np.float64), layer), what="layer inference")


@pytest.mark.parametrize("numerics", ["darknet", "standard"])
def test_normalizer_is_the_layers_inference_normalizer(rng, numerics):
    """fold.normalizer (the C library's formula) against float64 written here, and against inference itself."""
    from darknet_bn.fold import normalizer
    var = np.concatenate([np.abs(rng.standard_normal(13)) * 10.0 ** rng.integers(-12, 4, 13), [0.0, 1e-30]])
    eps = 1e-3
    want = 1 / (np.sqrt(var) + 1e-6) if numerics == "darknet" else 1 / np.sqrt(var + eps)
    got = normalizer(var, numerics, eps)
    assert np.allclose(got, want, rtol=1e-15, atol=0)
    # inference of a layer whose running statistics are set: y = (x - rm) * inv * gamma + beta, in float32
    layer = darknet_bn.BatchNormLayer(1, 1, 1, 3, numerics=numerics, eps=1.0 if numerics == "standard" else 1e-5)
    layer.rolling_variance[:] = [4.0, 0.25, 9.0]
    x = np.array([[3.0, -1.0, 2.0]], np.float32).reshape(1, 3, 1, 1)
    inv = normalizer(layer.rolling_variance, numerics, float(np.float32(layer.eps)))
    assert np.array_equal(layer.forward(x, train=False).ravel(), (x.ravel() * inv.astype(np.float32)).astype(np.float32))
    with pytest.raises(ArgumentError, match="eps"):
        normalizer(var, "standard", -1.0)
    with pytest.raises(ArgumentError, match="numerics"):
        normalizer(var, "alexeyab")


ONES3 = np.ones(3)


@pytest.mark.parametrize("call,error,match", [
    (lambda: darknet_bn.fold.normalizer(ONES3, "standard", eps="x"), ArgumentTypeError, "eps must be a real number"),
    (lambda: darknet_bn.fold.normalizer(ONES3, "standard", eps=True), ArgumentTypeError, "eps must be a real number"),
    (lambda: darknet_bn.fold.normalizer(ONES3, ["darknet"]), ArgumentTypeError, "numerics must be a str"),
    (lambda: fold_batchnorm(np.ones((3, 2)), None, scales=3.0, bn_biases=ONES3, rolling_mean=ONES3,
                            rolling_variance=ONES3), ArgumentError, r"scales must have shape \(c,\)"),
    (lambda: fold_batchnorm(np.ones((3, 2)), None, scales=ONES3, bn_biases=np.ones(2), rolling_mean=ONES3,
                            rolling_variance=ONES3), ArgumentError, r"bn_biases must have shape \(3,\)"),
    (lambda: fold_batchnorm(np.ones((3, 2)), None, scales=ONES3, bn_biases=ONES3, rolling_mean=["a"] * 3,
                            rolling_variance=ONES3), ArgumentTypeError, "rolling_mean must be an array of real"),
    (lambda: fold_batchnorm(np.ones((3, 2)), None, scales=ONES3, bn_biases=ONES3, rolling_mean=ONES3,
                            rolling_variance=np.ones((3, 1))), ArgumentError, r"rolling_variance must have shape"),
    (lambda: inference_scale(ONES3, np.ones(4)), ArgumentError, r"rolling_variance must have shape \(3,\)"),
], ids=["eps_str", "eps_bool", "numerics_list", "scales_scalar", "bn_biases_length", "rolling_mean_strings",
        "rolling_variance_2d", "inference_scale_lengths"])
def test_every_argument_is_checked_by_name(call, error, match):
    """Each argument of the fold functions gets an exception naming it, not a NumPy or Python one."""
    with pytest.raises(error, match=match):
        call()
