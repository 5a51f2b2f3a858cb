"""Library-wide settings: thread count and build information."""
from __future__ import annotations

from typing import Any, Dict

from . import _validate
from ._lib import check, ffi, lib


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1; values above 256 are clamped) in every kernel and layer call.

    The default is the number of cores this process may run on, or the
    environment variable ``DARKNET_BN_NUM_THREADS`` when it is set.
    """
    check(lib.dnbn_set_num_threads(_validate.size(n, "n")), "set_num_threads(n)")


def get_num_threads() -> int:
    """Return the number of threads kernel and layer calls use."""
    return int(lib.dnbn_get_num_threads())


def info() -> Dict[str, Any]:
    """Return the library's version, instruction-set path ("avx2" or "generic") and thread count."""
    return {
        "version": ffi.string(lib.dnbn_version()).decode(),
        "simd": ffi.string(lib.dnbn_simd_path()).decode(),
        "threads": get_num_threads(),
    }
