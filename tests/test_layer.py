"""BatchNormLayer with Darknet numerics (docs/reference.md §3, §8) against the float64 oracle."""

import threading

import numpy as np
import pytest

import darknet_bn
import oracle
from conftest import (ACT_BUFFERS, ALL_BUFFERS, CHAN_BUFFERS, activations, assert_close,
                      assert_ulps, assert_unchanged, f32, snapshot)

# (batch, c, h, w); h != w where possible so that a swap of w and h shows.
LAYER_SHAPES = [
    (4, 3, 5, 7),
    (1, 3, 5, 7),      # batch 1, spatial >= 2
    (8, 6, 1, 1),      # fully connected: spatial 1
    (3, 1, 4, 9),      # one channel
    (7, 13, 11, 3),    # primes
    (2, 32, 52, 52),   # docs/reference.md §7-like
    (2, 1, 52, 52),    # one channel, many values: threads split inside the channel
]
SHAPE_IDS = ["x".join(map(str, s)) for s in LAYER_SHAPES]


def make_pair(shape, rng=None, numerics="darknet", **kw):
    """A layer and its oracle twin with the same (random, if rng) scales and biases."""
    b, c, h, w = shape
    layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics, **kw)
    st = oracle.LayerState(b, w, h, c, numerics=numerics, eps=kw.get("eps"), momentum=kw.get("momentum"))
    if rng is not None:
        scales = f32(1.0 + 0.25 * rng.standard_normal(c))
        biases = f32(rng.standard_normal(c))
        layer.scales, layer.biases = scales, biases
        st.scales, st.biases = scales.astype(np.float64), biases.astype(np.float64)
    return layer, st


def check_forward(layer, st, train):
    """Forward-pass buffers against the oracle."""
    assert_close(layer.output, st.output, what="output")
    if train:
        assert np.array_equal(layer.x, f32(st.x)), "x is not a copy of the input"
        assert_close(layer.x_norm, st.x_norm, what="x_norm")
        assert_ulps(layer.mean, st.mean, what="mean")
        assert_ulps(layer.variance, st.variance, what="variance")
    assert_close(layer.rolling_mean, st.rolling_mean, what="rolling_mean")
    assert_close(layer.rolling_variance, st.rolling_variance, what="rolling_variance")


def check_backward(layer, st, ret, darknet=True):
    """Backward-pass buffers against the oracle."""
    assert_close(ret, st.delta.reshape(ret.shape), what="returned delta")
    assert_close(layer.delta, st.delta, what="layer.delta")
    assert_close(layer.bias_updates, st.bias_updates, what="bias_updates")
    assert_close(layer.scale_updates, st.scale_updates, what="scale_updates")
    if darknet:
        assert_close(layer.mean_delta, st.mean_delta, what="mean_delta")
        assert_close(layer.variance_delta, st.variance_delta, what="variance_delta")


def check_params(layer, st):
    for name in ("scales", "biases", "scale_updates", "bias_updates"):
        assert_close(getattr(layer, name), getattr(st, name), what=name)


def run_steps(layer, st, rng, shape, steps=3, offset_std=3.0, lr=0.1, momentum=0.9, decay=5e-4,
              darknet=True):
    """Several training steps (forward, random delta, backward, update) compared after each phase."""
    for _ in range(steps):
        x = activations(rng, shape, offset_std=offset_std)
        ret = layer.forward(x, train=True)
        st.forward(x, train=True)
        assert ret.shape == x.shape
        check_forward(layer, st, train=True)
        delta = f32(rng.standard_normal(shape))
        ret = layer.backward(delta)
        st.backward(delta)
        assert ret.shape == delta.shape
        check_backward(layer, st, ret, darknet=darknet)
        layer.update(lr, momentum, decay)
        st.update(lr, momentum, decay)
        check_params(layer, st)


# --------------------------------------------------------------------------- state and attributes

def test_initial_state():
    """A new layer: scales 1, biases 0, rolling stats 0, every update/delta 0, float32 buffers."""
    b, c, h, w = 2, 3, 4, 5
    layer = darknet_bn.BatchNormLayer(b, w, h, c)
    assert (layer.batch, layer.w, layer.h, layer.c) == (b, w, h, c)
    assert layer.outputs == c * h * w
    assert layer.numerics == "darknet"
    assert layer.eps == pytest.approx(1e-5)
    assert layer.momentum == pytest.approx(0.01)
    for name in ACT_BUFFERS:
        a = getattr(layer, name)
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (b, c, h, w), name
        assert a.flags.c_contiguous and a.flags.writeable, name
    for name in CHAN_BUFFERS:
        a = getattr(layer, name)
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (c,), name
        assert a.flags.writeable, name
    assert np.all(layer.scales == 1)
    for name in ("biases", "rolling_mean", "rolling_variance", "scale_updates", "bias_updates",
                 "mean_delta", "variance_delta"):
        assert np.all(getattr(layer, name) == 0), name
    assert np.all(layer.delta == 0)


def test_default_momentum_by_numerics():
    """momentum=None means 0.01 for darknet numerics and 0.1 for standard; explicit values are kept."""
    assert darknet_bn.BatchNormLayer(2, 2, 2, 2).momentum == pytest.approx(0.01)
    assert darknet_bn.BatchNormLayer(2, 2, 2, 2, numerics="standard").momentum == pytest.approx(0.1)
    assert darknet_bn.BatchNormLayer(2, 2, 2, 2, momentum=0.2).momentum == pytest.approx(0.2)
    std = darknet_bn.BatchNormLayer(2, 2, 2, 2, numerics="standard", eps=1e-3, momentum=0.3)
    assert (std.numerics, std.eps, std.momentum) == ("standard", pytest.approx(1e-3), pytest.approx(0.3))


# --------------------------------------------------------------------------- training against the oracle

@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=SHAPE_IDS)
def test_training_steps_then_inference(threads, rng, shape):
    """Three training steps then inference: every buffer matches the oracle carried alongside."""
    layer, st = make_pair(shape, rng)
    run_steps(layer, st, rng, shape, steps=3)
    before = snapshot(layer)
    x = activations(rng, shape)
    ret = layer.forward(x, train=False)
    st.forward(x, train=False)
    assert np.shares_memory(ret, layer.output)
    assert_close(ret, st.output, what="inference output")
    # Inference writes only the output.
    del before["output"]
    assert_unchanged(layer, before)


def test_training_step_by_step_order(rng):
    """One training step, checked buffer by buffer against docs/reference.md §3's order of effect."""
    b, c, h, w = 3, 2, 3, 4
    layer, st = make_pair((b, c, h, w), rng)
    layer.rolling_mean = f32([0.5, -1.0])
    layer.rolling_variance = f32([2.0, 0.25])
    x = activations(rng, (b, c, h, w))
    layer.forward(x)
    xd = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
    mean = xd.mean(axis=1)
    var = xd.var(axis=1, ddof=1)                      # unbiased (Darknet quirk)
    assert_ulps(layer.mean, mean, what="mean")
    assert_ulps(layer.variance, var, what="variance")
    assert_close(layer.rolling_mean, 0.99 * np.array([0.5, -1.0]) + 0.01 * mean, what="rolling_mean")
    assert_close(layer.rolling_variance, 0.99 * np.array([2.0, 0.25]) + 0.01 * var,
                 what="rolling_variance")
    xn = (x - mean[None, :, None, None]) / (np.sqrt(var)[None, :, None, None] + 1e-6)
    assert_close(layer.x_norm, xn, what="x_norm")
    y = xn * f32(layer.scales).astype(np.float64)[None, :, None, None] \
        + f32(layer.biases).astype(np.float64)[None, :, None, None]
    assert_close(layer.output, y, what="output")


@pytest.mark.parametrize("offset_std", [30.0, 100.0])
def test_training_with_large_offsets(threads, rng, offset_std):
    """Inputs whose channel means sit up to 100 std from zero still meet docs/reference.md §6."""
    shape = (4, 5, 6, 7)
    layer, st = make_pair(shape, rng)
    run_steps(layer, st, rng, shape, steps=2, offset_std=offset_std)


def test_mean_variance_offset_1e4_std(rng):
    """Layer mean/variance are within 4 ulps of exact with channel means 1e4 std from zero."""
    b, c, h, w = 4, 3, 26, 26
    std = np.array([1.0, 0.5, 3.0])
    x = f32(1e4 * std[None, :, None, None] * np.array([1, -1, 1])[None, :, None, None]
            + std[None, :, None, None] * rng.standard_normal((b, c, h, w)))
    layer = darknet_bn.BatchNormLayer(b, w, h, c)
    layer.forward(x)
    xd = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
    assert_ulps(layer.mean, xd.mean(axis=1), what="mean")
    assert_ulps(layer.variance, xd.var(axis=1, ddof=1), what="variance")


def test_non_default_momentum(rng):
    """Darknet numerics with momentum 0.05: rolling = 0.95 rolling + 0.05 batch statistic."""
    shape = (3, 4, 5, 2)
    layer, st = make_pair(shape, rng, momentum=0.05)
    run_steps(layer, st, rng, shape, steps=3)
    assert st.momentum == 0.05


def test_flat_input_form(rng):
    """forward/backward take (batch, c*h*w) arrays and return that shape, same values as 4-D."""
    b, c, h, w = 3, 4, 2, 5
    layer4, st = make_pair((b, c, h, w), rng)
    layer2 = darknet_bn.BatchNormLayer(b, w, h, c)
    layer2.scales, layer2.biases = layer4.scales.copy(), layer4.biases.copy()
    x = activations(rng, (b, c, h, w))
    delta = f32(rng.standard_normal((b, c, h, w)))
    y4 = layer4.forward(x)
    y2 = layer2.forward(x.reshape(b, c * h * w))
    st.forward(x)
    assert y2.shape == (b, c * h * w)
    assert np.shares_memory(y2, layer2.output)
    assert_close(y2, st.output.reshape(b, -1), what="output (flat)")
    assert np.array_equal(y2.reshape(y4.shape), y4)
    d4 = layer4.backward(delta)
    d2 = layer2.backward(delta.reshape(b, c * h * w))
    st.backward(delta)
    assert d2.shape == (b, c * h * w)
    assert np.shares_memory(d2, layer2.delta)
    assert_close(d2, st.delta.reshape(b, -1), what="delta (flat)")
    assert np.array_equal(d2.reshape(d4.shape), d4)
    assert layer2.output.shape == (b, c, h, w)


def test_non_contiguous_input_and_delta(rng):
    """Non-contiguous (strided, Fortran-ordered) inputs are accepted and read correctly."""
    b, c, h, w = 3, 4, 5, 6
    layer, st = make_pair((b, c, h, w), rng)
    big = activations(rng, (b, c, h, 2 * w))
    x = big[..., ::2]
    assert not x.flags.c_contiguous
    layer.forward(x)
    st.forward(x)
    assert_close(layer.output, st.output, what="output")
    delta = np.asfortranarray(f32(rng.standard_normal((b, c, h, w))))
    assert not delta.flags.c_contiguous
    ret = layer.backward(delta)
    st.backward(delta)
    assert_close(ret, st.delta, what="delta")


def test_backward_accumulates_updates(rng):
    """Two backward passes after one forward add both deltas' sums into the update buffers."""
    shape = (2, 3, 4, 5)
    layer, st = make_pair(shape, rng)
    x = activations(rng, shape)
    layer.forward(x)
    st.forward(x)
    for _ in range(2):
        d = f32(rng.standard_normal(shape))
        ret = layer.backward(d)
        st.backward(d)
        check_backward(layer, st, ret)


def test_backward_with_layer_delta_itself(rng):
    """backward(layer.delta) works in place, like a Darknet network writing into l->delta."""
    shape = (3, 2, 4, 3)
    layer, st = make_pair(shape, rng)
    x = activations(rng, shape)
    layer.forward(x)
    st.forward(x)
    d = f32(rng.standard_normal(shape))
    layer.delta[...] = d
    ret = layer.backward(layer.delta)
    st.backward(d)
    check_backward(layer, st, ret)
    assert np.shares_memory(ret, layer.delta)


def test_forward_on_its_own_output(rng):
    """forward(layer.output) reads the old output as input (the header allows input == output)."""
    shape = (2, 3, 3, 4)
    layer, st = make_pair(shape, rng)
    x = activations(rng, shape)
    layer.forward(x)
    st.forward(x)
    st.forward(layer.output.copy())
    layer.forward(layer.output)
    check_forward(layer, st, train=True)


@pytest.mark.parametrize("flat", [False, True], ids=["4d", "2d"])
@pytest.mark.parametrize("numerics", ["darknet", "standard"])
def test_input_in_layer_x(rng, numerics, flat):
    """forward(layer.x) (the zero-copy call): the input is read where it is and
    kept as is; training steps, backward and inference match the oracle."""
    shape = (3, 5, 6, 7)
    layer, st = make_pair(shape, rng, numerics=numerics)
    for _ in range(3):
        x, d = activations(rng, shape), f32(rng.standard_normal(shape))
        view = layer.x.reshape(shape[0], -1) if flat else layer.x
        view[...] = x.reshape(view.shape)
        layer.forward(view)
        st.forward(x)
        check_forward(layer, st, train=True)
        assert np.array_equal(layer.x, x), "x changed"
        ret = layer.backward(d)
        st.backward(d)
        check_backward(layer, st, ret, darknet=numerics == "darknet")
    layer.forward(layer.x, train=False)
    st.forward(x, train=False)
    check_forward(layer, st, train=False)


def test_inference_on_a_fresh_layer(rng):
    """Inference before any training uses rolling mean 0 and variance 0: (x - 0)/(0 + 1e-6)."""
    shape = (2, 3, 2, 2)
    layer, st = make_pair(shape, rng)
    x = f32(rng.uniform(-1e-3, 1e-3, shape))
    layer.forward(x, train=False)
    st.forward(x, train=False)
    assert_close(layer.output, st.output, what="output")


def test_two_layers_in_two_threads(rng):
    """Layers are reentrant: two layers trained at once from two Python threads match the oracle."""
    shapes = [(4, 8, 16, 16), (3, 5, 20, 12)]
    pairs = [make_pair(s, rng) for s in shapes]
    data = [[(activations(rng, s), f32(rng.standard_normal(s))) for _ in range(3)] for s in shapes]
    errors = []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            layer = pairs[i][0]
            barrier.wait()
            for _ in range(20):
                for x, d in data[i]:
                    layer.update(0.0, momentum=0.0)  # zero the update buffers: no float32 drift
                    layer.forward(x)
                    layer.backward(d)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not errors, errors
    for (layer, st), steps in zip(pairs, data):
        for _ in range(20):
            for x, d in steps:
                st.update(0.0, momentum=0.0)
                st.forward(x)
                st.backward(d)
        check_forward(layer, st, train=True)
        check_backward(layer, st, layer.delta)


# --------------------------------------------------------------------------- update

def test_update_rule_and_decay_ignored(rng):
    """update: biases += lr/batch*bias_updates, updates *= momentum; decay has no effect."""
    b, c, h, w = 4, 3, 2, 2
    layer = darknet_bn.BatchNormLayer(b, w, h, c)
    sc, bi = f32(rng.uniform(0.5, 2, c)), f32(rng.normal(size=c))
    su, bu = f32(rng.normal(size=c) * 10), f32(rng.normal(size=c) * 10)
    layer.scales, layer.biases, layer.scale_updates, layer.bias_updates = sc, bi, su, bu
    before = snapshot(layer)
    layer.update(0.5, momentum=0.25, decay=0.1)
    d = lambda a: a.astype(np.float64)  # noqa: E731
    assert_close(layer.biases, d(bi) + 0.5 / b * d(bu), what="biases")
    assert_close(layer.scales, d(sc) + 0.5 / b * d(su), what="scales")
    assert_close(layer.bias_updates, 0.25 * d(bu), what="bias_updates")
    assert_close(layer.scale_updates, 0.25 * d(su), what="scale_updates")
    for name in ("biases", "scales", "bias_updates", "scale_updates"):
        del before[name]
    assert_unchanged(layer, before)
    # Default momentum is 0.9.
    layer.update(0.0)
    assert_close(layer.bias_updates, 0.9 * 0.25 * d(bu), what="bias_updates (default momentum)")


# --------------------------------------------------------------------------- zero-copy views

def test_views_share_memory_and_forward_returns_output(rng):
    """Attribute arrays are views of one C buffer; forward/backward return views of output/delta."""
    shape = (2, 3, 4, 5)
    b, c, h, w = shape
    layer = darknet_bn.BatchNormLayer(b, w, h, c)
    for name in ALL_BUFFERS:
        assert np.shares_memory(getattr(layer, name), getattr(layer, name)), name
    x = activations(rng, shape)
    y = layer.forward(x)
    assert np.shares_memory(y, layer.output)
    assert not np.shares_memory(y, x)
    out_view = layer.output
    y2 = layer.forward(2 * x)
    assert np.shares_memory(y2, out_view)
    assert np.array_equal(out_view, y2)
    d = layer.backward(f32(rng.standard_normal(shape)))
    assert np.shares_memory(d, layer.delta)


def test_writing_into_views_changes_the_layer(rng):
    """Writing into layer.scales/biases/rolling stats in place changes the next forward's output."""
    shape = (3, 2, 3, 3)
    b, c, h, w = shape
    layer = darknet_bn.BatchNormLayer(b, w, h, c)
    st = oracle.LayerState(b, w, h, c)
    x = activations(rng, shape)
    layer.scales[...] = f32([2.0, -0.5])
    layer.biases[1] = 3.0
    st.scales = np.array([2.0, -0.5])
    st.biases = np.array([0.0, 3.0])
    layer.forward(x)
    st.forward(x)
    assert_close(layer.output, st.output, what="output")
    layer.rolling_mean[...] = f32([0.25, -0.5])
    layer.rolling_variance[...] = f32([1.5, 0.75])
    st.rolling_mean = np.array([0.25, -0.5])
    st.rolling_variance = np.array([1.5, 0.75])
    layer.forward(x, train=False)
    st.forward(x, train=False)
    assert_close(layer.output, st.output, what="inference output")


def test_setters_copy_values_in(rng):
    """layer.scales = arr copies into the C buffer: later changes to arr do not reach the layer."""
    b, c, h, w = 2, 4, 3, 3
    layer = darknet_bn.BatchNormLayer(b, w, h, c)
    old_view = layer.scales
    arr = f32([1.5, 2.5, 3.5, 4.5])
    layer.scales = arr
    arr[:] = 99
    assert np.array_equal(layer.scales, f32([1.5, 2.5, 3.5, 4.5]))
    assert np.array_equal(old_view, f32([1.5, 2.5, 3.5, 4.5])), "setter rebound instead of copying"
    assert not np.shares_memory(layer.scales, arr)
    x_act = activations(rng, (b, c, h, w))
    layer.x_norm = x_act
    x_act[...] = 0
    assert not np.all(layer.x_norm == 0)
    st = oracle.LayerState(b, w, h, c)
    st.scales = np.array([1.5, 2.5, 3.5, 4.5])
    x = activations(rng, (b, c, h, w))
    layer.forward(x)
    st.forward(x)
    assert_close(layer.output, st.output, what="output")


# --------------------------------------------------------------------------- NaN / Inf

def test_nan_in_one_channel_stays_there(rng):
    """A NaN in one channel's input leaves every other channel's outputs and statistics exact."""
    shape = (2, 4, 3, 3)
    layer, st = make_pair(shape, rng)
    x = activations(rng, shape)
    x[1, 2, 0, 1] = np.nan
    layer.forward(x)
    st.forward(x)
    good = [0, 1, 3]
    assert np.isnan(layer.output[:, 2]).all()
    assert np.isnan(layer.mean[2]) and np.isnan(layer.rolling_mean[2])
    assert_close(layer.output[:, good], st.output[:, good], what="output")
    assert_close(layer.rolling_variance[good], st.rolling_variance[good], what="rolling_variance")
    d = f32(rng.standard_normal(shape))
    ret = layer.backward(d)
    st.backward(d)
    assert_close(ret[:, good], st.delta[:, good], what="delta")
    assert_close(layer.scale_updates[good], st.scale_updates[good], what="scale_updates")
    assert np.isnan(layer.scale_updates[2])
