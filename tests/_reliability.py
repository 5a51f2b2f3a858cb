"""Helpers shared by the reliability tests (test_stress, test_properties, test_concurrency, test_memory).

Not a test module (pytest collects only test_*.py). Imports the package under
test and the float64 oracle; nothing here asserts numerics by itself.
"""

import contextlib
import os
import subprocess
import sys

import numpy as np

import darknet_bn
import oracle
from conftest import f32

HERE = os.path.dirname(os.path.abspath(__file__))

# Shapes (batch, c, h, w) that reach each work split of the C layer and kernels
# at the thread count given with them (threads.c: at least 2^17 element
# operations per thread; channels.c / batchnorm_layer.c: how work is cut).
# tests/c/test_darknet_bn.c (test_paths_run_what_they_name) checks that these
# very shapes take the split named here; keep the two in step.
#   "channels": threads own whole channels, a few per work unit (large h*w);
#   "groups":   many channels share a work unit, visited image by image (small h*w);
#   "split":    fewer channels than threads, so a channel is cut into parts whose
#               moments are merged;
#   "fc":       spatial == 1, tiles of channels vectorized across channels.
PATHS = {
    "channels": ((2, 32, 128, 128), 2),
    "groups": ((8, 128, 12, 12), 2),
    "split": ((2, 2, 320, 320), 3),
    "fc": ((8192, 40, 1, 1), 2),
}


@contextlib.contextmanager
def num_threads(n):
    """Run the body with darknet_bn at `n` threads, restoring the previous count after."""
    old = darknet_bn.get_num_threads()
    darknet_bn.set_num_threads(n)
    try:
        yield n
    finally:
        darknet_bn.set_num_threads(old)


def make_pair(shape, numerics="darknet", scales=None, biases=None, **kw):
    """A BatchNormLayer of `shape` (batch, c, h, w) and its float64 oracle twin, same parameters."""
    b, c, h, w = shape
    layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics, **kw)
    st = oracle.LayerState(b, w, h, c, numerics=numerics, eps=kw.get("eps"), momentum=kw.get("momentum"))
    if scales is not None:
        layer.scales = f32(scales)
        st.scales = f32(scales).astype(np.float64)
    if biases is not None:
        layer.biases = f32(biases)
        st.biases = f32(biases).astype(np.float64)
    return layer, st


def per_channel(a, c):
    """A (batch, c, ...) array as float64 (c, m): each channel's values in a row."""
    a = np.asarray(a)
    return np.moveaxis(a.reshape(a.shape[0], c, -1), 1, 0).reshape(c, -1).astype(np.float64)


def run_python(code, timeout=120, **env_changes):
    """Run `code` in a fresh interpreter (this venv, tests/ on the path); return CompletedProcess.

    env_changes: variables to set (str) or remove (None). The caller checks returncode:
    a negative one is the signal that killed the child (a crash the test run survives).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


def describe_exit(r):
    """A readable account of a finished subprocess for an assertion message."""
    how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
    return f"{how}\n--- stdout (tail) ---\n{r.stdout[-3000:]}\n--- stderr (tail) ---\n{r.stderr[-3000:]}"
