"""Run darknet_bn's parallel calls on the OpenMP team already in the process.

PyTorch's CPU build runs its intra-op work on an OpenMP team whose threads
spin for a while after each op before they sleep. darknet_bn's own workers
sleep between calls, so right after a PyTorch op they must first win a core
from a spinning OpenMP thread, and a call that should use two threads mostly
runs on one. Handing darknet_bn the ``GOMP_parallel`` of the OpenMP runtime
PyTorch loaded (``dnbn_set_team`` in the C API) runs its calls on that same
team, which is awake and on the cores.

``DARKNET_BN_TEAM=pool`` keeps darknet_bn's own pool; ``openmp`` (the
default once ``darknet_bn.torch`` is imported) uses the OpenMP team when one
is loaded. The library's thread count still decides how many threads a call
uses.

Not taken: in a process forked from one that had imported darknet_bn
(libgomp cannot run a team in the child of a process whose thread had one:
the call would wait forever for the parent's threads), and when the other
library runs one thread (a DataLoader worker sets PyTorch to one thread:
there is no spinning team to lend, and it may be such a child). libgomp's own
limits then apply to the process: after a team has run in it, multithreaded
OpenMP work in its forked children hangs, as after PyTorch's own parallel
ops (start children with ``spawn``, or set ``DARKNET_BN_TEAM=pool``), and
libgomp ends the process when it cannot create a thread (darknet_bn's pool
runs on fewer threads instead).
"""

import ctypes
import os
from typing import Optional

from ._lib import ffi, lib

__all__ = ["use_openmp_team", "team_library"]

_ENV = "DARKNET_BN_TEAM"
_current: Optional[str] = None
_forked = False


def _after_fork_in_child() -> None:
    """A forked child: the C library is back on its pool (its fork handler); never take a team here."""
    global _current, _forked
    _current = None
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _loaded_openmp(prefer: Optional[str]) -> Optional[str]:
    """The path of an OpenMP runtime mapped into this process (libgomp, or LLVM's libomp/libiomp5):
    the first under the directory ``prefer`` (the library whose team it should be), else the first."""
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6]
    except OSError:
        return None
    runtimes = [p for p in paths if os.path.basename(p).startswith(("libgomp", "libomp", "libiomp5")) and ".so" in p]
    if prefer:
        under = [p for p in runtimes if p.startswith(os.path.join(os.path.realpath(prefer), ""))
                 or p.startswith(os.path.join(prefer, ""))]
        runtimes = under + runtimes
    return runtimes[0] if runtimes else None


def use_openmp_team(prefer: Optional[str] = None, threads: int = 2) -> Optional[str]:
    """Run darknet_bn's parallel calls on a loaded OpenMP runtime's team; return its path.

    ``prefer``: a directory (PyTorch's) whose OpenMP runtime to take when
    several are loaded; ``threads``: the thread count that library runs its
    own work with. Does nothing and returns None when ``DARKNET_BN_TEAM=pool``
    is set (any other value: this), ``threads`` < 2, this process was forked
    from one that had imported darknet_bn, or no OpenMP runtime exporting
    ``GOMP_parallel`` is loaded; darknet_bn's own pool is used then. Safe to
    call more than once.
    """
    global _current
    if os.environ.get(_ENV, "openmp").strip().lower() == "pool" or threads < 2 or _forked:
        return None
    path = _loaded_openmp(prefer)
    if path is None:
        return None
    try:
        runtime = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
        address = ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    if not address:
        return None
    lib.dnbn_set_team(ffi.cast("dnbn_team_run", address))
    _current = path
    return path


def team_library() -> Optional[str]:
    """The OpenMP runtime whose team runs the parallel calls (None: darknet_bn's own pool)."""
    return _current if lib.dnbn_get_team() != ffi.NULL else None
