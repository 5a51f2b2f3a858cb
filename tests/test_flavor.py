"""The AlexeyAB flavor of the kernels (build/libdarknet_bn_alexeyab.so) against a float64 oracle.

AlexeyAB's Darknet differs from pjreddie's in two kernels:

- normalize_cpu:       x = (x - mean) / sqrt(var + 1e-5)      (pjreddie: / (sqrt(var) + 1e-6))
- normalize_delta_cpu: delta * 1/(sqrt(var) + 1e-5) + ...     (pjreddie: delta * 1/sqrt(var + 1e-5) + ...)

The oracle below writes both forks' formulas in float64 (the other terms of
normalize_delta_cpu are tests/oracle.py's); both shared libraries are loaded
side by side through cffi's ABI mode, so every call compares the two builds on
the same inputs. The other eight kernels must be bit-identical across flavors.
"""

import subprocess
from pathlib import Path

import numpy as np
import pytest

import oracle
from conftest import assert_close
from test_cdef import REFERENCE_KERNELS, header_cdef_region, parse_prototypes

cffi = pytest.importorskip("cffi")

ROOT = Path(__file__).resolve().parent.parent
LIBS = {"pjreddie": ROOT / "build" / "libdarknet_bn.so", "alexeyab": ROOT / "build" / "libdarknet_bn_alexeyab.so"}
SHAPES = [(2, 3, 5), (4, 16, 7), (1, 5, 1), (8, 3, 64), (3, 130, 1), (32, 7, 9)]
EPS = 1e-5


def forward_divisor(flavor, var):
    """normalize_cpu's divisor of each fork, float64."""
    return np.sqrt(var + EPS) if flavor == "alexeyab" else np.sqrt(var) + 1e-6


def delta_factor(flavor, var):
    """normalize_delta_cpu's factor on delta of each fork, float64."""
    return 1.0 / (np.sqrt(var) + EPS) if flavor == "alexeyab" else 1.0 / np.sqrt(var + EPS)


@pytest.fixture(scope="module")
def libs():
    subprocess.run(["make", "-s", "-C", str(ROOT), *(str(p.relative_to(ROOT)) for p in LIBS.values())],
                   check=True, capture_output=True)
    header = (ROOT / "csrc" / "darknet_bn.h").read_text(encoding="utf-8")
    protos = parse_prototypes(header_cdef_region(header))
    ffi = cffi.FFI()
    ffi.cdef("\n".join(f"{ret} {name}({', '.join(t for t, _ in params) or 'void'});"
                       for name, (ret, params) in protos.items()
                       if name in REFERENCE_KERNELS or name.endswith("_ref") or name == "dnbn_kernel_flavor"))
    return ffi, {flavor: ffi.dlopen(str(path)) for flavor, path in LIBS.items()}


def ptr(ffi, a):
    assert a.dtype == np.float32 and a.flags.c_contiguous
    return ffi.cast("float *", ffi.from_buffer(a))


def inputs(shape, seed, offset=0.0):
    b, f, s = shape
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, f, s)) * rng.uniform(0.01, 3, (1, f, 1)) + offset).astype(np.float32)
    mean = x.astype(np.float64).mean(axis=(0, 2)).astype(np.float32)
    var = (rng.uniform(0, 4, f) ** 2).astype(np.float32)
    var[0] = 0.0  # where the two forks differ most: the epsilon alone
    delta = rng.standard_normal((b, f, s)).astype(np.float32)
    mean_delta = rng.standard_normal(f).astype(np.float32)
    variance_delta = rng.standard_normal(f).astype(np.float32)
    return x, mean, var, delta, mean_delta, variance_delta


def test_each_library_names_its_flavor(libs):
    ffi, lib = libs
    for flavor, handle in lib.items():
        assert ffi.string(handle.dnbn_kernel_flavor()).decode() == flavor


@pytest.mark.parametrize("suffix", ["", "_ref"])
@pytest.mark.parametrize("flavor", ["pjreddie", "alexeyab"])
@pytest.mark.parametrize("shape", SHAPES)
def test_normalize_cpu_flavor(libs, flavor, shape, suffix):
    """normalize_cpu (and _ref) of each build equals its fork's formula in float64."""
    ffi, lib = libs
    b, f, s = shape
    x, mean, var, *_ = inputs(shape, seed=b * 100 + f)
    got = x.copy()
    getattr(lib[flavor], "normalize_cpu" + suffix)(ptr(ffi, got), ptr(ffi, mean), ptr(ffi, var), b, f, s)
    want = (x.astype(np.float64) - mean[None, :, None]) / forward_divisor(flavor, var.astype(np.float64))[None, :, None]
    assert_close(got, want, what=f"{flavor} normalize_cpu{suffix}")


@pytest.mark.parametrize("suffix", ["", "_ref"])
@pytest.mark.parametrize("flavor", ["pjreddie", "alexeyab"])
@pytest.mark.parametrize("shape", SHAPES)
def test_normalize_delta_cpu_flavor(libs, flavor, shape, suffix):
    """normalize_delta_cpu (and _ref) of each build equals its fork's formula in float64."""
    ffi, lib = libs
    b, f, s = shape
    x, mean, var, delta, md, vd = inputs(shape, seed=b * 10 + f)
    got = delta.copy()
    getattr(lib[flavor], "normalize_delta_cpu" + suffix)(ptr(ffi, x), ptr(ffi, mean), ptr(ffi, var), ptr(ffi, md),
                                                         ptr(ffi, vd), b, f, s, ptr(ffi, got))
    m = b * s
    v64 = var.astype(np.float64)
    want = (delta.astype(np.float64) * delta_factor(flavor, v64)[None, :, None]
            + vd.astype(np.float64)[None, :, None] * 2.0 * (x.astype(np.float64) - mean[None, :, None]) / m
            + md.astype(np.float64)[None, :, None] / m)
    assert_close(got, want, what=f"{flavor} normalize_delta_cpu{suffix}")


def test_the_oracle_tells_the_forks_apart():
    """The two forks' normalizers differ measurably at small variance (so the tests above can fail)."""
    var = np.array([0.0, 1e-6, 1e-4])
    assert np.all(np.abs(forward_divisor("alexeyab", var) / forward_divisor("pjreddie", var) - 1) > 0.01)
    assert np.all(np.abs(delta_factor("alexeyab", var) / delta_factor("pjreddie", var) - 1) > 0.01)
    # and pjreddie's is the one tests/oracle.py (written independently) has
    x = np.ones((1, 3, 1))
    assert np.allclose(oracle.normalize_cpu(x, np.zeros(3), var, 1, 3, 1).ravel(), 1 / forward_divisor("pjreddie", var))


@pytest.mark.parametrize("shape", SHAPES)
def test_other_kernels_identical_across_flavors(libs, shape):
    """The eight kernels the forks share give bit-identical results in both builds."""
    ffi, lib = libs
    b, f, s = shape
    x, mean, var, delta, *_ = inputs(shape, seed=7 + b)
    scales = np.linspace(0.5, 2, f, dtype=np.float32)
    results = {}
    for flavor, L in lib.items():
        out = {name: np.zeros(f, np.float32) for name in ("mean", "variance", "bias", "scale", "md", "vd")}
        L.mean_cpu(ptr(ffi, x), b, f, s, ptr(ffi, out["mean"]))
        L.variance_cpu(ptr(ffi, x), ptr(ffi, mean), b, f, s, ptr(ffi, out["variance"]))
        L.backward_bias(ptr(ffi, out["bias"]), ptr(ffi, delta), b, f, s)
        L.backward_scale_cpu(ptr(ffi, x), ptr(ffi, delta), b, f, s, ptr(ffi, out["scale"]))
        L.mean_delta_cpu(ptr(ffi, delta), ptr(ffi, var), b, f, s, ptr(ffi, out["md"]))
        L.variance_delta_cpu(ptr(ffi, x), ptr(ffi, delta), ptr(ffi, mean), ptr(ffi, var), b, f, s, ptr(ffi, out["vd"]))
        y = x.copy()
        L.scale_bias(ptr(ffi, y), ptr(ffi, scales), b, f, s)
        L.add_bias(ptr(ffi, y), ptr(ffi, scales), b, f, s)
        out["y"] = y
        results[flavor] = out
    for name, a in results["pjreddie"].items():
        assert np.array_equal(a, results["alexeyab"][name], equal_nan=True), name
    assert_close(results["alexeyab"]["md"], oracle.mean_delta_cpu(delta, var, b, f, s), what="mean_delta_cpu")
