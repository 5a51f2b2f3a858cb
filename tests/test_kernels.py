"""The ten Darknet kernels (docs/reference.md §3), fast and reference, against the float64 oracle."""

import os
import subprocess
import sys

import numpy as np
import pytest

import darknet_bn
import darknet_bn.kernels as K
import oracle
from conftest import activations, assert_close, assert_ulps, f32, wait_child

# (batch, filters, spatial)
SHAPES = [
    (4, 3, 1),        # fully connected: spatial == 1
    (64, 16, 1),      # fully connected, wider
    (1, 3, 35),       # batch == 1, spatial >= 2
    (1, 1, 2),        # smallest trainable m
    (3, 5, 7),        # primes
    (7, 13, 11),      # primes
    (2, 1, 50),       # one channel (threads must split inside the channel)
    (3, 1, 1031),     # one channel, long odd row (vector tails)
    (5, 17, 33),      # odd everything
    (2, 32, 52 * 52),  # docs/reference.md §7-like mid layer
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]

ACCURACY_SHAPES = pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)


def channel_vec(rng, filters, lo=0.5, hi=2.0):
    """A float32 per-channel vector of positive values."""
    return f32(rng.uniform(lo, hi, size=filters))


def exact_mean_f32(x, batch, filters, spatial):
    """The exact mean rounded to float32, as a caller of variance_cpu would hold it."""
    return f32(oracle.mean_cpu(x, batch, filters, spatial))


def assert_same_buffer(ret, buf, name):
    """The kernel returned the buffer it modified in place."""
    assert isinstance(ret, np.ndarray), f"{name}: returned {type(ret)!r}"
    assert np.shares_memory(ret, buf), f"{name}: the return value is not the output buffer"


# --------------------------------------------------------------------------- forward kernels

@ACCURACY_SHAPES
def test_mean_cpu(impl, threads, rng, shape):
    """mean_cpu overwrites mean with the per-channel mean, within 4 ulps of exact."""
    b, f, s = shape
    x = activations(rng, shape)
    x0 = x.copy()
    mean = np.full(f, np.nan, dtype=np.float32)
    ret = impl.mean_cpu(x, b, f, s, mean)
    assert_same_buffer(ret, mean, "mean")
    assert_ulps(mean, oracle.mean_cpu(x, b, f, s), what="mean")
    assert np.array_equal(x, x0), "mean_cpu modified x"


@ACCURACY_SHAPES
def test_variance_cpu(impl, threads, rng, shape):
    """variance_cpu overwrites variance with the unbiased variance about the given mean (4 ulps)."""
    b, f, s = shape
    if b * s < 2:
        pytest.skip("m < 2")
    x = activations(rng, shape)
    x0 = x.copy()
    mean = exact_mean_f32(x, b, f, s)
    mean0 = mean.copy()
    var = np.full(f, np.nan, dtype=np.float32)
    ret = impl.variance_cpu(x, mean, b, f, s, var)
    assert_same_buffer(ret, var, "variance")
    assert_ulps(var, oracle.variance_cpu(x, mean, b, f, s), what="variance")
    assert np.array_equal(x, x0) and np.array_equal(mean, mean0), "inputs modified"


def test_variance_cpu_uses_the_given_mean(impl, rng):
    """variance_cpu is Σ(x - mean[f])²/(m-1) about the mean passed in, not a recomputed one."""
    b, f, s = 3, 4, 10
    x = activations(rng, (b, f, s))
    mean = f32(oracle.mean_cpu(x, b, f, s) + np.array([0.0, 1.0, -2.0, 0.5]))
    var = np.zeros(f, np.float32)
    impl.variance_cpu(x, mean, b, f, s, var)
    assert_ulps(var, oracle.variance_cpu(x, mean, b, f, s), what="variance")


@ACCURACY_SHAPES
def test_normalize_cpu(impl, threads, rng, shape):
    """normalize_cpu works in place: (x - mean)/(sqrt(variance) + 1e-6)."""
    b, f, s = shape
    x = activations(rng, shape)
    mean = f32(rng.normal(size=f))
    var = channel_vec(rng, f, 0.25, 4.0)
    x_in, mean0, var0 = x.copy(), mean.copy(), var.copy()
    ret = impl.normalize_cpu(x, mean, var, b, f, s)
    assert_same_buffer(ret, x, "x")
    assert_close(x, oracle.normalize_cpu(x_in, mean, var, b, f, s), what="x")
    assert np.array_equal(mean, mean0) and np.array_equal(var, var0), "mean/variance modified"


def test_normalize_cpu_epsilon_outside_root(impl):
    """normalize_cpu puts Darknet's 1e-6 outside the root: variance 0 divides by 1e-6 exactly."""
    x = f32([[[1e-6, 2e-6, -3e-6]], [[0.0, 5e-7, 1e-6]]])  # batch 2, 1 channel, spatial 3
    mean = f32([0.0])
    var = f32([0.0])
    impl.normalize_cpu(x, mean, var, 2, 1, 3)
    assert_close(x, np.array([[[1.0, 2.0, -3.0]], [[0.0, 0.5, 1.0]]]), what="x")
    # variance 1e-4: sqrt = 1e-2, so the divisor is 0.010001 (1e-6 outside), not sqrt(1e-4 + 1e-6)
    y = f32(np.ones((2, 1, 3)))
    var = f32([1e-4])
    impl.normalize_cpu(y, f32([0.0]), var, 2, 1, 3)
    assert_close(y, np.full((2, 1, 3), 1.0 / (np.sqrt(np.float64(var[0])) + 1e-6)), what="x")


@ACCURACY_SHAPES
def test_scale_bias(impl, threads, rng, shape):
    """scale_bias multiplies each channel by scales[f], in place."""
    b, f, s = shape
    out = activations(rng, shape)
    scales = f32(rng.normal(size=f))
    out0, sc0 = out.copy(), scales.copy()
    ret = impl.scale_bias(out, scales, b, f, s)
    assert_same_buffer(ret, out, "output")
    assert_close(out, oracle.scale_bias(out0, scales, b, f, s), what="output")
    assert np.array_equal(scales, sc0)


@ACCURACY_SHAPES
def test_add_bias(impl, threads, rng, shape):
    """add_bias adds biases[f] to each channel, in place."""
    b, f, s = shape
    out = activations(rng, shape)
    biases = f32(rng.normal(size=f) * 3)
    out0, bi0 = out.copy(), biases.copy()
    ret = impl.add_bias(out, biases, b, f, s)
    assert_same_buffer(ret, out, "output")
    assert_close(out, oracle.add_bias(out0, biases, b, f, s), what="output")
    assert np.array_equal(biases, bi0)


# --------------------------------------------------------------------------- backward kernels

@ACCURACY_SHAPES
def test_backward_bias_accumulates(impl, threads, rng, shape):
    """backward_bias adds Σ delta to the nonzero bias_updates already there."""
    b, f, s = shape
    delta = activations(rng, shape, offset_std=1.0)
    upd = f32(rng.normal(size=f) * 5)
    upd0, d0 = upd.copy(), delta.copy()
    ret = impl.backward_bias(upd, delta, b, f, s)
    assert_same_buffer(ret, upd, "bias_updates")
    assert_close(upd, oracle.backward_bias(upd0, delta, b, f, s), what="bias_updates")
    assert np.array_equal(delta, d0)
    # A second call accumulates again.
    impl.backward_bias(upd, delta, b, f, s)
    want = oracle.backward_bias(oracle.backward_bias(upd0, delta, b, f, s), delta, b, f, s)
    assert_close(upd, want, what="bias_updates after two calls")


@ACCURACY_SHAPES
def test_backward_scale_cpu_accumulates(impl, threads, rng, shape):
    """backward_scale_cpu adds Σ delta * x_norm to the nonzero scale_updates already there."""
    b, f, s = shape
    x_norm = f32(rng.standard_normal(shape))
    delta = activations(rng, shape, offset_std=1.0)
    upd = f32(rng.normal(size=f) * 5)
    upd0, d0, xn0 = upd.copy(), delta.copy(), x_norm.copy()
    ret = impl.backward_scale_cpu(x_norm, delta, b, f, s, upd)
    assert_same_buffer(ret, upd, "scale_updates")
    assert_close(upd, oracle.backward_scale_cpu(x_norm, delta, b, f, s, upd0), what="scale_updates")
    assert np.array_equal(delta, d0) and np.array_equal(x_norm, xn0)


@ACCURACY_SHAPES
def test_mean_delta_cpu_overwrites(impl, threads, rng, shape):
    """mean_delta_cpu overwrites mean_delta with (Σ delta)·(-1/sqrt(variance + 1e-5))."""
    b, f, s = shape
    delta = activations(rng, shape, offset_std=1.0)
    var = channel_vec(rng, f, 0.25, 4.0)
    md = np.full(f, np.nan, dtype=np.float32)
    ret = impl.mean_delta_cpu(delta, var, b, f, s, md)
    assert_same_buffer(ret, md, "mean_delta")
    assert_close(md, oracle.mean_delta_cpu(delta, var, b, f, s), what="mean_delta")
    # Overwritten, not accumulated: a second call gives the same values.
    first = md.copy()
    impl.mean_delta_cpu(delta, var, b, f, s, md)
    assert_close(md, first.astype(np.float64), rtol=1e-6, atol=0, what="mean_delta again")


@ACCURACY_SHAPES
def test_variance_delta_cpu_overwrites(impl, threads, rng, shape):
    """variance_delta_cpu overwrites with (Σ delta (x - mean))·(-1/2)(variance + 1e-5)^(-3/2)."""
    b, f, s = shape
    x = activations(rng, shape)
    delta = activations(rng, shape, offset_std=1.0)
    mean = exact_mean_f32(x, b, f, s)
    var = channel_vec(rng, f, 0.25, 4.0)
    vd = np.full(f, np.nan, dtype=np.float32)
    ret = impl.variance_delta_cpu(x, delta, mean, var, b, f, s, vd)
    assert_same_buffer(ret, vd, "variance_delta")
    want = oracle.variance_delta_cpu(x, delta, mean, var, b, f, s)
    assert_close(vd, want, what="variance_delta")
    impl.variance_delta_cpu(x, delta, mean, var, b, f, s, vd)
    assert_close(vd, want, what="variance_delta again")


@ACCURACY_SHAPES
def test_normalize_delta_cpu_in_place(impl, threads, rng, shape):
    """normalize_delta_cpu rewrites delta in place by docs/reference.md §3's formula."""
    b, f, s = shape
    x = activations(rng, shape)
    delta = activations(rng, shape, offset_std=1.0)
    mean = exact_mean_f32(x, b, f, s)
    var = channel_vec(rng, f, 0.25, 4.0)
    md = f32(rng.normal(size=f) * np.sqrt(b * s))
    vd = f32(rng.normal(size=f) * np.sqrt(b * s))
    d_in = delta.copy()
    inputs = [a.copy() for a in (x, mean, var, md, vd)]
    ret = impl.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, delta)
    assert_same_buffer(ret, delta, "delta")
    assert_close(delta, oracle.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, d_in), what="delta")
    for a, a0 in zip((x, mean, var, md, vd), inputs):
        assert np.array_equal(a, a0), "an input of normalize_delta_cpu was modified"


def test_backward_chain_epsilon_inside_root(impl):
    """The backward kernels put Darknet's 1e-5 inside the root: variance 0 gives 1/sqrt(1e-5)."""
    b, f, s = 1, 1, 4
    x = f32([0.0, 1.0, 2.0, 3.0]).reshape(b, f, s)
    delta = f32([1.0, 2.0, 3.0, 4.0]).reshape(b, f, s)
    mean, var = f32([1.5]), f32([0.0])
    md = impl.mean_delta_cpu(delta, var, b, f, s, np.zeros(1, np.float32))
    assert_close(md, np.array([-10.0 / np.sqrt(1e-5)]), what="mean_delta")
    vd = impl.variance_delta_cpu(x, delta, mean, var, b, f, s, np.zeros(1, np.float32))
    assert_close(vd, np.array([5.0 * -0.5 * 1e-5 ** -1.5]), what="variance_delta")
    dn = impl.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, delta.copy())
    assert_close(dn, oracle.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, delta), what="delta")


# --------------------------------------------------------------------------- shapes, agreement

def test_any_array_shape_accepted(impl, rng):
    """Kernels take arrays of any shape whose size matches (flat, 3-D, 4-D give the same result)."""
    b, f, h, w = 2, 3, 4, 5
    x4 = activations(rng, (b, f, h, w))
    results = []
    for x in (x4.copy(), x4.reshape(-1).copy(), x4.reshape(b, f, h * w).copy()):
        mean = np.zeros((f,), np.float32)
        impl.mean_cpu(x, b, f, h * w, mean)
        impl.normalize_cpu(x, mean, f32(np.ones(f)), b, f, h * w)
        results.append((mean.copy(), x.reshape(-1).copy()))
        assert x.shape in {(b, f, h, w), (b * f * h * w,), (b, f, h * w)}, "shape changed"
    want = oracle.normalize_cpu(x4, oracle.mean_cpu(x4, b, f, h * w), np.ones(f), b, f, h * w)
    for mean, xn in results:
        assert_close(xn, want.reshape(-1), what="x")
    # Per-channel vectors may be 2-D too (e.g. (f, 1)).
    mean2 = np.zeros((f, 1), np.float32)
    impl.mean_cpu(x4, b, f, h * w, mean2)
    assert_ulps(mean2.reshape(-1), oracle.mean_cpu(x4, b, f, h * w), what="mean")


def test_numpy_integer_sizes_accepted(impl, rng):
    """Sizes given as NumPy integers (e.g. from array.shape arithmetic) work like Python ints."""
    x = activations(rng, (3, 4, 5))
    mean = np.zeros(4, np.float32)
    impl.mean_cpu(x, np.int64(3), np.int32(4), np.int64(5), mean)
    assert_ulps(mean, oracle.mean_cpu(x, 3, 4, 5), what="mean")


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1, 1031), (2, 32, 52 * 52), (64, 16, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fast_and_reference_agree(threads, rng, shape):
    """Every fast kernel agrees with its reference loop to docs/reference.md §6 tolerance (extra check)."""
    b, f, s = shape
    x = activations(rng, shape)
    delta = activations(rng, shape, offset_std=1.0)
    R = K.reference
    out = {}
    for key, mod in (("fast", K), ("ref", R)):
        mean = mod.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
        var = mod.variance_cpu(x, mean, b, f, s, np.zeros(f, np.float32))
        xn = mod.normalize_cpu(x.copy(), mean, var, b, f, s)
        y = mod.add_bias(mod.scale_bias(xn.copy(), f32(np.linspace(0.5, 2, f)), b, f, s),
                         f32(np.linspace(-1, 1, f)), b, f, s)
        bu = mod.backward_bias(f32(np.ones(f)), delta, b, f, s)
        su = mod.backward_scale_cpu(xn, delta, b, f, s, f32(np.ones(f)))
        md = mod.mean_delta_cpu(delta, var, b, f, s, np.zeros(f, np.float32))
        vd = mod.variance_delta_cpu(x, delta, mean, var, b, f, s, np.zeros(f, np.float32))
        dn = mod.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, delta.copy())
        out[key] = dict(mean=mean, var=var, xn=xn, y=y, bu=bu, su=su, md=md, vd=vd, dn=dn)
    for name in ("mean", "var"):
        assert_ulps(out["fast"][name], out["ref"][name].astype(np.float64), ulps=2 * 4, what=name)
    for name in ("xn", "y", "bu", "su", "md", "vd", "dn"):
        assert_close(out["fast"][name], out["ref"][name].astype(np.float64), rtol=2e-5, atol=2e-5,
                     what=name)


def test_results_deterministic_for_a_thread_count(rng):
    """At a given thread count, repeated calls give bit-identical results (header contract)."""
    old = darknet_bn.get_num_threads()
    try:
        darknet_bn.set_num_threads(2)
        b, f, s = 3, 2, 20011
        x = activations(rng, (b, f, s), offset_std=50)
        delta = activations(rng, (b, f, s))
        runs = []
        for _ in range(3):
            mean = K.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
            var = K.variance_cpu(x, mean, b, f, s, np.zeros(f, np.float32))
            su = K.backward_scale_cpu(x, delta, b, f, s, np.zeros(f, np.float32))
            runs.append(np.concatenate([mean, var, su]).view(np.uint32))
        assert all(np.array_equal(runs[0], r) for r in runs[1:])
    finally:
        darknet_bn.set_num_threads(old)


# --------------------------------------------------------------------------- accuracy limits of docs/reference.md §6

@pytest.mark.parametrize("offset_std", [100.0, 1e4])
def test_mean_variance_large_offset(impl, threads, rng, offset_std):
    """mean/variance stay within 4 ulps of exact for means up to 1e4 std from zero."""
    b, f, s = 4, 3, 52 * 52
    std = np.array([1.0, 0.5, 2.0])
    off = offset_std * std * np.array([1.0, -1.0, 1.0])
    x = f32(off[None, :, None] + std[None, :, None] * rng.standard_normal((b, f, s)))
    mean = impl.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
    assert_ulps(mean, oracle.mean_cpu(x, b, f, s), what="mean")
    var = impl.variance_cpu(x, mean, b, f, s, np.zeros(f, np.float32))
    assert_ulps(var, oracle.variance_cpu(x, mean, b, f, s), what="variance")


def test_darknet_float_accumulator_case(impl, rng):
    """docs/reference.md §3's example: 346,112 values of mean 10,000 and std 1 give variance ~1 (not 183x)."""
    b, f, s = 8, 1, 346112 // 8
    x = f32(10000.0 + rng.standard_normal((b, f, s)))
    mean = impl.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
    assert_ulps(mean, oracle.mean_cpu(x, b, f, s), what="mean")
    var = impl.variance_cpu(x, mean, b, f, s, np.zeros(f, np.float32))
    assert_ulps(var, oracle.variance_cpu(x, mean, b, f, s), what="variance")
    assert 0.9 < var[0] < 1.1


def test_mean_variance_ten_million_values(impl, threads):
    """mean/variance within 4 ulps of exact for 10^7 values per channel with offset 1e3 std."""
    rng = np.random.default_rng(7)
    b, f, s = 10, 1, 10 ** 6
    x = f32(1000.0 + rng.standard_normal((b, f, s), dtype=np.float32))
    mean = impl.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
    assert_ulps(mean, oracle.mean_cpu(x, b, f, s), what="mean")
    var = impl.variance_cpu(x, mean, b, f, s, np.zeros(f, np.float32))
    assert_ulps(var, oracle.variance_cpu(x, mean, b, f, s), what="variance")


@pytest.mark.parametrize("offset_std", [30.0, 100.0])
def test_normalize_and_backward_large_offset(impl, threads, rng, offset_std):
    """normalize and the backward kernels meet docs/reference.md §6 for means up to 100 std from zero."""
    b, f, s = 3, 4, 257
    std = rng.uniform(0.5, 2.0, f)
    off = offset_std * std * np.array([1, -1, 1, -1])
    x = f32(off[None, :, None] + std[None, :, None] * rng.standard_normal((b, f, s)))
    delta = f32(rng.standard_normal((b, f, s)))
    mean = impl.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
    var = impl.variance_cpu(x, mean, b, f, s, np.zeros(f, np.float32))
    xn = impl.normalize_cpu(x.copy(), mean, var, b, f, s)
    assert_close(xn, oracle.normalize_cpu(x, mean, var, b, f, s), what="x")
    md = impl.mean_delta_cpu(delta, var, b, f, s, np.zeros(f, np.float32))
    assert_close(md, oracle.mean_delta_cpu(delta, var, b, f, s), what="mean_delta")
    vd = impl.variance_delta_cpu(x, delta, mean, var, b, f, s, np.zeros(f, np.float32))
    assert_close(vd, oracle.variance_delta_cpu(x, delta, mean, var, b, f, s), what="variance_delta")
    dn = impl.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, delta.copy())
    assert_close(dn, oracle.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, delta), what="delta")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the oracle's own NaN arithmetic
def test_nan_and_inf_stay_in_their_channel(impl, threads, rng):
    """NaN/Inf in one channel's input make that channel non-finite and leave the others exact."""
    b, f, s = 2, 4, 9
    x = activations(rng, (b, f, s))
    x[1, 1, 3] = np.nan
    x[0, 2, 0] = np.inf
    mean = impl.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
    assert np.isnan(mean[1]) and not np.isfinite(mean[2])
    good = [0, 3]
    assert_ulps(mean[good], oracle.mean_cpu(x, b, f, s)[good], what="mean")
    var = impl.variance_cpu(x, mean, b, f, s, np.zeros(f, np.float32))
    assert not np.isfinite(var[1]) and not np.isfinite(var[2])
    assert_ulps(var[good], oracle.variance_cpu(x, mean, b, f, s)[good], what="variance")
    xn = impl.normalize_cpu(x.copy(), mean, var, b, f, s)
    assert np.isnan(xn[:, 1]).all() and np.isnan(xn[:, 2]).all()
    assert_close(xn[:, good], oracle.normalize_cpu(x, mean, var, b, f, s)[:, good], what="x")
    su = impl.backward_scale_cpu(xn, f32(np.ones((b, f, s))), b, f, s, np.zeros(f, np.float32))
    assert np.isnan(su[1]) and np.isnan(su[2]) and np.isfinite(su[good]).all()


@pytest.mark.bigmem
def test_more_than_2_31_elements():
    """docs/reference.md §2: 64-bit indexing; a tensor of more than 2^31 floats is read and written correctly."""
    b, f, s = 1, 2, 2 ** 30 + 3
    x = np.empty((b, f, s), np.float32)
    x[:, 0] = 1.0
    x[:, 1] = 3.0
    x[0, 1, -1] = 3.0 + 2.0 ** -10 * s  # shifts the mean of channel 1 by 2^-10
    mean = K.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
    assert_ulps(mean, np.array([1.0, (3.0 * (s - 1) + float(x[0, 1, -1])) / s]), what="mean")
    K.add_bias(x, f32([1.0, -1.0]), b, f, s)
    assert x[0, 0, 0] == 2.0 and x[0, 0, -1] == 2.0 and x[0, 1, 0] == 2.0
    assert x[0, 1, -2] == 2.0 and x[0, 1, -1] == np.float32(2.0 + 2.0 ** -10 * s)


# --------------------------------------------------------------------------- settings

def test_info_and_thread_settings():
    """info() reports version, SIMD path and threads; set/get_num_threads round-trip."""
    info = darknet_bn.info()
    assert set(info) >= {"version", "simd", "threads"}
    assert info["simd"] in ("avx2", "generic")
    parts = str(info["version"]).split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts), info["version"]
    old = darknet_bn.get_num_threads()
    try:
        darknet_bn.set_num_threads(1)
        assert darknet_bn.get_num_threads() == 1 and darknet_bn.info()["threads"] == 1
        darknet_bn.set_num_threads(3)
        assert darknet_bn.get_num_threads() == 3 and darknet_bn.info()["threads"] == 3
    finally:
        darknet_bn.set_num_threads(old)
    assert darknet_bn.get_num_threads() == old


def _run_python(code, **env_changes):
    env = dict(os.environ)
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_thread_count_defaults_and_environment():
    """Default threads = usable cores; DARKNET_BN_NUM_THREADS overrides it."""
    code = "import darknet_bn; print(darknet_bn.get_num_threads())"
    cores = len(os.sched_getaffinity(0))
    assert int(_run_python(code, DARKNET_BN_NUM_THREADS=None)) == cores
    assert int(_run_python(code, DARKNET_BN_NUM_THREADS="3")) == 3


def test_simd_environment_forces_generic(rng):
    """DARKNET_BN_SIMD=generic selects the portable path, which still computes correct results."""
    code = (
        "import numpy as np, darknet_bn, darknet_bn.kernels as K\n"
        "x = np.arange(2*3*37, dtype=np.float32).reshape(2, 3, 37) * np.float32(0.25)\n"
        "m = K.mean_cpu(x, 2, 3, 37, np.zeros(3, np.float32))\n"
        "print(darknet_bn.info()['simd']); print(' '.join(repr(float(v)) for v in m))\n"
    )
    out = _run_python(code, DARKNET_BN_SIMD="generic").splitlines()
    assert out[0] == "generic"
    x = np.arange(2 * 3 * 37, dtype=np.float32).reshape(2, 3, 37) * np.float32(0.25)
    assert_ulps(f32([float(v) for v in out[1].split()]), oracle.mean_cpu(x, 2, 3, 37), what="mean")


def test_works_in_child_after_fork(rng):
    """After the parent used its threads, a forked child still computes correct results."""
    old = darknet_bn.get_num_threads()
    darknet_bn.set_num_threads(2)
    try:
        b, f, s = 2, 3, 4099
        x = activations(rng, (b, f, s))
        K.mean_cpu(x, b, f, s, np.zeros(f, np.float32))  # the parent uses its threads first
        want = oracle.mean_cpu(x, b, f, s)
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                m = K.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
                err = np.abs(m.astype(np.float64) - want)
                code = 0 if (err <= 4 * np.spacing(np.abs(want).astype(np.float32))).all() else 3
            finally:
                os._exit(code)
        assert wait_child(pid, timeout=30) == 0
    finally:
        darknet_bn.set_num_threads(old)
