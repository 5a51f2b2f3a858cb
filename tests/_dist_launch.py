"""Starting real rank processes for tests/test_distributed.py, with deadlines.

* MPI: ``mpiexec -n N python -m mpi4py tests/_dist_mpi_worker.py OUT MODE SIZE``,
  with the mpiexec next to the running Python (the ``mpich`` wheel puts it in
  the virtual environment's bin/) or on PATH. Open MPI's needs
  ``--oversubscribe`` (more ranks than cores) and, as root,
  ``--allow-run-as-root``; MPICH's needs neither.
* torch.distributed: one process per rank from a forkserver that imported
  torch once (spawning fresh interpreters costs an import of torch each, 2-4 s
  on 2 cores), gloo over a file store.

A launch that outlives its deadline is killed, and the test fails: a hang is
never waited out.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
MPI_WORKER = os.path.join(HERE, "_dist_mpi_worker.py")
DEADLINE = 120.0  # seconds, for any one launch


def mpiexec() -> Optional[str]:
    """The mpiexec to use: the one next to this Python first, then PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(local, os.X_OK):
        return local
    return shutil.which("mpiexec")


def mpi_skip_reason() -> Optional[str]:
    """Why the MPI tests cannot run here, or None."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'darknet_bn[mpi]', i.e. mpi4py and mpich)"
    if mpiexec() is None:
        return "no mpiexec next to this Python or on PATH (pip install mpich)"
    return None


def mpicc() -> Optional[str]:
    local = os.path.join(os.path.dirname(sys.executable), "mpicc")
    if os.access(local, os.X_OK):
        return local
    return shutil.which("mpicc")


def mpiexec_command(size: int) -> List[str]:
    exe = mpiexec()
    assert exe is not None
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    cmd = [exe, "-n", str(size)]
    if "Open MPI" in version or "OpenRTE" in version:
        cmd.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
    return cmd


def mpi_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["DARKNET_BN_NUM_THREADS"] = "1"
    return env


def run_mpi(size: int, mode: str, out_dir: str, deadline: float = DEADLINE) -> Tuple[int, str, float]:
    """Run the MPI worker on ``size`` ranks; (return code, output, seconds). Killed at the deadline."""
    cmd = mpiexec_command(size) + [sys.executable, "-m", "mpi4py", MPI_WORKER, out_dir, mode, str(size)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=mpi_env(),
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise AssertionError(f"mpiexec -n {size} ({mode}) did not finish in {deadline:.0f} s:\n{out}")
    return proc.returncode, out, time.monotonic() - t0


def read_results(out_dir: str, size: int, what: str) -> List[Dict[str, Any]]:
    """Each rank's pickled results; a rank that crashed fails the test with its traceback."""
    results = []
    for r in range(size):
        path = os.path.join(out_dir, f"rank{r}.pkl")
        assert os.path.exists(path), f"{what}: rank {r} wrote no results"
        with open(path, "rb") as f:
            res = pickle.load(f)
        assert "crash" not in res, f"{what}: rank {r} failed:\n{res['crash']}"
        results.append(res)
    return results


def torch_skip_reason() -> Optional[str]:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'darknet_bn[torch]')"
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch has no torch.distributed with the gloo backend"
    return None


_CONTEXT: Any = None


def _forkserver() -> Any:
    """The forkserver context, its server preloading torch (once per test process)."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["numpy", "torch", "torch.distributed", "darknet_bn", "_dist_cases",
                                    "_dist_torch_worker"])
        _CONTEXT = ctx
    return _CONTEXT


def run_torch(size: int, mode: str, out_dir: str, pg_timeout: float = 60.0,
              deadline: float = DEADLINE) -> Tuple[List[Optional[int]], float]:
    """Start ``size`` rank processes of tests/_dist_torch_worker.py; (exit codes, seconds). Killed at the deadline."""
    import _dist_torch_worker

    ctx = _forkserver()
    init_file = os.path.join(out_dir, "store")
    procs = [ctx.Process(target=_dist_torch_worker.main, args=(r, size, init_file, out_dir, mode, pg_timeout),
                         daemon=True) for r in range(size)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    end = t0 + deadline
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(10)
    assert not hung, f"torch ranks {hung} ({mode}) did not finish in {deadline:.0f} s"
    return [p.exitcode for p in procs], time.monotonic() - t0
