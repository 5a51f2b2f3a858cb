"""Numerics under stress against the float64 oracle (docs/reference.md §3, §4, §5, §6).

Large offsets with 10^7 values per channel, constant channels, denormal and huge
magnitudes, NaN/Inf confined to their channel (forward and backward, on every
work split of the C code), all-zero deltas, and ill-conditioned backward passes.

Where docs/reference.md §6's absolute tolerance (1e-5) would hide the failure being looked for
(denormal results are far below it), the checks are relative and say so.
"""

import numpy as np
import pytest

import darknet_bn
import darknet_bn.kernels as K
import oracle
from _reliability import PATHS, make_pair, num_threads, per_channel
from conftest import activations, assert_close, assert_ulps, f32

NUMERICS = ["darknet", "standard"]
IMPLS = {"fast": K, "reference": K.reference}
TINY = 2.0 ** -149          # the smallest float32 denormal
FLT_MIN = float(np.finfo(np.float32).tiny)  # the smallest normal float32
FLT_MAX = float(np.finfo(np.float32).max)


def exact_moments(x, c):
    """Per-channel mean and sum of squared deviations of a (batch, c, ...) float32 array, in float64."""
    xd = per_channel(x, c)
    mean = xd.mean(axis=1)
    m2 = ((xd - mean[:, None]) ** 2).sum(axis=1)
    return mean, m2, xd.shape[1]


# --------------------------------------------------------------------------- 10^7 values, 1e4 std

M7 = 10 ** 7


@pytest.fixture(scope="module")
def ten_million():
    """(2, 2, 5e6) float32: 10^7 values per channel, offsets +1e4 and -1e4 std; exact moments."""
    rng = np.random.default_rng(1_000_000_7)
    b, c, s = 2, 2, M7 // 2
    std = (0.5, 2.0)
    off = (1e4 * std[0], -1e4 * std[1])
    x = np.empty((b, c, s), np.float32)
    for f in range(c):
        x[:, f] = np.float32(off[f]) + np.float32(std[f]) * rng.standard_normal((b, s), dtype=np.float32)
    mean = np.empty(c)
    m2 = np.empty(c)
    for f in range(c):
        xf = x[:, f].astype(np.float64)
        mean[f] = xf.sum() / M7
        m2[f] = ((xf - mean[f]) ** 2).sum()
    return x, mean, m2


@pytest.mark.parametrize("impl_name,threads", [("fast", 1), ("fast", 2), ("fast", 7), ("reference", 1)],
                         ids=["fast-1thread", "fast-2threads", "fast-7threads", "reference"])
def test_ten_million_values_offset_1e4_std_kernels(ten_million, impl_name, threads):
    """mean_cpu/variance_cpu on 10^7 values per channel 1e4 std from zero: within 4 ulps of exact."""
    x, mean_exact, m2_exact = ten_million
    b, f, s = x.shape
    impl = IMPLS[impl_name]
    with num_threads(threads):
        mean = impl.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
        assert_ulps(mean, mean_exact, what="mean")
        var = impl.variance_cpu(x, mean, b, f, s, np.zeros(f, np.float32))
    # variance_cpu uses the mean it is given: sum (x - mean)^2 = m2 + m (mean_exact - mean)^2.
    want = (m2_exact + M7 * (mean_exact - mean.astype(np.float64)) ** 2) / (M7 - 1)
    assert_ulps(var, want, what="variance")
    assert 0.2 < var[0] < 0.3 and 3.5 < var[1] < 4.5  # not Darknet's float-accumulator blow-up


@pytest.mark.parametrize("numerics", NUMERICS)
def test_ten_million_values_offset_1e4_std_layer(ten_million, numerics):
    """The layer on 10^7 values per channel 1e4 std from zero: statistics within 4 ulps, x_norm standardized."""
    x, mean_exact, m2_exact = ten_million
    b, c, s = x.shape
    m = M7
    with num_threads(2):
        layer = darknet_bn.BatchNormLayer(b, s, 1, c, numerics=numerics)
        layer.forward(x.reshape(b, c, 1, s))
        mom = layer.momentum
        unbiased = m2_exact / (m - 1)
        var_used = unbiased if numerics == "darknet" else m2_exact / m
        assert_ulps(layer.mean, mean_exact, what="mean")
        assert_ulps(layer.variance, var_used, what="variance")
        assert_ulps(layer.rolling_mean, mom * mean_exact, what="rolling_mean")
        start = 0.0 if numerics == "darknet" else 1.0
        assert_ulps(layer.rolling_variance, (1 - mom) * start + mom * unbiased, what="rolling_variance")
        xn = layer.x_norm
        for f in range(c):
            v = xn[:, f].astype(np.float64)
            assert abs(v.mean()) < 1e-3, f"channel {f}: mean of x_norm {v.mean()}"
            assert abs(v.std() - 1.0) < 1e-3, f"channel {f}: std of x_norm {v.std()}"
        # Sums of 10^7 deltas are accumulated accurately too.
        delta = np.random.default_rng(77).standard_normal((b, c, 1, s), dtype=np.float32)
        layer.backward(delta)
    dd = per_channel(delta, c)
    assert_close(layer.bias_updates, dd.sum(axis=1), what="bias_updates")
    assert_close(layer.scale_updates, (dd * per_channel(xn, c)).sum(axis=1), what="scale_updates")
    assert np.isfinite(layer.delta).all()


@pytest.mark.parametrize("numerics", NUMERICS)
def test_offset_100_std_large_channels_meet_tolerance(rng, numerics):
    """Offsets of 100 std with 5e5 values per channel, channels split over threads: outputs and deltas within docs/reference.md §6."""
    shape = (1, 2, 1000, 500)
    b, c, h, w = shape
    std = np.array([0.7, 3.0])
    off = np.array([100.0, -100.0]) * std
    x = f32(off[None, :, None, None] + std[None, :, None, None] * rng.standard_normal(shape))
    d = f32(rng.standard_normal(shape))
    with num_threads(3):
        layer, st = make_pair(shape, numerics, scales=[1.5, -0.5], biases=[0.25, -2.0])
        layer.forward(x)
        st.forward(x)
        assert_close(layer.output, st.output, what="output")
        assert_close(layer.x_norm, st.x_norm, what="x_norm")
        assert_ulps(layer.mean, st.mean, what="mean")
        assert_ulps(layer.variance, st.variance, what="variance")
        layer.backward(d)
        st.backward(d)
        assert_close(layer.delta, st.delta, what="delta")
        assert_close(layer.bias_updates, st.bias_updates, what="bias_updates")
        assert_close(layer.scale_updates, st.scale_updates, what="scale_updates")


# --------------------------------------------------------------------------- constant channels

# Constant values a channel may hold: ordinary, large, 1e30 (its square overflows
# float32), a denormal, zero. Every other channel is constant.
CONSTANTS = [3.3, -7e4, 1e30, -1e-40, 0.0, 1.0]


def constant_channels(rng, shape):
    """Random activations whose even channels are constant; returns (x, {channel: value})."""
    x = activations(rng, shape)
    consts = {}
    for f in range(0, shape[1], 2):
        v = np.float32(CONSTANTS[(f // 2) % len(CONSTANTS)])
        x[:, f] = v
        consts[f] = v
    return x, consts


@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("path", list(PATHS))
def test_constant_channels_layer(rng, path, numerics):
    """Constant channels: mean exact, variance 0, x_norm exactly 0, output exactly the bias, backward finite."""
    shape, threads = PATHS[path]
    b, c, h, w = shape
    x, consts = constant_channels(rng, shape)
    scales = f32(rng.uniform(0.5, 2.0, c))
    biases = f32(rng.standard_normal(c))
    with num_threads(threads):
        layer, st = make_pair(shape, numerics, scales=scales, biases=biases)
        layer.forward(x)
        st.forward(x)
        for f, v in consts.items():
            assert layer.mean[f] == v, f"channel {f} (constant {v}): mean {layer.mean[f]}"
            assert layer.variance[f] == 0, f"channel {f} (constant {v}): variance {layer.variance[f]}"
            assert np.all(layer.x_norm[:, f] == 0), f"channel {f} (constant {v}): x_norm not 0"
            assert np.all(layer.output[:, f] == biases[f]), f"channel {f} (constant {v}): output is not the bias"
        assert_close(layer.output, st.output, what="output")
        assert_close(layer.rolling_mean, st.rolling_mean, what="rolling_mean")
        assert_close(layer.rolling_variance, st.rolling_variance, what="rolling_variance")
        d = f32(rng.standard_normal(shape))
        ret = layer.backward(d)
        st.backward(d)
        assert np.isfinite(ret).all() and np.isfinite(layer.scale_updates).all()
        assert_close(ret, st.delta, what="delta")
        assert_close(layer.bias_updates, st.bias_updates, what="bias_updates")
        assert_close(layer.scale_updates, st.scale_updates, what="scale_updates")
        if numerics == "darknet":
            assert_close(layer.mean_delta, st.mean_delta, what="mean_delta")
            assert_close(layer.variance_delta, st.variance_delta, what="variance_delta")
        # Inference with the running statistics learnt from constant channels.
        layer.forward(x, train=False)
        st.forward(x, train=False)
        assert np.isfinite(layer.output).all()
        assert_close(layer.output, st.output, what="inference output")


@pytest.mark.parametrize("impl_name", list(IMPLS))
@pytest.mark.parametrize("dims,threads", [((3, 12, 37), 2), ((2, 2, 100003), 3), ((4096, 12, 1), 2)],
                         ids=["channels", "split", "fc"])
def test_constant_channels_kernels(rng, impl_name, dims, threads):
    """Kernels on constant channels: mean exact, variance 0, normalize gives exactly 0, deltas finite."""
    impl = IMPLS[impl_name]
    b, f, s = dims
    x, consts = constant_channels(rng, (b, f, s))
    d = f32(rng.standard_normal((b, f, s)))
    z = lambda: np.zeros(f, np.float32)  # noqa: E731
    with num_threads(threads):
        mean = impl.mean_cpu(x, b, f, s, z())
        var = impl.variance_cpu(x, mean, b, f, s, z())
        xn = impl.normalize_cpu(x.copy(), mean, var, b, f, s)
        md = impl.mean_delta_cpu(d, var, b, f, s, z())
        vd = impl.variance_delta_cpu(x, d, mean, var, b, f, s, z())
        dn = impl.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, d.copy())
    for ch, v in consts.items():
        assert mean[ch] == v and var[ch] == 0, (ch, v, mean[ch], var[ch])
        assert np.all(xn[:, ch] == 0), f"channel {ch} (constant {v}): normalize_cpu not 0"
        assert vd[ch] == 0, f"channel {ch}: variance_delta {vd[ch]}"
    assert np.isfinite(dn).all() and np.isfinite(md).all()
    assert_close(xn, oracle.normalize_cpu(x, mean, var, b, f, s), what="normalize_cpu")
    assert_close(md, oracle.mean_delta_cpu(d, var, b, f, s), what="mean_delta")
    assert_close(dn, oracle.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, d), what="normalize_delta")


# --------------------------------------------------------------------------- denormals

def denormals(rng, shape, bits=20):
    """float32 denormals: random multiples of 2^-149 below 2^(bits-149) in magnitude, never all zero."""
    k = rng.integers(-2 ** bits, 2 ** bits, size=shape)
    x = f32(k * TINY)
    assert np.all(np.abs(x) < FLT_MIN) and np.count_nonzero(x) > x.size // 2
    return x


@pytest.mark.parametrize("impl_name", list(IMPLS))
@pytest.mark.parametrize("dims", [(3, 4, 1001), (512, 24, 1)], ids=["rows", "fc"])
def test_denormals_kernels(rng, impl_name, dims):
    """Kernels compute exactly on denormal floats (no flush to zero); relative checks, as 1e-5 absolute would hide it."""
    impl = IMPLS[impl_name]
    b, f, s = dims
    x = denormals(rng, dims)
    z = lambda: np.zeros(f, np.float32)  # noqa: E731
    with num_threads(2):
        mean = impl.mean_cpu(x, b, f, s, z())
        assert_ulps(mean, oracle.mean_cpu(x, b, f, s), what="mean of denormals")
        assert np.count_nonzero(mean) == f, f"denormal means flushed to zero: {mean}"
        # Multiplying by 2^100 and adding denormals are exact in IEEE arithmetic.
        y = impl.scale_bias(x.copy(), f32(np.full(f, 2.0 ** 100)), b, f, s)
        assert np.array_equal(y, f32(x.astype(np.float64) * 2.0 ** 100)), "scale_bias of denormals not exact"
        bias = denormals(rng, (f,), bits=10)
        y = impl.add_bias(x.copy(), bias, b, f, s)
        want = f32(x.astype(np.float64) + bias.astype(np.float64)[None, :, None])
        assert np.array_equal(y, want), "add_bias of denormals not exact"
        bu = impl.backward_bias(z(), x, b, f, s)
        assert_ulps(bu, oracle.backward_bias(np.zeros(f), x, b, f, s), what="backward_bias of denormals")
        su = impl.backward_scale_cpu(x, f32(np.full((b, f, s), 2.0 ** 20)), b, f, s, z())
        assert_ulps(su, oracle.backward_scale_cpu(x, np.full((b, f, s), 2.0 ** 20), b, f, s, np.zeros(f)),
                    what="backward_scale_cpu of denormals")
        # normalize with mean 0, variance 0 multiplies by 1e6: denormals become normal numbers.
        xn = impl.normalize_cpu(x.copy(), z(), z(), b, f, s)
        assert_close(xn, oracle.normalize_cpu(x, np.zeros(f), np.zeros(f), b, f, s), rtol=1e-6, atol=0,
                     what="normalize_cpu of denormals")
        md = impl.mean_delta_cpu(x, z(), b, f, s, z())
        assert_close(md, oracle.mean_delta_cpu(x, np.zeros(f), b, f, s), rtol=1e-6, atol=2 * TINY,
                     what="mean_delta_cpu of denormals")
    # The library left this thread's floating-point mode alone (no FTZ/DAZ).
    assert np.float32(2.0 ** -140) * np.float32(0.5) == np.float32(2.0 ** -141)
    assert np.float32(2.0 ** -140) != 0 and np.float32(2.0 ** -140) + np.float32(0) != 0


@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (256, 12, 1, 1)], ids=["rows", "fc"])
def test_denormal_inputs_layer(rng, numerics, shape):
    """A layer fed denormal inputs normalizes them correctly (relative check: x_norm is ~1e-33, below the atol of docs/reference.md §6)."""
    b, c, h, w = shape
    x = denormals(rng, shape)
    layer, st = make_pair(shape, numerics)
    layer.forward(x)
    st.forward(x)
    assert_ulps(layer.mean, st.mean, what="mean of denormals")
    assert_ulps(layer.variance, st.variance, what="variance of denormals")
    assert np.count_nonzero(layer.mean) == c
    # x - mean carries the error of rounding the mean (a denormal ulp); scaled by the normalizer.
    gain = 1e6 if numerics == "darknet" else 1.0 / np.sqrt(1e-5)
    assert_close(layer.x_norm, st.x_norm, rtol=1e-5, atol=4 * TINY * gain, what="x_norm of denormals")
    assert_close(layer.output, st.output, rtol=1e-5, atol=4 * TINY * gain, what="output of denormals")
    assert np.count_nonzero(layer.x_norm) > x.size // 2, "x_norm of denormal inputs flushed to zero"


@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (256, 12, 1, 1)], ids=["rows", "fc"])
def test_denormal_deltas_layer(rng, numerics, shape):
    """Backward of denormal deltas gives the right denormal gradients (relative check, a few denormal ulps)."""
    b, c, h, w = shape
    layer, st = make_pair(shape, numerics, scales=f32(rng.uniform(0.5, 2, c)))
    x = activations(rng, shape)
    layer.forward(x)
    st.forward(x)
    d = denormals(rng, shape)
    ret = layer.backward(d)
    st.backward(d)
    assert np.count_nonzero(ret) > ret.size // 2, "denormal gradients flushed to zero"
    assert_close(ret, st.delta, rtol=1e-4, atol=8 * TINY, what="delta of denormals")
    assert_ulps(layer.bias_updates, st.bias_updates, what="bias_updates of denormals")
    assert_close(layer.scale_updates, st.scale_updates, rtol=1e-5, atol=2 * TINY, what="scale_updates")


# --------------------------------------------------------------------------- huge magnitudes

@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("shape", [(3, 3, 8, 9), (512, 3, 1, 1)], ids=["rows", "fc"])
def test_huge_inputs_layer(rng, numerics, shape):
    """Inputs ~1e19 (squares overflow float32, not double): statistics within 4 ulps, outputs/deltas within docs/reference.md §6."""
    b, c, h, w = shape
    scale = np.array([1e19, -3e18, 1.5e19])[:c]
    x = f32(scale[None, :, None, None] * (2.0 + rng.standard_normal(shape)))
    with np.errstate(over="ignore"):
        assert np.isinf(x * x).any(), "the test data must overflow float32 when squared"
    layer, st = make_pair(shape, numerics, scales=[1.5, 0.5, -1.0], biases=[1.0, -2.0, 0.0])
    layer.forward(x)
    st.forward(x)
    for name in ("mean", "variance"):
        assert_ulps(getattr(layer, name), getattr(st, name), what=name)
    assert_ulps(layer.rolling_mean, st.rolling_mean, what="rolling_mean")
    assert_ulps(layer.rolling_variance, st.rolling_variance, what="rolling_variance")
    assert_close(layer.x_norm, st.x_norm, what="x_norm")
    assert_close(layer.output, st.output, what="output")
    d = f32(rng.standard_normal(shape))
    layer.backward(d)
    st.backward(d)
    assert_close(layer.delta, st.delta, what="delta")
    assert_close(layer.scale_updates, st.scale_updates, what="scale_updates")
    layer.forward(x, train=False)
    st.forward(x, train=False)
    assert_close(layer.output, st.output, what="inference output")


@pytest.mark.parametrize("numerics", NUMERICS)
def test_variance_beyond_float32_still_normalizes(rng, numerics):
    """Inputs ~1e30 +- 1e29 (variance 1e58 exceeds float32): mean exact, x_norm/output correct, backward finite."""
    shape = (4, 2, 6, 5)
    b, c, h, w = shape
    x = f32(1e30 * (1.0 + 0.1 * rng.standard_normal(shape)))
    layer, st = make_pair(shape, numerics)
    layer.forward(x)
    st.forward(x)
    assert_ulps(layer.mean, st.mean, what="mean")
    assert not np.isnan(layer.variance).any(), f"variance is NaN: {layer.variance}"
    assert_close(layer.x_norm, st.x_norm, what="x_norm")
    assert_close(layer.output, st.output, what="output")
    d = f32(rng.standard_normal(shape))
    ret = layer.backward(d)
    st.backward(d)
    assert np.isfinite(ret).all()
    assert_close(ret, st.delta, what="delta")
    assert_close(layer.bias_updates, st.bias_updates, what="bias_updates")
    assert_close(layer.scale_updates, st.scale_updates, what="scale_updates")


@pytest.mark.parametrize("numerics", NUMERICS)
def test_huge_deltas_layer(rng, numerics):
    """Deltas ~1e30: gradients and update sums within docs/reference.md §6 scaled by 1e30, nothing overflows."""
    shape = (4, 3, 7, 6)
    layer, st = make_pair(shape, numerics, scales=[2.0, -0.5, 1.0])
    x = activations(rng, shape)
    layer.forward(x)
    st.forward(x)
    d = f32(1e30 * rng.standard_normal(shape))
    layer.backward(d)
    st.backward(d)
    # Backward is linear in delta: this is the unit-scale problem times 1e30, so docs/reference.md §6's
    # absolute term scales with it (the unit-scale cancellation case is tested on its own below).
    for name in ("delta", "bias_updates", "scale_updates"):
        assert np.isfinite(getattr(layer, name)).all(), name
        assert_close(getattr(layer, name), getattr(st, name), atol=1e-5 * 1e30, what=name)


def cancelling_pairs(rng, shape, binade, k_range=3):
    """float32 values of magnitude in [2^binade, 2^(binade+1)): each row's first half +a_i, second half
    -a_i + k_i q (q = the float32 ulp there, k_i small), so a row sums to (sum k_i) q.

    Every value is a multiple of q and every partial sum stays far below 2^53 q, so float64
    accumulation in any order is exact; float32 accumulation of the first half overflows
    when 2^binade * len/2 > FLT_MAX.
    """
    b, f, s = shape
    half = s // 2
    q = 2.0 ** (binade - 23)
    a = (2.0 ** 23 + rng.integers(4, 2 ** 23 - 4, size=(b, f, half))) * q  # in [2^binade, 2^(binade+1))
    k = rng.integers(-k_range, k_range + 1, size=(b, f, half))
    d = np.concatenate([a, -a + k * q], axis=2)
    out = f32(d)
    assert np.array_equal(out.astype(np.float64), d), "construction must be exact in float32"
    return out, (k.sum(axis=(0, 2)) * q)


@pytest.mark.parametrize("impl_name", list(IMPLS))
def test_huge_values_kernels(rng, impl_name):
    """Kernels whose float32 partial sums or products would overflow give the exact finite result (double sums)."""
    impl = IMPLS[impl_name]
    b, f, s = 2, 3, 1026
    z = lambda: np.zeros(f, np.float32)  # noqa: E731
    # Values near FLT_MAX: their sum overflows float32, their mean does not.
    x = f32(3e38 + 1e37 * rng.uniform(-1, 1, (b, f, s)))
    mean = impl.mean_cpu(x, b, f, s, z())
    assert_ulps(mean, oracle.mean_cpu(x, b, f, s), what="mean near FLT_MAX")
    # Values ~1e19: squared deviations overflow float32.
    x = f32(1e19 * (1.0 + rng.standard_normal((b, f, s))))
    mean = impl.mean_cpu(x, b, f, s, z())
    var = impl.variance_cpu(x, mean, b, f, s, z())
    assert_ulps(var, oracle.variance_cpu(x, mean, b, f, s), what="variance at 1e19")
    # Deltas of magnitude ~2^127 (~1.7e38) that cancel to ~1e32 per channel.
    d, total = cancelling_pairs(rng, (b, f, s), 127)
    bu = impl.backward_bias(z(), d, b, f, s)
    assert np.array_equal(bu, f32(total)), f"backward_bias: {bu} != exact {total}"
    md = impl.mean_delta_cpu(d, f32(np.ones(f)), b, f, s, z())
    assert_close(md, total * (-1 / np.sqrt(1 + 1e-5)), what="mean_delta_cpu of cancelling 1.7e38")
    # Products 2^30 * ~2^100 = ~2^130 overflow float32 every one, but cancel.
    d, total = cancelling_pairs(rng, (b, f, s), 100)
    xn = f32(np.full((b, f, s), 2.0 ** 30))
    su = impl.backward_scale_cpu(xn, d, b, f, s, z())
    assert np.array_equal(su, f32(total * 2.0 ** 30)), f"backward_scale_cpu: {su} != exact {total * 2.0 ** 30}"
    vd = impl.variance_delta_cpu(xn, d, z(), f32(np.ones(f)), b, f, s, z())
    assert_close(vd, total * 2.0 ** 30 * -0.5 * (1 + 1e-5) ** -1.5, what="variance_delta_cpu")


# --------------------------------------------------------------------------- NaN / Inf confinement

POISONS = ["nan_input", "inf_input", "-inf_input", "nan_delta", "inf_delta", "nan_scale"]
# groups: inside a work unit of 16 channels; fc: the last lane of a vector, next to a tile edge.
POISON_CHANNEL = {"channels": 3, "groups": 21, "split": 0, "fc": 23}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the oracle's own NaN arithmetic
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("path", list(PATHS))
def test_non_finite_stays_in_its_channel(rng, path, numerics, poison):
    """One NaN/Inf in one channel's input, delta or scale: only that channel is non-finite; the rest match the oracle."""
    shape, threads = PATHS[path]
    b, c, h, w = shape
    bad = POISON_CHANNEL[path]
    good = [f for f in range(c) if f != bad]
    kind, where = poison.split("_")
    value = np.float32({"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind])
    pos = (b - 1, bad, h // 2, w - 1)  # late in the channel: its second part when channels are split
    x = activations(rng, shape)
    d = f32(rng.standard_normal(shape))
    scales = f32(rng.uniform(0.5, 2.0, c))
    if where == "input":
        x[pos] = value
    elif where == "delta":
        d[pos] = value
    else:
        scales[bad] = value
    with num_threads(threads):
        layer, st = make_pair(shape, numerics, scales=scales, biases=f32(rng.standard_normal(c)))
        layer.forward(x)
        st.forward(x)
        assert np.array_equal(layer.x.view(np.uint32), x.view(np.uint32)), "x is not a bit copy of the input"
        if where in ("input", "scale"):
            assert not np.isfinite(layer.output[:, bad]).any(), "a non-finite input left finite outputs in its channel"
        if where == "input":
            for name in ("mean", "variance", "rolling_mean", "rolling_variance"):
                assert not np.isfinite(getattr(layer, name)[bad]), f"{name}[{bad}] is finite"
        for name in ("output", "x_norm"):
            assert_close(getattr(layer, name)[:, good], getattr(st, name)[:, good], what=f"{name} (other channels)")
        for name in ("mean", "variance", "rolling_mean", "rolling_variance"):
            assert_close(getattr(layer, name)[good], getattr(st, name)[good], what=f"{name} (other channels)")
        ret = layer.backward(d)
        st.backward(d)
        assert not np.isfinite(ret[:, bad]).any(), "a non-finite value left finite deltas in its channel"
        assert_close(ret[:, good], st.delta[:, good], what="delta (other channels)")
        for name in ("bias_updates", "scale_updates") + (("mean_delta", "variance_delta")
                                                         if numerics == "darknet" else ()):
            assert_close(getattr(layer, name)[good], getattr(st, name)[good], what=f"{name} (other channels)")
        if where == "delta":
            assert not np.isfinite(layer.bias_updates[bad])
        if where == "scale":  # the parameter sums do not involve the scale
            assert_close(layer.bias_updates, st.bias_updates, what="bias_updates")
            assert_close(layer.scale_updates, st.scale_updates, what="scale_updates")
        # The next clean step is unharmed: batch statistics do not remember the bad value.
        x2 = activations(rng, shape)
        layer.forward(x2)
        st.forward(x2)
        ok = good if where == "scale" else list(range(c))
        assert_close(layer.output[:, ok], st.output[:, ok], what="output of the next step")


# --------------------------------------------------------------------------- all-zero deltas

@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("path", list(PATHS))
def test_all_zero_deltas(rng, path, numerics):
    """backward(0) returns exact zeros, leaves the accumulated updates bit-identical, zeroes mean/variance deltas."""
    shape, threads = PATHS[path]
    b, c, h, w = shape
    with num_threads(threads):
        layer, _ = make_pair(shape, numerics, scales=f32(rng.uniform(-2, 2, c)))
        x, _ = constant_channels(rng, shape)  # constant channels too: 0/0 must not appear
        layer.forward(x)
        layer.bias_updates = f32(rng.standard_normal(c))
        layer.scale_updates = f32(rng.standard_normal(c))
        bu = layer.bias_updates.copy()
        su = layer.scale_updates.copy()
        ret = layer.backward(np.zeros(shape, np.float32))
    assert np.all(ret == 0) and np.all(layer.delta == 0), "backward of zero deltas is not zero"
    assert np.array_equal(layer.bias_updates.view(np.uint32), bu.view(np.uint32))
    assert np.array_equal(layer.scale_updates.view(np.uint32), su.view(np.uint32))
    if numerics == "darknet":
        assert np.all(layer.mean_delta == 0) and np.all(layer.variance_delta == 0)


@pytest.mark.parametrize("impl_name", list(IMPLS))
def test_all_zero_deltas_kernels(rng, impl_name):
    """The backward kernels on zero deltas: accumulators unchanged, mean/variance deltas and the result exactly 0."""
    impl = IMPLS[impl_name]
    b, f, s = 3, 5, 131
    x, _ = constant_channels(rng, (b, f, s))
    d = np.zeros((b, f, s), np.float32)
    acc = f32(rng.standard_normal(f))
    mean = impl.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
    var = impl.variance_cpu(x, mean, b, f, s, np.zeros(f, np.float32))
    assert np.array_equal(impl.backward_bias(acc.copy(), d, b, f, s), acc)
    assert np.array_equal(impl.backward_scale_cpu(x, d, b, f, s, acc.copy()), acc)
    md = impl.mean_delta_cpu(d, var, b, f, s, f32(np.ones(f)))
    vd = impl.variance_delta_cpu(x, d, mean, var, b, f, s, f32(np.ones(f)))
    assert np.all(md == 0) and np.all(vd == 0), (md, vd)
    assert np.all(impl.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, d.copy()) == 0)


# --------------------------------------------------------------------------- ill-conditioned backward

# Minimal cases where the exact gradient is a small difference of large terms
# (|scale * delta / std| >> 1): docs/reference.md §6 asks for 1e-5 relative + 1e-5 absolute
# on deltas for every input within 100 std, with no bound on delta or std.
# The third: a constant delta, so sum delta (x - mean) = 0 and Darknet's variance_delta is
# exactly ~0, while its terms are ~1.8e4 (0.5 (var + 1e-5)^(-3/2) sum |x - mean|).
ILL_CONDITIONED = [
    ("standard", [0.0, 0.5], [100.0, -3.0]),
    ("darknet", [0.00087, -0.006846, -0.003639, -0.000104, -0.012565, 0.003268],
     [85.7, -72.5, -8.0, -9.9, -45.0, 13.9]),
    ("darknet", [-0.02236068] + [0.00447214] * 5, [1.0] * 6),
]


@pytest.mark.parametrize("numerics,x,d", ILL_CONDITIONED,
                         ids=["standard-m2", "darknet-m6", "darknet-variance_delta"])
def test_backward_cancellation_meets_spec_tolerance(numerics, x, d):
    """Backward where an exact result is a small difference of large terms still meets docs/reference.md §6 (1e-5 rel + abs)."""
    m = len(x)
    shape = (1, 1, 1, m)
    layer, st = make_pair(shape, numerics)
    xa = f32(np.reshape(x, shape))
    da = f32(np.reshape(d, shape))
    layer.forward(xa)
    st.forward(xa)
    ret = layer.backward(da)
    st.backward(da)
    assert_close(ret, st.delta, what=f"{numerics} delta (x={x}, delta={d})")
    if numerics == "darknet":
        assert_close(layer.mean_delta, st.mean_delta, what="mean_delta")
        assert_close(layer.variance_delta, st.variance_delta, what=f"variance_delta (x={x}, delta={d})")


@pytest.mark.parametrize("impl_name", list(IMPLS))
def test_normalize_delta_kernel_cancellation_meets_spec_tolerance(impl_name):
    """normalize_delta_cpu where delta/sqrt(var + 1e-5) and mean_delta/m cancel meets docs/reference.md §6 for its given inputs."""
    impl = IMPLS[impl_name]
    b, f, s = 1, 1, 4
    x = np.zeros((b, f, s), np.float32)   # variance 0: 1/sqrt(var + 1e-5) = 316.2
    d = np.full((b, f, s), 100.0, np.float32)
    mean = impl.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
    var = impl.variance_cpu(x, mean, b, f, s, np.zeros(f, np.float32))
    md = impl.mean_delta_cpu(d, var, b, f, s, np.zeros(f, np.float32))
    vd = impl.variance_delta_cpu(x, d, mean, var, b, f, s, np.zeros(f, np.float32))
    dn = impl.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, d.copy())
    # The exact value for these float32 inputs is the rounding of mean_delta, divided by m.
    assert_close(dn, oracle.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, d),
                 what=f"normalize_delta_cpu (mean_delta {md}, variance {var})")


# --------------------------------------------------------------------------- deviations beyond float32

def far_apart(rng, shape):
    """Finite float32 inputs whose deviation from the channel mean overflows float32: most values of a
    channel at about +3e38 (sign alternating by channel), one in eight at the opposite end, so the mean
    sits near the bulk and x - mean reaches about 4.5e38 > FLT_MAX, while x_norm is a few units."""
    b, c, h, w = shape
    sign = np.where(np.arange(c) % 2 == 0, 1.0, -1.0)[None, :, None, None]
    bulk = 3e38 * (1 - 0.05 * rng.uniform(0, 1, shape))
    far = rng.uniform(0, 1, shape) < 0.125
    far.reshape(b, c, -1)[0, :, 0] = True  # at least one per channel
    x = f32(sign * np.where(far, -bulk, bulk))
    dev = per_channel(x, c) - per_channel(x, c).mean(axis=1, keepdims=True)
    assert np.all(np.isfinite(x)) and np.abs(dev).max() > FLT_MAX, "the data must overflow x - mean"
    return x


@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 8), (16, 12, 1, 1), (3, 2, 5, 3)], ids=["rows", "fc", "tails"])
def test_deviation_beyond_float32_layer(rng, numerics, shape):
    """x - mean beyond FLT_MAX (finite inputs): x_norm, output, the input delta and inference match the
    float64 oracle (the float pass recomputes such lanes in double) instead of giving -inf; on the
    vector rows, the channel tiles of spatial == 1 and the scalar tails (both instruction-set paths:
    test_deviation_beyond_float32_paths_agree)."""
    x = far_apart(rng, shape)
    c = shape[1]
    layer, st = make_pair(shape, numerics, scales=np.linspace(0.5, 2, c), biases=np.linspace(-1, 1, c))
    layer.forward(x)
    st.forward(x)
    assert np.all(np.isfinite(layer.x_norm)) and np.all(np.isfinite(layer.output))
    assert_close(layer.x_norm, st.x_norm, what="x_norm")
    assert_close(layer.output, st.output, what="output")
    d = f32(rng.standard_normal(shape))
    layer.backward(d)
    st.backward(d)
    assert_close(layer.delta, st.delta, what="delta")
    # inference with running statistics far from the data: x - rolling_mean overflows too
    layer.rolling_mean = f32(np.full(c, -2e38) * np.where(np.arange(c) % 2 == 0, 1, -1))
    layer.rolling_variance = f32(np.full(c, 3e38))
    st.rolling_mean = layer.rolling_mean.astype(np.float64)
    st.rolling_variance = layer.rolling_variance.astype(np.float64)
    layer.forward(x, train=False)
    st.forward(x, train=False)
    assert np.all(np.isfinite(layer.output))
    assert_close(layer.output, st.output, what="inference output")


def test_deviation_beyond_float32_paths_agree():
    """The portable and AVX2 paths recompute the same lanes the same way: bit-identical results."""
    from _reliability import run_python
    code = (
        "import numpy as np, darknet_bn, test_stress\n"
        "x = test_stress.far_apart(np.random.default_rng(5), (2, 3, 4, 8))\n"
        "l = darknet_bn.BatchNormLayer(2, 8, 4, 3)\n"
        "l.forward(x); l.backward(np.ones_like(x))\n"
        "print(darknet_bn.info()['simd'], l.output.tobytes().hex()[:4000], l.x_norm.tobytes().hex()[:4000],"
        " l.delta.tobytes().hex()[:4000])\n")
    out = {}
    for simd in (None, "generic"):
        p = run_python(code, DARKNET_BN_SIMD=simd)
        assert p.returncode == 0, p.stderr
        path, *values = p.stdout.split()
        out[path] = values
    assert "generic" in out
    assert len(set(map(tuple, out.values()))) == 1, "paths differ"


@pytest.mark.parametrize("impl_name", list(IMPLS))
def test_normalize_cpu_deviation_beyond_float32(rng, impl_name):
    """normalize_cpu with a mean far from the values: (x - mean) beyond FLT_MAX, the result finite."""
    impl = IMPLS[impl_name]
    b, f, s = 2, 3, 21
    x = f32(np.where(rng.uniform(0, 1, (b, f, s)) < 0.5, -3e38, 3e38))
    mean = f32([2e38, -2e38, 1e38])
    var = f32([3e38, 1e38, 2e38])
    got = impl.normalize_cpu(x.copy(), mean, var, b, f, s)
    assert np.all(np.isfinite(got))
    assert_close(got, oracle.normalize_cpu(x, mean, var, b, f, s), what="normalize_cpu")


@pytest.mark.parametrize("path", list(PATHS))
def test_kernels_on_the_named_paths(rng, path):
    """The reduction and elementwise kernels on each named work split (tall spatial == 1 included:
    ranges of whole images per thread) against float64 sums written here."""
    (b, c, h, w), threads = PATHS[path]
    s = h * w
    x = (rng.standard_normal((b, c, s)) * 3 + 1).astype(np.float32)
    d = rng.standard_normal((b, c, s)).astype(np.float32)
    x64, d64 = x.astype(np.float64), d.astype(np.float64)
    m = b * s
    with num_threads(threads):
        mean = darknet_bn.kernels.mean_cpu(x, b, c, s, np.zeros(c, np.float32))
        var = darknet_bn.kernels.variance_cpu(x, mean, b, c, s, np.zeros(c, np.float32))
        bias_updates = darknet_bn.kernels.backward_bias(np.ones(c, np.float32), d, b, c, s)
        scale_updates = darknet_bn.kernels.backward_scale_cpu(x, d, b, c, s, np.zeros(c, np.float32))
        shifted = darknet_bn.kernels.add_bias(x.copy(), np.arange(c, dtype=np.float32), b, c, s)
    want_mean = x64.sum(axis=(0, 2)) / m
    want_var = ((x64 - mean.astype(np.float64)[None, :, None]) ** 2).sum(axis=(0, 2)) / (m - 1)
    assert_close(mean, want_mean, what="mean_cpu")
    assert_close(var, want_var, what="variance_cpu")
    assert_close(bias_updates, 1 + d64.sum(axis=(0, 2)), what="backward_bias")
    assert_close(scale_updates, (d64 * x64).sum(axis=(0, 2)), what="backward_scale_cpu")
    assert np.array_equal(shifted, (x + np.arange(c, dtype=np.float32)[None, :, None]).astype(np.float32))
