"""Rank processes of the torch.distributed tests: gloo on a file store, started by a forkserver.

``main(rank, size, init_file, out_dir, mode, timeout)`` joins the process
group and runs one mode, then pickles its results to ``out_dir/rank<r>.pkl``
(or the traceback, under "crash"):

* ``"main"``: every SyncBatchNormLayer scenario over the torch communicator
  (tests/_dist_cases.py), the SyncBatchNorm module scenarios, and
  DistributedDataParallel training of a converted model;
* ``"timeout"``: rank 0 runs a synchronized forward that no other rank joins;
  it must raise after the process group's timeout.

The module and model builders are used by the tests too, for the
single-process references.
"""
from __future__ import annotations

import datetime
import os
import pickle
import time
import traceback
from typing import Any, Dict, List

import numpy as np

import _dist_cases as cases

MODULE_C = 3
SPATIAL = (4, 5)
# Module scenario kinds run on the first split only (the plain "conv" one runs on every split).
VARIANTS = ("fc-momentum-none", "noaffine", "nostats", "channels_last", "nan")
DDP_SPLITS = {2: (3, 5), 3: (2, 0, 6)}
DDP_LR = 0.1


def module_cases(size: int) -> List[Dict[str, Any]]:
    """SyncBatchNorm module scenarios for ``size`` ranks."""
    out = [{"key": f"module-conv-{'_'.join(map(str, s))}", "kind": "conv", "split": s} for s in cases.SPLITS[size]]
    out += [{"key": f"module-{k}", "kind": k, "split": cases.SPLITS[size][0]} for k in VARIANTS]
    for case in out:
        case["seed"] = cases._seed(case["key"])
    return out


def module_options(kind: str) -> Dict[str, Any]:
    """SyncBatchNorm / BatchNorm constructor options of a scenario kind."""
    return {
        "fc-momentum-none": {"momentum": None},
        "noaffine": {"affine": False},
        "nostats": {"track_running_stats": False},
    }.get(kind, {})


def module_data(case: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Whole-batch inputs (at offset 10^4) and output gradients of two steps, weight and bias."""
    h, w = (1, 1) if case["kind"] == "fc-momentum-none" else SPATIAL
    data = cases.batch_data(case["seed"], sum(case["split"]), MODULE_C, h, w)
    if case["kind"] == "fc-momentum-none":
        for k in ("x1", "dy1", "x2", "dy2"):
            data[k] = np.ascontiguousarray(data[k].reshape(data[k].shape[0], MODULE_C))
    if case["kind"] == "nan":
        lo, _ = cases.bounds(case["split"], 0)
        data["x1"][lo, cases.NAN_CHANNEL, 0, 0] = np.nan
    return data


def run_module_case(case: Dict[str, Any], rank: int, process_group: Any = None) -> Dict[str, np.ndarray]:
    """Two training steps and an eval forward of a SyncBatchNorm on this rank's shard."""
    import torch

    from darknet_bn._sync_torch import SyncBatchNorm

    data = module_data(case)
    m = SyncBatchNorm(MODULE_C, process_group=process_group, **module_options(case["kind"]))
    if m.weight is not None:
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(data["scales"]))
            m.bias.copy_(torch.from_numpy(data["biases"]))
    out: Dict[str, np.ndarray] = {}
    for k in ("1", "2"):
        x = torch.from_numpy(cases.shard(data["x" + k], case["split"], rank))
        g = torch.from_numpy(cases.shard(data["dy" + k], case["split"], rank))
        if case["kind"] == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
            g = g.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = m(x)
        if case["kind"] == "channels_last":
            out[f"{k}.channels_last"] = np.array(y.is_contiguous(memory_format=torch.channels_last))
        y.backward(g)
        out[f"y{k}"] = y.detach().contiguous().numpy().copy()
        out[f"dx{k}"] = x.grad.contiguous().numpy().copy()
        if m.weight is not None:
            out[f"{k}.weight_grad"] = m.weight.grad.numpy().copy()
            out[f"{k}.bias_grad"] = m.bias.grad.numpy().copy()
            m.weight.grad = m.bias.grad = None
        if m.running_mean is not None:
            out[f"{k}.running_mean"] = m.running_mean.numpy().copy()
            out[f"{k}.running_var"] = m.running_var.numpy().copy()
            out[f"{k}.num_batches_tracked"] = m.num_batches_tracked.numpy().copy()
    m.eval()
    with torch.no_grad():
        out["y_eval"] = m(torch.from_numpy(cases.shard(data["x1"], case["split"], rank))).numpy().copy()
    return out


def run_module_errors(rank: int, size: int) -> Dict[str, Any]:
    """The last rank passes an input with the wrong number of channels; then every rank runs a good step."""
    import torch

    from darknet_bn._sync_torch import SyncBatchNorm

    split = cases.SPLITS[size][0]
    data = cases.batch_data(cases._seed("module-errors"), sum(split), MODULE_C, *SPATIAL)
    m = SyncBatchNorm(MODULE_C)
    x = torch.from_numpy(cases.shard(data["x1"], split, rank))
    bad = torch.zeros(x.shape[0], MODULE_C + 1, *SPATIAL) if rank == size - 1 else x
    out: Dict[str, Any] = {}
    try:
        m(bad)
        out["forward-channels"] = None
    except Exception as exc:
        out["forward-channels"] = (type(exc).__name__, str(exc), getattr(exc, "ranks", None))
    out["forward-channels.num_batches_tracked"] = m.num_batches_tracked.numpy().copy()
    out["forward-channels.running_mean"] = m.running_mean.numpy().copy()
    out["after"] = m(x).detach().numpy().copy()
    return out


def ddp_model(sync: bool, dtype: Any = None) -> Any:
    """A small CNN with a BatchNorm2d and a darknet_bn BatchNorm1d, the same weights on every call.

    sync: converted by SyncBatchNorm.convert_sync_batchnorm (the ranks' model);
    otherwise the PyTorch-only reference (torch.nn batch norms).
    """
    import torch

    import darknet_bn.torch as dbt
    from darknet_bn._sync_torch import SyncBatchNorm

    torch.manual_seed(1234)
    bn1d = dbt.BatchNorm1d(6) if sync else torch.nn.BatchNorm1d(6)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 6), bn1d, torch.nn.ReLU(), torch.nn.Linear(6, 3),
    )
    if dtype is not None:
        model = model.to(dtype)
    return SyncBatchNorm.convert_sync_batchnorm(model) if sync else model


def ddp_data(size: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(cases._seed(f"ddp-{size}"))
    b = sum(DDP_SPLITS[size])
    return {
        "x1": rng.standard_normal((b, 2, 5, 5)).astype(np.float32),
        "x2": rng.standard_normal((b, 2, 5, 5)).astype(np.float32),
        "t": rng.standard_normal((b, 3)).astype(np.float32),
    }


def run_ddp(rank: int, size: int) -> Dict[str, Any]:
    """Two SGD steps of DistributedDataParallel over the converted model on this rank's shard."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: Dict[str, Any] = {}
    try:  # why SyncBatchNorm does not subclass torch.nn.SyncBatchNorm
        DDP(torch.nn.SyncBatchNorm.convert_sync_batchnorm(ddp_model(sync=False)))
        out["torch_sync_bn_in_ddp"] = None
    except Exception as exc:
        out["torch_sync_bn_in_ddp"] = (type(exc).__name__, str(exc))
    split = DDP_SPLITS[size]
    data = ddp_data(size)
    model = ddp_model(sync=True)
    out["converted"] = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()})
    ddp = DDP(model, forward_sync_buffers=False)  # equal buffers come from the protocol, not from broadcasts
    opt = torch.optim.SGD(ddp.parameters(), lr=DDP_LR)
    t = torch.from_numpy(cases.shard(data["t"], split, rank))
    for k in ("1", "2"):
        y = ddp(torch.from_numpy(cases.shard(data["x" + k], split, rank)))
        opt.zero_grad()
        (y * t).sum().backward()
        out[f"y{k}"] = y.detach().numpy().copy()
        out[f"{k}.grads"] = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        opt.step()
    out["state"] = {n: v.detach().numpy().copy() for n, v in model.state_dict().items()}
    return out


def run_main(rank: int, size: int) -> Dict[str, Any]:
    import torch.distributed as dist

    from darknet_bn.distributed import SyncBatchNormLayer, TorchCommunicator

    comm = TorchCommunicator()
    results = cases.run_all_layer_cases(comm)
    # A ProcessGroup given as it is (as_communicator wraps it).
    case = cases.layer_cases(size)[0]
    c, h, w = cases.SHAPES[case["shape"]]
    layer = SyncBatchNormLayer(case["split"][rank], w, h, c, dist.group.WORLD, numerics=case["numerics"])
    results["layer-process-group"] = cases.layer_steps(layer, cases.case_data(case),
                                                       lambda a: cases.shard(a, case["split"], rank))
    for mcase in module_cases(size):
        results[mcase["key"]] = run_module_case(mcase, rank)
    results["module-errors"] = run_module_errors(rank, size)
    import torch

    try:  # what PyTorch's own class does here: it refuses CPU tensors in synchronized training
        torch.nn.SyncBatchNorm(MODULE_C)(torch.randn(4, MODULE_C, *SPATIAL))
        results["torch-sync-bn-cpu"] = None
    except Exception as exc:
        results["torch-sync-bn-cpu"] = (type(exc).__name__, str(exc))
    # A process group of one rank (every rank creates every group, as new_group requires): no synchronization.
    solo = [dist.new_group([r]) for r in range(size)]
    results["module-solo-group"] = run_module_case(module_cases(size)[0], rank, process_group=solo[rank])
    results["ddp"] = run_ddp(rank, size)
    return results


def run_timeout(rank: int, size: int, out_dir: str) -> Dict[str, Any]:
    """Rank 0 forwards alone; the others wait until it is done (they never join its collective)."""
    import torch

    from darknet_bn._sync_torch import SyncBatchNorm

    done = os.path.join(out_dir, "rank0.done")
    if rank != 0:
        deadline = time.monotonic() + 120
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"waited": os.path.exists(done)}
    m = SyncBatchNorm(MODULE_C)
    try:
        m(torch.randn(4, MODULE_C, *SPATIAL))
        result: Dict[str, Any] = {"error": None}
    except Exception as exc:
        result = {"error": (type(exc).__name__, str(exc)[:500])}
    result["num_batches_tracked"] = int(m.num_batches_tracked)
    with open(done, "w"):
        pass
    return result


def main(rank: int, size: int, init_file: str, out_dir: str, mode: str, timeout: float) -> None:
    """Entry point of one rank process."""
    results: Dict[str, Any]
    try:
        import torch
        import torch.distributed as dist

        import darknet_bn

        torch.set_num_threads(1)
        darknet_bn.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout))
        results = run_main(rank, size) if mode == "main" else run_timeout(rank, size, out_dir)
        if mode == "main":
            dist.destroy_process_group()
    except BaseException:
        results = {"crash": traceback.format_exc()}
    tmp = os.path.join(out_dir, f"rank{rank}.pkl.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(results, f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pkl"))
    if mode != "main":
        os._exit(0)  # a process group with a peer that never joined: leave without tearing it down
