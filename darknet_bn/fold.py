"""Folding a batch-norm layer into the layer before it, for inference.

In inference a batch-norm layer is an affine map per channel o,
``y = s[o]·(z − rolling_mean[o]) + β[o]``, with

- darknet numerics: ``s = γ / (sqrt(rolling_variance) + 1e−6)`` (Darknet's
  epsilon outside the root),
- standard numerics: ``s = γ / sqrt(rolling_variance + eps)``.

When ``z`` is the output of a convolution or a fully connected layer,
``z[o] = W[o]·x + b[o]``, the two compose into one layer of the same kind:
``W'[o] = s[o]·W[o]`` and ``b'[o] = s[o]·(b[o] − rolling_mean[o]) + β[o]``.
:func:`fold_batchnorm` computes ``W'`` and ``b'`` in float64 and rounds them
once to float32.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from . import _validate
from ._lib import ffi, lib
from .errors import ArgumentError, ArgumentTypeError

__all__ = ["DARKNET_FORWARD_EPS", "fold_batchnorm", "inference_scale", "normalizer"]

#: Darknet's epsilon of the forward pass, added after the square root (documentation;
#: the arithmetic is the C library's).
DARKNET_FORWARD_EPS = 1e-6

#: The numerics names and their codes in the C library.
NUMERICS = _validate.NUMERICS


def _real_array(value: Any, name: str) -> np.ndarray:
    if value is None:
        raise ArgumentTypeError(f"{name} must be an array of real numbers, got None")
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "fiu":
        raise ArgumentTypeError(f"{name} must be an array of real numbers, got dtype {arr.dtype}")
    return arr


def _channels(value: Any, name: str, c: Optional[int] = None) -> np.ndarray:
    """A per-channel array of real numbers, shape (c,) (any length when c is None)."""
    arr = _real_array(value, name)
    if arr.ndim != 1 or (c is not None and arr.shape[0] != c):
        raise ArgumentError(f"{name} must have shape ({c if c is not None else 'c'},), got {arr.shape}")
    return arr


def normalizer(rolling_variance: Any, numerics: str = "darknet", eps: float = 1e-5) -> np.ndarray:
    """Return the inference normalizer per channel, in float64, as the layer's inference computes it.

    ``1 / (sqrt(rolling_variance) + 1e−6)`` for ``numerics="darknet"``,
    ``1 / sqrt(rolling_variance + eps)`` for ``"standard"`` (``eps`` >= 0). The
    formula lives in the C library (``dnbn_batchnorm_normalizer``); this reads
    it there. A negative variance gives NaN, as inference itself does.
    """
    _validate.numerics_name(numerics)
    _validate.number(eps, "eps")
    var = np.ascontiguousarray(_real_array(rolling_variance, "rolling_variance"), dtype=np.float64)
    out = np.empty(var.shape, dtype=np.float64)
    if var.size > np.iinfo(np.int32).max:
        raise ArgumentError(f"rolling_variance has too many channels ({var.size})")
    status = lib.dnbn_batchnorm_normalizer(NUMERICS[numerics], float(eps), ffi.from_buffer("double[]", var),
                                           var.size, ffi.from_buffer("double[]", out))
    if status != lib.DNBN_OK:
        raise ArgumentError(f"eps must be a finite number >= 0 for standard numerics, got {eps!r}")
    return out


def inference_scale(
    scales: np.ndarray, rolling_variance: np.ndarray, numerics: str = "darknet", eps: float = 1e-5
) -> np.ndarray:
    """Return ``s = γ · normalizer``, the per-channel factor of inference, in float64.

    ``γ · 1/(sqrt(rolling_variance) + 1e−6)`` for ``numerics="darknet"``,
    ``γ · 1/sqrt(rolling_variance + eps)`` for ``"standard"`` (:func:`normalizer`).
    Both arrays have shape (c,).
    """
    gamma = _channels(scales, "scales")
    var = _channels(rolling_variance, "rolling_variance", gamma.shape[0])
    return gamma.astype(np.float64) * normalizer(var, numerics, eps)


def fold_batchnorm(
    weights: Any,
    biases: Optional[Any],
    *,
    scales: np.ndarray,
    bn_biases: np.ndarray,
    rolling_mean: np.ndarray,
    rolling_variance: np.ndarray,
    numerics: str = "darknet",
    eps: float = 1e-5,
) -> Tuple[np.ndarray, np.ndarray]:
    """Fold inference batch norm into the preceding layer's ``weights`` and ``biases``.

    Args:
        weights: the preceding layer's weights, output channels first: shape
            (c, ...), e.g. (c_out, c_in, kh, kw) for a convolution (Darknet's
            order) or (c_out, n_in) for a fully connected layer. Any real dtype.
        biases: its biases, shape (c,), or None for a layer without them
            (treated as zeros; Darknet's convolutions with ``batch_normalize``
            have none of their own).
        scales, bn_biases, rolling_mean, rolling_variance: the batch-norm
            layer's γ, β and running statistics, shape (c,).
        numerics: ``"darknet"`` or ``"standard"``; ``eps`` is standard's epsilon.

    Returns:
        ``(weights', biases')``: new float32 arrays of shapes ``weights.shape``
        and (c,), computed in float64 and rounded once.

    Raises:
        ArgumentTypeError: an array is not of real numbers; numerics is not a str, eps not a number.
        ArgumentError: a shape does not match c; numerics or eps out of range.
    """
    c = _channels(scales, "scales").shape[0]
    beta = _channels(bn_biases, "bn_biases", c)
    mean = _channels(rolling_mean, "rolling_mean", c)
    _channels(rolling_variance, "rolling_variance", c)
    w = _real_array(weights, "weights")
    if w.ndim < 1 or w.shape[0] != c:
        raise ArgumentError(
            f"weights must have the layer's {c} channels as its first dimension, shape ({c}, ...), "
            f"got {w.shape}"
        )
    if biases is None:
        b = np.zeros(c, dtype=np.float64)
    else:
        b = _real_array(biases, "biases")
        if b.shape != (c,):
            raise ArgumentError(f"biases must have shape ({c},), got {b.shape}")
    s = inference_scale(scales, rolling_variance, numerics, eps)
    w64 = w.astype(np.float64) * s.reshape((c,) + (1,) * (w.ndim - 1))
    b64 = (b.astype(np.float64) - mean.astype(np.float64)) * s + beta.astype(np.float64)
    with np.errstate(over="ignore"):
        return w64.astype(np.float32), b64.astype(np.float32)
