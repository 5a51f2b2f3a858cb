"""Synchronized batch norm on 2 ranks against local batch norm, and each collective's latency (make bench).

For each engine (MPI through mpi4py and the pip MPI's mpiexec; torch.distributed
with gloo on 127.0.0.1) two ranks on this machine each hold the same per-rank
batch and time, interleaved, medians of repetitions:

- local: a training step (forward + backward) of darknet_bn.BatchNormLayer on
  the rank's own batch (no communication);
- synced: the same step of darknet_bn.distributed.SyncBatchNormLayer (one
  allgather in forward, one allreduce in backward);
- the two collectives alone, with the payloads the synced step sends
  (allgather of 3*C+1 doubles per rank, allreduce of 2*C+2 doubles).

Each rank runs darknet_bn on one thread (the two ranks share the 2 cores).
Rank 0 prints the table. Usage: python benchmarks/bench_distributed.py [--reps N]
[--engines mpi,torch]; it starts its own ranks.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

import numpy as np

SHAPES = [(8, 128, 52, 52), (16, 512, 13, 13), (64, 1024, 1, 1)]  # per-rank batch x C x H x W
RANKS = 2


def _median_time(fn: Callable[[], Any], reps: int, barrier: Callable[[], Any]) -> float:
    """Median seconds of ``fn`` over ``reps`` calls, the ranks aligned by a barrier before each."""
    times = []
    for _ in range(reps):
        barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(comm: Any, barrier: Callable[[], Any], reps: int) -> List[Dict[str, Any]]:
    """Every shape's timings on this rank (the caller is one rank of a 2-rank job)."""
    import darknet_bn
    from darknet_bn.distributed import SyncBatchNormLayer, as_communicator

    darknet_bn.set_num_threads(1)
    c_comm = as_communicator(comm)
    rows = []
    for b, c, h, w in SHAPES:
        rng = np.random.default_rng(c_comm.rank)
        x = rng.standard_normal((b, c, h, w), dtype=np.float32) + 3
        dy = rng.standard_normal((b, c, h, w), dtype=np.float32)
        local = darknet_bn.BatchNormLayer(b, w, h, c, numerics="standard")
        synced = SyncBatchNormLayer(b, w, h, c, comm, numerics="standard")
        gather = np.zeros(3 * c + 1)
        reduce = np.zeros(2 * c + 2)

        def local_step() -> None:
            local.forward(x)
            local.backward(dy)

        def synced_step() -> None:
            synced.forward(x)
            synced.backward(dy)

        for fn in (local_step, synced_step):  # warm up
            fn()
        t = {"local": [], "synced": [], "allgather": [], "allreduce": []}
        for _ in range(3):  # interleaved rounds
            t["local"].append(_median_time(local_step, reps, barrier))
            t["synced"].append(_median_time(synced_step, reps, barrier))
            t["allgather"].append(_median_time(lambda: c_comm.allgather(gather), reps, barrier))
            t["allreduce"].append(_median_time(lambda: c_comm.allreduce_sum(reduce), reps, barrier))
        rows.append({"shape": f"{b}x{c}x{h}x{w}", **{k: statistics.median(v) for k, v in t.items()}})
    return rows


def table(engine: str, rows: List[Dict[str, Any]]) -> str:
    def ms(s: float) -> str:
        return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"

    lines = [f"| engine | per-rank shape | local step | synced step | synced / local | allgather | allreduce |",
             "|---|---|---|---|---|---|---|"] if engine == "header" else []
    for r in rows:
        lines.append(f"| {engine} | {r['shape']} | {ms(r['local'])} | {ms(r['synced'])} | "
                     f"{r['synced'] / r['local']:.2f}x | {ms(r['allgather'])} | {ms(r['allreduce'])} |")
    return "\n".join(lines)


# ---- the two engines -------------------------------------------------------------------------

def mpi_rank_main(reps: int) -> None:
    """Run inside ``mpiexec -n 2``: measure, rank 0 prints the rows."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rows = measure(comm, comm.Barrier, reps)
    if comm.rank == 0:
        print(table("MPI (mpi4py)", rows), flush=True)


def torch_rank_main(rank: int, port: int, reps: int, out: str) -> None:
    """One torch.distributed (gloo) rank; rank 0 writes the rows to ``out``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        rows = measure(dist.group.WORLD, dist.barrier, reps)
        if rank == 0:
            with open(out, "w", encoding="utf-8") as f:
                f.write(table("torch.distributed (gloo)", rows) + "\n")
    finally:
        dist.destroy_process_group()


def run_mpi(reps: int) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = exe if os.path.exists(exe) else shutil.which("mpiexec")
    if exe is None:
        return "| MPI | skipped: no mpiexec (pip install mpi4py mpich) | | | | | |"
    cmd = [exe, "-n", str(RANKS), sys.executable, os.path.abspath(__file__), "--mpi-rank", "--reps", str(reps)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"mpiexec failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout.strip()


def run_torch(reps: int) -> str:
    try:
        import torch.multiprocessing as mp
    except ImportError:
        return "| torch.distributed (gloo) | skipped: torch is not installed | | | | | |"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.md")
        mp.spawn(torch_rank_main, args=(port, reps, out), nprocs=RANKS, join=True)
        with open(out, encoding="utf-8") as f:
            return f.read().strip()


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="repetitions per measurement (default 15)")
    parser.add_argument("--engines", default="mpi,torch", help="comma-separated: mpi, torch (default both)")
    parser.add_argument("--mpi-rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.reps <= 10000:
        parser.error(f"--reps must be from 1 to 10000, got {args.reps}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ("mpi", "torch") for e in engines):
        parser.error(f"--engines must name mpi and/or torch, got {args.engines!r}")
    if args.mpi_rank:
        mpi_rank_main(args.reps)
        return 0
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(f"Synchronized batch norm, {RANKS} ranks on one machine ({cpu}, {os.cpu_count()} cores), "
          f"darknet_bn at 1 thread per rank, standard numerics, medians of 3 interleaved rounds x {args.reps}.")
    print("local = BatchNormLayer on the rank's own batch; synced = SyncBatchNormLayer (global statistics).\n")
    print(table("header", []))
    if "mpi" in engines:
        print(run_mpi(args.reps), flush=True)
    if "torch" in engines:
        print(run_torch(args.reps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
