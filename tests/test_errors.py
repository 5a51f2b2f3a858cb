"""Bad input (docs/reference.md §5, §8): the right exception, naming the argument, and nothing written."""

import math
import re

import numpy as np
import pytest

import darknet_bn
import darknet_bn.kernels as K
from conftest import activations, assert_unchanged, f32, snapshot

E = darknet_bn


def names_arg(exc_info, name):
    """The exception message mentions the argument `name` as a word."""
    msg = str(exc_info.value)
    assert re.search(r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])", msg), \
        f"message does not name {name!r}: {msg!r}"


def test_exception_hierarchy():
    """Errors are both darknet_bn's and the fitting builtin (ValueError/TypeError/MemoryError)."""
    assert issubclass(E.ArgumentError, E.DarknetBNError) and issubclass(E.ArgumentError, ValueError)
    assert issubclass(E.ArgumentTypeError, E.DarknetBNError) and issubclass(E.ArgumentTypeError, TypeError)
    assert issubclass(E.LayerStateError, E.DarknetBNError) and issubclass(E.LayerStateError, ValueError)
    assert issubclass(E.AllocationError, E.DarknetBNError) and issubclass(E.AllocationError, MemoryError)


# --------------------------------------------------------------------------- kernels

B, F, S = 2, 3, 5
ACT, CHAN, SIZE = "act", "chan", "size"
# name -> ordered (argument, kind); the outputs of each kernel are in KERNEL_OUTPUTS.
KERNEL_ARGS = {
    "mean_cpu": [("x", ACT), ("batch", SIZE), ("filters", SIZE), ("spatial", SIZE), ("mean", CHAN)],
    "variance_cpu": [("x", ACT), ("mean", CHAN), ("batch", SIZE), ("filters", SIZE),
                     ("spatial", SIZE), ("variance", CHAN)],
    "normalize_cpu": [("x", ACT), ("mean", CHAN), ("variance", CHAN), ("batch", SIZE),
                      ("filters", SIZE), ("spatial", SIZE)],
    "scale_bias": [("output", ACT), ("scales", CHAN), ("batch", SIZE), ("n", SIZE), ("size", SIZE)],
    "add_bias": [("output", ACT), ("biases", CHAN), ("batch", SIZE), ("n", SIZE), ("size", SIZE)],
    "backward_bias": [("bias_updates", CHAN), ("delta", ACT), ("batch", SIZE), ("n", SIZE),
                      ("size", SIZE)],
    "backward_scale_cpu": [("x_norm", ACT), ("delta", ACT), ("batch", SIZE), ("n", SIZE),
                           ("size", SIZE), ("scale_updates", CHAN)],
    "mean_delta_cpu": [("delta", ACT), ("variance", CHAN), ("batch", SIZE), ("filters", SIZE),
                       ("spatial", SIZE), ("mean_delta", CHAN)],
    "variance_delta_cpu": [("x", ACT), ("delta", ACT), ("mean", CHAN), ("variance", CHAN),
                           ("batch", SIZE), ("filters", SIZE), ("spatial", SIZE),
                           ("variance_delta", CHAN)],
    "normalize_delta_cpu": [("x", ACT), ("mean", CHAN), ("variance", CHAN), ("mean_delta", CHAN),
                            ("variance_delta", CHAN), ("batch", SIZE), ("filters", SIZE),
                            ("spatial", SIZE), ("delta", ACT)],
}
KERNEL_OUTPUTS = {
    "mean_cpu": "mean", "variance_cpu": "variance", "normalize_cpu": "x", "scale_bias": "output",
    "add_bias": "output", "backward_bias": "bias_updates", "backward_scale_cpu": "scale_updates",
    "mean_delta_cpu": "mean_delta", "variance_delta_cpu": "variance_delta",
    "normalize_delta_cpu": "delta",
}
SIZE_ROLE = {"batch": 0, "filters": 1, "n": 1, "spatial": 2, "size": 2}
IMPLS = {"fast": K, "reference": K.reference}


def kernel_args(name, rng, dims=(B, F, S)):
    """Valid arguments for kernel `name` (a dict, argument -> value)."""
    b, f, s = dims
    args = {}
    for arg, kind in KERNEL_ARGS[name]:
        if kind == ACT:
            args[arg] = activations(rng, (b, f, s))
        elif kind == CHAN:
            args[arg] = f32(rng.uniform(0.5, 2.0, f))
        else:
            args[arg] = dims[SIZE_ROLE[arg]]
    return args


def call_kernel(impl, name, args):
    return getattr(impl, name)(*[args[a] for a, _ in KERNEL_ARGS[name]])


def array_copies(args):
    return {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}


def assert_arrays_unchanged(args, before):
    for k, v in before.items():
        assert np.array_equal(np.asarray(args[k]).view(np.uint32), v.view(np.uint32)), \
            f"{k} was written despite the error"


ARRAY_CASES = [(k, a) for k, spec in KERNEL_ARGS.items() for a, kind in spec if kind != SIZE]
SIZE_CASES = [(k, a) for k, spec in KERNEL_ARGS.items() for a, kind in spec if kind == SIZE]


def test_kernels_accept_valid_arguments(rng):
    """The argument table used below is valid: every kernel runs on it (sanity for the matrix)."""
    for name in KERNEL_ARGS:
        for impl in IMPLS.values():
            call_kernel(impl, name, kernel_args(name, rng))


@pytest.mark.parametrize("impl_name", list(IMPLS))
@pytest.mark.parametrize("name,arg", ARRAY_CASES, ids=[f"{k}-{a}" for k, a in ARRAY_CASES])
@pytest.mark.parametrize("bad", ["float64", "int32", "none", "list", "short", "long"])
def test_kernel_bad_array(rng, impl_name, name, arg, bad):
    """A bad array argument raises (TypeError for type, ValueError for size) naming it; nothing written."""
    args = kernel_args(name, rng)
    good = args[arg]
    if bad == "float64":
        args[arg], exc = good.astype(np.float64), TypeError
    elif bad == "int32":
        args[arg], exc = good.astype(np.int32), TypeError
    elif bad == "none":
        args[arg], exc = None, TypeError
    elif bad == "list":
        args[arg], exc = good.tolist(), TypeError
    elif bad == "short":
        args[arg], exc = f32(good.reshape(-1)[:-1]), ValueError
    else:
        args[arg], exc = f32(np.concatenate([good.reshape(-1), [1.0]])), ValueError
    before = array_copies(args)
    with pytest.raises(exc) as ei:
        call_kernel(IMPLS[impl_name], name, args)
    assert isinstance(ei.value, E.DarknetBNError)
    names_arg(ei, arg)
    assert_arrays_unchanged(args, before)


@pytest.mark.parametrize("impl_name", list(IMPLS))
@pytest.mark.parametrize("name", list(KERNEL_OUTPUTS))
@pytest.mark.parametrize("bad", ["non_contiguous", "read_only"])
def test_kernel_bad_output_buffer(rng, impl_name, name, bad):
    """A non-contiguous or read-only output buffer is refused, naming it; nothing is written."""
    args = kernel_args(name, rng)
    arg = KERNEL_OUTPUTS[name]
    good = args[arg]
    if bad == "non_contiguous":
        big = np.zeros((good.size, 2), np.float32)
        big[:, 0] = good.reshape(-1)
        args[arg] = big[:, 0]
        assert not args[arg].flags.c_contiguous
    else:
        args[arg] = good.copy()
        args[arg].setflags(write=False)
    before = array_copies(args)
    with pytest.raises((ValueError, TypeError)) as ei:
        call_kernel(IMPLS[impl_name], name, args)
    assert isinstance(ei.value, E.DarknetBNError)
    names_arg(ei, arg)
    assert_arrays_unchanged(args, before)
    if bad == "non_contiguous":
        assert np.array_equal(big[:, 1], np.zeros(good.size, np.float32)), "wrote between the strides"


@pytest.mark.parametrize("impl_name", list(IMPLS))
@pytest.mark.parametrize("name,arg", SIZE_CASES, ids=[f"{k}-{a}" for k, a in SIZE_CASES])
def test_kernel_zero_size(rng, impl_name, name, arg):
    """A size of 0 (with arrays consistent with it) raises ValueError naming that size."""
    dims = [B, F, S]
    dims[SIZE_ROLE[arg]] = 0
    args = kernel_args(name, rng, tuple(dims))
    before = array_copies(args)
    with pytest.raises(ValueError) as ei:
        call_kernel(IMPLS[impl_name], name, args)
    assert isinstance(ei.value, E.DarknetBNError)
    names_arg(ei, arg)
    assert_arrays_unchanged(args, before)


@pytest.mark.parametrize("impl_name", list(IMPLS))
@pytest.mark.parametrize("name,arg", SIZE_CASES, ids=[f"{k}-{a}" for k, a in SIZE_CASES])
@pytest.mark.parametrize("value,exc", [(-1, ValueError), (None, TypeError), (2.5, TypeError)],
                         ids=["negative", "none", "float"])
def test_kernel_bad_size(rng, impl_name, name, arg, value, exc):
    """A negative size raises ValueError, a non-integer one TypeError; nothing is written."""
    args = kernel_args(name, rng)
    args[arg] = value
    before = array_copies(args)
    with pytest.raises(exc) as ei:
        call_kernel(IMPLS[impl_name], name, args)
    assert isinstance(ei.value, E.DarknetBNError)
    if value is not None and value < 0:
        pass  # arrays cannot be consistent with a negative size; any named argument will do
    else:
        names_arg(ei, arg)
    assert_arrays_unchanged(args, before)


@pytest.mark.parametrize("impl_name", list(IMPLS))
def test_variance_cpu_needs_two_values(rng, impl_name):
    """variance_cpu with m = batch*spatial < 2 raises ValueError and leaves variance as it was."""
    args = kernel_args("variance_cpu", rng, (1, 3, 1))
    before = array_copies(args)
    with pytest.raises(ValueError) as ei:
        call_kernel(IMPLS[impl_name], "variance_cpu", args)
    assert isinstance(ei.value, E.DarknetBNError)
    assert_arrays_unchanged(args, before)


# --------------------------------------------------------------------------- constructor

CTOR_CASES = [
    (dict(batch=0), ValueError, "batch"),
    (dict(batch=-1), ValueError, "batch"),
    (dict(w=0), ValueError, "w"),
    (dict(h=-3), ValueError, "h"),
    (dict(c=0), ValueError, "c"),
    (dict(batch=None), TypeError, "batch"),
    (dict(c=[3]), TypeError, "c"),
    (dict(w="4"), TypeError, "w"),
    (dict(h=2.5), TypeError, "h"),
    (dict(numerics="pytorch"), ValueError, "numerics"),
    (dict(numerics=None), TypeError, "numerics"),
    (dict(eps=1e-3), ValueError, "eps"),                          # darknet numerics: eps is fixed
    (dict(numerics="standard", eps=0.0), ValueError, "eps"),
    (dict(numerics="standard", eps=-1e-5), ValueError, "eps"),
    (dict(numerics="standard", eps=math.nan), ValueError, "eps"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(numerics="standard", momentum=math.nan), ValueError, "momentum"),
    (dict(numerics="standard", momentum=2.0), ValueError, "momentum"),
]


CTOR_IDS = [f"{arg}={list(kw.values())[-1]!r}" for kw, _, arg in CTOR_CASES]


@pytest.mark.parametrize("kw,exc,arg", CTOR_CASES, ids=CTOR_IDS)
def test_constructor_bad_arguments(kw, exc, arg):
    """BatchNormLayer rejects bad sizes/numerics/eps/momentum with the right class, naming the argument."""
    full = dict(batch=2, w=3, h=4, c=5)
    full.update(kw)
    with pytest.raises(exc) as ei:
        darknet_bn.BatchNormLayer(**full)
    assert isinstance(ei.value, E.DarknetBNError)
    names_arg(ei, arg)


def test_constructor_valid_edge_values():
    """momentum 0 and 1 and eps 1e-5 for darknet (also as a NumPy float32, the value the layer keeps) are
    accepted (the boundaries are legal)."""
    darknet_bn.BatchNormLayer(1, 1, 1, 1, momentum=0.0)
    darknet_bn.BatchNormLayer(1, 1, 1, 1, momentum=1.0)
    darknet_bn.BatchNormLayer(1, 1, 1, 1, eps=1e-5)
    darknet_bn.BatchNormLayer(1, 1, 1, 1, eps=np.float32(1e-5))
    darknet_bn.BatchNormLayer(2, 1, 1, 1, numerics="standard", eps=0.5, momentum=0.0)


def test_constructor_element_count_overflow():
    """Sizes whose element count cannot be addressed raise ValueError (not a crash or a tiny layer)."""
    with pytest.raises(ValueError) as ei:
        darknet_bn.BatchNormLayer(2 ** 30, 2 ** 30, 2 ** 30, 2 ** 30)
    assert isinstance(ei.value, E.DarknetBNError)


def test_constructor_allocation_failure():
    """A layer too large for memory (8 TB per buffer) raises AllocationError, a MemoryError."""
    with pytest.raises(MemoryError) as ei:
        darknet_bn.BatchNormLayer(2 ** 12, 2 ** 9, 2 ** 10, 2 ** 10)
    assert isinstance(ei.value, E.AllocationError)


# --------------------------------------------------------------------------- layer calls

SHAPE = (2, 5, 3, 4)  # batch, c, h, w


def trained_layer(rng, numerics="darknet"):
    """A layer after one training forward, backward and update, so every buffer holds data."""
    b, c, h, w = SHAPE
    layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)
    layer.scales = f32(rng.uniform(0.5, 2, c))
    layer.forward(activations(rng, SHAPE))
    layer.backward(f32(rng.standard_normal(SHAPE)))
    layer.update(0.1, 0.9)
    layer.backward(f32(rng.standard_normal(SHAPE)))
    return layer


def bad_activation(kind, rng):
    b, c, h, w = SHAPE
    good = activations(rng, SHAPE)
    return {
        "float64": (good.astype(np.float64), TypeError),
        "int32": (good.astype(np.int32), TypeError),
        "none": (None, TypeError),
        "list": (good.tolist(), TypeError),
        "batch+1": (f32(np.zeros((b + 1, c, h, w))), ValueError),
        "h_w_swapped": (f32(np.zeros((b, c, w, h))), ValueError),
        "flat_long": (f32(np.zeros((b, c * h * w + 1))), ValueError),
        "one_dim": (f32(np.zeros(b * c * h * w)), ValueError),
        "three_dim": (f32(np.zeros((b, c, h * w))), ValueError),
    }[kind]


BAD_ACT_KINDS = ["float64", "int32", "none", "list", "batch+1", "h_w_swapped", "flat_long",
                 "one_dim", "three_dim"]


@pytest.mark.parametrize("numerics", ["darknet", "standard"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", BAD_ACT_KINDS)
def test_forward_bad_input(rng, numerics, train, kind):
    """forward with a bad input raises naming 'input' and leaves every buffer and the state unchanged."""
    layer = trained_layer(rng, numerics)
    value, exc = bad_activation(kind, rng)
    before = snapshot(layer)
    with pytest.raises(exc) as ei:
        layer.forward(value, train=train)
    assert isinstance(ei.value, E.DarknetBNError)
    names_arg(ei, "input")
    assert_unchanged(layer, before)
    # The last forward is still the training one: backward still works.
    layer.backward(f32(rng.standard_normal(SHAPE)))


@pytest.mark.parametrize("kind", BAD_ACT_KINDS)
def test_backward_bad_delta(rng, kind):
    """backward with a bad delta raises naming 'delta' and leaves every buffer unchanged."""
    layer = trained_layer(rng)
    value, exc = bad_activation(kind, rng)
    before = snapshot(layer)
    with pytest.raises(exc) as ei:
        layer.backward(value)
    assert isinstance(ei.value, E.DarknetBNError)
    names_arg(ei, "delta")
    assert_unchanged(layer, before)


@pytest.mark.parametrize("numerics", ["darknet", "standard"])
def test_backward_before_any_forward(rng, numerics):
    """backward on a fresh layer raises LayerStateError and writes nothing."""
    b, c, h, w = SHAPE
    layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)
    before = snapshot(layer)
    with pytest.raises(E.LayerStateError):
        layer.backward(f32(rng.standard_normal(SHAPE)))
    assert_unchanged(layer, before)


@pytest.mark.parametrize("numerics", ["darknet", "standard"])
@pytest.mark.parametrize("trained_first", [False, True])
def test_backward_after_inference_forward(rng, numerics, trained_first):
    """backward after an inference forward raises LayerStateError (even if trained before)."""
    b, c, h, w = SHAPE
    layer = trained_layer(rng, numerics) if trained_first else \
        darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)
    layer.forward(activations(rng, SHAPE), train=False)
    before = snapshot(layer)
    with pytest.raises(E.LayerStateError) as ei:
        layer.backward(f32(rng.standard_normal(SHAPE)))
    assert isinstance(ei.value, ValueError)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("numerics", ["darknet", "standard"])
@pytest.mark.parametrize("dims", [(1, 1, 1, 3), (1, 1, 1, 1)], ids=["c3", "c1"])
def test_training_with_one_value_per_channel(rng, numerics, dims):
    """Training with m = batch*h*w < 2 raises ValueError and leaves the layer unchanged."""
    b, w, h, c = dims
    layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)
    x = f32(rng.standard_normal((b, c, h, w)))
    layer.forward(x, train=False)  # inference needs no batch statistics
    before = snapshot(layer)
    with pytest.raises(ValueError) as ei:
        layer.forward(x, train=True)
    assert isinstance(ei.value, E.DarknetBNError)
    assert_unchanged(layer, before)
    assert np.isfinite(layer.output).all()
    with pytest.raises(E.LayerStateError):
        layer.backward(f32(np.ones((b, c, h, w))))


@pytest.mark.parametrize("kw,exc,arg", [
    (dict(learning_rate=None), TypeError, "learning_rate"),
    (dict(learning_rate="0.1"), TypeError, "learning_rate"),
    (dict(learning_rate=[0.1]), TypeError, "learning_rate"),
    (dict(learning_rate=0.1, momentum=None), TypeError, "momentum"),
    (dict(learning_rate=0.1, momentum="0.9"), TypeError, "momentum"),
], ids=["lr_none", "lr_str", "lr_list", "momentum_none", "momentum_str"])
def test_update_bad_arguments(rng, kw, exc, arg):
    """update with a non-number raises TypeError naming the argument; nothing is written."""
    layer = trained_layer(rng)
    before = snapshot(layer)
    with pytest.raises(exc) as ei:
        layer.update(**kw)
    assert isinstance(ei.value, E.DarknetBNError)
    names_arg(ei, arg)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("name", ["scales", "rolling_variance", "output"])
@pytest.mark.parametrize("kind", ["wrong_shape", "none"])
def test_setter_bad_value(rng, name, kind):
    """Assigning a wrong-shaped array or None to a buffer attribute raises naming it; nothing written."""
    layer = trained_layer(rng)
    shape = getattr(layer, name).shape
    value, exc = (f32(np.ones(shape[:-1] + (shape[-1] + 1,))), ValueError) if kind == "wrong_shape" \
        else (None, TypeError)
    before = snapshot(layer)
    with pytest.raises(exc) as ei:
        setattr(layer, name, value)
    assert isinstance(ei.value, E.DarknetBNError)
    names_arg(ei, name)
    assert_unchanged(layer, before)


# --------------------------------------------------------------------------- threads

@pytest.mark.parametrize("value,exc", [(0, ValueError), (-2, ValueError), (None, TypeError),
                                       ("2", TypeError), (2.5, TypeError)],
                         ids=["zero", "negative", "none", "str", "float"])
def test_set_num_threads_bad(value, exc):
    """set_num_threads rejects n < 1 (ValueError) and non-integers (TypeError), keeping the count."""
    old = darknet_bn.get_num_threads()
    with pytest.raises(exc) as ei:
        darknet_bn.set_num_threads(value)
    assert isinstance(ei.value, E.DarknetBNError)
    names_arg(ei, "n")
    assert darknet_bn.get_num_threads() == old
