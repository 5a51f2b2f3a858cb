"""Library-wide settings: thread count and build information."""
from __future__ import annotations

import json
from typing import Any, Dict

from . import _validate
from ._lib import check, ffi, lib
from ._openmp_team import team_library


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1; values above 256 are clamped) in every kernel and layer call.

    The default is the number of cores this process may run on, or the
    environment variable ``DARKNET_BN_NUM_THREADS`` when it is set.
    """
    check(lib.dnbn_set_num_threads(_validate.size(n, "n")), "set_num_threads(n)")


def get_num_threads() -> int:
    """Return the number of threads kernel and layer calls use."""
    return int(lib.dnbn_get_num_threads())


def tuning() -> Dict[str, Any]:
    """Return the choices the library made for this machine (docs/reference.md §5).

    Keys: ``simd``; ``team`` ("pool", or "external" when another library's
    thread team runs the parallel calls); ``l2_bytes`` and ``l3_bytes`` as the system reports them
    (0: unknown); ``group_bytes`` (input bytes of a channel group) and
    ``group_source``; ``min_work_per_thread`` (the least values per extra
    thread), ``min_work_source``, and the measurements it comes from,
    ``wake_us`` (a sleeping worker's wake-up) and ``value_ns`` (time per
    value); ``stream`` ("auto", "always" or "never"), ``stream_source``,
    ``stream_min_bytes`` and ``stream_decisions``: one entry per kind of pass,
    size class (``bytes_at_least``) and thread count met so far, with its
    ``choice`` ("trying", "plain", "stream", or "fixed" by
    ``DARKNET_BN_STREAM`` or the layout), the fastest time measured with each
    (``plain_ms``, ``stream_ms``), the channel-group size kept (``group_kb``,
    or "trying") with the fastest time of each size tried (``group_ms``: a
    list of {``group_kb``, ``ms``}, 0 when not timed), and ``trial_calls``
    (the calls that tried a choice of either).
    """
    size = int(lib.dnbn_tuning_report(ffi.NULL, 0)) + 1
    for _ in range(4):  # decisions may be added between the two calls
        buf = ffi.new("char[]", size)
        need = int(lib.dnbn_tuning_report(buf, size))
        if need < size:
            return dict(json.loads(ffi.string(buf).decode()))
        size = need + 256
    raise RuntimeError("the tuning report kept growing")


def info() -> Dict[str, Any]:
    """Return the library's version, instruction-set path ("avx2" or "generic"),
    thread count, the threads that run parallel calls (``team``: "pool" for
    darknet_bn's own, else the path of the OpenMP runtime whose team runs them,
    see ``darknet_bn.torch``), and under ``tuning`` the machine-dependent
    choices (:func:`tuning`)."""
    return {
        "version": ffi.string(lib.dnbn_version()).decode(),
        "simd": ffi.string(lib.dnbn_simd_path()).decode(),
        "threads": get_num_threads(),
        "team": team_library() or "pool",
        "tuning": tuning(),
    }
