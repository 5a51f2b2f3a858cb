"""Scenarios of synchronized batch norm, shared by the rank processes and the tests that check them.

Every rank rebuilds the whole batch from a seed and takes its shard; the test
process rebuilds the same batch and computes what one process computes on it
(darknet_bn.BatchNormLayer, PyTorch in float64, the float64 oracle). Light
imports only (numpy, darknet_bn): torch is imported by the functions that use it.

A scenario's result is a dict of NumPy arrays, or {"error": (type name,
message, extra)} for the error scenarios.
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

OFFSET = 1e4  # docs/reference.md §6: offsets up to 10^4 standard deviations
LR = 0.1
UPDATE_MOMENTUM = 0.9

# (c, h, w): a convolutional shape, and a fully connected one (spatial = 1).
SHAPES = {"conv": (3, 4, 5), "fc": (5, 1, 1)}
SPLITS = {2: [(3, 5), (1, 7), (0, 8)], 3: [(2, 3, 4), (0, 4, 5), (1, 0, 1)]}
NUMERICS = ("darknet", "standard")
NAN_CHANNEL = 1

# The buffers a layer scenario records after each phase.
STEP_BUFFERS = ("mean", "variance", "rolling_mean", "rolling_variance", "x_norm", "mean_delta", "variance_delta",
                "scale_updates", "bias_updates")


def layer_cases(size: int) -> List[Dict[str, Any]]:
    """The SyncBatchNormLayer scenarios for ``size`` ranks: every split x shape x numerics."""
    cases = []
    for split in SPLITS[size]:
        for shape in SHAPES:
            for numerics in NUMERICS:
                key = f"layer-{numerics}-{shape}-{'_'.join(map(str, split))}"
                cases.append({"key": key, "numerics": numerics, "shape": shape, "split": split, "seed": _seed(key)})
    return cases


def _seed(key: str) -> int:
    """A seed from a key, the same in every process (no hash randomization)."""
    return zlib.crc32(key.encode())


def batch_data(seed: int, batch: int, c: int, h: int, w: int, offset: float = OFFSET) -> Dict[str, np.ndarray]:
    """Two training steps' inputs and deltas for the whole batch, and the initial scales and biases."""
    rng = np.random.default_rng(seed)
    shape = (batch, c, h, w)
    std = rng.uniform(0.5, 2.0, c)[None, :, None, None]
    shift = rng.uniform(-3, 3, c)[None, :, None, None] * std
    data = {}
    for k in ("1", "2"):
        data["x" + k] = (offset + shift + std * rng.standard_normal(shape)).astype(np.float32)
        data["dy" + k] = rng.standard_normal(shape).astype(np.float32)
    data["scales"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    data["biases"] = rng.standard_normal(c).astype(np.float32)
    return data


def bounds(split: Sequence[int], rank: int) -> Tuple[int, int]:
    """The [lo, hi) images of ``rank`` in a batch split as ``split``."""
    lo = int(sum(split[:rank]))
    return lo, lo + int(split[rank])


def shard(a: np.ndarray, split: Sequence[int], rank: int) -> np.ndarray:
    lo, hi = bounds(split, rank)
    return np.ascontiguousarray(a[lo:hi])


def case_data(case: Dict[str, Any]) -> Dict[str, np.ndarray]:
    c, h, w = SHAPES[case["shape"]]
    return batch_data(case["seed"], sum(case["split"]), c, h, w)


def _record(layer: Any, out: Dict[str, np.ndarray], step: str) -> None:
    for name in STEP_BUFFERS:
        out[f"{step}.{name}"] = np.array(getattr(layer, name), copy=True)


def layer_steps(layer: Any, data: Dict[str, np.ndarray], take: Any) -> Dict[str, np.ndarray]:
    """Two training steps (forward, backward, update) and an inference forward; what each left.

    ``layer`` is a SyncBatchNormLayer or a BatchNormLayer; ``take(a)`` is this
    layer's part of a whole-batch array. Used by the ranks and by the test's
    single-process reference alike.
    """
    layer.scales = data["scales"]
    layer.biases = data["biases"]
    out: Dict[str, np.ndarray] = {}
    for k in ("1", "2"):
        out[f"y{k}"] = np.array(layer.forward(take(data["x" + k])), copy=True)
        out[f"dx{k}"] = np.array(layer.backward(take(data["dy" + k])), copy=True)
        _record(layer, out, k)
        layer.update(LR, UPDATE_MOMENTUM)
        out[f"{k}.scales"] = np.array(layer.scales, copy=True)
        out[f"{k}.biases"] = np.array(layer.biases, copy=True)
    out["y_inference"] = np.array(layer.forward(take(data["x1"]), train=False), copy=True)
    return out


def run_layer_case(comm: Any, case: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """One SyncBatchNormLayer scenario on this rank."""
    from darknet_bn.distributed import SyncBatchNormLayer

    c, h, w = SHAPES[case["shape"]]
    split = case["split"]
    layer = SyncBatchNormLayer(split[comm.rank], w, h, c, comm, numerics=case["numerics"])
    return layer_steps(layer, case_data(case), lambda a: shard(a, split, comm.rank))


def nan_case(size: int) -> Dict[str, Any]:
    """NaN in rank 0's shard, channel NAN_CHANNEL only."""
    split = SPLITS[size][0]
    return {"key": "layer-nan", "numerics": "standard", "shape": "conv", "split": split, "seed": _seed("nan")}


def nan_data(case: Dict[str, Any]) -> Dict[str, np.ndarray]:
    data = case_data(case)
    lo, hi = bounds(case["split"], 0)
    data["x1"][lo, NAN_CHANNEL, 0, 0] = np.nan
    return data


def run_nan_case(comm: Any, case: Dict[str, Any]) -> Dict[str, np.ndarray]:
    from darknet_bn.distributed import SyncBatchNormLayer

    c, h, w = SHAPES[case["shape"]]
    split = case["split"]
    layer = SyncBatchNormLayer(split[comm.rank], w, h, c, comm, numerics=case["numerics"])
    return layer_steps(layer, nan_data(case), lambda a: shard(a, split, comm.rank))


def _error(exc: BaseException) -> Tuple[str, str, Any]:
    return (type(exc).__name__, str(exc), getattr(exc, "ranks", None))


def run_layer_errors(comm: Any) -> Dict[str, Any]:
    """Failures on one rank: each rank records what it raised; a good step after shows nobody was left behind.

    * ``forward-shape``: the last rank passes an input of the wrong shape.
    * ``backward-dtype``: rank 0 passes a float64 delta.
    * ``global-count``: one value per channel in the whole batch.
    * ``constructor-c``: the last rank builds its layer with another c.
    * ``after``: a normal step on the same layer afterwards (its output).
    """
    from darknet_bn.distributed import SyncBatchNormLayer

    rank, last = comm.rank, comm.size - 1
    c, h, w = SHAPES["conv"]
    split = SPLITS[comm.size][0]
    data = batch_data(_seed("errors"), sum(split), c, h, w)
    layer = SyncBatchNormLayer(split[rank], w, h, c, comm, numerics="standard")
    out: Dict[str, Any] = {}
    x = shard(data["x1"], split, rank)
    bad = np.zeros((split[rank] + 1, c, h, w), np.float32) if rank == last else x
    try:
        layer.forward(bad)
        out["forward-shape"] = None
    except Exception as exc:
        out["forward-shape"] = _error(exc)
    out["forward-shape.rolling_mean"] = layer.rolling_mean.copy()  # unchanged: still 0
    layer.forward(x)
    dy = shard(data["dy1"], split, rank)
    try:
        layer.backward(dy.astype(np.float64) if rank == 0 else dy)
        out["backward-dtype"] = None
    except Exception as exc:
        out["backward-dtype"] = _error(exc)
    out["backward-dtype.bias_updates"] = layer.bias_updates.copy()  # unchanged: still 0
    out["after"] = layer.backward(dy).copy()
    one = SyncBatchNormLayer(1 if rank == 0 else 0, 1, 1, c, comm)
    try:
        one.forward(np.ones((one.batch, c, 1, 1), np.float32))
        out["global-count"] = None
    except Exception as exc:
        out["global-count"] = _error(exc)
    try:
        SyncBatchNormLayer(2, w, h, c + (rank == last), comm)
        out["constructor-c"] = None
    except Exception as exc:
        out["constructor-c"] = _error(exc)
    return out


def run_all_layer_cases(comm: Any) -> Dict[str, Any]:
    """Every SyncBatchNormLayer scenario for comm.size ranks."""
    results: Dict[str, Any] = {}
    for case in layer_cases(comm.size):
        results[case["key"]] = run_layer_case(comm, case)
    case = nan_case(comm.size)
    results[case["key"]] = run_nan_case(comm, case)
    results["layer-errors"] = run_layer_errors(comm)
    return results
