"""Memory (docs/reference.md §5, §8): creating and freeing many layers, calling kernels and
failing calls do not grow the process; a layer's C memory lives exactly as long
as the layer or any of its views, and is freed by reference counting alone.

Growth is measured as resident set size (/proc/self/statm) after a warm-up run
of the same loop, against a bound far below what a leak would cost (2,000
layers of 1 MB leaked = 2 GB).
"""

import gc
import os
import weakref

import numpy as np
import pytest

import darknet_bn
import darknet_bn.kernels as K
from _reliability import describe_exit, run_python

MB = 1 << 20
BOUND = 64 * MB                 # allowed RSS growth; a leak here costs hundreds of MB to GB
LAYER_1MB = (4, 16, 32, 32)     # 65,536 values: four activation buffers of 256 KB = 1 MB a layer

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm")


def rss():
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss():
    gc.collect()
    return rss()


def churn_layers(n, rng, keep_views=0):
    """Create, use (touching every buffer) and free `n` layers of 1 MB, alternating numerics.

    keep_views: hold the output/scales views of the last `keep_views` layers past the
    layer's own deletion, then drop them all at the end.
    """
    b, c, h, w = LAYER_1MB
    x = rng.standard_normal(LAYER_1MB).astype(np.float32)
    views = []
    for i in range(n):
        layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics="darknet" if i % 2 else "standard")
        layer.forward(x)
        layer.backward(x)
        layer.update(0.01)
        if keep_views:
            views.append((layer.output, layer.scales, layer.x_norm))
            if len(views) > keep_views:
                views.pop(0)
        del layer
        if i % 200 == 199:
            gc.collect()
    views.clear()


@pytest.mark.parametrize("keep_views", [0, 20], ids=["no_views", "views_kept_then_dropped"])
def test_creating_and_freeing_layers_does_not_grow(keep_views):
    """2,000 layers of 1 MB created, trained and freed (optionally outliving views): RSS grows < 64 MB."""
    rng = np.random.default_rng(30)
    churn_layers(300, rng, keep_views)  # warm-up: allocator pools, caches, code paths
    before = settled_rss()
    churn_layers(2000, rng, keep_views)
    growth = settled_rss() - before
    assert growth < BOUND, f"RSS grew by {growth / MB:.1f} MB over 2,000 layers of 1 MB"


def test_many_live_layers_freed_and_reused():
    """Cycles of 400 live 1 MB layers, all freed together: after two warm-up cycles, no growth per cycle."""
    # The allocator may keep freed heap memory for reuse instead of returning it to the
    # OS, so the baseline is taken once it holds a cycle's worth.
    b, c, h, w = LAYER_1MB
    x = np.random.default_rng(31).standard_normal(LAYER_1MB).astype(np.float32)

    def cycle():
        layers = [darknet_bn.BatchNormLayer(b, w, h, c) for _ in range(400)]
        for layer in layers:
            layer.forward(x)
        del layers, layer
        gc.collect()

    for _ in range(2):
        cycle()
    warm = settled_rss()
    for _ in range(3):
        cycle()
    growth = settled_rss() - warm
    assert growth < BOUND, f"RSS grew by {growth / MB:.1f} MB over 3 cycles of 400 MB of layers"


def test_calls_and_failing_calls_do_not_leak():
    """Thousands of forward calls on copied (non-contiguous) 1 MB inputs, kernel calls and refused calls: RSS grows < 64 MB."""
    b, c, h, w = LAYER_1MB
    rng = np.random.default_rng(32)
    layer = darknet_bn.BatchNormLayer(b, w, h, c)
    wide = rng.standard_normal((b, c, h, 2 * w)).astype(np.float32)
    strided = wide[..., ::2]  # non-contiguous: forward copies it every call
    wrong = wide.astype(np.float64)[..., ::2]
    flat = np.ascontiguousarray(strided).reshape(b, c, h * w)
    out = np.zeros(c, np.float32)

    def loop(n):
        for _ in range(n):
            layer.forward(strided)
            layer.backward(strided)
            K.mean_cpu(strided, b, c, h * w, out)
            K.variance_cpu(flat, out, b, c, h * w, np.zeros(c, np.float32))
            for bad in (lambda: layer.forward(wrong), lambda: layer.backward(strided[:1]),
                        lambda: K.mean_cpu(wrong, b, c, h * w, out), lambda: layer.update("x")):
                try:
                    bad()
                except (TypeError, ValueError):
                    pass
                else:
                    raise AssertionError("a bad call was accepted")

    loop(200)
    before = settled_rss()
    loop(2000)
    growth = settled_rss() - before
    assert growth < BOUND, f"RSS grew by {growth / MB:.1f} MB over 2,000 rounds of calls on 1 MB arrays"


def test_layer_memory_freed_by_refcount_and_kept_by_views():
    """A 256 MB layer is freed at `del` without gc (no reference cycles), but not while a view of it lives."""
    shape = (4, 16, 1024, 1024)  # 64 MB per activation buffer, mmap'd: freeing returns it to the OS
    b, c, h, w = shape
    x = np.ones(shape, np.float32)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        layer = darknet_bn.BatchNormLayer(b, w, h, c)
        layer.forward(x)
        layer.delta[...] = 1.0  # touch all four activation buffers
        ref = weakref.ref(layer)
        held = rss()
        del layer
        assert ref() is None, "the layer is kept alive by a reference cycle"
        freed = held - rss()
        assert freed > 200 * MB, f"only {freed / MB:.0f} MB of the 256 MB layer were freed at del"

        layer = darknet_bn.BatchNormLayer(b, w, h, c)
        layer.forward(x)
        layer.delta[...] = 1.0
        view = layer.output[1:3]
        held = rss()
        del layer
        still = held - rss()
        assert view.sum(dtype=np.float64) == 0.0  # x constant: x_norm and output are 0
        assert still < 200 * MB, "the layer's memory was released while a view of it lived"
        del view
        freed = held - rss()
        assert freed > 200 * MB, f"only {freed / MB:.0f} MB freed after the last view was dropped"
    finally:
        if was_enabled:
            gc.enable()


def darknet_x_norm(x):
    """docs/reference.md §3 x_norm in float64: (x - mean) / (sqrt(unbiased variance) + 1e-6) per channel."""
    xd = x.astype(np.float64)
    mean = xd.mean(axis=(0, 2, 3), keepdims=True)
    return (xd - mean) / (np.sqrt(xd.var(axis=(0, 2, 3), ddof=1, keepdims=True)) + 1e-6)


DERIVED = {
    "slice": lambda a: a[1],
    "reshape": lambda a: a.reshape(-1),
    "transpose": lambda a: a.T,
}


@pytest.mark.parametrize("derive", list(DERIVED))
def test_derived_x_norm_views_follow_training_forwards(derive):
    """An array derived from layer.x_norm (slice, reshape, ...) and held across a training forward shows that forward's x_norm."""
    rng = np.random.default_rng(34)
    shape = (3, 2, 4, 5)
    b, c, h, w = shape
    layer = darknet_bn.BatchNormLayer(b, w, h, c)
    x1 = rng.standard_normal(shape).astype(np.float32)
    x2 = (3.0 * rng.standard_normal(shape) + 2.0).astype(np.float32)
    layer.forward(x1)
    held = DERIVED[derive](layer.x_norm)  # the array layer.x_norm returned is a temporary
    for x in (x2, x1):
        layer.forward(x)
        want = DERIVED[derive](darknet_x_norm(x))
        err = np.abs(held - want).max()
        assert err < 1e-5, f"a {derive} of x_norm held across forward shows stale values (max error {err:.3g})"


_VIEW_CHILD = """
import gc
import numpy as np
import darknet_bn

rng = np.random.default_rng(33)
results = []
for shape in [(2, 3, 4, 5), (4, 16, 512, 512)]:   # small (heap) and large (mmap'd) buffers
    b, c, h, w = shape
    x = rng.standard_normal(shape).astype(np.float32)
    layer = darknet_bn.BatchNormLayer(b, w, h, c)
    layer.forward(x)
    layer.backward(x)
    views = {n: getattr(layer, n) for n in ("output", "x_norm", "delta", "scales", "rolling_mean")}
    want = {n: v.copy() for n, v in views.items()}
    del layer
    gc.collect()
    # Reuse the memory if it had been freed: new layers and arrays of the same sizes, filled.
    junk = []
    for _ in range(8):
        other = darknet_bn.BatchNormLayer(b, w, h, c)
        other.forward(np.full(shape, 7.0, np.float32))
        junk.append(other)
        junk.append(np.full(shape, 9.0, np.float32))
        junk.append(np.full(c, 9.0, np.float32))
    for n, v in views.items():
        assert np.array_equal(v, want[n]), n + " changed after its layer was deleted"
        v[...] = 3.0                        # still writable memory
        assert np.all(v == 3.0)
    results.append("ok")
    del junk, views
    gc.collect()
print(" ".join(results))
"""


def test_views_outlive_their_layer_safely():
    """Views kept after `del layer` (small and large buffers) still read and write valid memory (child process)."""
    r = run_python(_VIEW_CHILD, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["ok", "ok"], describe_exit(r)
