"""Concurrency (docs/reference.md §5): the GIL is released around C calls, layers and kernels
run from several Python threads give the serial results bit for bit, results do
not depend on the thread count beyond docs/reference.md §6's tolerance (and are bit-for-bit
repeatable at a given count), the DARKNET_BN_NUM_THREADS variable is obeyed,
and the library keeps working after fork (also while another thread is inside a
threaded call) and in multiprocessing workers started by fork and by spawn.

No test asserts speed; clocks are used only as timeouts.
"""

import json
import multiprocessing
import os
import threading
import time

import numpy as np
import pytest

import _mp_workers
import darknet_bn
import darknet_bn.kernels as K
import oracle
from _reliability import describe_exit, make_pair, num_threads, run_python
from conftest import activations, assert_close, assert_ulps, f32, wait_child

NUMERICS = ["darknet", "standard"]
LAYER_BUFFERS = ("output", "x", "x_norm", "delta", "mean", "variance", "rolling_mean", "rolling_variance",
                 "scales", "biases", "scale_updates", "bias_updates", "mean_delta", "variance_delta")


def bits(a):
    """The bit pattern of a float32 array (NaN-safe exact comparison)."""
    return np.ascontiguousarray(a).view(np.uint32)


def run_threads(targets, timeout=120):
    """Run each callable in its own thread, started together; re-raise the first exception."""
    errors = []
    barrier = threading.Barrier(len(targets))

    def wrap(fn):
        try:
            barrier.wait()
            fn()
        except BaseException as e:  # reported in the test thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- the GIL

def test_c_calls_release_the_gil():
    """While one thread is inside a long forward call, another Python thread runs and sees it half done."""
    shape = (1, 32, 512, 512)  # 8M values: a call of many milliseconds, written channel after channel
    b, c, h, w = shape
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    with num_threads(1):
        layer = darknet_bn.BatchNormLayer(b, w, h, c)
        flat = layer.output.reshape(-1)
        probe = np.linspace(0, flat.size - 1, 4096).astype(np.intp)
        state = {"gen": 0, "in_call": False, "stop": False}
        seen = []
        spins = [0]

        def observer():
            while not state["stop"]:
                spins[0] += 1
                g1, f1 = state["gen"], state["in_call"]
                sample = flat[probe]
                g2, f2 = state["gen"], state["in_call"]
                if f1 and f2 and g1 == g2:  # the sample was taken inside call g1
                    nan = int(np.isnan(sample).sum())
                    if 0 < nan < sample.size:
                        seen.append((g1, nan))

        t = threading.Thread(target=observer, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        calls = []
        try:
            while not seen and time.monotonic() < deadline:
                flat[...] = np.nan
                state["gen"] += 1
                state["in_call"] = True
                s0 = spins[0]
                layer.forward(x)
                s1 = spins[0]
                state["in_call"] = False
                calls.append(s1 - s0)
                assert np.isfinite(flat[probe]).all()
        finally:
            state["stop"] = True
            t.join(10)
    assert seen, (f"in {len(calls)} forward calls the other thread never observed a half-written output; "
                  f"its loop advanced {calls[:10]} times during the calls (the GIL is held?)")


@pytest.mark.parametrize("numerics", NUMERICS)
def test_layers_in_threads_match_serial_bit_for_bit(numerics):
    """Four layers (every work split) trained at once from four threads equal the serial run bit for bit."""
    shapes = [(2, 8, 96, 96), (2, 2, 224, 224), (4096, 40, 1, 1), (3, 5, 7, 9)]
    rng = np.random.default_rng(11)
    data = [[(activations(rng, s), f32(rng.standard_normal(s))) for _ in range(3)] for s in shapes]

    def train(layer, steps):
        for x, d in steps:
            layer.forward(x)
            layer.backward(d)
            layer.update(0.05, 0.9)
        layer.forward(steps[0][0], train=False)
        out_inf = layer.output.copy()
        layer.forward(steps[-1][0])
        layer.backward(steps[-1][1])
        return out_inf

    def fresh():
        return [darknet_bn.BatchNormLayer(s[0], s[3], s[2], s[1], numerics=numerics) for s in shapes]

    with num_threads(2):
        serial = fresh()
        serial_inf = [train(layer, steps) for layer, steps in zip(serial, data)]
        threaded = fresh()
        threaded_inf = [None] * len(shapes)

        def job(i):
            def run():
                threaded_inf[i] = train(threaded[i], data[i])
            return run

        run_threads([job(i) for i in range(len(shapes))])
    for i, (a, b) in enumerate(zip(serial, threaded)):
        assert np.array_equal(bits(serial_inf[i]), bits(threaded_inf[i])), f"layer {i}: inference output differs"
        for name in LAYER_BUFFERS:
            assert np.array_equal(bits(getattr(a, name)), bits(getattr(b, name))), \
                f"layer {i} {shapes[i]}: {name} differs between the threaded and the serial run"


def _kernel_chain(x, d, b, f, s, mod=K):
    """All ten kernels in Darknet's order; returns every result."""
    z = lambda: np.zeros(f, np.float32)  # noqa: E731
    mean = mod.mean_cpu(x, b, f, s, z())
    var = mod.variance_cpu(x, mean, b, f, s, z())
    xn = mod.normalize_cpu(x.copy(), mean, var, b, f, s)
    y = mod.add_bias(mod.scale_bias(xn.copy(), f32(np.linspace(0.5, 2, f)), b, f, s), f32(np.linspace(-1, 1, f)),
                     b, f, s)
    bu = mod.backward_bias(z(), d, b, f, s)
    su = mod.backward_scale_cpu(xn, d, b, f, s, z())
    md = mod.mean_delta_cpu(d, var, b, f, s, z())
    vd = mod.variance_delta_cpu(x, d, mean, var, b, f, s, z())
    dn = mod.normalize_delta_cpu(x, mean, var, md, vd, b, f, s, d.copy())
    return [mean, var, xn, y, bu, su, md, vd, dn]


def test_kernels_in_threads_match_serial_bit_for_bit():
    """The ten kernels (fast and reference) run from six threads at once, some sharing inputs, equal the serial results."""
    dims = [(2, 8, 9000), (2, 2, 50000), (4096, 40, 1), (2, 2, 50000), (3, 5, 63), (4096, 40, 1)]
    rng = np.random.default_rng(12)
    inputs = []
    shared = {3: 1, 5: 2}  # these threads read the same arrays as an earlier one
    for i, (b, f, s) in enumerate(dims):
        if i in shared:
            inputs.append(inputs[shared[i]])
        else:
            inputs.append((activations(rng, (b, f, s)), f32(rng.standard_normal((b, f, s)))))
    mods = [K, K.reference, K, K, K.reference, K]
    with num_threads(2):
        serial = [_kernel_chain(x, d, *dm, mod=m) for (x, d), dm, m in zip(inputs, dims, mods)]
        results = [None] * len(dims)

        def job(i):
            def run():
                for _ in range(3):
                    results[i] = _kernel_chain(*inputs[i], *dims[i], mod=mods[i])
            return run

        run_threads([job(i) for i in range(len(dims))])
    for i in range(len(dims)):
        for k, (a, b) in enumerate(zip(serial[i], results[i])):
            assert np.array_equal(bits(a), bits(b)), f"thread {i} {dims[i]}: result {k} differs from serial"


# --------------------------------------------------------------------------- thread count

# Big enough for 7 threads to be used (7 x 65,536 element operations).
COUNT_SHAPES = {
    "channels": (2, 12, 160, 120),
    "groups": (2, 100, 48, 48),
    "split": (2, 3, 320, 360),
    "fc": (4096, 120, 1, 1),
}


@pytest.mark.parametrize("numerics", NUMERICS)
@pytest.mark.parametrize("path", list(COUNT_SHAPES))
def test_layer_results_across_thread_counts(path, numerics):
    """1, 2, 3 and 7 threads: each run bit-for-bit repeatable, every count within docs/reference.md §6 of the oracle."""
    shape = COUNT_SHAPES[path]
    rng = np.random.default_rng(13)
    x = activations(rng, shape, offset_std=30.0)
    d = f32(rng.standard_normal(shape))
    scales = f32(rng.uniform(0.5, 2, shape[1]))
    _, st = make_pair(shape, numerics, scales=scales)
    st.forward(x)
    st.backward(d)
    runs = {}
    for n in (1, 2, 3, 7):
        with num_threads(n):
            reps = []
            for _ in range(2):
                layer, _ = make_pair(shape, numerics, scales=scales)
                layer.forward(x)
                layer.backward(d)
                reps.append({name: getattr(layer, name).copy() for name in LAYER_BUFFERS})
        for name in LAYER_BUFFERS:
            assert np.array_equal(bits(reps[0][name]), bits(reps[1][name])), f"{n} threads: {name} not repeatable"
        runs[n] = reps[0]
        r = runs[n]
        assert_close(r["output"], st.output, what=f"output at {n} threads")
        assert_close(r["delta"], st.delta, what=f"delta at {n} threads")
        assert_ulps(r["mean"], st.mean, what=f"mean at {n} threads")
        assert_ulps(r["variance"], st.variance, what=f"variance at {n} threads")
        assert_close(r["scale_updates"], st.scale_updates, what=f"scale_updates at {n} threads")
        assert_close(r["bias_updates"], st.bias_updates, what=f"bias_updates at {n} threads")
    for n in (2, 3, 7):
        for name in ("output", "delta", "x_norm"):
            assert_close(runs[n][name], runs[1][name].astype(np.float64), rtol=2e-5, atol=2e-5,
                         what=f"{name}: {n} threads vs 1 thread")


def test_kernel_results_across_thread_counts_one_channel():
    """One channel of 4M values cut into up to 64 parts: mean/variance within 4 ulps at 1-64 threads, repeatable."""
    b, f, s = 1, 1, 2048 * 2048
    rng = np.random.default_rng(14)
    x = f32(250.0 + 0.5 * rng.standard_normal((b, f, s)))
    want_mean = oracle.mean_cpu(x, b, f, s)
    for n in (1, 2, 3, 7, 64):
        with num_threads(n):
            got = []
            for _ in range(2):
                mean = K.mean_cpu(x, b, f, s, np.zeros(f, np.float32))
                var = K.variance_cpu(x, mean, b, f, s, np.zeros(f, np.float32))
                got.append(np.concatenate([mean, var]))
        assert np.array_equal(bits(got[0]), bits(got[1])), f"{n} threads: not repeatable"
        assert_ulps(got[0][:1], want_mean, what=f"mean at {n} threads")
        assert_ulps(got[0][1:], oracle.variance_cpu(x, got[0][:1], b, f, s), what=f"variance at {n} threads")


_ENV_CHILD = """
import json, numpy as np, darknet_bn
n = darknet_bn.get_num_threads()
rng = np.random.default_rng(15)
x = (250.0 + rng.standard_normal((2, 2, 300, 300))).astype(np.float32)
layer = darknet_bn.BatchNormLayer(2, 300, 300, 2)
layer.forward(x)
print(json.dumps({"threads": n, "mean": layer.mean.view(np.uint32).tolist(),
                  "output": int(layer.output.view(np.uint32).sum(dtype=np.uint64))}))
"""


def test_environment_variable_sets_thread_count():
    """DARKNET_BN_NUM_THREADS=1 is obeyed in a new process, whose results equal this process's at 1 thread."""
    r = run_python(_ENV_CHILD, DARKNET_BN_NUM_THREADS="1")
    assert r.returncode == 0, describe_exit(r)
    child = json.loads(r.stdout)
    assert child["threads"] == 1
    rng = np.random.default_rng(15)
    x = f32(250.0 + rng.standard_normal((2, 2, 300, 300)))
    with num_threads(1):
        layer = darknet_bn.BatchNormLayer(2, 300, 300, 2)
        layer.forward(x)
    assert child["mean"] == layer.mean.view(np.uint32).tolist()
    assert child["output"] == int(layer.output.view(np.uint32).sum(dtype=np.uint64))


@pytest.mark.parametrize("value", ["0", "-3", "abc", "", "2x", "100000"])
def test_unusable_environment_value_falls_back(value):
    """A malformed or out-of-range DARKNET_BN_NUM_THREADS neither crashes nor yields a count outside 1..256."""
    r = run_python(_ENV_CHILD, DARKNET_BN_NUM_THREADS=value)
    assert r.returncode == 0, describe_exit(r)
    n = json.loads(r.stdout)["threads"]
    assert 1 <= n <= 256, n
    if value == "100000":
        assert n == 256


# --------------------------------------------------------------------------- fork and multiprocessing

def _warm_threads():
    """Make this process run a threaded layer forward (8x32x64x64 at 2 threads)."""
    shape = (8, 32, 64, 64)
    layer = darknet_bn.BatchNormLayer(8, 64, 64, 32)
    layer.forward(np.random.default_rng(16).standard_normal(shape, dtype=np.float32))
    return layer


def _child_checks_layer(expected, x, d):
    """In a forked child: a threaded training step must reproduce `expected` bit for bit; exit 0/3."""
    code = 1
    try:
        layer = darknet_bn.BatchNormLayer(*_shape_args(x.shape))
        layer.forward(x)
        layer.backward(d)
        ok = all(np.array_equal(bits(getattr(layer, n)), bits(v)) for n, v in expected.items())
        code = 0 if ok else 3
    finally:
        os._exit(code)


def _shape_args(shape):
    b, c, h, w = shape
    return b, w, h, c


def test_layer_works_in_child_after_fork():
    """After the parent ran threaded calls, a forked child's threaded training step equals the parent's bit for bit."""
    shape = (4, 8, 64, 64)
    rng = np.random.default_rng(17)
    x = activations(rng, shape)
    d = f32(rng.standard_normal(shape))
    with num_threads(2):
        _warm_threads()
        layer = darknet_bn.BatchNormLayer(*_shape_args(shape))
        layer.forward(x)
        layer.backward(d)
        expected = {n: getattr(layer, n).copy() for n in ("output", "x_norm", "delta", "mean", "variance")}
        pid = os.fork()
        if pid == 0:
            _child_checks_layer(expected, x, d)
        code = wait_child(pid)
    assert code == 0, f"the child's results differ from the parent's (exit {code})"


def test_fork_while_another_thread_is_in_a_threaded_call():
    """Forking while another thread runs threaded forward calls: every child computes correctly and exits."""
    big = (8, 32, 64, 64)
    shape = (4, 8, 64, 64)
    rng = np.random.default_rng(18)
    x = activations(rng, shape)
    d = f32(rng.standard_normal(shape))
    xb = np.random.default_rng(19).standard_normal(big, dtype=np.float32)
    with num_threads(2):
        layer = darknet_bn.BatchNormLayer(*_shape_args(shape))
        layer.forward(x)
        layer.backward(d)
        expected = {n: getattr(layer, n).copy() for n in ("output", "x_norm", "delta", "mean", "variance")}
        busy = darknet_bn.BatchNormLayer(*_shape_args(big))
        stop = threading.Event()
        loops = [0]

        def background():
            while not stop.is_set():
                busy.forward(xb)
                busy.backward(xb)
                loops[0] += 1

        t = threading.Thread(target=background, daemon=True)
        t.start()
        try:
            codes = []
            for i in range(6):
                time.sleep(0.002 * i)
                pid = os.fork()
                if pid == 0:
                    _child_checks_layer(expected, x, d)
                codes.append(wait_child(pid))
        finally:
            stop.set()
            t.join(30)
    assert codes == [0] * 6, codes
    assert loops[0] > 0


def _check_worker_results(results, seeds, numerics):
    b, c, h, w = _mp_workers.WORKER_SHAPE
    for seed, res in zip(seeds, results):
        x, d, scales, biases = _mp_workers.step_data(seed)
        layer_pair = make_pair(_mp_workers.WORKER_SHAPE, numerics, scales=scales, biases=biases)
        st = layer_pair[1]
        st.forward(x)
        st.backward(d)
        assert_close(res["output"], st.output, what=f"seed {seed} output")
        assert_close(res["x_norm"], st.x_norm, what=f"seed {seed} x_norm")
        assert_close(res["delta"], st.delta, what=f"seed {seed} delta")
        assert_ulps(res["mean"], st.mean, what=f"seed {seed} mean")
        assert_ulps(res["variance"], st.variance, what=f"seed {seed} variance")
        assert_close(res["rolling_mean"], st.rolling_mean, what="rolling_mean")
        assert_close(res["rolling_variance"], st.rolling_variance, what="rolling_variance")
        assert_close(res["bias_updates_before_update"], st.bias_updates, what="bias_updates")
        assert_close(res["scale_updates_before_update"], st.scale_updates, what="scale_updates")
        st.update(0.1, 0.9, 0.0)
        for name in ("scales", "biases", "scale_updates", "bias_updates"):
            assert_close(res[name], getattr(st, name), what=f"seed {seed} {name} after update")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_workers(method):
    """multiprocessing pools (fork and spawn) run training steps after the parent used threads; results match the oracle."""
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {method} not available")
    seeds = [101, 102, 103, 104]
    tasks = [(s, NUMERICS[i % 2]) for i, s in enumerate(seeds)]
    with num_threads(2):
        _warm_threads()
        ctx = multiprocessing.get_context(method)
        with ctx.Pool(2) as pool:
            async_result = pool.map_async(_mp_workers.train_step, tasks)
            results = async_result.get(timeout=120)
    assert {r["pid"] for r in results}.isdisjoint({os.getpid()})
    if method == "fork":
        assert all(r["threads"] == 2 for r in results), [r["threads"] for r in results]
    else:
        assert all(r["threads"] >= 1 for r in results)
    for numerics in NUMERICS:
        idx = [i for i, t in enumerate(tasks) if t[1] == numerics]
        _check_worker_results([results[i] for i in idx], [seeds[i] for i in idx], numerics)


# --------------------------------------------------------------------------- thread count changed mid-flight

def test_thread_count_changed_while_calls_run():
    """set_num_threads from one thread while two others train layers: no crash, every result within docs/reference.md §6."""
    shapes = [(2, 2, 224, 224), (4096, 40, 1, 1)]
    rng = np.random.default_rng(20)
    work = []
    for s in shapes:
        x, d = activations(rng, s), f32(rng.standard_normal(s))
        _, st = make_pair(s, "darknet")
        st.forward(x)
        st.backward(d)
        work.append((s, x, d, st))
    stop = threading.Event()
    old = darknet_bn.get_num_threads()
    counts = [0, 0]

    def toggler():
        r = np.random.default_rng(21)
        while not stop.is_set():
            darknet_bn.set_num_threads(int(r.integers(1, 9)))
            time.sleep(0.0005)

    def trainer(i):
        def run():
            s, x, d, st = work[i]
            layer = darknet_bn.BatchNormLayer(*_shape_args(s))
            for _ in range(15):
                layer.forward(x)
                layer.backward(d)
                assert_close(layer.output, st.output, what=f"layer {i} output")
                assert_close(layer.delta, st.delta, what=f"layer {i} delta")
                layer.update(0.0, 0.0)  # zero the accumulators: each step equals the oracle's first
                counts[i] += 1
        return run

    t = threading.Thread(target=toggler, daemon=True)
    t.start()
    try:
        run_threads([trainer(0), trainer(1)])
    finally:
        stop.set()
        t.join(10)
        darknet_bn.set_num_threads(old)
    assert counts == [15, 15]
