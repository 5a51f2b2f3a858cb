"""Worker functions for the multiprocessing tests of test_concurrency.py.

Module level (picklable by reference) and light: numpy and darknet_bn only, so a
'spawn' child imports nothing of pytest. The parent rebuilds the same data from
the seed and checks the returned buffers against the float64 oracle.
"""

import os

import numpy as np

# (batch, c, h, w): 131,072 values, enough for the C code to use 2 threads.
WORKER_SHAPE = (4, 8, 64, 64)
BUFFERS = ("output", "x_norm", "delta", "mean", "variance", "rolling_mean", "rolling_variance",
           "scales", "biases", "scale_updates", "bias_updates")


def step_data(seed, shape=WORKER_SHAPE):
    """The input, delta, scales and biases of a training step, from `seed`."""
    rng = np.random.default_rng(seed)
    b, c, h, w = shape
    std = rng.uniform(0.5, 2.0, c)
    off = rng.uniform(-3, 3, c) * std
    x = (off[None, :, None, None] + std[None, :, None, None] * rng.standard_normal(shape)).astype(np.float32)
    d = rng.standard_normal(shape).astype(np.float32)
    scales = rng.uniform(0.5, 2.0, c).astype(np.float32)
    biases = rng.standard_normal(c).astype(np.float32)
    return x, d, scales, biases


def train_step(args):
    """Build a layer, run forward, backward and update on the seed's data; return its buffers.

    args = (seed, numerics). Also returns the pid and the thread count the
    library reports in this process.
    """
    import darknet_bn

    seed, numerics = args
    b, c, h, w = WORKER_SHAPE
    x, d, scales, biases = step_data(seed)
    layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)
    layer.scales = scales
    layer.biases = biases
    layer.forward(x)
    layer.backward(d)
    out = {name: np.array(getattr(layer, name), copy=True) for name in BUFFERS if name not in
           ("scales", "biases", "scale_updates", "bias_updates")}
    out["scale_updates_before_update"] = np.array(layer.scale_updates, copy=True)
    out["bias_updates_before_update"] = np.array(layer.bias_updates, copy=True)
    layer.update(0.1, 0.9, 0.0)
    for name in ("scales", "biases", "scale_updates", "bias_updates"):
        out[name] = np.array(getattr(layer, name), copy=True)
    out["pid"] = os.getpid()
    out["threads"] = darknet_bn.get_num_threads()
    return out
