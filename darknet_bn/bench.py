"""Side-by-side benchmark of darknet_bn's layer against its peers (docs/reference.md §7).

Run ``python -m darknet_bn.bench`` (``--help`` for the options). For every
shape and thread count it times, in one process and on the same data:

* ``darknet_bn standard`` -- ``BatchNormLayer(numerics="standard")``, the same
  math as PyTorch (the baseline of every ratio except the reference path's);
* ``darknet_bn darknet`` -- ``BatchNormLayer(numerics="darknet")``;
* ``torch native`` -- ``torch.ops.aten.native_batch_norm`` and
  ``native_batch_norm_backward``, allocating their outputs (if torch imports);
* ``torch out=`` -- the same ops' ``.out`` overloads into preallocated tensors;
* ``numpy`` -- the standard math written plainly in vectorized NumPy;
* ``reference`` -- Darknet's layer written with
  ``darknet_bn.kernels.reference`` (single-threaded C loops), Darknet numerics,
  so its ratio is taken against ``darknet_bn darknet``;
* ``roofline`` -- the least bytes the pass must move over the copy bandwidth
  measured in this run: training step 5 floats per value (read input, write
  output, read delta and the input, write delta: darknet_bn's peers keep
  their input in ``layer.x``, as PyTorch keeps a reference to it; the C
  benchmark's "...input in x" row), inference 2 floats per value.

Two passes are timed: the training step (forward with batch statistics, then
backward of a fixed delta) and the inference forward (running statistics).
Repetitions are interleaved across peers (A, B, C, A, B, C, ...) so machine
noise hits all peers alike; each peer is warmed up first; a sample of a fast
call loops it enough times to last ``--min-time``. Reported figures are
medians of the samples, as time per call. Before timing, the peers' results
are compared ("peers agree: max |diff| = ...") so the comparison is fair.

Thread counts default to 1, 2 and all usable cores (deduplicated; none above
the usable cores); darknet_bn and torch always get the same count.

With torch, more sections follow (each ratio is torch's time over darknet_bn's):

* inside a PyTorch process (:mod:`darknet_bn._bench_torch_layer`): per shape
  and thread count, the training step of ``darknet_bn standard`` against the
  faster PyTorch variant of the same cell, every timed call right after a
  short PyTorch parallel op (a small conv2d), so PyTorch's OpenMP workers have
  just been active, as inside a model; reported next to the "alone" ratio.
  ``--no-in-torch`` skips it.
* channels-last: forward (train) + backward of ``darknet_bn.torch.BatchNorm2d``
  against ``torch.nn.BatchNorm2d`` on a ``torch.channels_last`` input
  (``--channels-last-shape``, default 8x128x52x52, 4x16x8x8 with ``--quick``;
  ``--no-channels-last`` skips it).
* a whole CNN training step (``--cnn-input``, default 16x3x64x64: three
  conv3x3 + BatchNorm2d + ReLU blocks of 32, 64, 64 channels with 2x2 max
  pooling between them, global average pooling, a linear layer,
  cross-entropy, SGD with momentum): the model with ``torch.nn.BatchNorm2d``
  against the same model after ``darknet_bn.torch.convert_model``, same
  weights, data and thread count, steps interleaved, medians. ``--no-cnn``
  skips it.
* a ResNet-18-like model (:mod:`darknet_bn._bench_models`; ``--resnet-input``,
  default 16x3x112x112, 4x3x64x64 with ``--quick``; ``--no-resnet`` skips it):
  training step, inference, and the batch-norm time inside one training step
  from ``torch.profiler``, torch's model against its conversion.

With torch installed the benchmark imports ``darknet_bn.torch``, so darknet_bn's
parallel calls run on torch's OpenMP team, as in a user's process
(``DARKNET_BN_TEAM=pool`` keeps darknet_bn's own sleeping workers, which then
compete for the cores with torch's OpenMP workers spin-waiting after each
op, libgomp's default). ``OMP_WAIT_POLICY=PASSIVE`` stops the spinning at some
cost to torch's own ops. libgomp reads it when torch loads, so
``--omp-passive`` runs the CNN and ResNet sections a second time in a child
process started with it (:mod:`darknet_bn._bench_passive`); both results are
in the JSON and the tables.

Each section's table carries the targets (:mod:`darknet_bn._bench_targets`)
next to the measured ratios, marked met or MISS; a summary ends the table.

Writes ``bench.json`` (machine, configuration, every sample), ``bench.txt``
(the machine description, then the terminal tables), ``bench.png`` (speedup
over PyTorch per shape) and ``bench_threads.png`` (training-step time against
threads per shape) into ``--out``, by default ``docs/bench/<machine slug>``
(:func:`machine_slug`, e.g. ``intel-xeon-avx512-2c``). Needs the ``bench``
extra (matplotlib for the charts, tqdm for the progress bar); without them it
still runs and writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import darknet_bn
from darknet_bn import _bench_passive, _bench_targets, _cli
from darknet_bn._bench_common import (  # noqa: F401  (re-exported: the benchmark's public helpers)
    AGREE_TOL,
    EPS,
    SETTLE_S,
    STD_MOMENTUM,
    Shape,
    _timed,
    calibrate,
    default_threads,
    fmt_size,
    fmt_time,
    interleaved,
    make_data,
    set_threads,
    settle_tuning,
    shape_label,
    usable_cores,
)
from darknet_bn._bench_common import scaled_diff as _scaled_diff
from darknet_bn._bench_figures import plot_threads
from darknet_bn._bench_machine import machine_info, machine_slug, machine_text  # noqa: F401
from darknet_bn._bench_models import (  # noqa: F401  (the model sections, re-exported)
    CNN_CHANNELS,
    CNN_CHECK_STEPS,
    CNN_CLASSES,
    CNN_INPUT,
    CNN_LR,
    CNN_PEERS,
    RESNET_CHECK_STEPS,
    RESNET_INPUT,
    RESNET_PROFILE_STEPS,
    RESNET_QUICK_INPUT,
    CnnPeer,
    bench_cnn,
    bench_resnet,
    cnn_description,
    cnn_table,
    make_cnn,
    make_cnn_peers,
    make_resnet,
    resnet_final_hw,
    resnet_table,
)
from darknet_bn._bench_torch_layer import (
    CHANNELS_LAST_QUICK_SHAPE,
    CHANNELS_LAST_SHAPE,
    bench_channels_last,
    channels_last_table,
    in_torch_cell,
    in_torch_table,
    make_torch_op,
    torch_op_description,
)
from darknet_bn.kernels import reference as _ref

Arrays = Dict[str, np.ndarray]

SCHEMA = "darknet_bn.bench/2"

#: docs/reference.md §7's six shapes (batch, channels, h, w).
SHAPES: Tuple[Shape, ...] = (
    (8, 32, 208, 208),
    (32, 64, 112, 112),
    (8, 128, 52, 52),
    (16, 512, 13, 13),
    (64, 1024, 1, 1),
    (4, 16, 4, 4),
)
#: ``--quick`` keeps the shapes that fit in cache.
QUICK_SHAPES: Tuple[Shape, ...] = ((16, 512, 13, 13), (64, 1024, 1, 1), (4, 16, 4, 4))
#: The shape of the start-up agreement check (small, m = 2048 values per channel).
CHECK_SHAPE: Shape = (8, 32, 16, 16)

PASSES = ("train_step", "infer")
PASS_TITLES = {"train_step": "training step (forward + backward)", "infer": "inference forward"}
#: Floats moved per tensor value by the least a pass can do (see the module docstring).
ROOF_FLOATS = {"train_step": 5, "infer": 2}


# --------------------------------------------------------------------------- peers


class Peer:
    """One implementation under test, holding its own buffers for one shape.

    Subclasses set ``name`` (the JSON key), ``label`` (the table's name) and
    ``numerics`` ("standard" or "darknet"; ratios compare against darknet_bn
    with the same numerics), and implement the two timed passes and
    :meth:`results` (copies of the last training step's y, dx, dgamma, dbeta).
    """

    name = ""
    label = ""
    numerics = "standard"

    def __init__(self, x: np.ndarray, dy: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> None:
        self.shape: Shape = tuple(x.shape)  # type: ignore[assignment]

    def train_step(self) -> None:
        """Forward with batch statistics, then backward of the fixed delta."""
        raise NotImplementedError

    def infer(self) -> None:
        """Forward with the running statistics."""
        raise NotImplementedError

    def results(self) -> Arrays:
        """y, dx (for +dLoss/dy = dy), dgamma, dbeta of the last training step, as float arrays."""
        raise NotImplementedError

    def infer_output(self) -> np.ndarray:
        """A copy of the last inference output."""
        raise NotImplementedError

    def run(self, which: str) -> None:
        """Run pass ``which`` ("train_step" or "infer")."""
        (self.train_step if which == "train_step" else self.infer)()


class LayerPeer(Peer):
    """darknet_bn's ``BatchNormLayer`` with the given numerics.

    With ``copy_input`` False the input is written into ``layer.x`` once and
    every forward is given ``layer.x`` itself, so that it reads the input
    where backward will find it and copies nothing (the zero-copy call of the
    README), as PyTorch keeps a reference to its input; with True each
    forward is given a separate array and copies it into ``layer.x``, as
    Darknet's forward does.
    """

    def __init__(self, x: np.ndarray, dy: np.ndarray, gamma: np.ndarray, beta: np.ndarray, numerics: str,
                 copy_input: bool = False) -> None:
        super().__init__(x, dy, gamma, beta)
        b, c, h, w = self.shape
        self.numerics = numerics
        self.name = f"darknet_bn_{numerics}" + ("_copy" if copy_input else "")
        self.label = f"darknet_bn {numerics}" + (", x copied" if copy_input else "")
        self.layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics=numerics)
        self.layer.scales = gamma
        self.layer.biases = beta
        if not copy_input:
            kept = self.layer.x.reshape(x.shape)
            kept[...] = x
            x = kept
        self.x, self.dy = x, dy
        self.y = self.layer.output

    def train_step(self) -> None:
        self.layer.forward(self.x, train=True)
        self.layer.backward(self.dy)

    def infer(self) -> None:
        self.layer.forward(self.x, train=False)

    def results(self) -> Arrays:
        layer = self.layer
        layer.scale_updates[:] = 0.0
        layer.bias_updates[:] = 0.0
        layer.forward(self.x, train=True)
        y = layer.output.copy()
        dx = layer.backward(self.dy).copy()
        return {"y": y, "dx": dx, "dgamma": layer.scale_updates.copy(), "dbeta": layer.bias_updates.copy()}

    def infer_output(self) -> np.ndarray:
        self.infer()
        return self.layer.output.copy()


class ReferencePeer(Peer):
    """Darknet's ``forward/backward_batchnorm_layer`` written with the reference kernels.

    Forward: copy input to output and x, mean, variance, rolling update,
    normalize, copy to x_norm, scale_bias, add_bias. Backward (delta first
    receives the incoming gradient, as the next layer writes it in Darknet):
    backward_bias, backward_scale_cpu, scale_bias on delta, mean_delta_cpu,
    variance_delta_cpu, normalize_delta_cpu.
    """

    name = "reference"
    label = "reference (C loops)"
    numerics = "darknet"

    def __init__(self, x: np.ndarray, dy: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> None:
        super().__init__(x, dy, gamma, beta)
        b, c, h, w = self.shape
        self.input, self.dy = x, dy
        self.b, self.c, self.s = b, c, h * w
        self.output = np.empty_like(x)
        self.x = np.empty_like(x)
        self.x_norm = np.empty_like(x)
        self.delta = np.empty_like(x)
        self.scales = gamma.astype(np.float32).copy()
        self.biases = beta.astype(np.float32).copy()
        z = lambda: np.zeros(c, np.float32)  # noqa: E731
        self.scale_updates, self.bias_updates = z(), z()
        self.mean, self.variance = z(), z()
        self.rolling_mean, self.rolling_variance = z(), z()
        self.mean_delta, self.variance_delta = z(), z()

    def forward(self, train: bool) -> None:
        """Darknet's forward_batchnorm_layer (the batch-norm layer's own, l.type == BATCHNORM)."""
        b, c, s = self.b, self.c, self.s
        np.copyto(self.output, self.input)  # copy_cpu(l.outputs*l.batch, net.input, 1, l.output, 1)
        if train:
            np.copyto(self.x, self.output)  # copy_cpu(..., l.output, 1, l.x, 1)
            _ref.mean_cpu(self.output, b, c, s, self.mean)
            _ref.variance_cpu(self.output, self.mean, b, c, s, self.variance)
            self.rolling_mean *= np.float32(0.99)  # scal_cpu(l.out_c, .99, l.rolling_mean, 1)
            self.rolling_mean += np.float32(0.01) * self.mean  # axpy_cpu(l.out_c, .01, l.mean, 1, ...)
            self.rolling_variance *= np.float32(0.99)
            self.rolling_variance += np.float32(0.01) * self.variance
            _ref.normalize_cpu(self.output, self.mean, self.variance, b, c, s)
            np.copyto(self.x_norm, self.output)
        else:
            _ref.normalize_cpu(self.output, self.rolling_mean, self.rolling_variance, b, c, s)
        _ref.scale_bias(self.output, self.scales, b, c, s)
        _ref.add_bias(self.output, self.biases, b, c, s)

    def backward(self) -> None:
        """Darknet's backward_batchnorm_layer on delta = dy."""
        b, c, s = self.b, self.c, self.s
        np.copyto(self.delta, self.dy)
        _ref.backward_bias(self.bias_updates, self.delta, b, c, s)
        _ref.backward_scale_cpu(self.x_norm, self.delta, b, c, s, self.scale_updates)
        _ref.scale_bias(self.delta, self.scales, b, c, s)
        _ref.mean_delta_cpu(self.delta, self.variance, b, c, s, self.mean_delta)
        _ref.variance_delta_cpu(self.x, self.delta, self.mean, self.variance, b, c, s, self.variance_delta)
        _ref.normalize_delta_cpu(
            self.x, self.mean, self.variance, self.mean_delta, self.variance_delta, b, c, s, self.delta
        )

    def train_step(self) -> None:
        self.forward(True)
        self.backward()

    def infer(self) -> None:
        self.forward(False)

    def results(self) -> Arrays:
        self.scale_updates[:] = 0
        self.bias_updates[:] = 0
        self.forward(True)
        y = self.output.copy()
        self.backward()
        return {"y": y, "dx": self.delta.copy(), "dgamma": self.scale_updates.copy(),
                "dbeta": self.bias_updates.copy()}

    def infer_output(self) -> np.ndarray:
        self.infer()
        return self.output.copy()


class NumpyPeer(Peer):
    """The standard (PyTorch) batch norm, written plainly in vectorized NumPy; allocates as it goes."""

    name = "numpy"
    label = "numpy"

    def __init__(self, x: np.ndarray, dy: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> None:
        super().__init__(x, dy, gamma, beta)
        c = self.shape[1]
        self.x, self.dy = x, dy
        self.gamma = gamma.reshape(1, c, 1, 1).astype(np.float32)
        self.beta = beta.reshape(1, c, 1, 1).astype(np.float32)
        self.running_mean = np.zeros(c, np.float32)
        self.running_var = np.ones(c, np.float32)
        self.out: Arrays = {}

    def train_step(self) -> None:
        x, dy, gamma, beta = self.x, self.dy, self.gamma, self.beta
        axes = (0, 2, 3)
        m = x.size // x.shape[1]
        # forward
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        invstd = 1.0 / np.sqrt(var + np.float32(EPS))
        x_hat = (x - mean) * invstd
        y = gamma * x_hat + beta
        mom = np.float32(STD_MOMENTUM)
        self.running_mean = (1 - mom) * self.running_mean + mom * mean.ravel()
        self.running_var = (1 - mom) * self.running_var + mom * var.ravel() * np.float32(m / (m - 1))
        # backward
        dbeta = dy.sum(axis=axes, keepdims=True)
        dgamma = (dy * x_hat).sum(axis=axes, keepdims=True)
        dx = (gamma * invstd / m) * (m * dy - dbeta - x_hat * dgamma)
        self.out = {"y": y, "dx": dx, "dgamma": dgamma.ravel(), "dbeta": dbeta.ravel()}

    def infer(self) -> None:
        c = self.shape[1]
        mean = self.running_mean.reshape(1, c, 1, 1)
        invstd = 1.0 / np.sqrt(self.running_var.reshape(1, c, 1, 1) + np.float32(EPS))
        self.out["y_infer"] = (self.x - mean) * invstd * self.gamma + self.beta

    def results(self) -> Arrays:
        self.train_step()
        return {k: np.array(v) for k, v in self.out.items() if k != "y_infer"}

    def infer_output(self) -> np.ndarray:
        self.infer()
        return np.array(self.out["y_infer"])


class TorchPeer(Peer):
    """PyTorch's CPU batch norm through the native ATen ops (no autograd), allocating or ``out=``."""

    def __init__(
        self, x: np.ndarray, dy: np.ndarray, gamma: np.ndarray, beta: np.ndarray, torch: Any, out: bool
    ) -> None:
        super().__init__(x, dy, gamma, beta)
        c = self.shape[1]
        self.torch = torch
        self.use_out = out
        self.name = "torch_out" if out else "torch"
        self.label = "torch out=" if out else "torch native"
        self.x = torch.from_numpy(x)
        self.dy = torch.from_numpy(dy)
        self.weight = torch.from_numpy(gamma.astype(np.float32).copy())
        self.bias = torch.from_numpy(beta.astype(np.float32).copy())
        self.running_mean = torch.zeros(c)
        self.running_var = torch.ones(c)
        self.fwd = torch.ops.aten.native_batch_norm.default
        self.bwd = torch.ops.aten.native_batch_norm_backward.default
        self.fwd_out = torch.ops.aten.native_batch_norm.out
        self.bwd_out = torch.ops.aten.native_batch_norm_backward.out
        if out:
            self.y = torch.empty_like(self.x)
            self.y_infer = torch.empty_like(self.x)
            self.save_mean, self.save_invstd = torch.empty(c), torch.empty(c)
            self.infer_mean, self.infer_invstd = torch.empty(c), torch.empty(c)
            self.dx = torch.empty_like(self.x)
            self.dgamma, self.dbeta = torch.empty(c), torch.empty(c)
        self.last: Tuple[Any, ...] = ()
        self.last_infer: Any = None

    def train_step(self) -> None:
        t = self
        if self.use_out:
            y, sm, si = t.fwd_out(t.x, t.weight, t.bias, t.running_mean, t.running_var, True, STD_MOMENTUM, EPS,
                                  out=t.y, save_mean=t.save_mean, save_invstd=t.save_invstd)
            dx, dg, db = t.bwd_out(t.dy, t.x, t.weight, t.running_mean, t.running_var, sm, si, True, EPS,
                                   [True, True, True], out0=t.dx, out1=t.dgamma, out2=t.dbeta)
        else:
            y, sm, si = t.fwd(t.x, t.weight, t.bias, t.running_mean, t.running_var, True, STD_MOMENTUM, EPS)
            dx, dg, db = t.bwd(t.dy, t.x, t.weight, t.running_mean, t.running_var, sm, si, True, EPS,
                               [True, True, True])
        self.last = (y, dx, dg, db)

    def infer(self) -> None:
        t = self
        if self.use_out:
            y = t.fwd_out(t.x, t.weight, t.bias, t.running_mean, t.running_var, False, STD_MOMENTUM, EPS,
                          out=t.y_infer, save_mean=t.infer_mean, save_invstd=t.infer_invstd)[0]
        else:
            y = t.fwd(t.x, t.weight, t.bias, t.running_mean, t.running_var, False, STD_MOMENTUM, EPS)[0]
        self.last_infer = y

    def results(self) -> Arrays:
        self.train_step()
        y, dx, dg, db = (a.numpy().copy() for a in self.last)
        return {"y": y, "dx": dx, "dgamma": dg, "dbeta": db}

    def infer_output(self) -> np.ndarray:
        self.infer()
        return self.last_infer.numpy().copy()


def make_peers(shape: Shape, torch: Any, seed: int = 0) -> List[Peer]:
    """Every peer for ``shape`` on the same data (darknet_bn standard first: the baseline).

    Each peer reads its own copy of x and dy: peers sharing one array would
    find it in cache where the peer before them left it, and the first peer of
    each round would be the only one to read it from memory.
    """
    x, dy, gamma, beta = make_data(shape, seed)

    def own() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return x.copy(), dy.copy(), gamma, beta

    peers: List[Peer] = [
        LayerPeer(*own(), "standard"),
        LayerPeer(*own(), "standard", copy_input=True),
        LayerPeer(*own(), "darknet"),
    ]
    if torch is not None:
        peers.append(TorchPeer(*own(), torch, out=False))
        peers.append(TorchPeer(*own(), torch, out=True))
    peers.append(NumpyPeer(*own()))
    peers.append(ReferencePeer(*own()))
    return peers


def baseline_name(peer_numerics: str) -> str:
    """The darknet_bn peer a peer's ratios are taken against: the one with the same numerics."""
    return f"darknet_bn_{peer_numerics}"


# --------------------------------------------------------------------------- agreement


def check_agreement(peers: Sequence[Peer]) -> Dict[str, Any]:
    """Run one training step and one inference on each (fresh) peer; compare with darknet_bn.

    Standard-numerics peers are compared with ``darknet_bn standard``, the
    reference path with ``darknet_bn darknet``: y, dx, dgamma, dbeta of the
    training step and the inference output. Returns per-peer worst scaled
    difference (max |diff| / max(1, max |baseline|)) and per-array details.
    """
    results = {p.name: p.results() for p in peers}
    for p in peers:
        results[p.name]["y_infer"] = p.infer_output()
    per_peer: Dict[str, Dict[str, float]] = {}
    for p in peers:
        base = baseline_name(p.numerics)
        if p.name == base or base not in results:
            continue
        per_peer[p.name] = {
            k: _scaled_diff(results[p.name][k], results[base][k]) for k in ("y", "dx", "dgamma", "dbeta", "y_infer")
        }
    worst = max((max(v.values()) for v in per_peer.values()), default=0.0)
    return {
        "shape": list(peers[0].shape),
        "max_scaled_diff": worst,
        "agree": bool(worst <= AGREE_TOL),
        "tolerance": AGREE_TOL,
        "per_peer": per_peer,
    }


# --------------------------------------------------------------------------- measurement


def copy_bandwidth(threads: int, megabytes: int = 256, reps: int = 7) -> float:
    """Bytes read + written per second by ``np.copyto`` split over ``threads`` threads (median).

    NumPy releases the GIL while copying, so the threads copy in parallel.
    """
    n = max(1, megabytes * (1 << 20) // 4)
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32)
    bounds = [n * t // threads for t in range(threads + 1)]
    parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    times = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            list(pool.map(lambda p: np.copyto(p[0], p[1]), parts))
            times.append(time.perf_counter() - t0)
    return 2.0 * n * 4 / statistics.median(times[1:])  # the first copy also faults the pages in


def bench_cell(
    peers: Sequence[Peer],
    threads: int,
    torch: Any,
    bandwidth: float,
    reps: Optional[int],
    min_time: float,
    budget: float,
    max_reps: int,
    progress: Callable[[float, str], None],
) -> Dict[str, Any]:
    """Time every peer's two passes at ``threads`` threads, repetitions interleaved across peers.

    ``reps`` None chooses the repetition count from the warm-up timings so the
    cell takes about ``budget`` seconds (between ``MIN_REPS`` and ``max_reps``).
    """
    set_threads(threads, torch)
    b, c, h, w = peers[0].shape
    label = f"{b}x{c}x{h}x{w} @{threads}t"
    fns = {(p.name, which): (lambda p=p, which=which: p.run(which)) for which in PASSES for p in peers}
    timed, reps = interleaved(fns, reps=reps, min_time=min_time, budget=budget, max_reps=max_reps,
                              progress=progress, label=label)
    samples = {p.name: {k: timed[p.name, k]["samples"] for k in PASSES} for p in peers}
    inner = {key: t["inner"] for key, t in timed.items()}
    n_values = b * c * h * w
    roof = {k: ROOF_FLOATS[k] * 4 * n_values / bandwidth for k in PASSES}
    cell: Dict[str, Any] = {
        "shape": [b, c, h, w],
        "threads": threads,
        "darknet_bn_threads": darknet_bn.get_num_threads(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "megabytes": n_values * 4 / 1e6,
        "reps": reps,
        "copy_bandwidth": bandwidth,
        "roofline": {f"{k}_s": roof[k] for k in PASSES},
        "peers": {},
    }
    for p in peers:
        med = {k: statistics.median(samples[p.name][k]) for k in PASSES}
        cell["peers"][p.name] = {
            "label": p.label,
            "numerics": p.numerics,
            "baseline": baseline_name(p.numerics),
            "inner": {k: inner[p.name, k] for k in PASSES},
            **{f"{k}_s": med[k] for k in PASSES},
            **{f"{k}_samples": samples[p.name][k] for k in PASSES},
        }
    for p in peers:
        entry = cell["peers"][p.name]
        base = cell["peers"].get(entry["baseline"])
        entry["ratio"] = {k: (entry[f"{k}_s"] / base[f"{k}_s"] if base else None) for k in PASSES}
    dn = cell["peers"]["darknet_bn_standard"]
    cell["roofline"]["ratio"] = {k: roof[k] / dn[f"{k}_s"] for k in PASSES}
    return cell


# --------------------------------------------------------------------------- reporting


def table(cells: Sequence[Dict[str, Any]]) -> str:
    """The terminal table: per thread count, per shape, each peer's medians and ratios."""
    lines: List[str] = []
    for threads in sorted({c["threads"] for c in cells}):
        group = [c for c in cells if c["threads"] == threads]
        bw = group[0]["copy_bandwidth"]
        lines.append(f"== {threads} thread{'s' if threads > 1 else ''} "
                     f"(copy bandwidth {bw / 1e9:.1f} GB/s) ==")
        lines.append(f"{'shape':<16} {'peer':<29} {'train step':>11} {'ratio':>8} {'inference':>11} {'ratio':>8}")
        for c in group:
            name = shape_label(c["shape"])
            rows = [(e["label"], e["train_step_s"], e["ratio"]["train_step"], e["infer_s"], e["ratio"]["infer"])
                    for e in c["peers"].values()]
            rf = c["roofline"]
            rows.append(("roofline", rf["train_step_s"], rf["ratio"]["train_step"], rf["infer_s"],
                         rf["ratio"]["infer"]))
            for i, (label, ts, tr, inf, ir) in enumerate(rows):
                ratio = lambda r: f"{r:7.2f}x" if r is not None else "       -"  # noqa: E731
                lines.append(f"{name if i == 0 else '':<16} {label:<29} {fmt_time(ts):>11} {ratio(tr):>8} "
                             f"{fmt_time(inf):>11} {ratio(ir):>8}")
            lines.append(f"{'':<16} ({c['reps']} reps, {fmt_size(c['megabytes'])})")
        lines.append("")
    lines.append("Times are medians per call. ratio = peer time / darknet_bn time with the same numerics")
    lines.append("(standard for torch and numpy, darknet for the reference path): 3.00x means darknet_bn is 3x")
    lines.append("faster. darknet_bn's layers read their input from layer.x (written there once, so forward copies")
    lines.append("nothing, as PyTorch keeps a reference to its input); \"x copied\" passes a separate array, which")
    lines.append("forward copies into layer.x, as Darknet does. The reference path is single-threaded C loops")
    lines.append("called from Python; numpy is single-threaded. roofline = least bytes moved / DRAM copy")
    lines.append("bandwidth (a floor for the out-of-cache shapes; shapes that fit in cache can beat it); its")
    lines.append("ratio = the fraction of the roof darknet_bn standard reaches.")
    return "\n".join(lines)


PEER_COLORS = {
    "darknet_bn_standard": "#1f77b4",
    "darknet_bn_standard_copy": "#9ecae1",
    "darknet_bn_darknet": "#6baed6",
    "torch": "#d62728",
    "torch_out": "#ff9896",
    "numpy": "#2ca02c",
    "reference": "#9467bd",
}


def plot(cells: Sequence[Dict[str, Any]], path: str) -> Optional[str]:
    """Grouped bars of speedup over PyTorch (or over NumPy without torch), per shape and pass.

    One column of panels per thread count, one row per pass; log scale; a
    line at 1x; a black tick per shape marks the roofline. Returns the path,
    or None when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    have_torch = "torch" in cells[0]["peers"]
    base = "torch" if have_torch else "numpy"
    base_label = "PyTorch (native_batch_norm)" if have_torch else "NumPy"
    threads_list = sorted({c["threads"] for c in cells})
    names = [n for n in cells[0]["peers"] if n != base]
    nrows, ncols = len(PASSES), len(threads_list)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols + 1, 4.3 * nrows), squeeze=False, sharey="row")
    width = 0.8 / len(names)
    for col, threads in enumerate(threads_list):
        group = [c for c in cells if c["threads"] == threads]
        xs = np.arange(len(group))
        for row, which in enumerate(PASSES):
            ax = axes[row][col]
            lo, hi = 1.0, 1.0
            for i, name in enumerate(names):
                vals = [c["peers"][base][f"{which}_s"] / c["peers"][name][f"{which}_s"] for c in group]
                lo, hi = min(lo, *vals), max(hi, *vals)
                pos = xs - 0.4 + width * (i + 0.5)
                bars = ax.bar(pos, vals, width, color=PEER_COLORS.get(name), label=group[0]["peers"][name]["label"],
                              edgecolor="white", linewidth=0.5)
                if name == "darknet_bn_standard":
                    for bar, v in zip(bars, vals):
                        ax.annotate(f"{v:.1f}x" if v >= 0.95 else f"{v:.2g}x", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                                    va="bottom", fontsize=8, fontweight="bold", xytext=(0, 2),
                                    textcoords="offset points", zorder=5,
                                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85))
            roofs = [c["peers"][base][f"{which}_s"] / c["roofline"][f"{which}_s"] for c in group]
            hi = max(hi, *roofs)
            ax.hlines(roofs, xs - 0.42, xs + 0.42, colors="black", linewidth=2, label="roofline (bytes / DRAM copy bandwidth)")
            ax.axhline(1.0, color="#444444", linestyle="--", linewidth=1, label=f"{base_label} = 1x")
            ax.set_yscale("log")
            ax.set_ylim(lo / 1.6, hi * 2.2)
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{shape_label(c['shape'])}\n{fmt_size(c['megabytes'])}" for c in group], fontsize=8)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.grid(axis="y", which="major", alpha=0.35)
            ax.grid(axis="y", which="minor", alpha=0.12)
            ax.set_title(f"{PASS_TITLES[which]}, {threads} thread{'s' if threads > 1 else ''}", fontsize=11)
            if col == 0:
                ax.set_ylabel(f"speedup over {base_label.split(' ')[0]} (higher is faster)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.suptitle(f"darknet_bn batch norm vs peers: speedup over {base_label} (median per call)", fontsize=13)
    fig.tight_layout(rect=(0, 0.07 if len(labels) > 4 else 0.04, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- command line


#: Bytes the benchmark holds per value of a benchmark shape at its peak: about 48 float32
#: tensors of the shape (peers' buffers, results compared, NumPy's and torch's temporaries;
#: measured 47 on 16x64x128x128).
BYTES_PER_VALUE = 48 * 4
#: Bytes the CNN row holds per input pixel (batch*h*w) at its peak, plus 8 per input channel
#: value: activations and gradients of both models (measured 275 floats on 32x3x128x128).
CNN_BYTES_PER_PIXEL = 300 * 4
#: Bytes the ResNet section holds per input pixel (batch*h*w) at its peak (measured about 770:
#: activations and gradients of both models, 16x3x112x112), and its fixed part (weights,
#: gradients and momentum of both models, about 280 MB).
RESNET_BYTES_PER_PIXEL = 1500
RESNET_FIXED_BYTES = 400 * 2**20


def _check_memory(text: str, needed: int, what: str) -> None:
    """Raise ArgumentTypeError if ``needed`` bytes exceed this machine's physical memory."""
    total = _cli.physical_memory()
    if total is not None and needed > total:
        raise argparse.ArgumentTypeError(
            f"{text!r} needs about {needed / 2**30:.1f} GiB for {what}; this machine has {total / 2**30:.1f} GiB")


def parse_shape(text: str) -> Shape:
    """``"8x32x208x208"`` -> (8, 32, 208, 208); batch*h*w must be >= 2 (training), and the
    benchmark's buffers for it (:data:`BYTES_PER_VALUE`) must fit in physical memory."""
    shape = _cli.shape(min_values_per_channel=2)(text)
    b, c, h, w = shape
    _check_memory(text, b * c * h * w * BYTES_PER_VALUE, "the benchmark's buffers")
    return shape


def parse_cnn_input(text: str) -> Shape:
    """``"16x3x64x64"`` -> (16, 3, 64, 64); h and w must be >= 4 (two 2x2 poolings), and the
    CNN row's activations (:data:`CNN_BYTES_PER_PIXEL`) must fit in physical memory."""
    shape = _cli.shape(min_values_per_channel=2, min_hw=4, why=" (two 2x2 poolings)")(text)
    b, c, h, w = shape
    _check_memory(text, b * h * w * (CNN_BYTES_PER_PIXEL + 8 * c), "the CNN's activations")
    return shape


#: Least values per channel (batch * h * w) the ResNet's last stage must keep. With 2, a training
#: batch norm's input gradient is 0 in exact arithmetic and rounding noise in float32 (x_hat is
#: +-1), so no two implementations agree on it; 4 leaves a well-conditioned gradient.
RESNET_MIN_LAST_VALUES = 4


def parse_resnet_input(text: str) -> Shape:
    """``"16x3x112x112"`` -> (16, 3, 112, 112); the last stage (h and w divided by 32, rounded up) must
    keep batch*h*w >= :data:`RESNET_MIN_LAST_VALUES` values per channel, and the ResNet section's
    memory (:data:`RESNET_BYTES_PER_PIXEL`, :data:`RESNET_FIXED_BYTES`) must fit."""
    shape = _cli.shape(min_values_per_channel=2)(text)
    b, c, h, w = shape
    hf, wf = resnet_final_hw(h, w)
    if b * hf * wf < RESNET_MIN_LAST_VALUES:
        raise argparse.ArgumentTypeError(
            f"{text!r} leaves {b * hf * wf} value(s) per channel at the last stage (batch * h/32 * w/32, rounded "
            f"up); the benchmark needs at least {RESNET_MIN_LAST_VALUES} (fewer make the batch-norm gradients "
            f"rounding noise)")
    _check_memory(text, b * h * w * RESNET_BYTES_PER_PIXEL + b * c * h * w * 16 + RESNET_FIXED_BYTES,
                  "the ResNet's weights and activations")
    return shape


def _bandwidth_mb_type() -> Callable[[str], int]:
    """``--bandwidth-mb``: 1 MB up to what two buffers of that size leave of physical memory."""
    total = _cli.physical_memory()
    if total is None:
        return _cli.integer(1)
    return _cli.integer(1, max(1, total // (2 * 2**20)), " (two buffers of this many MB must fit in memory)")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options; every value is checked while parsing (darknet_bn._cli)."""
    threads_text = ", ".join(str(n) for n in default_threads())
    p = _cli.ArgumentParser(
        prog="python -m darknet_bn.bench",
        description="Time darknet_bn's batch-norm layer (training step and inference) against PyTorch, "
                    "NumPy and the reference C loops, side by side in one process (docs/reference.md §7); "
                    "with PyTorch also inside a PyTorch process, on channels-last tensors, in a small CNN "
                    "and in a ResNet-18-like model.",
        epilog="Writes bench.json, bench.txt, bench.png and bench_threads.png into --out. "
               "Ratios are peer / darknet_bn.",
    )
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="BxCxHxW",
                   help="shapes to time (default: docs/reference.md §7's six; with --quick the three small ones)")
    p.add_argument("--threads", nargs="+", type=_cli.threads, metavar="N",
                   help=f"thread counts, 1 to {_cli.MAX_THREADS} (default: 1, 2 and all usable cores, "
                        f"deduplicated; here {threads_text})")
    p.add_argument("--reps", type=_cli.integer(1), default=None,
                   help="repetitions per (shape, threads), >= 1; default: chosen per shape from a time budget")
    p.add_argument("--quick", action="store_true", help="small shapes and inputs only, fewer repetitions")
    p.add_argument("--out", type=_cli.output_dir, default=os.path.join("docs", "bench", machine_slug()),
                   help="output directory, created if missing (default: docs/bench/<machine slug>, "
                        "here %(default)s)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if it is installed")
    p.add_argument("--no-in-torch", action="store_true",
                   help="skip the 'inside a PyTorch process' section (each call right after a PyTorch op)")
    p.add_argument("--channels-last-shape", type=parse_shape, default=None, metavar="BxCxHxW",
                   help="shape of the channels-last module row (default: 8x128x52x52; 4x16x8x8 with --quick)")
    p.add_argument("--no-channels-last", action="store_true", help="skip the channels-last row")
    p.add_argument("--cnn-input", type=parse_cnn_input, default=CNN_INPUT, metavar="BxCxHxW",
                   help="input of the CNN training-step row (default: 16x3x64x64; needs torch)")
    p.add_argument("--no-cnn", action="store_true", help="skip the CNN training-step row")
    p.add_argument("--resnet-input", type=parse_resnet_input, default=None, metavar="BxCxHxW",
                   help="input of the ResNet-18-like section (default: 16x3x112x112; 4x3x64x64 with --quick)")
    p.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18-like section")
    p.add_argument("--omp-passive", action="store_true",
                   help="also run the CNN and ResNet sections in a child process started with "
                        "OMP_WAIT_POLICY=PASSIVE, and report both")
    p.add_argument("--min-time", type=_cli.positive_real, default=None, metavar="SECONDS",
                   help="least seconds per sample; fast calls are looped (default 0.005, 0.002 with --quick)")
    p.add_argument("--budget", type=_cli.positive_real, default=None, metavar="SECONDS",
                   help="seconds of timed repetitions per (shape, threads) when --reps is not given "
                        "(default 6, 1.5 with --quick)")
    p.add_argument("--bandwidth-mb", type=_bandwidth_mb_type(), default=256, metavar="MB",
                   help="buffer size for the copy-bandwidth measurement (default: %(default)s MB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _import_torch(disabled: bool) -> Any:
    if disabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    # as in a user's process that has PyTorch: darknet_bn.torch puts darknet_bn's parallel calls on
    # PyTorch's OpenMP team (DARKNET_BN_TEAM=pool keeps darknet_bn's own pool; bench.txt's header says which)
    import darknet_bn.torch  # noqa: F401
    return torch


def _open_bar(total: float, enabled: bool) -> Any:
    """A tqdm progress bar on stderr counting cells, or None (no tqdm, or disabled)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, file=sys.stderr, unit="cell", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total} cells [{elapsed}<{remaining}]")


def _report_parts(machine: Dict[str, Any], cells: Sequence[Dict[str, Any]], sections: Dict[str, Any],
                  targets: Sequence[Dict[str, Any]]) -> List[str]:
    """The blocks of bench.txt: the machine, the layer table, its targets, every other section that ran,
    the targets summary."""
    passive = sections.get("omp_passive") or {}
    parts = [machine_text(machine), table(cells)]
    if any("torch" in c["peers"] for c in cells):
        parts.append(_bench_targets.layer_table(cells))
    if sections.get("in_torch"):
        parts.append(in_torch_table(sections["in_torch"]))
    if sections.get("channels_last"):
        parts.append(channels_last_table(sections["channels_last"]))
    if sections.get("cnn"):
        parts.append(cnn_table(sections["cnn"], passive.get("cnn")))
    if sections.get("resnet"):
        parts.append(resnet_table(sections["resnet"], passive.get("resnet")))
    elif passive.get("resnet"):
        parts.append(resnet_table(passive["resnet"]))
    if passive.get("error"):
        parts.append(f"OMP_WAIT_POLICY=PASSIVE run failed: {passive['error']}")
    parts.append(_bench_targets.summary(targets))
    return parts


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; print the tables; write bench.json/.txt/.png and bench_threads.png.

    Returns 0; 1 if peers disagree, a requested section fails or the results cannot be written;
    2 if --out cannot be created. A bad option value exits with status 2 and one line on stderr
    before anything runs.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # before any work: a run of minutes must not end in an unwritable --out
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        print(f"{parser.prog}: error: argument --out: cannot create {args.out!r}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    torch = _import_torch(args.no_torch)
    shapes: List[Shape] = list(args.shapes or (QUICK_SHAPES if args.quick else SHAPES))
    threads_list = sorted(set(args.threads or default_threads()))
    min_time = args.min_time if args.min_time is not None else (0.002 if args.quick else 0.005)
    budget = args.budget if args.budget is not None else (1.5 if args.quick else 6.0)
    max_reps = 5 if args.quick else 15
    cl_shape = args.channels_last_shape or (CHANNELS_LAST_QUICK_SHAPE if args.quick else CHANNELS_LAST_SHAPE)
    resnet_input = args.resnet_input or (RESNET_QUICK_INPUT if args.quick else RESNET_INPUT)
    profile_steps = 2 if args.quick else RESNET_PROFILE_STEPS
    run_in_torch = torch is not None and not args.no_in_torch
    run_cl = torch is not None and not args.no_channels_last
    run_cnn = torch is not None and not args.no_cnn
    run_resnet = torch is not None and not args.no_resnet
    run_passive = args.omp_passive and (run_cnn or run_resnet)
    if args.omp_passive and not run_passive:
        print("--omp-passive: nothing to rerun (it reruns the CNN and ResNet sections, which need torch)",
              file=sys.stderr)
    old_threads = darknet_bn.get_num_threads()
    old_torch_threads = torch.get_num_threads() if torch is not None else None

    machine = machine_info(torch)
    print(machine_text(machine))
    if machine["load_average_start"]:
        print(f"load average {machine['load_average_start'][0]:.2f}; threads {threads_list}")

    # Are the peers computing the same thing?
    set_threads(max(threads_list), torch)
    check = check_agreement(make_peers(CHECK_SHAPE, torch, seed=1))
    worst = check["max_scaled_diff"]
    print(f"peers agree: max |diff| = {worst:.2e} (scaled by max(1, |value|); y, dx, dgamma, dbeta, inference "
          f"on {shape_label(CHECK_SHAPE)}; tolerance {AGREE_TOL:g})" if check["agree"] else
          f"PEERS DISAGREE: max |diff| = {worst:.2e} > {AGREE_TOL:g}: {check['per_peer']}")

    per_threads = len(threads_list)
    n_cells = (len(shapes) * per_threads * (2 if run_in_torch else 1)
               + per_threads * (run_cl + run_cnn + run_resnet)
               + (per_threads * (run_cnn + run_resnet) if run_passive else 0))
    bar = _open_bar(n_cells, not args.no_progress)

    def progress(amount: float, text: str) -> None:
        if bar is not None:
            bar.set_description_str(text, refresh=False)
            bar.update(amount)

    bandwidth = {}
    for n in threads_list:
        progress(0.0, f"copy bandwidth @{n}t")
        bandwidth[n] = copy_bandwidth(n, args.bandwidth_mb)
    cells: List[Dict[str, Any]] = []
    shape_checks: List[Dict[str, Any]] = []
    sections: Dict[str, Any] = {"in_torch": None, "channels_last": None, "cnn": None, "resnet": None,
                                "omp_passive": None}
    if run_in_torch:
        sections["in_torch"] = {"op": torch_op_description(), "results": []}
    timing = dict(reps=args.reps, min_time=min_time, budget=budget, max_reps=max_reps, progress=progress)
    try:
        op = make_torch_op(torch) if run_in_torch else None
        for shape in shapes:
            progress(0.0, f"{shape_label(shape)} setup")
            peers = make_peers(shape, torch)
            set_threads(max(threads_list), torch)
            shape_checks.append(check_agreement(peers))
            for n in threads_list:
                cell = bench_cell(peers, n, torch, bandwidth[n], args.reps, min_time, budget, max_reps, progress)
                cells.append(cell)
                if op is not None:
                    res = in_torch_cell(peers, cell, n, op, **timing)
                    if res is not None:
                        sections["in_torch"]["results"].append(res)
            del peers
        if run_cl:
            sections["channels_last"] = bench_channels_last(torch, cl_shape, threads_list, **timing)
        if run_cnn:
            sections["cnn"] = bench_cnn(torch, args.cnn_input, threads_list, args.reps, min_time, budget, max_reps,
                                        progress)
        if run_resnet:
            sections["resnet"] = bench_resnet(torch, resnet_input, threads_list, **timing, profile_steps=profile_steps)
        if run_passive:
            sections["omp_passive"] = _bench_passive.run({
                "cnn_input": list(args.cnn_input) if run_cnn else None,
                "resnet_input": list(resnet_input) if run_resnet else None,
                "threads": threads_list, "reps": args.reps, "min_time": min_time, "budget": budget,
                "max_reps": max_reps, "profile_steps": profile_steps,
            }, progress)
    finally:
        if bar is not None:
            bar.close()
        darknet_bn.set_num_threads(old_threads)
        if torch is not None:
            torch.set_num_threads(old_torch_threads)

    machine["darknet_bn_end"] = darknet_bn.info()
    passive = sections["omp_passive"] or {}
    resnets = [r for r in (sections["resnet"], passive.get("resnet")) if r]
    targets = _bench_targets.collect(cells, sections["in_torch"], sections["channels_last"], resnets)
    parts = _report_parts(machine, cells, sections, targets)
    text = "\n\n".join(parts)
    print()
    print("\n\n".join(parts[1:]))  # the machine was printed at the start
    all_agree = check["agree"] and all(c["agree"] for c in shape_checks)
    worst_shape = max((c["max_scaled_diff"] for c in shape_checks), default=0.0)
    if not all(c["agree"] for c in shape_checks):
        print(f"PEERS DISAGREE on a benchmark shape: max |diff| = {worst_shape:.2e}", file=sys.stderr)
    agreements = [("CNN LOSSES", sections["cnn"]), ("CNN LOSSES (PASSIVE)", passive.get("cnn")),
                  ("RESNET", sections["resnet"]), ("RESNET (PASSIVE)", passive.get("resnet")),
                  ("CHANNELS-LAST OUTPUTS", sections["channels_last"])]
    for what, section in agreements:
        if section is not None and not section["agreement"]["agree"]:
            agr = section["agreement"]
            numbers = ", ".join(f"{k} {v:.2e}" for k, v in agr.items() if isinstance(v, float))
            print(f"{what} DISAGREE: {numbers}", file=sys.stderr)
            all_agree = False
    status = 0 if all_agree else 1
    if passive.get("error"):
        print(f"OMP_WAIT_POLICY=PASSIVE run failed: {passive['error']}", file=sys.stderr)
        status = 1

    wall = time.perf_counter() - start
    report = {
        "schema": SCHEMA,
        "machine": machine,
        "config": {
            "shapes": [list(s) for s in shapes],
            "threads": threads_list,
            "reps": args.reps,
            "quick": args.quick,
            "torch": torch is not None,
            "min_time_s": min_time,
            "budget_s": budget,
            "passes": list(PASSES),
            "roofline_floats_per_value": ROOF_FLOATS,
            "cnn_input": list(args.cnn_input) if run_cnn else None,
            "in_torch_op": sections["in_torch"]["op"] if run_in_torch else None,
            "channels_last_shape": list(cl_shape) if run_cl else None,
            "resnet_input": list(resnet_input) if run_resnet else None,
            "resnet_profile_steps": profile_steps if run_resnet else None,
            "omp_passive": bool(run_passive),
        },
        "agreement": {"check": check, "shapes": shape_checks, "agree": all_agree},
        "copy_bandwidth": {str(n): bw for n, bw in bandwidth.items()},
        "results": cells,
        "in_torch": sections["in_torch"],
        "channels_last": sections["channels_last"],
        "cnn": sections["cnn"],
        "resnet": sections["resnet"],
        "omp_passive": sections["omp_passive"],
        "targets": targets,
        "figures": [],
        "wall_time_s": None,
    }
    try:
        os.makedirs(args.out, exist_ok=True)
        png = plot(cells, os.path.join(args.out, "bench.png"))
        png_threads = plot_threads(cells, sections["in_torch"], os.path.join(args.out, "bench_threads.png"))
        if png is None:
            print("matplotlib is not installed: no bench.png or bench_threads.png (pip install 'darknet_bn[bench]')",
                  file=sys.stderr)
        report["figures"] = [os.path.basename(f) for f in (png, png_threads) if f]
        wall = time.perf_counter() - start
        report["wall_time_s"] = wall
        if hasattr(os, "getloadavg"):
            machine["load_average_end"] = list(os.getloadavg())
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "bench.txt"), "w") as f:
            f.write(text + "\n")
    except OSError as exc:  # --out was writable at the start; it no longer is
        print(f"{parser.prog}: error: cannot write the results into {args.out!r}: {exc}", file=sys.stderr)
        return 1
    written = [os.path.join(args.out, "bench.json")] + [f for f in (png, png_threads) if f] + [
        os.path.join(args.out, "bench.txt")]
    print(f"\nwall time {wall:.1f} s; wrote {', '.join(written)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
