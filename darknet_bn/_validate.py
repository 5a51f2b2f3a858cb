"""Argument checks shared by the layer and the kernels.

Every check raises before anything is written, with a message that names the
argument and says what was expected.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ._lib import lib
from .errors import ArgumentError, ArgumentTypeError

INT_MAX = 2**31 - 1
#: The numerics names and their codes in the C library (csrc/darknet_bn.h).
NUMERICS = {"darknet": int(lib.DNBN_NUMERICS_DARKNET), "standard": int(lib.DNBN_NUMERICS_STANDARD)}
#: The running statistics' momentum when none is given: Darknet's 0.01, PyTorch's 0.1.
DEFAULT_MOMENTUM = {"darknet": 0.01, "standard": 0.1}
#: The only eps darknet numerics accept (Darknet's constants are fixed; eps is standard's).
DARKNET_EPS = 1e-5
FLOAT32_MAX = float(np.finfo(np.float32).max)


def size(value: Any, name: str) -> int:
    """Return ``value`` as a C int that is >= 1."""
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be an integer, got bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if n < 1:
        raise ArgumentError(f"{name} must be >= 1, got {n}")
    if n > INT_MAX:
        raise ArgumentError(f"{name} must fit in a C int (<= {INT_MAX}), got {n}")
    return n


def number(value: Any, name: str) -> None:
    """Check that ``value`` is a real number (a Python or NumPy int or float, not a bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(f"{name} must be a real number, got {type(value).__name__}")


def numerics_name(value: Any) -> str:
    """Check that ``value`` names numerics ('darknet' or 'standard'); return it."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"numerics must be a str, got {type(value).__name__}")
    if value not in NUMERICS:
        raise ArgumentError(f"numerics must be 'darknet' or 'standard', got {value!r}")
    return value


def real(value: Any, name: str, low: Optional[float] = None, high: Optional[float] = None) -> float:
    """Return ``value`` as a float that is finite in float32 (C takes it as a float), within [low, high]."""
    number(value, name)
    try:
        x = float(value)
    except OverflowError:
        raise ArgumentError(f"{name} must be finite in float32, got {value}") from None
    if not math.isfinite(x) or abs(x) > FLOAT32_MAX:
        raise ArgumentError(f"{name} must be finite in float32 (|{name}| <= {FLOAT32_MAX:.4g}), got {x}")
    if (low is not None and x < low) or (high is not None and x > high):
        raise ArgumentError(f"{name} must be in [{low}, {high}], got {x}")
    return x


def flag(value: Any, name: str) -> bool:
    """Return ``value`` as a bool; only bool and NumPy bool are accepted."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def float32_array(value: Any, name: str) -> np.ndarray:
    """Check that ``value`` is a float32 NumPy array."""
    if not isinstance(value, np.ndarray):
        raise ArgumentTypeError(f"{name} must be a numpy.ndarray of float32, got {type(value).__name__}")
    if value.dtype != np.float32:
        raise ArgumentTypeError(f"{name} must have dtype float32, got {value.dtype}")
    return value


def readable(value: Any, name: str, count: int, shapes: Sequence[Tuple[int, ...]] = ()) -> np.ndarray:
    """Return a C-contiguous float32 array of ``count`` values (copied if not contiguous).

    With ``shapes``, the array's shape must be one of them; otherwise only its size counts.
    """
    if type(value) is np.ndarray and value.dtype == np.float32 and value.shape in shapes:
        return value if value.flags.c_contiguous else np.ascontiguousarray(value)  # the common case, fast
    arr = float32_array(value, name)
    _check_extent(arr, name, count, shapes)
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


def writable(value: Any, name: str, count: int, shapes: Sequence[Tuple[int, ...]] = ()) -> np.ndarray:
    """Check an output array: float32, ``count`` values, C-contiguous and writable."""
    arr = float32_array(value, name)
    _check_extent(arr, name, count, shapes)
    if not arr.flags.c_contiguous:
        raise ArgumentError(f"{name} must be C-contiguous (it is written in place)")
    if not arr.flags.writeable:
        raise ArgumentError(f"{name} must be writable (it is written in place)")
    return arr


def _check_extent(arr: np.ndarray, name: str, count: int, shapes: Sequence[Tuple[int, ...]]) -> None:
    if shapes:
        if tuple(arr.shape) not in [tuple(s) for s in shapes]:
            wanted = " or ".join(str(tuple(s)) for s in shapes)
            raise ArgumentError(f"{name} must have shape {wanted}, got {tuple(arr.shape)}")
    elif arr.size != count:
        raise ArgumentError(f"{name} must hold {count} float32 values, got {arr.size}")


def layer_options(c: int, h: int, w: int, numerics: Any, eps: Any, momentum: Any) -> Tuple[str, float, float]:
    """Check a layer's c*h*w (sizes already checked) and numerics, eps, momentum; return the last three
    (momentum defaulted from the numerics)."""
    if c * h * w > INT_MAX:
        raise ArgumentError(f"c*h*w must fit in a C int (<= {INT_MAX}), got {c * h * w}")
    numerics = numerics_name(numerics)
    eps = real(eps, "eps")
    if numerics == "darknet" and np.float32(eps) != np.float32(DARKNET_EPS):  # the C layer keeps eps in float32
        raise ArgumentError(f"eps applies to numerics='standard' (got eps={eps!r}); darknet numerics use "
                            "Darknet's constants")
    if not np.float32(eps) > 0:
        raise ArgumentError(f"eps must be > 0 in float32, got {eps}")
    momentum = DEFAULT_MOMENTUM[numerics] if momentum is None else real(momentum, "momentum", 0, 1)
    return numerics, eps, momentum
