"""State that survives interruption: an exception between the C calls and the Python bookkeeping.

The GIL is released during a C call, so an exception raised by a signal handler
(KeyboardInterrupt from Ctrl-C, or any handler that raises) surfaces right after
the call returns, before the Python statements that follow it; MemoryError may
come from any allocation. Whatever the point, every buffer attribute must read
as what the C layer last did: the layer's whole state is either the one before
the call or the one after it, never a mixture (docs/reference.md §5: the
layer's state is unchanged after an error; §3: x_norm reads as the last
training forward's).

Two ways in:
- a sweep that raises at *every* bytecode boundary inside darknet_bn's Python
  code (a trace function with opcode events), deterministic, on small layers;
- real signals (``signal.setitimer``) at delays spanning before, during and
  after the C call, on a layer whose forward takes milliseconds.

Each interrupted layer is compared, bit for bit, with two fresh layers that
replay the calls without interruption: one stopped before the interrupted call,
one after it. Both the buffers and how the layer then behaves (backward
allowed or refused, the next update and forwards) must match one of the two.
The references themselves are checked against tests/oracle.py's float64 formulas.
"""
import copy
import os
import pickle
import signal
import sys
import time

import numpy as np
import pytest

import darknet_bn
import oracle
from conftest import ALL_BUFFERS, activations, assert_close, f32

PACKAGE_DIR = os.path.dirname(os.path.abspath(darknet_bn.__file__))
SMALL = (3, 4, 5, 6)     # batch, c, h, w: the opcode sweep
LARGE = (8, 32, 64, 64)  # 1 Mi values: a training forward takes a millisecond or more


class Boom(Exception):
    """An ordinary exception, as a signal handler or a callback might raise."""


class Data:
    """The arrays every scenario uses, for one shape."""

    def __init__(self, shape):
        rng = np.random.default_rng(sum(shape))
        self.shape = shape
        self.x1 = activations(rng, shape)
        self.x2 = f32(activations(rng, shape) * 3.0 + 5.0)  # other statistics than x1
        self.x3 = activations(rng, shape)
        self.x4 = f32(activations(rng, shape) - 2.0)
        self.written = f32(activations(rng, shape) + 20.0)
        self.d1 = f32(rng.standard_normal(shape))
        self.d2 = f32(rng.standard_normal(shape) * 2.0)


# Each scenario: (setup, op). setup(layer, data) brings a fresh layer to the state
# before the call and returns an x_norm array the caller keeps alive (or None);
# op(layer, data) is the call that gets interrupted.
def _trained(layer, d):
    layer.forward(d.x1)


def _trained_read(layer, d):
    layer.forward(d.x1)
    layer.x_norm  # noqa: B018 - read, then dropped: x_norm is current, nobody watches it


def _trained_held(layer, d):
    held = layer.x_norm
    layer.forward(d.x1)
    return held


def _trained_released(layer, d):
    held = layer.x_norm  # watched during this forward (x_norm written), dropped after it
    layer.forward(d.x1)
    del held


def _trained_written(layer, d):
    layer.forward(d.x1)
    layer.x_norm = d.written  # the caller's own values in x_norm


def _stepped(layer, d):
    layer.forward(d.x1)
    layer.backward(d.d1)


SCENARIOS = {
    # the reported failure: x_norm read after the previous training forward
    "forward_train_after_read": (_trained_read, lambda l, d: l.forward(d.x2)),
    "forward_train_unread": (_trained, lambda l, d: l.forward(d.x2)),
    "forward_train_held": (_trained_held, lambda l, d: l.forward(d.x2)),
    "forward_train_released": (_trained_released, lambda l, d: l.forward(d.x2)),
    "forward_train_after_write": (_trained_written, lambda l, d: l.forward(d.x2)),
    "forward_train_first": (lambda l, d: None, lambda l, d: l.forward(d.x1)),
    "forward_infer_after_read": (_trained_read, lambda l, d: l.forward(d.x2, train=False)),
    "forward_infer_released": (_trained_released, lambda l, d: l.forward(d.x2, train=False)),
    "backward": (_trained, lambda l, d: l.backward(d.d1)),
    "backward_held": (_trained_held, lambda l, d: l.backward(d.d1)),
    "update": (_stepped, lambda l, d: l.update(0.5, momentum=0.9)),
    "read_x_norm": (_trained, lambda l, d: l.x_norm),
    "write_x_norm": (_trained, lambda l, d: setattr(l, "x_norm", d.written)),
    "deepcopy": (_trained, lambda l, d: copy.deepcopy(l)),
    "pickle": (_trained, lambda l, d: pickle.dumps(l)),
}


def new_layer(shape, numerics):
    b, c, h, w = shape
    return darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)


def observe(layer, held, d):
    """The layer's state and behaviour: every buffer, the held x_norm array, then what later calls give."""
    seen = {name: np.array(getattr(layer, name)) for name in ALL_BUFFERS}
    if held is not None:
        seen["held"] = np.array(held)
    try:
        seen["backward"] = layer.backward(d.d2).copy()
    except darknet_bn.LayerStateError:
        seen["backward"] = "refused"
    layer.update(0.25, momentum=0.5)
    seen["inference"] = layer.forward(d.x3, train=False).copy()
    seen["training"] = layer.forward(d.x4).copy()
    seen["x_norm_next"] = np.array(layer.x_norm)
    if held is not None:
        seen["held_next"] = np.array(held)
    return seen


def same(a, b):
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], str) or isinstance(b[k], str):
            if not (isinstance(a[k], str) and isinstance(b[k], str) and a[k] == b[k]):
                return False
        elif not np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)):
            return False
    return True


def first_difference(seen, ref):
    for k in ref:
        if k not in seen or (isinstance(ref[k], str) != isinstance(seen[k], str)):
            return f"{k}: {seen.get(k)!r} vs {ref[k]!r}"
        if isinstance(ref[k], str):
            if ref[k] != seen[k]:
                return f"{k}: {seen[k]} vs {ref[k]}"
        elif not np.array_equal(seen[k].view(np.uint32), ref[k].view(np.uint32)):
            err = np.nanmax(np.abs(seen[k].astype(np.float64) - ref[k]))
            return f"{k} (max error {err:.3g})"
    return "nothing"


def references(shape, numerics, scenario, d):
    """Replays without interruption: the observation of a layer stopped before the call, and after it."""
    setup, op = SCENARIOS[scenario]
    refs = {}
    for when in ("before", "after"):
        layer = new_layer(shape, numerics)
        held = setup(layer, d)
        if when == "after":
            op(layer, d)
        refs[when] = observe(layer, held, d)
    return refs


def classify(seen, refs, what):
    """'after' or 'before': which replay the interrupted layer matches ('after' if both); fails on a mixture."""
    for when in ("after", "before"):
        if same(seen, refs[when]):
            return when
    raise AssertionError(
        f"{what}: the layer matches neither the state before the call nor after it "
        f"(vs before: {first_difference(seen, refs['before'])}; vs after: {first_difference(seen, refs['after'])})")


# --------------------------------------------------------------------------- every bytecode boundary


class RaiseAt:
    """A trace function raising `exc` at the n-th bytecode executed in darknet_bn's own Python files."""

    def __init__(self, n, exc):
        self.n, self.exc, self.count, self.raised = n, exc, 0, None

    def __call__(self, frame, event, arg):  # global trace function: which frames to follow
        if frame.f_code.co_filename.startswith(PACKAGE_DIR):
            frame.f_trace_opcodes = True
            return self.local
        return None

    def local(self, frame, event, arg):
        if event == "opcode":
            self.count += 1
            if self.count == self.n:
                self.raised = self.exc()
                raise self.raised
        return self.local


def run_interrupted(layer, op, d, n, exc):
    """Run op with `exc` raised at the n-th bytecode; return the exception raised (None: it completed)."""
    tracer = RaiseAt(n, exc)
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        op(layer, d)
    except BaseException as e:  # noqa: B036 - KeyboardInterrupt is one of the cases
        assert e is tracer.raised, f"an exception of another origin escaped: {e!r}"
        return e
    finally:
        sys.settrace(previous)
    assert tracer.raised is None
    return None


@pytest.mark.parametrize("numerics", ["darknet", "standard"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_exception_at_every_bytecode_leaves_a_whole_state(scenario, numerics):
    """Raise at each bytecode boundary of the call in turn: the layer is always wholly before or after it."""
    d = Data(SMALL)
    setup, op = SCENARIOS[scenario]
    refs = references(SMALL, numerics, scenario, d)
    kinds = (KeyboardInterrupt, MemoryError, Boom)
    outcomes = {"before": 0, "after": 0}
    n = 0
    while True:
        n += 1
        assert n < 5000, "the call never completed"
        exc = kinds[n % len(kinds)]
        layer = new_layer(SMALL, numerics)
        held = setup(layer, d)
        raised = run_interrupted(layer, op, d, n, exc)
        seen = observe(layer, held, d)
        when = classify(seen, refs, f"{scenario}, {exc.__name__} at bytecode {n}")
        if raised is None:
            assert when == "after", f"{scenario}: the call completed but the layer reads as before it"
            break
        outcomes[when] += 1
    # The sweep reached both sides of the C call (for calls that change anything).
    if not same(refs["before"], refs["after"]):
        assert outcomes["before"] > 0 and outcomes["after"] > 0, outcomes
    assert n > 5


# --------------------------------------------------------------------------- signals during the C call


@pytest.fixture
def alarm():
    """SIGALRM handler raising the armed exception once; restores the previous handler and timer."""
    state = {"exc": None}

    def handler(signum, frame):
        exc, state["exc"] = state["exc"], None
        if exc is not None:
            raise exc()

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


SIGNAL_SCENARIOS = ["forward_train_after_read", "forward_train_released", "forward_train_held",
                    "forward_infer_after_read", "backward", "update"]


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")
@pytest.mark.parametrize("scenario", SIGNAL_SCENARIOS)
def test_signal_during_the_call_leaves_a_whole_state(scenario, alarm):
    """A handler raising at delays before, during and after the C call: the layer is wholly before or after."""
    numerics = "darknet"
    d = Data(LARGE)
    setup, op = SCENARIOS[scenario]
    refs = references(LARGE, numerics, scenario, d)
    # How long the call takes here, to spread the delays over it.
    times = []
    for _ in range(3):
        layer = new_layer(LARGE, numerics)
        held = setup(layer, d)
        t0 = time.perf_counter()
        op(layer, d)
        times.append(time.perf_counter() - t0)
    took = float(np.median(times))
    delays = np.concatenate([[1e-6, 5e-6, 2e-5], np.linspace(0.05, 0.95, 14) * took, [1.2 * took, 2.0 * took]])
    kinds = (KeyboardInterrupt, Boom)
    counts = {(how, when): 0 for how in ("raised", "completed") for when in ("before", "after")}
    for i, delay in enumerate(delays):
        exc = kinds[i % len(kinds)]
        layer = new_layer(LARGE, numerics)
        held = setup(layer, d)
        raised = False
        try:
            alarm["exc"] = exc
            signal.setitimer(signal.ITIMER_REAL, max(float(delay), 1e-6))
            op(layer, d)
            signal.setitimer(signal.ITIMER_REAL, 0)
            alarm["exc"] = None  # from here on the handler raises nothing
        except exc:
            raised = True
        signal.setitimer(signal.ITIMER_REAL, 0)
        alarm["exc"] = None
        seen = observe(layer, held, d)
        when = classify(seen, refs, f"{scenario}, {exc.__name__} after {delay * 1e6:.0f} us (call ~{took * 1e6:.0f} us)")
        counts[("raised" if raised else "completed", when)] += 1
        assert raised or when == "after", f"{scenario}: completed call reads as before it"
    # The case that tore the old code: the exception raised after the C call did its work.
    if scenario != "update":  # update's C call takes microseconds: the alarm rarely lands inside it
        assert counts[("raised", "after")] > 0, counts


# --------------------------------------------------------------------------- the references are right


@pytest.mark.parametrize("numerics", ["darknet", "standard"])
def test_replayed_references_match_the_float64_oracle(numerics):
    """The 'after' replay of a training forward, and of a backward, is §3/§4 evaluated in float64."""
    d = Data(SMALL)
    b, c, h, w = SMALL
    st = oracle.LayerState(b, w, h, c, numerics=numerics)
    st.forward(d.x1)
    st.forward(d.x2)
    after = references(SMALL, numerics, "forward_train_after_read", d)["after"]
    for name in ("output", "x", "x_norm", "mean", "variance", "rolling_mean", "rolling_variance"):
        assert_close(after[name], getattr(st, name), what=f"after forward: {name}")
    st = oracle.LayerState(b, w, h, c, numerics=numerics)
    st.forward(d.x1)
    st.backward(d.d1)
    after = references(SMALL, numerics, "backward", d)["after"]
    for name in ("delta", "bias_updates", "scale_updates"):
        assert_close(after[name], getattr(st, name), what=f"after backward: {name}")
