"""Copies of a BatchNormLayer: pickle (every protocol), copy.deepcopy and copy.copy.

Each gives an independent layer (its own C memory) with the same sizes,
numerics, eps, momentum, every buffer and the C layer's state, so that
backward, update, forward and x_norm on the copy give bit for bit what they
give on the original (docs/reference.md §8: the layer's buffers; §3/§4: what
backward reads from the training forward).

A copy is compared with a *twin*: a second layer built by the same calls,
never copied. Comparing with the twin instead of the original keeps the
original untouched until the copy is made, so the copy of a layer whose x_norm
was never read (still to be computed from x) is tested as such.
"""
import copy
import pickle

import numpy as np
import pytest

import darknet_bn
from darknet_bn import layer as layer_module
from _reliability import describe_exit, run_python
from conftest import ALL_BUFFERS, activations, assert_close, f32
import oracle

SHAPE = (4, 3, 5, 6)  # batch, c, h, w
SETTINGS = {
    "darknet": {"numerics": "darknet"},
    "standard": {"numerics": "standard", "eps": 1e-3, "momentum": 0.25},
}
# What happened to the layer before it is copied.
STAGES = ("fresh", "inference", "trained", "trained_then_inference", "stepped")
# What the caller did with x_norm before the copy.
#   unread: never read (C has not written it: it is due from x);
#   read:   read once, the array dropped;
#   held:   an x_norm array is alive (training forwards write x_norm);
#   written: assigned by the caller after the last forward.
X_NORM = ("unread", "read", "held", "written")
PROTOCOLS = list(range(pickle.HIGHEST_PROTOCOL + 1))
METHODS = [f"pickle{p}" for p in PROTOCOLS] + ["deepcopy", "copy"]


def copy_by(method, layer):
    if method == "deepcopy":
        return copy.deepcopy(layer)
    if method == "copy":
        return copy.copy(layer)
    return pickle.loads(pickle.dumps(layer, protocol=int(method[len("pickle"):])))


def data(seed, offset=0.0, scale=1.0):
    """Deterministic activations of SHAPE for `seed`."""
    return f32(activations(np.random.default_rng(seed), SHAPE) * scale + offset)


def build(numerics, stage, x_norm):
    """A layer after `stage`, with x_norm treated as `x_norm` says; returns (layer, held array or None)."""
    b, c, h, w = SHAPE
    layer = darknet_bn.BatchNormLayer(b, w, h, c, **SETTINGS[numerics])
    held = layer.x_norm if x_norm == "held" else None
    layer.scales = f32([1.5, 0.5, -2.0])
    layer.biases = f32([0.25, -1.0, 3.0])
    if stage == "inference":
        layer.forward(data(1), train=False)
    if stage in ("trained", "trained_then_inference", "stepped"):
        layer.forward(data(2, offset=4.0, scale=3.0))
    if stage == "stepped":
        layer.backward(data(3))
        layer.update(0.5, momentum=0.9)
        layer.forward(data(4, offset=-2.0))
    if stage == "trained_then_inference":
        layer.forward(data(5), train=False)
    if x_norm == "read":
        layer.x_norm  # noqa: B018 - the read is the point
    if x_norm == "written":
        layer.x_norm = data(6, offset=10.0)
    return layer, held


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


def assert_same_buffers(got, want, what):
    """Every buffer attribute of two layers equal bit for bit (x_norm read through the attribute)."""
    for name in ALL_BUFFERS:
        g, w = getattr(got, name), getattr(want, name)
        assert g.shape == w.shape, f"{what}: {name} shape {g.shape} != {w.shape}"
        assert np.array_equal(bits(g), bits(w)), (
            f"{what}: {name} differs (max |diff| {np.nanmax(np.abs(g.astype(np.float64) - w)):.3g})")


def assert_same_settings(got, want):
    assert type(got) is type(want)
    for attr in ("batch", "w", "h", "c", "outputs", "numerics", "eps", "momentum"):
        assert getattr(got, attr) == getattr(want, attr), attr
    assert repr(got) == repr(want)


def backward_outcome(layer, delta):
    """What backward does on `layer`: ('ok', returned delta copy) or ('refused', None)."""
    try:
        return "ok", layer.backward(delta).copy()
    except darknet_bn.LayerStateError:
        return "refused", None


# --------------------------------------------------------------------------- equal and behaving the same


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("x_norm", X_NORM)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("numerics", list(SETTINGS))
def test_copy_equals_original_and_behaves_the_same(numerics, stage, x_norm, method):
    """The copy has the original's settings and buffers, and every later call gives bit for bit the same."""
    orig, held = build(numerics, stage, x_norm)
    twin, twin_held = build(numerics, stage, x_norm)
    dup = copy_by(method, orig)  # before anything reads orig's x_norm
    assert dup is not orig
    assert_same_settings(dup, twin)
    assert_same_buffers(dup, twin, "copy vs twin")
    assert_same_buffers(orig, twin, "original after being copied vs twin")
    if held is not None:
        assert np.array_equal(bits(held), bits(twin_held)), "the original's held x_norm changed"

    # backward (allowed exactly when the original allows it), update, inference, training
    d = data(7, scale=2.0)
    want = backward_outcome(twin, d)
    got = backward_outcome(dup, d)
    assert got[0] == want[0] == ("ok" if stage in ("trained", "stepped") else "refused")
    if got[0] == "ok":
        assert np.array_equal(bits(got[1]), bits(want[1])), "backward on the copy differs from the original's"
    for lay in (dup, twin):
        lay.update(0.25, momentum=0.5)
    assert_same_buffers(dup, twin, "after update")
    x = data(8, offset=1.0)
    assert np.array_equal(bits(dup.forward(x, train=False)), bits(twin.forward(x, train=False)))
    x = data(9, offset=-3.0, scale=0.5)
    assert np.array_equal(bits(dup.forward(x)), bits(twin.forward(x)))
    assert_same_buffers(dup, twin, "after a training forward")
    d = data(10)
    assert np.array_equal(bits(dup.backward(d)), bits(twin.backward(d)))
    assert_same_buffers(dup, twin, "after a second backward")


@pytest.mark.parametrize("numerics", list(SETTINGS))
def test_copy_of_trained_layer_matches_float64_oracle(numerics):
    """Backward on a copy made right after a training forward is the §3/§4 backward of that forward."""
    b, c, h, w = SHAPE
    orig = darknet_bn.BatchNormLayer(b, w, h, c, **SETTINGS[numerics])
    st = oracle.LayerState(b, w, h, c, numerics=numerics, eps=SETTINGS[numerics].get("eps"),
                           momentum=SETTINGS[numerics].get("momentum"))
    x = data(11, offset=5.0, scale=2.0)
    orig.forward(x)
    st.forward(x)
    for method in METHODS:
        dup = copy_by(method, orig)
        d = data(12)
        ref = st.copy()
        ref.backward(d)
        dup.backward(d)
        # tests/oracle.py's standard backward computes dx and the updates, not the two partials
        checked = ALL_BUFFERS if numerics == "darknet" else tuple(
            n for n in ALL_BUFFERS if n not in ("mean_delta", "variance_delta"))
        for name in checked:
            assert_close(getattr(dup, name), getattr(ref, name), what=f"{method}: {name}")


# --------------------------------------------------------------------------- independence


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("numerics", list(SETTINGS))
def test_copy_and_original_are_independent(numerics, method):
    """No buffer is shared; calls and writes on either leave the other (and views of the original) alone."""
    orig, _ = build(numerics, "trained", "unread")
    twin, _ = build(numerics, "trained", "unread")
    views = {name: getattr(orig, name) for name in ALL_BUFFERS}  # taken before the copy
    dup = copy_by(method, orig)
    for name in ALL_BUFFERS:
        assert not np.shares_memory(getattr(dup, name), getattr(orig, name)), f"{name} is shared"
        assert not np.shares_memory(getattr(dup, name), views[name]), f"{name} shares a view of the original"

    # Everything on the copy: the original and its views stay the twin's.
    dup.backward(data(13))
    dup.update(1.0, momentum=0.0)
    dup.forward(data(14, offset=7.0, scale=4.0))
    dup.forward(data(15), train=False)
    for name in ALL_BUFFERS:
        getattr(dup, name)[...] = 42.0
    assert_same_buffers(orig, twin, "original after calls on the copy")
    for name, view in views.items():
        assert np.array_equal(bits(view), bits(getattr(twin, name))), f"view of the original's {name} changed"
        assert np.shares_memory(view, getattr(orig, name)), f"view of {name} no longer into the original"

    # Everything on the original: the copy keeps what it had.
    before = {name: getattr(dup, name).copy() for name in ALL_BUFFERS}
    orig.backward(data(16))
    orig.update(1.0)
    orig.forward(data(17, offset=-5.0))
    for name in ALL_BUFFERS:
        getattr(orig, name)[...] = -7.0
    for name in ALL_BUFFERS:
        assert np.array_equal(bits(getattr(dup, name)), bits(before[name])), f"copy's {name} changed"


def test_copy_outlives_original_and_original_outlives_copy():
    """Deleting either one leaves the other's memory valid (each owns its C layer)."""
    orig, _ = build("darknet", "trained", "unread")
    twin, _ = build("darknet", "trained", "unread")
    dup = copy.deepcopy(orig)
    del orig
    junk = [darknet_bn.BatchNormLayer(4, 6, 5, 3) for _ in range(4)]  # reuse of freed memory, if any
    for j in junk:
        j.forward(data(18, offset=9.0))
    assert_same_buffers(dup, twin, "copy after the original was deleted")
    again = copy.copy(dup)
    del dup
    assert_same_buffers(again, twin, "copy of a copy after its source was deleted")


# --------------------------------------------------------------------------- the pickled form


def test_pickled_state_is_a_small_versioned_dict():
    """The pickle carries version 1, plain values and arrays; a stale x_norm is not stored."""
    layer, _ = build("standard", "trained", "unread")
    func, args, extra = layer.__reduce__()
    cls, state = args
    assert cls is darknet_bn.BatchNormLayer and extra is None
    assert state["version"] == 1
    assert (state["batch"], state["w"], state["h"], state["c"]) == (4, 6, 5, 3)
    assert (state["numerics"], state["eps"], state["momentum"]) == ("standard", 1e-3, 0.25)
    assert state["last_forward"] == "training" and state["trained"] is True
    assert state["buffers"]["x_norm"] is None, "x_norm due from x must not be stored"
    for name, arr in state["buffers"].items():
        if name != "x_norm":
            assert isinstance(arr, np.ndarray) and arr.dtype == np.float32, name
            assert not np.shares_memory(arr, getattr(layer, name)), f"state[{name!r}] is a view"
    assert state["forward_mean"].dtype == np.float64 and state["forward_mean"].shape == (3,)
    x = layer.x.astype(np.float64)
    assert np.allclose(state["forward_mean"], x.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    assert np.allclose(state["forward_normalizer"], 1 / np.sqrt(x.var(axis=(0, 2, 3)) + 1e-3), rtol=1e-6)
    values = 4 * 3 * 5 * 6
    assert len(pickle.dumps(layer, protocol=5)) < 4 * (3 * values + 12 * 3) + 3000
    layer.x_norm  # noqa: B018 - now current: stored
    assert layer.__reduce__()[1][1]["buffers"]["x_norm"] is not None


_CHILD = """
import pickle, sys
import numpy as np
with open(sys.argv[1], "rb") as f:
    layer, delta = pickle.load(f)
out = {name: np.array(getattr(layer, name)) for name in %r}
out["returned"] = layer.backward(delta).copy()
out["after"] = {name: np.array(getattr(layer, name)) for name in %r}
with open(sys.argv[2], "wb") as f:
    pickle.dump((repr(layer), out), f)
print("ok")
"""


def test_pickled_layer_loads_in_a_fresh_process(tmp_path):
    """A pickled trained layer (x_norm never read) loads in a new interpreter and backpropagates bit for bit."""
    src, dst = tmp_path / "layer.pkl", tmp_path / "out.pkl"
    for numerics in SETTINGS:
        layer, _ = build(numerics, "stepped", "unread")
        delta = data(19, scale=3.0)
        with open(src, "wb") as f:
            pickle.dump((layer, delta), f, protocol=pickle.HIGHEST_PROTOCOL)
        code = _CHILD % (ALL_BUFFERS, ALL_BUFFERS)
        r = run_python(code.replace("sys.argv[1]", repr(str(src))).replace("sys.argv[2]", repr(str(dst))),
                       timeout=120, DARKNET_BN_NUM_THREADS=str(darknet_bn.get_num_threads()))
        assert r.returncode == 0 and r.stdout.strip() == "ok", describe_exit(r)
        with open(dst, "rb") as f:
            rep, out = pickle.load(f)
        assert rep == repr(layer)
        for name in ALL_BUFFERS:
            assert np.array_equal(bits(out[name]), bits(getattr(layer, name))), f"{numerics}: loaded {name}"
        returned = layer.backward(delta)
        assert np.array_equal(bits(out["returned"]), bits(returned)), f"{numerics}: backward in the child"
        for name in ALL_BUFFERS:
            assert np.array_equal(bits(out["after"][name]), bits(getattr(layer, name))), f"{numerics}: {name}"


class _Evil:
    """Pickles as a call of the layer's restore function with a given state."""

    def __init__(self, state, cls=darknet_bn.BatchNormLayer):
        self.state, self.cls = state, cls

    def __reduce__(self):
        return (layer_module._restore_layer, (self.cls, self.state))


def _good_state():
    layer, _ = build("darknet", "trained", "unread")
    return layer.__reduce__()[1][1]


def _with(**changes):
    state = _good_state()
    for key, value in changes.items():
        if value is _DROP:
            del state[key]
        else:
            state[key] = value
    return state


def _with_buffer(name, value):
    state = _good_state()
    if value is _DROP:
        del state["buffers"][name]
    else:
        state["buffers"][name] = value
    return state


_DROP = object()

BAD_STATES = {
    "not a dict": (lambda: [1, 2], darknet_bn.ArgumentTypeError, "must be a dict"),
    "version 2": (lambda: _with(version=2), darknet_bn.ArgumentError, "version 2"),
    "version 0": (lambda: _with(version=0), darknet_bn.ArgumentError, "version 0"),
    "version missing": (lambda: _with(version=_DROP), darknet_bn.ArgumentError, "version None"),
    "version '1'": (lambda: _with(version="1"), darknet_bn.ArgumentError, "version '1'"),
    "version True": (lambda: _with(version=True), darknet_bn.ArgumentError, "version True"),
    "key missing": (lambda: _with(momentum=_DROP), darknet_bn.ArgumentError, "missing keys ['momentum']"),
    "key unknown": (lambda: _with(colour="red"), darknet_bn.ArgumentError, "unknown keys ['colour']"),
    "batch 0": (lambda: _with(batch=0), darknet_bn.ArgumentError, "batch must be >= 1"),
    "batch float": (lambda: _with(batch=4.0), darknet_bn.ArgumentTypeError, "batch must be an integer"),
    "batch mismatch": (lambda: _with(batch=5), darknet_bn.ArgumentError,
                       "buffers['output'] has shape (4, 3, 5, 6), expected (5, 3, 5, 6)"),
    "c mismatch": (lambda: _with(c=4), darknet_bn.ArgumentError, "expected (4, 4, 5, 6)"),
    "w/h swapped": (lambda: _with(w=5, h=6), darknet_bn.ArgumentError, "expected (4, 3, 6, 5)"),
    "numerics": (lambda: _with(numerics="pytorch"), darknet_bn.ArgumentError, "numerics must be"),
    "darknet eps": (lambda: _with(eps=1e-3), darknet_bn.ArgumentError, "eps applies to numerics='standard'"),
    "momentum": (lambda: _with(momentum=1.5), darknet_bn.ArgumentError, "momentum must be in"),
    "last_forward": (lambda: _with(last_forward="backward"), darknet_bn.ArgumentError, "last_forward must be"),
    "trained int": (lambda: _with(trained=1), darknet_bn.ArgumentTypeError, "trained must be a bool"),
    "training untrained": (lambda: _with(trained=False), darknet_bn.ArgumentError, "cannot have trained"),
    "x_norm None untrained": (lambda: _with(trained=False, last_forward="inference"),
                              darknet_bn.ArgumentTypeError, "buffers['x_norm'] must be a float32"),
    "buffer missing": (lambda: _with_buffer("scales", _DROP), darknet_bn.ArgumentError, "buffers must be a dict"),
    "buffer float64": (lambda: _with_buffer("scales", np.ones(3)), darknet_bn.ArgumentTypeError,
                       "buffers['scales'] must be a float32"),
    "buffer short": (lambda: _with_buffer("rolling_mean", np.zeros(2, np.float32)), darknet_bn.ArgumentError,
                     "buffers['rolling_mean'] has shape (2,), expected (3,)"),
    "buffer list": (lambda: _with_buffer("x", [0.0] * 360), darknet_bn.ArgumentTypeError,
                    "buffers['x'] must be a float32"),
    "forward_mean float32": (lambda: _with(forward_mean=np.zeros(3, np.float32)), darknet_bn.ArgumentError,
                             "forward_mean must be a float64"),
    "forward_normalizer short": (lambda: _with(forward_normalizer=np.zeros(2)), darknet_bn.ArgumentError,
                                 "forward_normalizer must be a float64"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_bad_pickled_state_raises_a_clear_error(case):
    """Unpickling a state of another version, with missing/unknown keys or inconsistent sizes raises, naming it."""
    make, exc, text = BAD_STATES[case]
    blob = pickle.dumps(_Evil(make()))
    with pytest.raises(exc) as info:
        pickle.loads(blob)
    assert "pickled BatchNormLayer state" in str(info.value)
    assert text in str(info.value)


def test_restore_refuses_a_class_that_is_not_a_layer():
    blob = pickle.dumps(_Evil(_good_state(), cls=dict))
    with pytest.raises(darknet_bn.ArgumentTypeError, match="cls must be BatchNormLayer"):
        pickle.loads(blob)


def test_good_state_through_the_evil_path_loads():
    """The crafted-pickle path used above does load an untouched state (so the errors are the changes')."""
    layer = pickle.loads(pickle.dumps(_Evil(_good_state())))
    twin, _ = build("darknet", "trained", "unread")
    assert_same_buffers(layer, twin, "restored")


# --------------------------------------------------------------------------- subclasses


class TaggedLayer(darknet_bn.BatchNormLayer):
    """A subclass with an attribute of its own (module level, so pickle can find it)."""

    def __init__(self, *args, tag=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = tag if tag is not None else {"name": "bn1", "seen": []}


def test_subclass_and_its_attributes_are_copied():
    layer = TaggedLayer(4, 6, 5, 3)
    layer.forward(data(20))
    shallow, deep = copy.copy(layer), copy.deepcopy(layer)
    assert type(shallow) is TaggedLayer and type(deep) is TaggedLayer
    assert shallow.tag is layer.tag, "copy.copy shares other attributes"
    assert deep.tag == layer.tag and deep.tag is not layer.tag, "copy.deepcopy copies them"
    for p in PROTOCOLS:
        loaded = pickle.loads(pickle.dumps(layer, protocol=p))
        assert type(loaded) is TaggedLayer and loaded.tag == layer.tag, p
        assert_same_buffers(loaded, layer, f"protocol {p}")
    d = data(21)
    assert np.array_equal(bits(deep.backward(d)), bits(layer.backward(d)))


def test_deepcopy_keeps_identity_within_a_structure():
    """A layer referenced twice in a deep-copied structure is copied once."""
    layer, _ = build("darknet", "trained", "read")
    net = {"a": layer, "b": [layer]}
    dup = copy.deepcopy(net)
    assert dup["a"] is dup["b"][0] and dup["a"] is not layer


def test_own_attributes_list_is_complete():
    """layer._OWN_ATTRIBUTES names exactly what a fresh layer stores, so nothing internal is taken as a subclass's."""
    layer = darknet_bn.BatchNormLayer(2, 2, 2, 2)
    assert set(vars(layer)) == set(layer_module._OWN_ATTRIBUTES)
    assert layer._extra_attributes() == {}


def test_copying_writes_nothing_in_the_original():
    """Copies read the original only: a stale x_norm stays due, and is then computed exactly."""
    orig, _ = build("standard", "stepped", "unread")
    twin, _ = build("standard", "stepped", "unread")
    raw = orig._raw("x_norm").copy()
    for method in METHODS:
        copy_by(method, orig)
    assert orig._x_norm_stale()
    assert np.array_equal(bits(orig._raw("x_norm")), bits(raw))
    assert_same_buffers(orig, twin, "original")
