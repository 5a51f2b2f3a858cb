"""Synchronized batch norm across processes: darknet_bn.distributed and darknet_bn._sync_torch.SyncBatchNorm.

What is checked, and against what:

* Real processes, both engines: ``mpiexec -n 2`` and ``-n 3`` (mpi4py) and 2 and
  3 torch.distributed ranks (gloo on a file store). Each launch runs every
  scenario of tests/_dist_cases.py once (shards such as [3,5], [1,7], [0,8],
  [2,3,4], [0,4,5], [1,0,1], at data offset 10^4, both numerics, a
  convolutional and a fully connected shape); the tests compare what the
  ranks computed with one process on the concatenated batch (BatchNormLayer,
  two training steps with updates) and with the float64 oracle
  (tests/oracle.py; docs/reference.md §6: 1e-5 relative + 1e-5, mean and
  variance within 4 float32 ulps), and check that every rank holds the same
  bits of the running statistics.
* The SyncBatchNorm module over torch.distributed: outputs, input gradients,
  summed weight/bias gradients and running statistics against the oracle;
  DistributedDataParallel training against PyTorch in float64 on one process.
* Failures: a rank with bad input makes itself raise its own error and the
  others PeerError, nobody waits; a rank that never joins makes a torch rank
  raise after the process-group timeout; a rank that dies makes mpiexec end
  the MPI job.
* In one process, with ranks as threads (tests/_dist_threads.py, a third
  engine): arguments, the collectives each call makes, rank-order merging,
  the PyTorch-compatible module surface.

The MPI tests are skipped without mpi4py or mpiexec, the torch ones without torch.
"""
from __future__ import annotations

import inspect
import io
import os
import subprocess
import threading
from typing import Any, Dict, List

import numpy as np
import pytest

import _dist_cases as cases
import _dist_launch as launch
import darknet_bn
import oracle
from _dist_threads import ThreadGroup, run_ranks
from conftest import assert_close, assert_ulps
from darknet_bn.distributed import (
    Communicator,
    PeerError,
    SyncBatchNormLayer,
    TorchCommunicator,
    as_communicator,
    sync_backward_sums,
    sync_moments,
)

MPI_SKIP = launch.mpi_skip_reason()
TORCH_SKIP = launch.torch_skip_reason()
ENGINES = [
    pytest.param("mpi", marks=pytest.mark.skipif(MPI_SKIP is not None, reason=str(MPI_SKIP))),
    pytest.param("torch", marks=pytest.mark.skipif(TORCH_SKIP is not None, reason=str(TORCH_SKIP))),
]
needs_torch = pytest.mark.skipif(TORCH_SKIP is not None, reason=str(TORCH_SKIP))
needs_mpi = pytest.mark.skipif(MPI_SKIP is not None, reason=str(MPI_SKIP))

PER_SAMPLE = ("y1", "dx1", "y2", "dx2", "y_inference", "1.x_norm", "2.x_norm")
PER_CHANNEL = tuple(f"{k}.{name}" for k in "12" for name in cases.STEP_BUFFERS if name != "x_norm") + (
    "1.scales", "1.biases", "2.scales", "2.biases")


def bits(a: np.ndarray) -> np.ndarray:
    """Bit pattern of a float32 array (NaN-safe exact comparison)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# --------------------------------------------------------------------------- launches (cached per test run)

_LAUNCHES: Dict[Any, Any] = {}


def launched(engine: str, size: int, tmp_path_factory: Any) -> List[Dict[str, Any]]:
    """Every rank's results of the "main" launch of ``engine`` on ``size`` ranks (run once per test session)."""
    key = (engine, size)
    if key not in _LAUNCHES:
        out = str(tmp_path_factory.mktemp(f"{engine}{size}"))
        try:
            if engine == "mpi":
                code, output, _ = launch.run_mpi(size, "main", out)
                assert code == 0, f"mpiexec -n {size} failed ({code}):\n{output}"
            else:
                codes, _ = launch.run_torch(size, "main", out)
                assert codes == [0] * size, f"torch ranks exited with {codes}"
            _LAUNCHES[key] = launch.read_results(out, size, f"{engine} x{size}")
        except AssertionError as exc:
            _LAUNCHES[key] = exc
    if isinstance(_LAUNCHES[key], AssertionError):
        raise _LAUNCHES[key]
    return _LAUNCHES[key]


def concat(results: List[Dict[str, Any]], key: str, name: str) -> np.ndarray:
    return np.concatenate([r[key][name] for r in results])


# --------------------------------------------------------------------------- references

def single_process(case: Dict[str, Any], data: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """What one BatchNormLayer computes on the concatenated batch, through the same steps."""
    c, h, w = cases.SHAPES[case["shape"]]
    layer = darknet_bn.BatchNormLayer(sum(case["split"]), w, h, c, numerics=case["numerics"])
    return cases.layer_steps(layer, data, lambda a: a)


def oracle_step1(case: Dict[str, Any], data: Dict[str, np.ndarray]) -> oracle.LayerState:
    """The float64 oracle's first training step (forward, backward) on the concatenated batch."""
    c, h, w = cases.SHAPES[case["shape"]]
    st = oracle.LayerState(sum(case["split"]), w, h, c, numerics=case["numerics"])
    st.scales = data["scales"].astype(np.float64)
    st.biases = data["biases"].astype(np.float64)
    st.forward(data["x1"])
    st.backward(data["dy1"])
    return st


def check_layer_results(results: List[Dict[str, Any]], key: str, case: Dict[str, Any],
                        data: Dict[str, np.ndarray]) -> None:
    """The ranks' results of a SyncBatchNormLayer scenario against one process and the oracle."""
    ref = single_process(case, data)
    for name in PER_SAMPLE:
        assert_close(concat(results, key, name), ref[name], what=f"{key}: {name} vs one process")
    for r, res in enumerate(results):
        for name in PER_CHANNEL:
            assert_close(res[key][name], ref[name], what=f"{key}: rank {r} {name} vs one process")
            assert np.array_equal(bits(res[key][name]), bits(results[0][key][name])), (
                f"{key}: {name} differs between rank 0 and rank {r}")
    st = oracle_step1(case, data)
    assert_close(concat(results, key, "y1"), st.output, what=f"{key}: output vs oracle")
    assert_close(concat(results, key, "dx1"), st.delta, what=f"{key}: input delta vs oracle")
    assert_close(concat(results, key, "1.x_norm"), st.x_norm, what=f"{key}: x_norm vs oracle")
    res = results[0][key]
    assert_ulps(res["1.mean"], st.mean, what=f"{key}: mean vs oracle")
    assert_ulps(res["1.variance"], st.variance, what=f"{key}: variance vs oracle")
    for name in ("rolling_mean", "rolling_variance", "bias_updates", "scale_updates"):
        assert_close(res[f"1.{name}"], getattr(st, name), what=f"{key}: {name} vs oracle")
    if case["numerics"] == "darknet":
        assert_close(res["1.mean_delta"], st.mean_delta, what=f"{key}: mean_delta vs oracle")
        assert_close(res["1.variance_delta"], st.variance_delta, what=f"{key}: variance_delta vs oracle")


# --------------------------------------------------------------------------- real processes: SyncBatchNormLayer

LAYER_PARAMS = [(size, case) for size in (2, 3) for case in cases.layer_cases(size)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size,case", LAYER_PARAMS, ids=[f"{s}ranks-{c['key']}" for s, c in LAYER_PARAMS])
def test_layer_shards_equal_one_process(engine, size, case, tmp_path_factory):
    """Each split of the batch over real ranks gives the concatenated batch's results; running stats identical bits."""
    results = launched(engine, size, tmp_path_factory)
    check_layer_results(results, case["key"], case, cases.case_data(case))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", [2, 3])
def test_layer_nan_stays_in_its_channel(engine, size, tmp_path_factory):
    """NaN in one rank's shard, one channel: that channel is NaN on every rank, the others are exact."""
    results = launched(engine, size, tmp_path_factory)
    case = cases.nan_case(size)
    data = cases.nan_data(case)
    ref = single_process(case, data)
    key, ch = case["key"], cases.NAN_CHANNEL
    others = [f for f in range(cases.SHAPES["conv"][0]) if f != ch]
    y = concat(results, key, "y1")
    assert np.isnan(y[:, ch]).all(), "the NaN channel is not NaN everywhere"
    assert np.isfinite(y[:, others]).all(), "NaN leaked into another channel"
    assert_close(y, ref["y1"], what="output with NaN")  # NaN positions must match too
    assert_close(concat(results, key, "dx1"), ref["dx1"], what="input delta with NaN")
    for r, res in enumerate(results):
        for name in ("1.rolling_mean", "1.rolling_variance", "2.rolling_mean", "2.rolling_variance"):
            assert np.isnan(res[key][name][ch]) and np.isfinite(res[key][name][others]).all(), f"rank {r} {name}"
            assert np.array_equal(bits(res[key][name]), bits(results[0][key][name])), f"{name}: rank {r} differs"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", [2, 3])
def test_layer_failure_on_one_rank_raises_everywhere(engine, size, tmp_path_factory):
    """Bad input on one rank: it raises its own error, the others PeerError naming it; nothing changed; all go on."""
    results = launched(engine, size, tmp_path_factory)
    last = size - 1
    for r, res in enumerate(results):
        err = res["layer-errors"]
        if r == last:
            assert err["forward-shape"][0] == "ArgumentError" and "input must have shape" in err["forward-shape"][1]
        else:
            assert err["forward-shape"][0] == "PeerError" and err["forward-shape"][2] == (last,), err
            assert f"rank {last} of {size} failed" in err["forward-shape"][1]
        if r == 0:
            assert err["backward-dtype"][0] == "ArgumentTypeError", err
        else:
            assert err["backward-dtype"][0] == "PeerError" and err["backward-dtype"][2] == (0,), err
        assert not err["forward-shape.rolling_mean"].any(), "a failed forward changed the running mean"
        assert not err["backward-dtype.bias_updates"].any(), "a failed backward changed bias_updates"
        assert err["global-count"][0] == "ArgumentError" and "at least 2 values per channel" in err["global-count"][1]
        assert err["constructor-c"][0] == "ArgumentError" and "same c" in err["constructor-c"][1], err
    # After the failures, a normal step on the same layers: the concatenated batch's input delta.
    split = cases.SPLITS[size][0]
    c, h, w = cases.SHAPES["conv"]
    data = cases.batch_data(cases._seed("errors"), sum(split), c, h, w)
    layer = darknet_bn.BatchNormLayer(sum(split), w, h, c, numerics="standard")
    layer.forward(data["x1"])
    assert_close(np.concatenate([res["layer-errors"]["after"] for res in results]), layer.backward(data["dy1"]),
                 what="input delta of the step after the failures")


@pytest.mark.parametrize("engine", ENGINES)
def test_layer_takes_the_engine_object_itself(engine, tmp_path_factory):
    """MPI.COMM_WORLD or a ProcessGroup given as they are: the same bits as through the wrapper."""
    results = launched(engine, 2, tmp_path_factory)
    key = "layer-mpi4py-comm" if engine == "mpi" else "layer-process-group"
    first = cases.layer_cases(2)[0]["key"]
    for res in results:
        for name, value in res[key].items():
            assert np.array_equal(bits(value), bits(res[first][name])), name


@needs_mpi
@pytest.mark.parametrize("size", [2, 3])
def test_layer_over_a_split_communicator(size, tmp_path_factory):
    """Ranks split by parity synchronize only within their sub-communicator."""
    results = launched("mpi", size, tmp_path_factory)
    c, h, w = cases.SHAPES["conv"]
    groups: Dict[int, Dict[int, Any]] = {}
    for res in results:
        color, sub_rank, sub_size = res["layer-split-comm.group"]
        groups.setdefault(color, {})[sub_rank] = (sub_size, res["layer-split-comm"])
    for color, members in groups.items():
        sub_size = len(members)
        assert all(s == sub_size for s, _ in members.values())
        data = cases.batch_data(cases._seed("split-comm"), 2 * sub_size, c, h, w)
        ref = cases.layer_steps(darknet_bn.BatchNormLayer(2 * sub_size, w, h, c), data, lambda a: a)
        y = np.concatenate([members[r][1]["y1"] for r in range(sub_size)])
        assert_close(y, ref["y1"], what=f"group {color} output")
        for r in range(sub_size):
            assert_close(members[r][1]["2.rolling_variance"], ref["2.rolling_variance"], what="rolling_variance")


def test_accuracy_at_offset_1e4_beats_pytorch_float32():
    """At offset 10^4 the synchronized output is within §6 of float64; PyTorch's float32 batch norm is not."""
    torch = pytest.importorskip("torch")
    case = [c for c in cases.layer_cases(3) if c["numerics"] == "standard" and c["shape"] == "conv"][0]
    data = cases.case_data(case)
    split = case["split"]
    c, h, w = cases.SHAPES["conv"]

    def one_rank(comm):
        layer = SyncBatchNormLayer(split[comm.rank], w, h, c, comm, numerics="standard")
        layer.scales, layer.biases = data["scales"], data["biases"]
        return layer.forward(cases.shard(data["x1"], split, comm.rank)).copy()

    ours = np.concatenate(run_ranks(3, one_rank))
    st = oracle.LayerState(sum(split), w, h, c, numerics="standard")
    st.scales, st.biases = data["scales"].astype(np.float64), data["biases"].astype(np.float64)
    exact = st.forward(data["x1"])
    theirs = torch.nn.functional.batch_norm(torch.from_numpy(data["x1"]), None, None,
                                            torch.from_numpy(data["scales"]), torch.from_numpy(data["biases"]),
                                            True, 0.1, 1e-5).numpy()
    assert_close(ours, exact, what="synchronized output at offset 1e4")
    err_ours = np.abs(ours - exact).max()
    err_torch = np.abs(theirs - exact).max()
    assert err_torch > 1e-5 and err_torch > 20 * err_ours, (err_ours, err_torch)


# --------------------------------------------------------------------------- real processes: failures

@needs_mpi
def test_mpi_rank_that_dies_ends_the_job(tmp_path):
    """A rank raising before the first collective: python -m mpi4py aborts, mpiexec ends the waiting rank too."""
    code, output, _ = launch.run_mpi(2, "crash", str(tmp_path), deadline=30)  # a job that hangs fails there
    assert code != 0, output
    assert (tmp_path / "rank0.entered").exists(), output  # rank 0 was inside the collective
    assert not (tmp_path / "rank0.returned").exists(), "rank 0 got past a collective its peer never joined"


@needs_torch
def test_torch_rank_that_never_joins_times_out(tmp_path):
    """Rank 1 never calls the forward: rank 0 raises after the process group's 2 s timeout, module unchanged."""
    codes, _ = launch.run_torch(2, "timeout", str(tmp_path), pg_timeout=2.0, deadline=90)
    assert codes == [0, 0]
    rank0, rank1 = launch.read_results(str(tmp_path), 2, "torch timeout")
    assert rank0["error"] is not None, "the forward returned without its peer"
    assert rank0["error"][0] == "RuntimeError" and "Timed out" in rank0["error"][1], rank0["error"]
    assert rank0["num_batches_tracked"] == 0
    assert rank1["waited"]


# --------------------------------------------------------------------------- real processes: the torch module

if TORCH_SKIP is None:
    import _dist_torch_worker

    TORCH_MODULE_PARAMS = [(size, case) for size in (2, 3) for case in _dist_torch_worker.module_cases(size)]
else:
    TORCH_MODULE_PARAMS = []


def module_oracle(case: Dict[str, Any], data: Dict[str, np.ndarray], rows: slice = slice(None),
                  running: Any = None) -> Dict[str, Any]:
    """The float64 oracle (standard numerics) of a module scenario: two training steps and eval.

    ``running``: the (running_mean, running_var) the eval forward normalizes
    with; the module's own float32 values, so that eval is checked as a
    function of what the module holds (default: the oracle's float64 ones).
    """
    import _dist_torch_worker as tw

    opts = tw.module_options(case["kind"])
    x1 = data["x1"][rows]
    b, c = x1.shape[0], x1.shape[1]
    spatial = int(np.prod(x1.shape[2:]))
    st = oracle.LayerState(b, spatial, 1, c, numerics="standard")
    if opts.get("affine", True):
        st.scales, st.biases = data["scales"].astype(np.float64), data["biases"].astype(np.float64)
    out: Dict[str, Any] = {}
    for k in ("1", "2"):
        if opts.get("momentum", 0.1) is None:
            st.momentum = 1.0 / int(k)
        st.bias_updates = np.zeros(c)
        st.scale_updates = np.zeros(c)
        out[f"y{k}"] = st.forward(data["x" + k][rows]).reshape(data["x" + k][rows].shape)
        out[f"dx{k}"] = st.backward(data["dy" + k][rows]).reshape(data["x" + k][rows].shape)
        out[f"{k}.weight_grad"], out[f"{k}.bias_grad"] = st.scale_updates.copy(), st.bias_updates.copy()
        out[f"{k}.running_mean"], out[f"{k}.running_var"] = st.rolling_mean.copy(), st.rolling_variance.copy()
    if running is not None:
        st.rolling_mean, st.rolling_variance = (np.asarray(v, np.float64) for v in running)
    out["y_eval"] = st.forward(data["x1"][rows], train=False).reshape(x1.shape)
    return out


@needs_torch
@pytest.mark.parametrize("size,case", TORCH_MODULE_PARAMS, ids=[f"{s}ranks-{c['key']}" for s, c in TORCH_MODULE_PARAMS])
def test_sync_module_equals_whole_batch(size, case, tmp_path_factory):
    """SyncBatchNorm over gloo ranks: the whole batch's outputs, input grads, summed parameter grads, running stats."""
    import _dist_torch_worker as tw

    results = launched("torch", size, tmp_path_factory)
    key, opts = case["key"], tw.module_options(case["kind"])
    data = tw.module_data(case)
    held = (results[0][key]["2.running_mean"], results[0][key]["2.running_var"]) \
        if opts.get("track_running_stats", True) else None
    want = module_oracle(case, data, running=held)
    for k in ("1", "2"):
        assert_close(concat(results, key, f"y{k}"), want[f"y{k}"], what=f"{key}: output {k}")
        assert_close(concat(results, key, f"dx{k}"), want[f"dx{k}"], what=f"{key}: input grad {k}")
        if opts.get("affine", True):
            for name in ("weight_grad", "bias_grad"):
                summed = np.sum([r[key][f"{k}.{name}"].astype(np.float64) for r in results], axis=0)
                assert_close(summed, want[f"{k}.{name}"], what=f"{key}: {name} summed over ranks, step {k}")
        if opts.get("track_running_stats", True):
            for r, res in enumerate(results):
                for name in ("running_mean", "running_var"):
                    assert_close(res[key][f"{k}.{name}"], want[f"{k}.{name}"], what=f"{key}: rank {r} {name}")
                    assert np.array_equal(bits(res[key][f"{k}.{name}"]), bits(results[0][key][f"{k}.{name}"]))
                assert int(res[key][f"{k}.num_batches_tracked"]) == int(k)
    if opts.get("track_running_stats", True):
        assert_close(concat(results, key, "y_eval"), want["y_eval"], what=f"{key}: eval output")
    else:  # eval without running statistics: each rank's own batch statistics, no synchronization (as PyTorch)
        for r, res in enumerate(results):
            lo, hi = cases.bounds(case["split"], r)
            assert_close(res[key]["y_eval"], module_oracle(case, data, slice(lo, hi))["y1"], what=f"rank {r} eval")
    if case["kind"] == "channels_last":
        assert all(bool(res[key][f"{k}.channels_last"]) for res in results for k in "12")
    if case["kind"] == "nan":
        y = concat(results, key, "y1")
        assert np.isnan(y[:, cases.NAN_CHANNEL]).all() and not np.isnan(np.delete(y, cases.NAN_CHANNEL, 1)).any()


@needs_torch
def test_pytorch_refuses_what_sync_module_computes(tmp_path_factory):
    """In the same gloo processes, torch.nn.SyncBatchNorm raises on CPU training input (the case computed here)."""
    for res in launched("torch", 2, tmp_path_factory):
        kind, message = res["torch-sync-bn-cpu"]
        assert kind == "ValueError" and "expected input tensor to be on GPU" in message, message


@needs_torch
@pytest.mark.parametrize("size", [2, 3])
def test_sync_module_in_a_group_of_one_is_local(size, tmp_path_factory):
    """process_group of one rank: each rank normalizes its own shard, as PyTorch's (no synchronization)."""
    import _dist_torch_worker as tw

    results = launched("torch", size, tmp_path_factory)
    case = tw.module_cases(size)[0]
    data = tw.module_data(case)
    for r, res in enumerate(results):
        lo, hi = cases.bounds(case["split"], r)
        want = module_oracle(case, data, slice(lo, hi))
        got = res["module-solo-group"]
        for name in ("y1", "dx1", "1.weight_grad", "1.running_mean", "1.running_var"):
            assert_close(got[name], want[name], what=f"rank {r} {name}")


@needs_torch
@pytest.mark.parametrize("size", [2, 3])
def test_sync_module_failure_on_one_rank(size, tmp_path_factory):
    """Wrong channel count on the last rank: its own error, PeerError elsewhere, module unchanged, next step fine."""
    import _dist_torch_worker as tw

    results = launched("torch", size, tmp_path_factory)
    last = size - 1
    for r, res in enumerate(results):
        err = res["module-errors"]
        if r == last:
            assert err["forward-channels"][0] == "ArgumentError" and "num_features=3" in err["forward-channels"][1]
        else:
            assert err["forward-channels"][0] == "PeerError" and err["forward-channels"][2] == (last,)
        assert int(err["forward-channels.num_batches_tracked"]) == 0
        assert not err["forward-channels.running_mean"].any()
    split = cases.SPLITS[size][0]
    data = cases.batch_data(cases._seed("module-errors"), sum(split), tw.MODULE_C, *tw.SPATIAL)
    st = oracle.LayerState(sum(split), tw.SPATIAL[1], tw.SPATIAL[0], tw.MODULE_C, numerics="standard")
    assert_close(np.concatenate([res["module-errors"]["after"] for res in results]), st.forward(data["x1"]),
                 what="the forward after the failure")


@needs_torch
@pytest.mark.parametrize("size", [2, 3])
def test_ddp_training_equals_one_process(size, tmp_path_factory):
    """DistributedDataParallel over a converted model: two SGD steps equal PyTorch float64 on the whole batch."""
    import torch

    import _dist_torch_worker as tw

    results = launched("torch", size, tmp_path_factory)
    refused = ("ValueError", "SyncBatchNorm layers only work with GPU modules")
    assert results[0]["ddp"]["torch_sync_bn_in_ddp"] == refused
    assert not any(name.endswith(("BatchNorm1d", "BatchNorm2d")) for name in results[0]["ddp"]["converted"])
    assert "darknet_bn._sync_torch.SyncBatchNorm" in results[0]["ddp"]["converted"]
    data = tw.ddp_data(size)
    model = tw.ddp_model(sync=False, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=tw.DDP_LR)
    t = torch.from_numpy(data["t"]).double()
    tol = dict(rtol=1e-4, atol=1e-5)
    for k in ("1", "2"):
        y = model(torch.from_numpy(data["x" + k]).double())
        opt.zero_grad()
        ((y * t).sum() / size).backward()  # DDP averages the ranks' gradients of their own sums
        assert_close(np.concatenate([r["ddp"][f"y{k}"] for r in results]), y.detach().numpy(), what=f"output {k}",
                     **tol)
        for name, p in model.named_parameters():
            for r, res in enumerate(results):
                assert_close(res["ddp"][f"{k}.grads"][name], p.grad.numpy(), what=f"step {k} rank {r} grad {name}",
                             **tol)
        opt.step()
    for name, value in model.state_dict().items():
        for r, res in enumerate(results):
            got = res["ddp"]["state"][name]
            if name.endswith("num_batches_tracked"):
                assert int(got) == 2
                continue
            assert_close(got, value.numpy(), what=f"rank {r} {name} after two steps", **tol)
            assert np.array_equal(got, results[0]["ddp"]["state"][name]), f"{name} differs between ranks"


# --------------------------------------------------------------------------- the C example over MPI

@needs_mpi
@pytest.mark.skipif(launch.mpicc() is None, reason="no mpicc next to this Python or on PATH (pip install mpich)")
def test_c_example_mpi_phases(tmp_path):
    """examples/mpi_phases.c, built with the MPI's mpicc, agrees with one layer on 2 and 3 ranks (empty shard)."""
    repo = os.path.dirname(launch.HERE)
    archive = os.path.join(repo, "build", "libdarknet_bn.a")
    if not os.path.exists(archive):
        pytest.skip("build/libdarknet_bn.a is not built (make)")
    exe = str(tmp_path / "mpi_phases")
    build = subprocess.run([launch.mpicc(), "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror",
                            "-I" + os.path.join(repo, "csrc"), os.path.join(repo, "examples", "mpi_phases.c"),
                            archive, "-o", exe, "-lm", "-pthread"], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    for size in (2, 3):
        run = subprocess.run(launch.mpiexec_command(size) + [exe], capture_output=True, text=True, timeout=60,
                             env=launch.mpi_env())
        assert run.returncode == 0, run.stdout + run.stderr
        assert "bit-identical on every rank: yes" in run.stdout and run.stdout.rstrip().endswith("ok"), run.stdout
        if size == 3:
            assert "shards 3 7 0" in run.stdout, run.stdout


# --------------------------------------------------------------------------- one process: the protocol

def test_communicators_are_the_protocol():
    """Both engines' classes and the test engine satisfy Communicator; other objects are refused by name."""
    from darknet_bn.distributed import MPICommunicator

    comm = ThreadGroup(1).communicators()[0]
    assert isinstance(comm, Communicator)
    assert as_communicator(comm) is comm
    for cls in (MPICommunicator, TorchCommunicator):
        for member in ("rank", "size", "allgather", "allreduce_sum"):
            assert hasattr(cls, member), (cls, member)
    with pytest.raises(darknet_bn.ArgumentTypeError, match="comm must be .* got int"):
        as_communicator(3)
    with pytest.raises(darknet_bn.ArgumentTypeError, match="got NoneType"):
        SyncBatchNormLayer(2, 1, 1, 3, None)


@needs_torch
def test_torch_communicator_needs_an_initialized_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(darknet_bn.ArgumentError, match="not initialized"):
        TorchCommunicator()


def test_sync_moments_merges_in_rank_order_without_cancellation():
    """Chan's merge in rank order: the same bits on every rank, equal to a rank-order float64 merge, exact at 1e6."""
    rng = np.random.default_rng(5)
    sizes = [7, 0, 13, 1]
    c = 3
    shards = [1e6 + rng.standard_normal((n, c)) for n in sizes]

    def one_rank(comm):
        x = shards[comm.rank]
        n = float(len(x))
        mean = x.mean(axis=0) if len(x) else np.zeros(c)
        m2 = ((x - mean) ** 2).sum(axis=0) if len(x) else np.zeros(c)
        return sync_moments(comm, n, mean, m2)

    got = run_ranks(len(sizes), one_rank)
    for r in got:
        assert not isinstance(r, BaseException), r
        assert r[0] == got[0][0] and np.array_equal(r[1], got[0][1]) and np.array_equal(r[2], got[0][2])
    # Chan's formula in rank order, written out in float64 here.
    n_a, mean_a, m2_a = 0.0, np.zeros(c), np.zeros(c)
    for x in shards:
        n_b = float(len(x))
        if n_b == 0:
            continue
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        if n_a == 0:
            n_a, mean_a, m2_a = n_b, mean_b, m2_b
            continue
        n = n_a + n_b
        d = mean_b - mean_a
        mean_a = mean_a + d * (n_b / n)
        m2_a = m2_a + m2_b + d * d * (n_a * n_b / n)
        n_a = n
    assert got[0][0] == sum(sizes)
    assert np.array_equal(got[0][1], mean_a) and np.array_equal(got[0][2], m2_a)
    whole = np.concatenate(shards)
    np.testing.assert_allclose(got[0][2] / (len(whole) - 1), whole.var(axis=0, ddof=1), rtol=1e-9)


def test_sync_backward_sums_adds_and_names_a_failed_rank():
    def one_rank(comm):
        s = np.full(2, comm.rank + 1.0)
        failure = ValueError("mine") if comm.rank == 2 else None
        return sync_backward_sums(comm, s, 2 * s, failure)

    got = run_ranks(3, one_rank)
    assert isinstance(got[2], ValueError) and str(got[2]) == "mine"
    for r in (0, 1):
        assert isinstance(got[r], PeerError) and got[r].ranks == (2,), got[r]
    ok = run_ranks(3, lambda comm: sync_backward_sums(comm, np.full(2, comm.rank + 1.0), np.ones(2)))
    for r in ok:
        assert np.array_equal(r[0], [6.0, 6.0]) and np.array_equal(r[1], [3.0, 3.0])


class _Recording:
    """A thread communicator that records the shape of every payload."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.log = inner, []
        self.rank, self.size = inner.rank, inner.size

    def allgather(self, values):
        self.log.append(("allgather", values.shape, values.dtype))
        return self.inner.allgather(values)

    def allreduce_sum(self, values):
        self.log.append(("allreduce_sum", values.shape, values.dtype))
        return self.inner.allreduce_sum(values)


def test_one_collective_per_phase_and_local_inference():
    """Constructor: one allgather; training forward: one float64 allgather; backward: one allreduce; the rest local."""
    c = 4
    logs = {}

    def one_rank(comm):
        rec = _Recording(comm)
        layer = SyncBatchNormLayer(comm.rank + 1, 2, 3, c, rec)
        x = np.random.default_rng(comm.rank).standard_normal((comm.rank + 1, c, 3, 2)).astype(np.float32)
        layer.forward(x)
        n_forward = len(rec.log)
        layer.backward(x)
        n_backward = len(rec.log)
        layer.update(0.1)
        layer.forward(x, train=False)
        logs[comm.rank] = (rec.log, n_forward, n_backward)

    for r in run_ranks(2, one_rank):
        assert r is None, r
    for log, n_forward, n_backward in logs.values():
        assert n_forward == 2 and n_backward == 3 and len(log) == 3, log
        assert log[1] == ("allgather", (2 + 2 * c,), np.float64)
        assert log[2] == ("allreduce_sum", (2 + 2 * c,), np.float64)


# --------------------------------------------------------------------------- one process: SyncBatchNormLayer

@pytest.mark.parametrize("numerics", ["darknet", "standard"])
@pytest.mark.parametrize("split", [(3, 5), (0, 8), (8, 0), (2, 0, 3, 3)])
def test_thread_ranks_equal_one_process(numerics, split):
    """The same scenario with thread ranks: one process's results, update included."""
    case = {"key": "threads", "numerics": numerics, "shape": "conv", "split": split, "seed": 7}
    data = cases.case_data(case)
    got = run_ranks(len(split), lambda comm: {"threads": cases.run_layer_case(comm, case)})
    for r in got:
        assert not isinstance(r, BaseException), r
    check_layer_results(got, "threads", case, data)


def test_layer_constructor_checks_and_agreement():
    """A bad argument raises on its rank, PeerError elsewhere; ranks must agree on c, h, w, numerics, eps, momentum."""
    def make(**per_rank):
        def one_rank(comm):
            kw = dict(batch=2, w=2, h=2, c=3, numerics="standard", eps=1e-5, momentum=0.1)
            kw.update({k: v[comm.rank] for k, v in per_rank.items()})
            return SyncBatchNormLayer(kw.pop("batch"), kw.pop("w"), kw.pop("h"), kw.pop("c"), comm, **kw)
        return run_ranks(2, one_rank)

    for per_rank, exc, text in [
        ({"batch": (2, -1)}, darknet_bn.ArgumentError, "batch must be >= 0"),
        ({"batch": (2, 1.5)}, darknet_bn.ArgumentTypeError, "batch must be an integer"),
        ({"w": (2, 0)}, darknet_bn.ArgumentError, "w must be >= 1"),
        ({"numerics": ("standard", "fast")}, darknet_bn.ArgumentError, "numerics must be"),
        ({"momentum": (0.1, 2.0)}, darknet_bn.ArgumentError, "momentum must be in"),
    ]:
        got = make(**per_rank)
        assert isinstance(got[1], exc) and text in str(got[1]), (per_rank, got[1])
        assert isinstance(got[0], PeerError) and got[0].ranks == (1,), (per_rank, got[0])
    for name, values in [("h", (2, 3)), ("numerics", ("standard", "darknet")), ("momentum", (0.1, 0.2)),
                         ("eps", (1e-5, 1e-3))]:
        per_rank = {name: values}
        if name == "numerics":
            per_rank["momentum"] = (None, None)
        got = make(**per_rank)
        for r in got:
            assert isinstance(r, darknet_bn.ArgumentError) and f"same {name}" in str(r), (name, r)
            if name == "numerics":
                assert "rank 0: standard, rank 1: darknet" in str(r), r
    got = make(batch=(0, 0))
    assert all(isinstance(r, darknet_bn.ArgumentError) and "empty" in str(r) for r in got), got
    ok = make(batch=(0, 5))
    assert [layer.global_batch for layer in ok] == [5, 5] and ok[0].output.shape == (0, 3, 2, 2)


def test_layer_call_errors():
    """backward before forward, a non-bool train (raised at once), shape checks on buffers."""
    got = run_ranks(2, lambda comm: SyncBatchNormLayer(2, 1, 1, 3, comm).backward(np.zeros((2, 3), np.float32)))
    assert all(isinstance(r, darknet_bn.LayerStateError) for r in got), got

    def bad_train(comm):
        rec = _Recording(comm)
        layer = SyncBatchNormLayer(2, 1, 1, 3, rec)
        n = len(rec.log)
        with pytest.raises(darknet_bn.ArgumentTypeError, match="train must be a bool"):
            layer.forward(np.zeros((2, 3), np.float32), train=1)
        assert len(rec.log) == n  # no collective
        with pytest.raises(darknet_bn.ArgumentError, match=r"scales must have shape \(3,\)"):
            layer.scales = np.ones(4)
        layer.scales = [1, 2, 3]
        assert layer.scales.dtype == np.float32 and layer.scales.tolist() == [1, 2, 3]

    assert run_ranks(2, bad_train) == [None, None]


def test_inference_is_local_and_matches_batchnormlayer():
    """Only rank 0 runs inference (no peer joins): BatchNormLayer's inference output."""
    done = threading.Event()

    def one_rank(comm):
        layer = SyncBatchNormLayer(3, 2, 2, 3, comm, numerics="standard")
        if comm.rank == 1:
            done.wait(10)
            return None
        layer.rolling_mean, layer.rolling_variance = [1.0, 2.0, 3.0], [0.5, 2.0, 4.0]
        layer.scales, layer.biases = [1.0, -1.0, 2.0], [0.0, 1.0, -1.0]
        x = np.random.default_rng(0).standard_normal((3, 3, 2, 2)).astype(np.float32)
        y = layer.forward(x, train=False).copy()
        done.set()
        ref = darknet_bn.BatchNormLayer(3, 2, 2, 3, numerics="standard")
        ref.rolling_mean, ref.rolling_variance = layer.rolling_mean, layer.rolling_variance
        ref.scales, ref.biases = layer.scales, layer.biases
        return y, ref.forward(x, train=False).copy()

    got = run_ranks(2, one_rank)
    assert np.array_equal(got[0][0], got[0][1])


def test_layer_refuses_copies():
    import copy
    import pickle

    def one_rank(comm):
        layer = SyncBatchNormLayer(1, 2, 1, 2, comm)
        for make_copy in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="bound to its communicator"):
                make_copy(layer)
        return repr(layer)

    got = run_ranks(2, one_rank)
    assert all(isinstance(r, str) and r.startswith("SyncBatchNormLayer(batch=1, w=2") for r in got), got


def test_weights_and_fold_like_batchnormlayer():
    def one_rank(comm):
        layer = SyncBatchNormLayer(2, 2, 2, 3, comm)
        f = io.BytesIO(np.arange(9, dtype="<f4").tobytes())
        layer.load_weights(f)
        g = io.BytesIO()
        layer.save_weights(g)
        ref = darknet_bn.BatchNormLayer(2, 2, 2, 3)
        ref.load_weights(io.BytesIO(np.arange(9, dtype="<f4").tobytes()))
        w = np.ones((3, 4), np.float32)
        return g.getvalue(), layer.fold_into(w), ref.fold_into(w)

    for saved, folded, ref in run_ranks(2, one_rank):
        assert saved == np.arange(9, dtype="<f4").tobytes()
        assert np.array_equal(folded[0], ref[0]) and np.array_equal(folded[1], ref[1])


# --------------------------------------------------------------------------- one process: the torch module

@needs_torch
def test_reexported_by_darknet_bn_torch():
    import darknet_bn.torch as dbt
    from darknet_bn._sync_torch import SyncBatchNorm

    if not hasattr(dbt, "SyncBatchNorm"):
        pytest.skip("darknet_bn.torch does not re-export SyncBatchNorm yet (from ._sync_torch import SyncBatchNorm)")
    assert dbt.SyncBatchNorm is SyncBatchNorm and "SyncBatchNorm" in dbt.__all__


@needs_torch
def test_module_surface_matches_torch():
    """Constructor signature, parameters, buffers and state_dict as torch.nn.SyncBatchNorm (loads both ways)."""
    import torch

    from darknet_bn._sync_torch import SyncBatchNorm

    ours = inspect.signature(SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(torch.nn.SyncBatchNorm.__init__).parameters
    described = [[(p.name, p.default, p.kind) for p in params.values()] for params in (ours, theirs)]
    assert described[0] == described[1]
    a, b = SyncBatchNorm(5, momentum=0.3), torch.nn.SyncBatchNorm(5, momentum=0.3)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    with torch.no_grad():
        b.weight.uniform_()
        b.running_mean.normal_()
    a.load_state_dict(b.state_dict())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight, b.weight) and torch.equal(a.running_mean, b.running_mean)
    assert SyncBatchNorm(4, bias=False).bias is None and SyncBatchNorm(4, affine=False).weight is None
    assert SyncBatchNorm(4, dtype=torch.float64).weight.dtype == torch.float64
    assert isinstance(SyncBatchNorm(4), torch.nn.modules.batchnorm._BatchNorm)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        SyncBatchNorm(4)(torch.zeros(4))


@needs_torch
@pytest.mark.parametrize("training", [True, False])
def test_module_without_process_group_is_torch(training):
    """No process group (as here): local batch norm, as torch.nn.SyncBatchNorm falls back to on CPU."""
    import torch
    import torch.distributed as dist

    from darknet_bn._sync_torch import SyncBatchNorm

    assert not dist.is_initialized()
    torch.manual_seed(0)
    ref = torch.nn.SyncBatchNorm(3, momentum=None)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.normal_()
        ref.running_mean.normal_()
        ref.running_var.uniform_(0.5, 2)
    mine = SyncBatchNorm(3, momentum=None)
    mine.load_state_dict(ref.state_dict())
    ref.train(training)
    mine.train(training)
    for step in range(2):
        x = (torch.randn(6, 3, 4, 4) * 2 + 5).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        g = torch.randn(6, 3, 4, 4)
        y_ref, y = ref(x), mine(x2)
        y_ref.backward(g)
        y.backward(g)
        for got, want, what in [(y, y_ref, "output"), (x2.grad, x.grad, "input grad"),
                                (mine.weight.grad, ref.weight.grad, "weight grad"),
                                (mine.bias.grad, ref.bias.grad, "bias grad"),
                                (mine.running_mean, ref.running_mean, "running_mean"),
                                (mine.running_var, ref.running_var, "running_var")]:
            assert_close(got.detach().numpy(), want.detach().double().numpy(), 2e-5, 2e-5, what=f"{what} {step}")
        assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked)


@needs_torch
def test_convert_sync_batchnorm():
    """Every batch norm kind becomes SyncBatchNorm sharing its Parameters and buffers; mode and group kept."""
    import torch

    import darknet_bn.torch as dbt
    from darknet_bn._sync_torch import SyncBatchNorm

    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.BatchNorm2d(4, affine=False),
                                torch.nn.BatchNorm3d(5, bias=False), dbt.BatchNorm2d(6, momentum=None),
                                torch.nn.SyncBatchNorm(7, track_running_stats=False),
                                torch.nn.Sequential(dbt.BatchNorm1d(8)), torch.nn.ReLU())
    model[3].eval()
    old = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    group = ThreadGroup(1).communicators()[0]
    new_model = SyncBatchNorm.convert_sync_batchnorm(model, group)
    assert new_model is model
    new = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(new) == len(old) == 6
    for o, n in zip(old, new):
        assert type(n) is SyncBatchNorm and n.process_group is group
        assert (n.num_features, n.eps, n.momentum, n.affine, n.track_running_stats, n.training) == (
            o.num_features, o.eps, o.momentum, o.affine, o.track_running_stats, o.training)
        assert n.weight is o.weight and n.bias is o.bias and n.running_mean is o.running_mean
        assert n.num_batches_tracked is o.num_batches_tracked
    assert new[2].weight is not None and new[2].bias is None
    root = torch.nn.BatchNorm2d(3)
    converted = SyncBatchNorm.convert_sync_batchnorm(root)
    assert type(converted) is SyncBatchNorm and converted.weight is root.weight and converted.process_group is None


@needs_torch
@pytest.mark.parametrize("split", [(3, 5), (0, 8), (2, 0, 3)])
def test_module_over_thread_ranks(split):
    """SyncBatchNorm with a non-torch Communicator as its group: the whole batch's results, one collective per phase
    (and one more at the module's first synchronized forward, where the ranks check they agree on its settings)."""
    import torch

    from darknet_bn._sync_torch import SyncBatchNorm

    c = 3
    data = cases.batch_data(11, sum(split), c, 2, 3)
    st = oracle.LayerState(sum(split), 3, 2, c, numerics="standard")
    st.scales, st.biases = data["scales"].astype(np.float64), data["biases"].astype(np.float64)
    want_y, want_dx = st.forward(data["x1"]), st.backward(data["dy1"])

    def one_rank(comm):
        rec = _Recording(comm)
        m = SyncBatchNorm(c, process_group=rec)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(data["scales"]))
            m.bias.copy_(torch.from_numpy(data["biases"]))
        x = torch.from_numpy(cases.shard(data["x1"], split, comm.rank)).requires_grad_()
        y = m(x)
        n_forward = len(rec.log)
        y.backward(torch.from_numpy(cases.shard(data["dy1"], split, comm.rank)))
        m.eval()
        m(x.detach())  # eval: no collective
        n_step, running_var = len(rec.log), m.running_var.numpy().copy()
        m.train()
        m(x.detach())  # a later training forward: the moments alone
        return y.detach().numpy(), x.grad.numpy(), m.weight.grad.numpy(), m.bias.grad.numpy(), \
            running_var, n_forward, n_step, len(rec.log) - n_step

    got = run_ranks(len(split), one_rank)
    for r in got:
        assert not isinstance(r, BaseException), r
    assert_close(np.concatenate([r[0] for r in got]), want_y, what="output")
    assert_close(np.concatenate([r[1] for r in got]), want_dx, what="input grad")
    assert_close(np.sum([r[2] for r in got], axis=0), st.scale_updates, what="weight grad summed over ranks")
    assert_close(np.sum([r[3] for r in got], axis=0), st.bias_updates, what="bias grad summed over ranks")
    assert all(np.array_equal(bits(r[4]), bits(got[0][4])) for r in got)
    assert_close(got[0][4], st.rolling_variance, what="running_var")
    assert all(r[5:] == (2, 3, 1) for r in got), [r[5:] for r in got]


@needs_torch
def test_module_keeps_no_reference_cycle():
    """The autograd node does not hold the output: dropped, it is freed at once (no cycle through the graph)."""
    import gc
    import weakref

    import torch

    from darknet_bn._sync_torch import SyncBatchNorm

    def one_rank(comm):
        m = SyncBatchNorm(2, process_group=comm)
        x = torch.randn(4, 2, 3, requires_grad=True)
        y = m(x)
        ref = weakref.ref(y)
        y.sum().backward()
        del y
        return ref() is None

    gc.disable()  # only reference counting: a cycle would keep the output alive
    try:
        assert run_ranks(2, one_rank) == [True, True]
    finally:
        gc.enable()


@needs_torch
def test_module_errors_over_thread_ranks():
    """float64 input on one rank: its own TypeError, PeerError on the other; double backward refused."""
    import torch

    from darknet_bn._sync_torch import SyncBatchNorm

    def one_rank(comm):
        m = SyncBatchNorm(2, process_group=comm)
        x = torch.randn(3, 2, dtype=torch.float64 if comm.rank == 1 else torch.float32)
        try:
            m(x)
        except Exception as exc:
            first = exc
        else:
            first = None
        x = torch.randn(3, 2, requires_grad=True)
        y = m(x)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        try:
            gx.sum().backward()
            second = None
        except RuntimeError as exc:
            second = exc
        return first, int(m.num_batches_tracked), second

    got = run_ranks(2, one_rank)
    assert isinstance(got[1][0], darknet_bn.ArgumentTypeError) and "float32" in str(got[1][0])
    assert isinstance(got[0][0], PeerError) and got[0][0].ranks == (1,)
    assert got[0][1] == got[1][1] == 1  # only the good forward counted
    assert all(isinstance(r[2], RuntimeError) and "once_differentiable" in str(r[2]) for r in got), got


def test_sync_layer_buffers_cannot_be_moved():
    """Every buffer a SyncBatchNormLayer hands out is a view NumPy refuses to resize, even with refcheck=False:
    the C layer points at their memory, and a resize would leave it writing to freed memory."""
    layer = run_ranks(1, lambda comm: SyncBatchNormLayer(2, 3, 3, 4, comm))[0]
    assert isinstance(layer, SyncBatchNormLayer), layer
    names = ("output", "delta", "x", "x_norm", "scales", "biases", "scale_updates", "bias_updates", "mean",
             "variance", "rolling_mean", "rolling_variance", "mean_delta", "variance_delta")
    for name in names:
        with pytest.raises(ValueError, match="does not own its data"):
            getattr(layer, name).resize((100000,), refcheck=False)


@needs_torch
@pytest.mark.parametrize("setting,differ", [
    ("num_features", lambda r: dict(num_features=3 + r)),
    ("eps", lambda r: dict(num_features=3, eps=1e-5 if r else 1e-3)),
    ("momentum", lambda r: dict(num_features=3, momentum=None if r else 0.1)),
    ("track_running_stats", lambda r: dict(num_features=3, track_running_stats=bool(r))),
])
def test_module_ranks_must_agree_on_settings(setting, differ):
    """Ranks whose SyncBatchNorm modules differ get the same ArgumentError at the first synchronized forward,
    naming the setting and each rank's value (not payloads of different sizes, nor silently different results)."""
    import torch

    from darknet_bn._sync_torch import SyncBatchNorm

    def one_rank(comm):
        m = SyncBatchNorm(process_group=comm, **differ(comm.rank))
        return m(torch.ones(4, m.num_features, 2, 2) * (1 + comm.rank) + torch.arange(16.0).view(4, 1, 2, 2))

    got = run_ranks(2, one_rank)
    for r in got:
        assert isinstance(r, darknet_bn.ArgumentError), got
        assert f"every rank must give the same {setting}, got rank 0: " in str(r), str(r)
    assert str(got[0]) == str(got[1])
