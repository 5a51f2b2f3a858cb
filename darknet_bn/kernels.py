"""Darknet's ten batch-norm kernels over NumPy arrays, same argument order as C.

Each function takes float32 C-contiguous arrays where C takes pointers
(inputs that are not contiguous are copied; outputs must be contiguous and
writable) and the sizes ``batch, filters, spatial`` (Darknet's ``batch, n,
size``). Activation arrays hold ``batch*filters*spatial`` values in NCHW order
(any shape); per-channel arrays hold ``filters`` values. The written array is
also returned.

``darknet_bn.kernels.reference`` has the same ten functions running the
straightforward reference loops.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Dict, Tuple

import numpy as np

from . import _validate
from ._lib import floats, lib
from .errors import ArgumentError

# Roles of arguments: sizes, activations (read, or written in place) and
# per-channel vectors (read, written, or accumulated).
_BATCH, _FILTERS, _SPATIAL = "batch", "filters", "spatial"
_ACT_IN, _ACT_OUT, _CH_IN, _CH_OUT = "act_in", "act_out", "ch_in", "ch_out"

_ROLES: Dict[str, Tuple[str, ...]] = {
    "mean_cpu": (_ACT_IN, _BATCH, _FILTERS, _SPATIAL, _CH_OUT),
    "variance_cpu": (_ACT_IN, _CH_IN, _BATCH, _FILTERS, _SPATIAL, _CH_OUT),
    "normalize_cpu": (_ACT_OUT, _CH_IN, _CH_IN, _BATCH, _FILTERS, _SPATIAL),
    "scale_bias": (_ACT_OUT, _CH_IN, _BATCH, _FILTERS, _SPATIAL),
    "add_bias": (_ACT_OUT, _CH_IN, _BATCH, _FILTERS, _SPATIAL),
    "backward_bias": (_CH_OUT, _ACT_IN, _BATCH, _FILTERS, _SPATIAL),
    "backward_scale_cpu": (_ACT_IN, _ACT_IN, _BATCH, _FILTERS, _SPATIAL, _CH_OUT),
    "mean_delta_cpu": (_ACT_IN, _CH_IN, _BATCH, _FILTERS, _SPATIAL, _CH_OUT),
    "variance_delta_cpu": (_ACT_IN, _ACT_IN, _CH_IN, _CH_IN, _BATCH, _FILTERS, _SPATIAL, _CH_OUT),
    "normalize_delta_cpu": (_ACT_IN, _CH_IN, _CH_IN, _CH_IN, _CH_IN, _BATCH, _FILTERS, _SPATIAL, _ACT_OUT),
}


def _call(name: str, args: Dict[str, Any], suffix: str = "") -> np.ndarray:
    """Validate ``args`` (by name, in C order) against ``name``'s roles, call C, return the output."""
    roles = _ROLES[name]
    names = list(args)
    sizes = {role: _validate.size(args[n], n) for n, role in zip(names, roles) if role in (_BATCH, _FILTERS, _SPATIAL)}
    batch, filters, spatial = sizes[_BATCH], sizes[_FILTERS], sizes[_SPATIAL]
    if name == "variance_cpu" and batch * spatial < 2:
        raise ArgumentError(f"variance_cpu needs batch*spatial >= 2 values per channel, got {batch * spatial}")
    count = {_ACT_IN: batch * filters * spatial, _ACT_OUT: batch * filters * spatial, _CH_IN: filters, _CH_OUT: filters}
    c_args = []
    keep = []  # arrays that must stay alive during the call
    out = None
    for n, role in zip(names, roles):
        if role in sizes:
            c_args.append(sizes[role])
            continue
        if role in (_ACT_OUT, _CH_OUT):
            arr = _validate.writable(args[n], n, count[role])
            out = arr
        else:
            arr = _validate.readable(args[n], n, count[role])
        keep.append(arr)
        c_args.append(floats(arr))
    getattr(lib, name + suffix)(*c_args)
    assert out is not None
    return out


def mean_cpu(x: np.ndarray, batch: int, filters: int, spatial: int, mean: np.ndarray) -> np.ndarray:
    """mean[f] = (1/m) sum x over the channel, m = batch*spatial. Overwrites mean."""
    return _call("mean_cpu", locals())


def variance_cpu(
    x: np.ndarray, mean: np.ndarray, batch: int, filters: int, spatial: int, variance: np.ndarray
) -> np.ndarray:
    """variance[f] = sum (x - mean[f])^2 / (m - 1), unbiased (Darknet). Overwrites variance; needs m >= 2."""
    return _call("variance_cpu", locals())


def normalize_cpu(
    x: np.ndarray, mean: np.ndarray, variance: np.ndarray, batch: int, filters: int, spatial: int
) -> np.ndarray:
    """In place: x = (x - mean[f]) / (sqrt(variance[f]) + 1e-6) (epsilon outside the root, Darknet)."""
    return _call("normalize_cpu", locals())


def scale_bias(output: np.ndarray, scales: np.ndarray, batch: int, n: int, size: int) -> np.ndarray:
    """In place: output[b, f, i] *= scales[f]."""
    return _call("scale_bias", locals())


def add_bias(output: np.ndarray, biases: np.ndarray, batch: int, n: int, size: int) -> np.ndarray:
    """In place: output[b, f, i] += biases[f]."""
    return _call("add_bias", locals())


def backward_bias(bias_updates: np.ndarray, delta: np.ndarray, batch: int, n: int, size: int) -> np.ndarray:
    """Accumulates: bias_updates[f] += sum delta over the channel."""
    return _call("backward_bias", locals())


def backward_scale_cpu(
    x_norm: np.ndarray, delta: np.ndarray, batch: int, n: int, size: int, scale_updates: np.ndarray
) -> np.ndarray:
    """Accumulates: scale_updates[f] += sum delta * x_norm over the channel."""
    return _call("backward_scale_cpu", locals())


def mean_delta_cpu(
    delta: np.ndarray, variance: np.ndarray, batch: int, filters: int, spatial: int, mean_delta: np.ndarray
) -> np.ndarray:
    """Overwrites: mean_delta[f] = (sum delta) * (-1 / sqrt(variance[f] + 1e-5))."""
    return _call("mean_delta_cpu", locals())


def variance_delta_cpu(
    x: np.ndarray,
    delta: np.ndarray,
    mean: np.ndarray,
    variance: np.ndarray,
    batch: int,
    filters: int,
    spatial: int,
    variance_delta: np.ndarray,
) -> np.ndarray:
    """Overwrites: variance_delta[f] = sum(delta*(x - mean[f])) * -1/2 * (variance[f] + 1e-5)^(-3/2)."""
    return _call("variance_delta_cpu", locals())


def normalize_delta_cpu(
    x: np.ndarray,
    mean: np.ndarray,
    variance: np.ndarray,
    mean_delta: np.ndarray,
    variance_delta: np.ndarray,
    batch: int,
    filters: int,
    spatial: int,
    delta: np.ndarray,
) -> np.ndarray:
    """In place: delta = delta/sqrt(variance+1e-5) + variance_delta*2*(x - mean)/m + mean_delta/m."""
    return _call("normalize_delta_cpu", locals())


def _reference_twin(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def twin(*args: Any, **kwargs: Any) -> np.ndarray:
        bound = signature.bind(*args, **kwargs)
        return _call(fn.__name__, dict(bound.arguments), suffix="_ref")

    twin.__doc__ = f"Reference loops of :func:`darknet_bn.kernels.{fn.__name__}`: {fn.__doc__}"
    return twin


KERNELS = (
    mean_cpu, variance_cpu, normalize_cpu, scale_bias, add_bias,
    backward_bias, backward_scale_cpu, mean_delta_cpu, variance_delta_cpu, normalize_delta_cpu,
)

reference = types.SimpleNamespace(**{fn.__name__: _reference_twin(fn) for fn in KERNELS})
reference.__doc__ = "The ten kernels' straightforward reference loops (same signatures)."

__all__ = [fn.__name__ for fn in KERNELS] + ["reference"]
