"""The machine-dependent choices (docs/reference.md §5): reported by info(), each overridable from the environment.

Each override is checked in a fresh interpreter, since the library reads the
environment once per process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict

import numpy as np
import pytest

import darknet_bn

SCRIPT = """
import json, numpy as np, darknet_bn
darknet_bn.set_num_threads(2)
layer = darknet_bn.BatchNormLayer(4, 64, 64, 16, numerics="standard")
x = np.random.default_rng(0).standard_normal((4, 16, 64, 64)).astype(np.float32)
layer.forward(x, train=True)
print(json.dumps(darknet_bn.info()["tuning"]))
"""


def clean_env(**env: str) -> Dict[str, str]:
    """This process's environment without any DARKNET_BN_ setting, with `env` added."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("DARKNET_BN_")}
    child_env.update(env)
    return child_env


def tuning_with(**env: str) -> Dict[str, Any]:
    """info()["tuning"] after one parallel training forward, in a child with `env` added."""
    child_env = clean_env(**env)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=child_env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_info_reports_tuning():
    t = darknet_bn.info()["tuning"]
    assert t["simd"] == darknet_bn.info()["simd"]
    assert t["group_bytes"] >= 256 << 10 or "DARKNET_BN_GROUP_KB" in t["group_source"]
    assert t["stream"] in ("auto", "always", "never")
    assert isinstance(t["stream_decisions"], list)
    for d in t["stream_decisions"]:
        assert d["choice"] in ("trying", "plain", "stream", "fixed")
        assert d["group_kb"] == "trying" or d["group_kb"] >= 1
        assert d["bytes_at_least"] >= t["stream_min_bytes"]


def test_defaults_are_measured_or_read():
    t = tuning_with()
    assert t["min_work_source"] == "calibrated", t
    assert t["wake_us"] > 0 and t["value_ns"] > 0
    assert 4096 <= t["min_work_per_thread"] <= 1 << 22
    if t["l2_bytes"] > 0:
        assert t["group_source"] == "L2 size"
        assert t["group_bytes"] == min(max(t["l2_bytes"], 256 << 10), 4 << 20)
    assert t["stream"] == "auto"


def test_environment_overrides():
    t = tuning_with(DARKNET_BN_GROUP_KB="512", DARKNET_BN_MIN_WORK="5000", DARKNET_BN_STREAM="never")
    assert (t["group_bytes"], t["group_source"]) == (512 << 10, "DARKNET_BN_GROUP_KB")
    assert (t["min_work_per_thread"], t["min_work_source"]) == (5000, "DARKNET_BN_MIN_WORK")
    assert (t["stream"], t["stream_source"]) == ("never", "DARKNET_BN_STREAM=never")
    assert tuning_with(DARKNET_BN_STREAM="always")["stream"] == "always"


def test_bad_overrides_are_ignored_and_said_so():
    t = tuning_with(DARKNET_BN_GROUP_KB="lots", DARKNET_BN_MIN_WORK="-3", DARKNET_BN_STREAM="sometimes")
    assert "ignored" in t["group_source"] and t["group_bytes"] >= 256 << 10
    assert "ignored" in t["min_work_source"] and t["min_work_per_thread"] >= 4096
    assert t["stream"] == "auto" and "ignored" in t["stream_source"]


def test_streaming_changes_no_value():
    """A 16 MB training step with streaming stores forced on and off: the same bits."""
    code = """
import numpy as np, darknet_bn
rng = np.random.default_rng(1)
x = (rng.standard_normal((2, 8, 256, 256)) * 3 + 1).astype(np.float32)
dy = rng.standard_normal(x.shape).astype(np.float32)
layer = darknet_bn.BatchNormLayer(2, 256, 256, 8, numerics="standard")
y = layer.forward(x, train=True).copy()
dx = layer.backward(dy).copy()
z = layer.forward(x, train=False).copy()
np.save(OUT, np.stack([y, dx, z]))
"""
    results = []
    for mode in ("never", "always"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dnbn_stream_{os.getpid()}_{mode}.npy")
        subprocess.run([sys.executable, "-c", f"OUT = {path!r}\n" + code], env=clean_env(DARKNET_BN_STREAM=mode),
                       check=True, timeout=120)
        results.append(np.load(path))
        os.unlink(path)
    assert results[0].tobytes() == results[1].tobytes()


def test_named_work_splits_run_on_their_threads():
    """The suite's PATHS shapes take the thread split they are named for (conftest fixes the threshold)."""
    from _reliability import PATHS
    if os.environ.get("DARKNET_BN_MIN_WORK") != "65536":
        pytest.skip("DARKNET_BN_MIN_WORK was set to something else before the suite started")
    old = darknet_bn.get_num_threads()
    darknet_bn.set_num_threads(2)
    try:  # a parallel call makes the library read its threshold
        layer = darknet_bn.BatchNormLayer(4, 64, 64, 16)
        layer.forward(np.ones((4, 16, 64, 64), np.float32) + np.arange(64, dtype=np.float32), train=True)
    finally:
        darknet_bn.set_num_threads(old)
    t = darknet_bn.info()["tuning"]
    assert (t["min_work_per_thread"], t["min_work_source"]) == (65536, "DARKNET_BN_MIN_WORK")
    for name, (shape, threads) in PATHS.items():
        values = int(np.prod(shape))
        assert values // t["min_work_per_thread"] >= threads, (name, shape, threads)


def test_store_trials_end_and_the_benchmark_waits_for_them():
    """auto: a pass's first calls try both stores, then (its units being channel groups)
    group sizes, each call counted, then one of each is kept; the benchmark's
    settle_tuning calls a pass until that happens and stops for a callable that makes no
    trial."""
    code = """
import json, numpy as np, darknet_bn
from darknet_bn._bench_common import settle_tuning
darknet_bn.set_num_threads(1)
x = np.random.default_rng(2).standard_normal((2, 8, 256, 256)).astype(np.float32)
layer = darknet_bn.BatchNormLayer(2, 256, 256, 8, numerics="standard")
def entry():
    return [d for d in darknet_bn.info()["tuning"]["stream_decisions"] if d["pass"] == "forward_infer"]
layer.forward(x, train=False)
first = entry()
calls = []
settle_tuning(lambda: calls.append(1))
idle = len(calls)
settle_tuning(lambda: (calls.append(1), layer.forward(x, train=False)))
print(json.dumps({"first": first, "idle": idle, "settle": len(calls) - idle, "after": entry()}))
"""
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=120,
                         check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert [(d["choice"], d["group_kb"], d["trial_calls"]) for d in r["first"]] == [("trying", "trying", 1)]
    assert r["idle"] == 1  # one call, no trial advanced: stop
    (after,) = r["after"]
    assert after["trial_calls"] == 1 + r["settle"] == 9 + 4 * 3  # 9 store calls, 4 group sizes x 3 calls
    assert after["choice"] in ("plain", "stream") and after["plain_ms"] > 0 and after["stream_ms"] > 0
    sizes = [g["group_kb"] for g in after["group_ms"]]
    assert after["group_kb"] in sizes and sizes == sorted(sizes, reverse=True) and sizes[1] * 2 == sizes[0]
    assert all(g["ms"] > 0 for g in after["group_ms"])
