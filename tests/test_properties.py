"""Property tests (hypothesis): random shapes and values against the float64 oracle,
and random malformed calls that must never crash the process (docs/reference.md §3-§6, §8).

The data generator keeps every channel's mean within 90 of its standard
deviations of zero (docs/reference.md §6's domain, with margin), spans standard deviations
from 1e-3 to 1e3 and deltas from 1e-2 to 1e2, includes constant channels, and
uses the docs/reference.md §6 tolerance. The layer is checked on the whole domain, including
deltas whose exact backward is a small difference of large terms.

The kernel chain mean_delta_cpu -> variance_delta_cpu -> normalize_delta_cpu is
fed deltas scaled per channel so that those terms stay small
(|delta| / sqrt(var + 1e-5) <= 4, and 0.5 (var + 1e-5)^(-3/2) sum |delta (x - mean)|
<= 2): the ill-conditioned kernel case is test_stress.py's
test_normalize_delta_kernel_cancellation_meets_spec_tolerance.

Means are checked to 4 float32 ulps of the exact value plus 4 float64 ulps of the
channel's largest magnitude: the error any float64 accumulation has when the
mean is a near-total cancellation (a mean 1e-10 of the spread, say).

The malformed-call fuzz runs in a child process (tests/_fuzz_calls.py), so a
segmentation fault is reported as the child's signal, not as a dead test run.
"""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import darknet_bn
import darknet_bn.kernels as K
import oracle
from _reliability import HERE, describe_exit, make_pair, per_channel, run_python
from conftest import ULPS, assert_close, assert_ulps, f32, float32_ulp

PROPS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OFFSET_STD = 90.0    # |mean| <= 90 std (docs/reference.md §6 says 100)
MAX_GAIN = 4.0       # bounds for the deltas of the kernel backward chain (module docstring)
MAX_VD_TERMS = 2.0


# --------------------------------------------------------------------------- strategies

def standardized(z):
    """Rows of z shifted to mean 0 and scaled to std 1 (float64); constant rows become 0."""
    u = z - z.mean(axis=1, keepdims=True)
    sd = u.std(axis=1, keepdims=True)
    return np.where(sd > 0, u / np.where(sd > 0, sd, 1.0), 0.0)


def to_nchw(rows, b, c, h, w):
    """(c, b*h*w) rows -> (b, c, h, w)."""
    return np.moveaxis(rows.reshape(c, b, h, w), 0, 1)


@st.composite
def cases(draw, max_batch=6, max_c=9, max_hw=9, need_train=True):
    """A random layer problem: shape, numerics, float32 input, scales, biases, unit-range delta pattern."""
    b = draw(st.integers(1, max_batch))
    c = draw(st.integers(1, max_c))
    h = draw(st.integers(1, max_hw))
    w = draw(st.integers(1, max_hw))
    if need_train and b * h * w < 2:
        w = 2
    m = b * h * w
    numerics = draw(st.sampled_from(["darknet", "standard"]))
    unit = st.floats(-4, 4, allow_nan=False, allow_subnormal=False)
    z = draw(hnp.arrays(np.float64, (c, m), elements=unit))
    log_std = draw(hnp.arrays(np.float64, c, elements=st.floats(-3, 3)))
    offset = draw(hnp.arrays(np.float64, c, elements=st.floats(-OFFSET_STD, OFFSET_STD)))
    std = 10.0 ** log_std
    rows = std[:, None] * (offset[:, None] + standardized(z))
    x = f32(to_nchw(rows, b, c, h, w))
    gamma = draw(hnp.arrays(np.float32, c, elements=st.floats(-2, 2, width=32)))
    beta = draw(hnp.arrays(np.float32, c, elements=st.floats(-2, 2, width=32)))
    dz = draw(hnp.arrays(np.float64, (b, c, h, w), elements=st.floats(-1, 1)))
    dz = dz * 10.0 ** draw(st.floats(-2, 2))
    return dict(shape=(b, c, h, w), numerics=numerics, x=x, gamma=gamma, beta=beta, dz=dz)


def conditioned_delta(case, gamma, mean, variance_used, eps):
    """The case's deltas scaled down per channel to keep backward well conditioned (module docstring).

    inv is the backward's 1/sqrt(variance + eps) (1e-5 for Darknet's backward epsilon).
    """
    b, c, h, w = case["shape"]
    inv = 1.0 / np.sqrt(np.asarray(variance_used, np.float64) + eps)
    g = np.abs(np.asarray(gamma, np.float64))
    dev = per_channel(case["x"], c) - np.asarray(mean, np.float64)[:, None]
    dz = per_channel(case["dz"], c)
    gain = g * inv * np.abs(dz).max(axis=1)
    vd_terms = 0.5 * g * inv ** 3 * np.abs(dz * dev).sum(axis=1)
    k = np.minimum(1.0, np.minimum(MAX_GAIN / np.maximum(gain, 1e-30),
                                   MAX_VD_TERMS / np.maximum(vd_terms, 1e-30)))
    return f32(case["dz"] * k[None, :, None, None])


def assert_mean(got, exact, x, c, what="mean"):
    """4 float32 ulps of the exact mean, plus 4 float64 ulps of the channel's largest |x| (module docstring)."""
    exact = np.asarray(exact, np.float64)
    floor = 4 * np.finfo(np.float64).eps * np.abs(per_channel(x, c)).max(axis=1)
    err = np.abs(np.asarray(got, np.float64) - exact)
    bound = ULPS * float32_ulp(exact) + floor
    assert np.all(err <= bound), f"{what}: got {got}, exact {exact}, |err| {err}, bound {bound}"


def check_forward(layer, st_, train):
    assert_close(layer.output, st_.output, what="output")
    if train:
        assert_close(layer.x_norm, st_.x_norm, what="x_norm")
        assert_mean(layer.mean, st_.mean, st_.x, layer.c)
        assert_ulps(layer.variance, st_.variance, what="variance")
    assert_close(layer.rolling_mean, st_.rolling_mean, what="rolling_mean")
    assert_close(layer.rolling_variance, st_.rolling_variance, what="rolling_variance")


# --------------------------------------------------------------------------- layer against the oracle

@PROPS
@given(cases(), st.floats(0.0, 1.0), st.floats(-1.0, 1.0), st.floats(0.0, 1.0))
def test_layer_training_step_matches_oracle(case, momentum, lr, update_momentum):
    """Random shapes/values: forward, backward, update, then inference match the oracle (both numerics)."""
    b, c, h, w = case["shape"]
    numerics = case["numerics"]
    layer, st_ = make_pair(case["shape"], numerics, scales=case["gamma"], biases=case["beta"],
                           momentum=momentum)
    x = case["x"]
    x_before = x.copy()
    ret = layer.forward(x, train=True)
    st_.forward(x, train=True)
    assert np.array_equal(x, x_before), "forward modified its input"
    assert ret.shape == x.shape and np.shares_memory(ret, layer.output)
    assert np.array_equal(layer.x, x), "x is not a copy of the input"
    check_forward(layer, st_, train=True)

    d = f32(case["dz"])
    d_before = d.copy()
    ret = layer.backward(d)
    st_.backward(d)
    assert np.array_equal(d, d_before), "backward modified its delta argument"
    assert_close(ret, st_.delta, what="delta")
    assert_close(layer.bias_updates, st_.bias_updates, what="bias_updates")
    assert_close(layer.scale_updates, st_.scale_updates, what="scale_updates")
    if numerics == "darknet":
        assert_close(layer.mean_delta, st_.mean_delta, what="mean_delta")
        assert_close(layer.variance_delta, st_.variance_delta, what="variance_delta")

    layer.update(lr, update_momentum, 0.0005)
    st_.update(lr, update_momentum, 0.0005)
    for name in ("scales", "biases", "scale_updates", "bias_updates"):
        assert_close(getattr(layer, name), getattr(st_, name), what=name)

    # Inference with the running statistics of this step, as a function of the layer's own
    # float32 state (darknet's rolling variance may be ~0: inference then multiplies by 1e6,
    # which would amplify the float32 rounding of the parameters the update just wrote).
    for name in ("scales", "biases", "rolling_mean", "rolling_variance"):
        setattr(st_, name, getattr(layer, name).astype(np.float64))
    layer.forward(x, train=False)
    st_.forward(x, train=False)
    assert_close(layer.output, st_.output, what="inference output")


@PROPS
@given(cases(need_train=False))
def test_inference_before_training_matches_oracle(case):
    """Inference on a fresh layer: darknet (x - 0)/(sqrt(0) + 1e-6), standard x/sqrt(1 + eps), then scale and bias."""
    b, c, h, w = case["shape"]
    layer, st_ = make_pair(case["shape"], case["numerics"], scales=case["gamma"], biases=case["beta"])
    x = case["x"]
    ret = layer.forward(x, train=False)
    st_.forward(x, train=False)
    assert ret.shape == x.shape
    assert_close(layer.output, st_.output, what="inference output")
    # Only output was written: the running statistics and parameters are still the initial ones.
    assert np.all(layer.rolling_mean == 0)
    assert np.all(layer.rolling_variance == (0 if case["numerics"] == "darknet" else 1))
    assert np.array_equal(layer.scales, case["gamma"]) and np.array_equal(layer.biases, case["beta"])
    with pytest.raises(darknet_bn.LayerStateError):
        layer.backward(np.zeros(case["shape"], np.float32))


@PROPS
@given(cases(), st.sampled_from(["fast", "reference"]))
def test_kernels_match_oracle(case, impl_name):
    """Each of the ten kernels (fast and reference) on random shapes/values matches the oracle."""
    impl = K if impl_name == "fast" else K.reference
    b, c, h, w = case["shape"]
    f, s = c, h * w
    x = case["x"].reshape(b, f, s)
    z = lambda: np.zeros(f, np.float32)  # noqa: E731
    mean = impl.mean_cpu(x, b, f, s, z())
    assert_mean(mean, oracle.mean_cpu(x, b, f, s), x, f, what="mean_cpu")
    var = impl.variance_cpu(x, mean, b, f, s, z())
    assert_ulps(var, oracle.variance_cpu(x, mean, b, f, s), what="variance_cpu")
    xn = impl.normalize_cpu(x.copy(), mean, var, b, f, s)
    assert_close(xn, oracle.normalize_cpu(x, mean, var, b, f, s), what="normalize_cpu")
    y = impl.scale_bias(xn.copy(), case["gamma"], b, f, s)
    assert_close(y, oracle.scale_bias(xn, case["gamma"], b, f, s), what="scale_bias")
    y2 = impl.add_bias(y.copy(), case["beta"], b, f, s)
    assert_close(y2, oracle.add_bias(y, case["beta"], b, f, s), what="add_bias")
    d = f32(case["dz"]).reshape(b, f, s)
    acc = f32(case["beta"])  # accumulators start non-zero: += must add, not overwrite
    assert_close(impl.backward_bias(acc.copy(), d, b, f, s), oracle.backward_bias(acc, d, b, f, s),
                 what="backward_bias")
    assert_close(impl.backward_scale_cpu(xn, d, b, f, s, acc.copy()),
                 oracle.backward_scale_cpu(xn, d, b, f, s, acc), what="backward_scale_cpu")
    d = conditioned_delta(case, np.ones(f), mean, var, oracle.DARKNET_BACKWARD_EPS).reshape(b, f, s)
    md = impl.mean_delta_cpu(d, var, b, f, s, f32(np.full(f, 7.0)))
    assert_close(md, oracle.mean_delta_cpu(d, var, b, f, s), what="mean_delta_cpu")
    vd = impl.variance_delta_cpu(x, d, mean, var, b, f, s, f32(np.full(f, 7.0)))
    assert_close(vd, oracle.variance_delta_cpu(x, d, mean, var, b, f, s), what="variance_delta_cpu")
    dn = impl.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, d.copy())
    assert_close(dn, oracle.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, d), what="normalize_delta_cpu")


@settings(PROPS, max_examples=40)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9),
       st.sampled_from(["darknet", "standard"]))
def test_training_with_one_value_per_channel_is_refused(b, c, h, w, numerics):
    """Training needs m = batch*h*w >= 2 (docs/reference.md §5): m < 2 raises ArgumentError and writes nothing."""
    layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)
    x = f32(np.arange(b * c * h * w).reshape(b, c, h, w) + 1.0)
    if b * h * w >= 2:
        layer.forward(x)
        assert np.isfinite(layer.output).all()
    else:
        with pytest.raises(darknet_bn.ArgumentError):
            layer.forward(x)
        assert np.all(layer.output == 0) and np.all(layer.rolling_mean == 0)
        layer.forward(x, train=False)  # inference is fine with a single value
        assert np.isfinite(layer.output).all()


# --------------------------------------------------------------------------- malformed calls

def test_random_malformed_calls_never_crash():
    """~1,900 random malformed calls of every public entry point, in a child process: no crash, only allowed errors."""
    code = ("import runpy, sys; sys.argv = ['_fuzz_calls.py', '60']; "
            f"runpy.run_path({HERE + '/_fuzz_calls.py'!r}, run_name='__main__')")
    r = run_python(code, timeout=300)
    last_call = [ln for ln in r.stdout.splitlines() if ln.startswith("CALL ")][-1:]
    assert r.returncode == 0, f"fuzz child failed; last call: {last_call}\n{describe_exit(r)}"
    summary = [ln for ln in r.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert summary and "SANITY ok" in r.stdout, describe_exit(r)
    counts = json.loads(summary[0][len("SUMMARY "):])
    allowed = {"ok", "valid_ok", "DarknetBNError", "ArgumentError", "ArgumentTypeError", "LayerStateError",
               "AllocationError", "TypeError", "ValueError", "MemoryError"}
    assert set(counts) <= allowed, counts
    raised = sum(v for k, v in counts.items() if k not in ("ok", "valid_ok"))
    assert counts.get("valid_ok", 0) >= 100 and raised >= 500 and counts.get("ok", 0) >= 100, counts


# Reassigning a size attribute of a BatchNormLayer must not let a call read or
# write outside the arrays: the input lies just before a PROT_NONE page, so an
# out-of-bounds read is a SIGSEGV of the child, not a silent wrong number.
_GUARDED_CALL = r"""
import ctypes, mmap, sys
import numpy as np
import darknet_bn

ALLOWED = (darknet_bn.DarknetBNError, TypeError, ValueError, MemoryError, AttributeError)
attr, value, method = ATTR, VALUE, METHOD
libc = ctypes.CDLL(None, use_errno=True)
page = mmap.PAGESIZE

def guarded(shape):
    n = int(np.prod(shape)) * 4
    size = -(-n // page) * page
    buf = mmap.mmap(-1, size + page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(ctypes.c_void_p(base + size), ctypes.c_size_t(page), 0) == 0
    arr = np.frombuffer(buf, np.float32, count=n // 4, offset=size - n).reshape(shape)
    arr[...] = 1.0
    return arr

b, c, h, w = 4, 2, 32, 32  # each image is 8 KB: two pages
layer = darknet_bn.BatchNormLayer(b, w, h, c)
layer.forward(np.random.default_rng(0).standard_normal((b, c, h, w)).astype(np.float32))
snap = {n: getattr(layer, n).copy() for n in ("output", "delta", "x", "x_norm", "mean", "rolling_mean")}
if attr is not None:
    try:
        setattr(layer, attr, value)
    except ALLOWED as e:
        print("SETATTR_REFUSED", type(e).__name__)
        sys.exit(0)
shape = (layer.batch, layer.c, layer.h, layer.w)
try:
    arr = guarded(shape)
except Exception as e:
    print("NO_SHAPE", e)
    sys.exit(0)
try:
    getattr(layer, method)(arr)
except ALLOWED as e:
    print("CALL_REFUSED", type(e).__name__, e)
    changed = [n for n, v in snap.items() if not np.array_equal(getattr(layer, n), v, equal_nan=True)]
    sys.exit(3 if changed else 0)
print("CALL_ACCEPTED")
"""


def guarded_call(attr, value, method):
    code = _GUARDED_CALL.replace("ATTR, VALUE, METHOD", f"{attr!r}, {value!r}, {method!r}")
    return run_python(code, timeout=60)


@pytest.mark.parametrize("method", ["forward", "backward"])
def test_guarded_array_harness_accepts_valid_calls(method):
    """Control for the test below: a valid call on an array that ends at a PROT_NONE page runs fine."""
    r = guarded_call(None, None, method)
    assert r.returncode == 0 and "CALL_ACCEPTED" in r.stdout, describe_exit(r)


@pytest.mark.parametrize("attr,value,method", [("batch", 1, "forward"), ("batch", 1, "backward"),
                                               ("h", 8, "forward"), ("c", 1, "backward")])
def test_reassigned_size_attribute_cannot_overrun_arrays(attr, value, method):
    """After layer.<size> = smaller, forward/backward must refuse cleanly (or the assignment must), never read out of bounds."""
    r = guarded_call(attr, value, method)
    assert r.returncode == 0, (
        f"layer.{attr} = {value}; layer.{method}(array of the new shape) -> "
        f"{'reads past the array (SIGSEGV)' if r.returncode == -11 else 'bad exit'}\n{describe_exit(r)}")
    assert "CALL_ACCEPTED" not in r.stdout, (
        f"layer.{attr} = {value} was accepted and {method} ran on an array of the wrong size: {r.stdout}")


def test_update_with_learning_rate_beyond_float32():
    """update() with a finite learning rate that overflows float32 is refused, or leaves untouched channels exact."""
    layer = darknet_bn.BatchNormLayer(2, 2, 2, 2)
    layer.bias_updates = f32([0.0, 1.0])
    layer.scale_updates = f32([0.0, 1.0])
    try:
        layer.update(1e39)  # a finite double; (float)1e39 is inf
    except ValueError:
        return
    # biases[0] += (1e39 / 2) * 0 is exactly biases[0]; inf * 0 would be NaN.
    assert np.isfinite(layer.biases[0]) and layer.biases[0] == 0, layer.biases
    assert np.isfinite(layer.scales[0]) and layer.scales[0] == 1, layer.scales


def test_standard_eps_that_underflows_float32_names_eps():
    """eps=1e-50 (positive, but 0 in float32) is refused with a message naming eps (docs/reference.md §8)."""
    with pytest.raises(ValueError) as ei:
        darknet_bn.BatchNormLayer(2, 2, 2, 2, numerics="standard", eps=1e-50)
    assert "eps" in str(ei.value), str(ei.value)
