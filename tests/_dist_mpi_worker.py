"""Rank program of the MPI tests: ``mpiexec -n N python -m mpi4py tests/_dist_mpi_worker.py OUT_DIR MODE N``.

Modes:

* ``main``: every SyncBatchNormLayer scenario (tests/_dist_cases.py) over
  ``MPICommunicator(MPI.COMM_WORLD)``, one over ``MPI.COMM_WORLD`` given as it
  is, and one over a communicator split by rank parity; results pickled to
  ``OUT_DIR/rank<r>.pkl``.
* ``crash``: the last rank raises before the first collective (the
  constructor's); the others enter it and would wait forever. Under
  ``python -m mpi4py`` the uncaught exception calls ``MPI_Abort``, and mpiexec
  ends the whole job: the test checks that it ends, and soon.
"""
from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
from typing import Any, Dict

import _dist_cases as cases


def run_main(comm_world: Any) -> Dict[str, Any]:
    from darknet_bn.distributed import MPICommunicator, SyncBatchNormLayer

    comm = MPICommunicator(comm_world)
    rank, size = comm.rank, comm.size
    results = cases.run_all_layer_cases(comm)
    case = cases.layer_cases(size)[0]
    c, h, w = cases.SHAPES[case["shape"]]
    layer = SyncBatchNormLayer(case["split"][rank], w, h, c, comm_world, numerics=case["numerics"])
    results["layer-mpi4py-comm"] = cases.layer_steps(layer, cases.case_data(case),
                                                     lambda a: cases.shard(a, case["split"], rank))
    # A sub-communicator: ranks of the same parity form a group and synchronize only among themselves.
    sub = comm_world.Split(rank % 2, rank)
    sub_comm = MPICommunicator(sub)
    data = cases.batch_data(cases._seed("split-comm"), 2 * sub_comm.size, c, h, w)
    layer = SyncBatchNormLayer(2, w, h, c, sub)
    results["layer-split-comm"] = cases.layer_steps(
        layer, data, lambda a: np_slice(a, 2 * sub_comm.rank, 2 * sub_comm.rank + 2))
    results["layer-split-comm.group"] = (rank % 2, sub_comm.rank, sub_comm.size)
    sub.Free()
    return results


def np_slice(a: Any, lo: int, hi: int) -> Any:
    import numpy as np

    return np.ascontiguousarray(a[lo:hi])


def main() -> None:
    out_dir, mode, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from mpi4py import MPI

    import darknet_bn
    from darknet_bn.distributed import SyncBatchNormLayer

    darknet_bn.set_num_threads(1)
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if size != expected:  # each process alone in its world: mpiexec is not the MPI mpi4py was built for
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump({"crash": f"MPI_COMM_WORLD has {size} ranks, mpiexec started {expected}: mpiexec and "
                                  f"mpi4py's MPI library ({MPI.Get_library_version().splitlines()[0]}) differ"}, f)
        return
    if mode == "crash":
        if rank == size - 1:
            # fail only once rank 0 is on its way into the collective (its marker written), so the
            # test sees a peer waiting, however slowly rank 0 started
            marker = os.path.join(out_dir, "rank0.entered")
            deadline = time.monotonic() + 30
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.01)
            raise RuntimeError("this rank fails before the first collective")
        with open(os.path.join(out_dir, f"rank{rank}.entered"), "w"):
            pass
        SyncBatchNormLayer(2, 1, 1, 3, world)  # waits for the failed rank
        with open(os.path.join(out_dir, f"rank{rank}.returned"), "w"):
            pass
        time.sleep(60)
        return
    try:
        results = run_main(world)
    except BaseException:
        results = {"crash": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main()
