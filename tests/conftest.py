"""Shared fixtures and checks for the darknet_bn test suite.

Tolerances are docs/reference.md §6: outputs and deltas within 1e-5 relative plus 1e-5
absolute of the formulas evaluated in float64 on the same float32 inputs; mean
and variance within a few (here 4) float32 ulps of the exact value.
"""

import os
import sys
import time
import zlib

import numpy as np
import pytest

# The tests that name a work split (tests/_reliability.py PATHS) need a known
# thread threshold: the library calibrates it from the machine otherwise
# (docs/reference.md §5). Read by the library at its first parallel call.
os.environ.setdefault("DARKNET_BN_MIN_WORK", "65536")

# The tests of threads, the pool and fork name darknet_bn's own pool; importing
# darknet_bn.torch (test_torch*, the benchmark's tests) would otherwise put the
# calls of the whole session on PyTorch's OpenMP team. test_openmp_team tests the
# team, in interpreters of its own.
os.environ.setdefault("DARKNET_BN_TEAM", "pool")

# The oracle and these helpers are imported by the test modules as plain modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

RTOL = 1e-5  # docs/reference.md §6
ATOL = 1e-5  # docs/reference.md §6
ULPS = 4     # docs/reference.md §6 "a few float32 ulps"

# Every buffer attribute of BatchNormLayer (docs/reference.md §8).
ACT_BUFFERS = ("output", "delta", "x", "x_norm")
CHAN_BUFFERS = ("scales", "biases", "scale_updates", "bias_updates", "mean", "variance",
                "rolling_mean", "rolling_variance", "mean_delta", "variance_delta")
ALL_BUFFERS = ACT_BUFFERS + CHAN_BUFFERS


def assert_close(got, want, rtol=RTOL, atol=ATOL, what="value"):
    """docs/reference.md §6: |got - want| <= rtol*|want| + atol elementwise (NaN must match NaN)."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != expected {want.shape}"
    g = got.astype(np.float64)
    nan_w = np.isnan(want)
    nan_g = np.isnan(g)
    assert np.array_equal(nan_w, nan_g), (
        f"{what}: NaN mismatch at {np.argwhere(nan_w != nan_g)[:5].tolist()}")
    inf_w = np.isinf(want)
    assert np.array_equal(g[inf_w], want[inf_w]), f"{what}: infinities differ"
    fin = ~(nan_w | inf_w)
    err = np.abs(g[fin] - want[fin])
    bound = rtol * np.abs(want[fin]) + atol
    bad = err > bound
    if bad.any():
        idx = np.flatnonzero(fin)[np.flatnonzero(bad)]
        i = idx[np.argmax((err - bound)[bad])]
        pos = np.unravel_index(i, want.shape)
        raise AssertionError(
            f"{what}: {bad.sum()} of {fin.sum()} elements outside {rtol:g}*|want| + {atol:g}; "
            f"worst at {tuple(int(p) for p in pos)}: got {g[pos]!r}, want {want[pos]!r}, "
            f"|err| {abs(g[pos] - want[pos]):.3e}")


def float32_ulp(want):
    """The float32 ulp at each value of `want` (spacing of the float32 nearest to it)."""
    return np.spacing(np.abs(np.asarray(want, dtype=np.float64)).astype(np.float32)).astype(np.float64)


def assert_ulps(got, want, ulps=ULPS, what="value"):
    """docs/reference.md §6 for mean/variance: |got - want| <= ulps float32 ulps of the exact float64 `want`."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != expected {want.shape}"
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}"
    err = np.abs(got.astype(np.float64) - want)
    bound = ulps * float32_ulp(want)
    bad = ~(err <= bound)
    if bad.any():
        i = np.argmax(np.where(bad, err / np.maximum(float32_ulp(want), 1e-300), 0))
        pos = np.unravel_index(i, want.shape)
        raise AssertionError(
            f"{what}: {bad.sum()} of {want.size} values beyond {ulps} float32 ulps; worst at "
            f"{tuple(int(p) for p in pos)}: got {float(got[pos])!r}, exact {want[pos]!r}, "
            f"{err[pos] / float32_ulp(want)[pos]:.2f} ulps")


def f32(a):
    """A C-contiguous float32 copy."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def activations(rng, shape, offset_std=3.0, std_range=(0.5, 2.0), channel_axis=1):
    """float32 data with a per-channel mean within `offset_std` stds and a per-channel std."""
    c = shape[channel_axis]
    bshape = [1] * len(shape)
    bshape[channel_axis] = c
    std = rng.uniform(*std_range, size=c).reshape(bshape)
    off = rng.uniform(-offset_std, offset_std, size=c).reshape(bshape) * std
    return f32(off + std * rng.standard_normal(shape))


def snapshot(layer):
    """Copies of every buffer of a BatchNormLayer, by attribute name."""
    return {name: np.array(getattr(layer, name), copy=True) for name in ALL_BUFFERS}


def assert_unchanged(layer, snap):
    """Every buffer equals the snapshot bit for bit (NaN-aware)."""
    for name, before in snap.items():
        now = np.asarray(getattr(layer, name))
        assert now.shape == before.shape, f"{name}: shape changed"
        assert np.array_equal(now.view(np.uint32), before.view(np.uint32)), f"{name} was modified"


def set_layer_state(layer, st):
    """Copy an oracle LayerState's float64 buffers into a layer (via the copying setters)."""
    for name in ALL_BUFFERS:
        setattr(layer, name, f32(getattr(st, name)))


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's node id: reproducible and distinct per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request):
    """Runs the test at 1 and at 2 threads, restoring the previous thread count after."""
    import darknet_bn
    old = darknet_bn.get_num_threads()
    darknet_bn.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        darknet_bn.set_num_threads(old)


@pytest.fixture(params=["fast", "reference"])
def impl(request):
    """The kernel module under test: darknet_bn.kernels or darknet_bn.kernels.reference."""
    import darknet_bn.kernels as k
    return k if request.param == "fast" else k.reference


def wait_child(pid, timeout=60):
    """Wait for a forked child with a timeout (a hang is killed and reported); return its exit code."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        pytest.fail(f"the forked child was killed by signal {os.WTERMSIG(status)}")
    return os.WEXITSTATUS(status)
