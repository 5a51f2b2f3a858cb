"""The compiled extension and the small helpers every wrapper uses to call it."""
from __future__ import annotations

from typing import Any

import numpy as np

from . import errors

try:
    from ._darknet_bn import ffi, lib
except ImportError as exc:  # pragma: no cover - only in a broken install
    raise ImportError(
        "darknet_bn's C extension is not built; install the package with `pip install .` "
        "(or `make venv` in a source checkout)"
    ) from exc

__all__ = ["ffi", "lib", "floats", "check"]


def floats(arr: np.ndarray) -> Any:
    """A ``float[]`` onto a C-contiguous float32 array's memory (no copy).

    The caller keeps ``arr`` alive for as long as the pointer is used.
    """
    return ffi.from_buffer("float[]", arr)


def check(status: int, message: str) -> None:
    """Raise the matching :mod:`darknet_bn.errors` exception for a nonzero status."""
    if status != errors.OK:
        errors.raise_for_status(status, message, ffi.string(lib.dnbn_strerror(status)).decode())
