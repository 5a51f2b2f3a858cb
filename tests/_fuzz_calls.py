"""Random malformed calls of every public darknet_bn function and method.

Run as a script by test_properties.py, in its own process, so that a crash
(a signal) shows up as the child's exit status instead of killing pytest:

    python _fuzz_calls.py EXAMPLES_PER_TARGET

For each public entry point (the ten kernels and their reference twins, the
layer's constructor, forward, backward, update and buffer setters, and the
thread settings) hypothesis draws valid arguments and then replaces some of
them with garbage: wrong dtypes, shapes and counts, None, lists, strings,
huge or negative integers, non-contiguous, read-only, unaligned, zero-stride
and byte-swapped arrays, aliased arguments. A call may succeed or raise one of
DarknetBNError / TypeError / ValueError / MemoryError; when it raises, nothing
it could write may have changed (docs/reference.md §5). Anything else fails the run.

Before each call the script prints "CALL <target> <arguments>" (flushed), so
the last such line names the call that crashed the process. At the end it
prints "SUMMARY <json>" with the outcome counts and "SANITY ok" after checking
that the library still computes a correct training step.
"""

import collections
import inspect
import json
import sys

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import darknet_bn
import darknet_bn.kernels as K

ALLOWED = (darknet_bn.DarknetBNError, TypeError, ValueError, MemoryError)
OUTCOMES = collections.Counter()
BUFFERS = ("output", "delta", "x", "x_norm", "scales", "biases", "scale_updates", "bias_updates", "mean",
           "variance", "rolling_mean", "rolling_variance", "mean_delta", "variance_delta")

# Roles of each kernel's arguments (C order): "act" activation, "chan" per-channel,
# "b"/"f"/"s" sizes; outputs are written (in place or overwritten/accumulated).
KERNEL_ROLES = {
    "mean_cpu": ("act", "b", "f", "s", "chan"),
    "variance_cpu": ("act", "chan", "b", "f", "s", "chan"),
    "normalize_cpu": ("act", "chan", "chan", "b", "f", "s"),
    "scale_bias": ("act", "chan", "b", "f", "s"),
    "add_bias": ("act", "chan", "b", "f", "s"),
    "backward_bias": ("chan", "act", "b", "f", "s"),
    "backward_scale_cpu": ("act", "act", "b", "f", "s", "chan"),
    "mean_delta_cpu": ("act", "chan", "b", "f", "s", "chan"),
    "variance_delta_cpu": ("act", "act", "chan", "chan", "b", "f", "s", "chan"),
    "normalize_delta_cpu": ("act", "chan", "chan", "chan", "chan", "b", "f", "s", "act"),
}

SETTINGS = settings(deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), print_blob=False)


# --------------------------------------------------------------------------- garbage

def _unaligned(a):
    """A writable, C-contiguous float32 copy of `a` whose data pointer is not 4-byte aligned."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = raw[1:].view(np.float32).reshape(a.shape)
    out[...] = a
    return out


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


# Transformations of a valid float32 array into something an entry point must reject
# (or may accept): name -> function.
ARRAY_GARBAGE = {
    "float64": lambda a: a.astype(np.float64),
    "float16": lambda a: a.astype(np.float16),
    "int32": lambda a: a.astype(np.int32),
    "int64": lambda a: a.astype(np.int64),
    "bool": lambda a: a.astype(bool),
    "complex64": lambda a: a.astype(np.complex64),
    "object": lambda a: a.astype(object),
    "bigendian": lambda a: a.astype(">f4"),
    "structured": lambda a: np.zeros(a.shape, dtype=[("v", "<f4")]),
    "noncontiguous": lambda a: np.repeat(a.ravel(), 2)[::2].reshape(a.shape),
    "transposed": lambda a: np.ascontiguousarray(a.reshape(a.shape[0], -1)).T if a.ndim >= 1 else a,
    "readonly": _readonly,
    "broadcast": lambda a: np.broadcast_to(np.float32(1.5), a.shape),
    "unaligned": _unaligned,
    "shorter": lambda a: a.ravel()[:-1].copy(),
    "longer": lambda a: np.append(a.ravel(), np.float32(1)),
    "empty": lambda a: np.zeros(0, np.float32),
    "zero_dim": lambda a: np.array(np.float32(2.0)),
    "scalar": lambda a: np.float32(2.0),
    "extra_axis": lambda a: a[None, ...].copy(),
    "nan_filled": lambda a: np.full(a.shape, np.nan, np.float32),
    "inf_filled": lambda a: np.full(a.shape, np.inf, np.float32),
    "huge": lambda a: np.full(a.shape, 3e38, np.float32),
    "list": lambda a: a.tolist(),
    "tuple": lambda a: tuple(a.ravel().tolist()),
    "memoryview": lambda a: memoryview(a.copy()),
    "bytearray": lambda a: bytearray(a.tobytes()),
    "matrix": lambda a: np.asmatrix(a.reshape(1, -1)),
    "masked": lambda a: np.ma.masked_array(a.copy()),
}
SCALAR_GARBAGE = [None, "3", b"3", "", [3], (3,), {"n": 3}, 3.0, 2.5, float("nan"), float("inf"), -float("inf"),
                  True, False, 0, -1, 1, 2, 2 ** 31 - 1, 2 ** 31, 2 ** 32 + 1, 2 ** 63, -2 ** 63, 2 ** 64,
                  10 ** 30, -(10 ** 30), np.int64(3), np.int8(-2), np.uint64(2 ** 64 - 1), np.float32(2.0),
                  np.float64(1e300), np.bool_(True), 1 + 2j, object(), np.zeros(3, np.float32),
                  np.array(5), np.array([2])]


def garbage_for(value):
    """A strategy of garbage to put where `value` (a valid argument) was."""
    options = [st.sampled_from(SCALAR_GARBAGE)]
    if isinstance(value, np.ndarray):
        options.append(st.sampled_from(sorted(ARRAY_GARBAGE)).map(lambda k: ARRAY_GARBAGE[k](value)))
    return st.one_of(*options)


def describe(v):
    if isinstance(v, np.ndarray):
        fl = v.flags
        return (f"{type(v).__name__}(shape={v.shape}, dtype={v.dtype}, C={fl.c_contiguous}, "
                f"W={fl.writeable}, aligned={fl.aligned})")
    r = repr(v)
    return r if len(r) < 60 else r[:57] + "..."


def say(target, args, kwargs=None):
    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in (kwargs or {}).items()]
    print(f"CALL {target}({', '.join(parts)})", flush=True)


def outcome(exc):
    OUTCOMES[type(exc).__name__ if exc is not None else "ok"] += 1


def writable_arrays(objs):
    """Bit copies of every writable ndarray among `objs` (what a failed call must leave alone)."""
    return [(o, np.array(o, copy=True)) for o in objs if isinstance(o, np.ndarray) and o.flags.writeable
            and o.dtype.kind in "fiub" and not isinstance(o, np.ma.MaskedArray)]


def assert_arrays_unchanged(saved, what):
    for arr, before in saved:
        same = np.array_equal(arr, before, equal_nan=arr.dtype.kind in "fc")
        if not same:
            raise AssertionError(f"{what}: an argument array was written by a call that raised")


# --------------------------------------------------------------------------- kernels

def valid_kernel_args(draw, name):
    b, f, s = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    if name == "variance_cpu" and b * s < 2:
        s = 2
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    sizes = {"b": b, "f": f, "s": s}
    args = []
    for role in KERNEL_ROLES[name]:
        if role == "act":
            args.append(rng.standard_normal((b, f, s)).astype(np.float32))
        elif role == "chan":
            args.append(rng.uniform(0.5, 2.0, f).astype(np.float32))
        else:
            args.append(sizes[role])
    return args


def fuzz_kernel(impl_name, name, n):
    fn = getattr(K if impl_name == "fast" else K.reference, name)
    target = f"kernels{'' if impl_name == 'fast' else '.reference'}.{name}"

    @settings(SETTINGS, max_examples=n)
    @given(st.data())
    def run(data):
        draw = data.draw
        args = valid_kernel_args(draw, name)
        mode = draw(st.sampled_from(["valid", "garbage", "garbage", "garbage", "alias", "arity"]))
        if mode == "garbage":
            for i in draw(st.sets(st.integers(0, len(args) - 1), min_size=1, max_size=3)):
                args[i] = draw(garbage_for(args[i]))
        elif mode == "alias":  # one array passed in two places (in place over an input)
            arrays = [i for i, a in enumerate(args) if isinstance(a, np.ndarray)]
            i, j = draw(st.permutations(arrays))[:2] if len(arrays) >= 2 else (arrays[0], arrays[0])
            if args[i].size == args[j].size:
                args[j] = args[i]
        elif mode == "arity":
            cut = draw(st.integers(0, len(args) + 1))
            args = args[:cut] if cut <= len(args) else args + [args[0]]
        saved = writable_arrays(args)
        say(target, args)
        if mode == "valid":  # a valid call must succeed
            fn(*args)
            OUTCOMES["valid_ok"] += 1
            return
        try:
            fn(*args)
        except ALLOWED as e:
            outcome(e)
            assert_arrays_unchanged(saved, target)
        else:
            outcome(None)

    run()


# --------------------------------------------------------------------------- layer

def make_layer(draw):
    b, c, h, w = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3)),
                  draw(st.integers(1, 3)))
    numerics = draw(st.sampled_from(["darknet", "standard"]))
    layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    state = draw(st.sampled_from(["fresh", "inference", "trained"]))
    if state != "fresh":
        x = rng.standard_normal((b, c, h, w)).astype(np.float32)
        train = state == "trained" and b * h * w >= 2
        layer.forward(x, train=train)
        if train:
            layer.backward(rng.standard_normal((b, c, h, w)).astype(np.float32))
    return layer, rng


def snapshot(layer):
    return {name: np.array(getattr(layer, name), copy=True) for name in BUFFERS}


def assert_layer_unchanged(layer, snap, what):
    for name, before in snap.items():
        if not np.array_equal(getattr(layer, name).view(np.uint32), before.view(np.uint32)):
            raise AssertionError(f"{what}: layer.{name} changed although the call raised")


def fuzz_constructor(n):
    params = list(inspect.signature(darknet_bn.BatchNormLayer).parameters)
    size_garbage = st.one_of(st.integers(-3, 9), st.sampled_from(SCALAR_GARBAGE))

    @settings(SETTINGS, max_examples=n)
    @given(st.data())
    def run(data):
        draw = data.draw
        kw = {"batch": draw(st.integers(1, 4)), "w": draw(st.integers(1, 4)), "h": draw(st.integers(1, 4)),
              "c": draw(st.integers(1, 4))}
        for name in draw(st.sets(st.sampled_from(params), min_size=1, max_size=3)):
            if name in ("batch", "w", "h", "c"):
                kw[name] = draw(size_garbage)
            elif name == "numerics":
                kw[name] = draw(st.one_of(st.sampled_from(["darknet", "standard", "Darknet", "", "torch"]),
                                          st.sampled_from(SCALAR_GARBAGE)))
            else:  # eps, momentum
                kw[name] = draw(st.one_of(st.floats(), st.sampled_from(SCALAR_GARBAGE)))
        # Sizes whose buffers would not fit in memory are fine to try (the library must
        # refuse them cleanly), but keep a *successful* construction small.
        ints = [v for k, v in kw.items() if k in ("batch", "w", "h", "c") and isinstance(v, int)
                and not isinstance(v, bool)]
        if len(ints) == 4 and all(v >= 1 for v in ints) and np.prod([float(v) for v in ints]) > 2 ** 24 \
                and max(ints) < 2 ** 31:
            kw["batch"] = -kw["batch"]
        positional = draw(st.booleans())
        say("BatchNormLayer", [], kw)
        try:
            if positional:
                layer = darknet_bn.BatchNormLayer(*[kw.pop(k) for k in ("batch", "w", "h", "c")], **kw)
            else:
                layer = darknet_bn.BatchNormLayer(**kw)
        except ALLOWED as e:
            outcome(e)
        else:
            outcome(None)
            del layer

    run()


def fuzz_method(method, n):
    @settings(SETTINGS, max_examples=n)
    @given(st.data())
    def run(data):
        draw = data.draw
        layer, rng = make_layer(draw)
        shape = (layer.batch, layer.c, layer.h, layer.w)
        good_act = rng.standard_normal(shape).astype(np.float32)
        if method == "forward":
            args = [good_act, draw(st.booleans())]
        elif method == "backward":
            args = [good_act]
        elif method == "update":
            args = [0.1, 0.9, 0.0]
        else:  # setattr of a buffer
            name = draw(st.sampled_from(BUFFERS))
            args = [name, np.zeros(getattr(layer, name).shape, np.float32)]
        mode = draw(st.sampled_from(["valid", "garbage", "garbage", "garbage", "arity", "own_buffer"]))
        if mode == "garbage":
            first = 1 if method == "setattr" else 0
            for i in draw(st.sets(st.integers(first, len(args) - 1), min_size=1, max_size=2)):
                args[i] = draw(garbage_for(args[i]) if isinstance(args[i], np.ndarray) else
                               st.one_of(st.sampled_from(SCALAR_GARBAGE), st.floats()))
        elif mode == "arity" and method != "setattr":
            cut = draw(st.integers(0, len(args) + 1))
            args = args[:cut] if cut <= len(args) else args + [args[0]]
        elif mode == "own_buffer" and method in ("forward", "backward"):
            args[0] = getattr(layer, draw(st.sampled_from(["output", "delta", "x", "x_norm"])))
        snap = snapshot(layer)
        saved = writable_arrays(args)
        say(f"layer.{method}", args)
        try:
            if method == "setattr":
                setattr(layer, *args)
            else:
                getattr(layer, method)(*args)
        except ALLOWED as e:
            outcome(e)
            assert_layer_unchanged(layer, snap, f"layer.{method}")
            assert_arrays_unchanged([(a, b) for a, b in saved if not any(a is v for v in snap.values())],
                                    f"layer.{method}")
        else:
            outcome(None)

    run()


def fuzz_settings(n):
    old = darknet_bn.get_num_threads()

    @settings(SETTINGS, max_examples=n)
    @given(st.one_of(st.integers(-5, 300), st.sampled_from(SCALAR_GARBAGE)), st.booleans())
    def run(value, extra):
        args = [value, value] if extra else [value]
        say("set_num_threads", args)
        try:
            darknet_bn.set_num_threads(*args)
        except ALLOWED as e:
            outcome(e)
        else:
            outcome(None)
            got = darknet_bn.get_num_threads()
            if not 1 <= got <= 256:
                raise AssertionError(f"set_num_threads({value!r}) left get_num_threads() = {got}")
        info = darknet_bn.info()
        if info["threads"] != darknet_bn.get_num_threads():
            raise AssertionError(f"info() disagrees with get_num_threads(): {info}")

    run()
    darknet_bn.set_num_threads(old)


# --------------------------------------------------------------------------- main

def sanity():
    """A training step on a fresh layer still matches the formulas (float64 by hand)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 4, 5)).astype(np.float32)
    layer = darknet_bn.BatchNormLayer(3, 5, 4, 2)
    y = layer.forward(x)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=(0, 2, 3), keepdims=True)
    var = xd.var(axis=(0, 2, 3), ddof=1, keepdims=True)
    want = (xd - mean) / (np.sqrt(var) + 1e-6)
    err = np.abs(y - want).max()
    if not err < 1e-5:
        raise AssertionError(f"the library computes wrong results after the fuzz run: max error {err}")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    np.seterr(all="ignore")
    for impl_name in ("fast", "reference"):
        for name in KERNEL_ROLES:
            fuzz_kernel(impl_name, name, n)
    fuzz_constructor(2 * n)
    for method in ("forward", "backward", "update", "setattr"):
        fuzz_method(method, 2 * n)
    fuzz_settings(n)
    print("SUMMARY " + json.dumps(dict(OUTCOMES)), flush=True)
    sanity()
    print("SANITY ok", flush=True)


if __name__ == "__main__":
    main()
