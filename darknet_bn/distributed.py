"""Synchronized batch normalization across processes, at the NumPy level.

A batch split over the ranks of a communicator is normalized with the
statistics of the whole batch, so every rank computes what one process would
compute on the concatenated batch (docs/reference.md §3, §4), through the C
phases of ``csrc/darknet_bn.h`` section 4::

    from mpi4py import MPI
    from darknet_bn.distributed import SyncBatchNormLayer

    layer = SyncBatchNormLayer(local_batch, 52, 52, 128, MPI.COMM_WORLD)  # collective
    y = layer.forward(x_local)          # one allgather
    dx = layer.backward(dy_local)       # one allreduce
    layer.update(learning_rate=0.01)    # local: every rank holds the same updates

Protocol, one collective per phase:

* **forward** (training): each rank computes its per-channel moments (count,
  mean, M2 = Σ(x − mean)²) in float64 with ``dnbn_batchnorm_moments``; one
  ``allgather`` of ``(status, count, mean, M2)`` float64 per rank; every rank
  merges the rows with Chan's formula (``dnbn_batchnorm_moments_combine``) in
  rank order, so every rank gets the same bits, and nothing like
  E[x²] − E[x]² cancels at large offsets; then the elementwise pass
  (``dnbn_batchnorm_layer_forward_moments``) with the global statistics. The
  running statistics are updated from those global statistics: identical bits
  on every rank.
* **backward**: each rank computes (Σdy, Σdy·(x − μ)) over its shard in float64
  (``dnbn_batchnorm_layer_backward_sums``); one ``allreduce`` sum of
  ``(failed, rank + 1 if failed, Σdy, Σdy·(x − μ))``; then the elementwise pass
  (``dnbn_batchnorm_layer_backward_apply``) with the global sums.

The check "at least 2 values per channel" is on the global count. A rank whose
shard is empty (batch 0) joins every collective with count 0 and zero sums.

Errors. A rank that fails before a collective (bad input, backward without a
training forward) still joins it with a failure flag, so no rank waits for it:
that rank raises its own exception, every other rank raises :class:`PeerError`,
and no layer changes. Nothing here times out by itself: a rank that dies or
never calls in is the engine's business (``torch.distributed`` raises after
its process-group timeout; ``mpiexec`` ends the whole job when a rank exits
with an error, e.g. under ``python -m mpi4py``).

Communicators. :class:`Communicator` is the whole interface the protocol uses
(``rank``, ``size``, ``allgather`` and ``allreduce_sum`` of a 1-D float64
array). :class:`MPICommunicator` wraps an ``mpi4py`` communicator,
:class:`TorchCommunicator` a ``torch.distributed`` process group;
:func:`as_communicator` picks one for a given object, and any other object
with the four members is used as it is (another engine). This module imports
neither mpi4py nor torch until one of those is used.
"""
from __future__ import annotations

import operator
import sys
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import numpy as np

from . import _validate
from . import fold as _fold
from . import weights as _weights
from ._lib import check, ffi, lib
from .errors import ArgumentError, ArgumentTypeError, DarknetBNError, LayerStateError

__all__ = [
    "Communicator",
    "MPICommunicator",
    "TorchCommunicator",
    "as_communicator",
    "PeerError",
    "sync_moments",
    "sync_backward_sums",
    "SyncBatchNormLayer",
]

_NUMERICS = _validate.NUMERICS
_STATE_TRAINING = int(lib.DNBN_STATE_TRAINING)  # dnbn_batchnorm_layer_state


class PeerError(DarknetBNError, RuntimeError):
    """Another rank of the communicator failed in the same collective step; this rank changed nothing.

    Attributes:
        step: what was running (e.g. ``"SyncBatchNormLayer.forward"``).
        ranks: the ranks that failed, when known (a tuple), else None.
    """

    def __init__(self, step: str, ranks: Optional[Tuple[int, ...]], count: int, size: int) -> None:
        self.step = step
        self.ranks = ranks
        if ranks is not None:
            who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        else:
            who = f"{count} ranks"
        super().__init__(
            f"{step}: {who} of {size} failed before the collective step (see that rank's own exception); "
            "nothing was changed on this rank"
        )


# ---------------------------------------------------------------- communicators


@runtime_checkable
class Communicator(Protocol):
    """The collective operations synchronized batch norm needs of a group of processes.

    Every rank of the group calls each operation in the same order with an
    array of the same length. Implementations: :class:`MPICommunicator`,
    :class:`TorchCommunicator`; any object with these four members works.
    """

    @property
    def rank(self) -> int:
        """This process's rank in the group, 0 <= rank < size."""
        ...

    @property
    def size(self) -> int:
        """The number of processes in the group."""
        ...

    def allgather(self, values: np.ndarray) -> np.ndarray:
        """Gather a 1-D float64 array from every rank: a (size, len(values)) float64 array, row r from rank r."""
        ...

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """The elementwise sum over ranks of a 1-D float64 array, the same on every rank."""
        ...


def _float64_vector(values: Any, name: str = "values") -> np.ndarray:
    """A C-contiguous 1-D float64 array (what the communicators send)."""
    if not isinstance(values, np.ndarray) or values.dtype != np.float64 or values.ndim != 1:
        raise ArgumentTypeError(f"{name} must be a 1-D float64 numpy.ndarray")
    return np.ascontiguousarray(values)


class MPICommunicator:
    """:class:`Communicator` over an ``mpi4py`` intracommunicator (``MPI.COMM_WORLD``, a split of it, ...).

    ``allgather`` is ``MPI_Allgather`` and ``allreduce_sum`` is
    ``MPI_Allreduce`` with ``MPI_SUM``, on ``MPI_DOUBLE`` buffers.

    Raises:
        ImportError: mpi4py is not installed.
        ArgumentTypeError: ``comm`` is not an ``mpi4py.MPI.Intracomm``.
        ArgumentError: ``comm`` is ``MPI.COMM_NULL``.
    """

    def __init__(self, comm: Any) -> None:
        try:
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover - exercised only without mpi4py
            raise ImportError("MPICommunicator needs mpi4py: pip install 'darknet_bn[mpi]'") from exc
        if not isinstance(comm, MPI.Comm):
            raise ArgumentTypeError(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
        if comm == MPI.COMM_NULL:
            raise ArgumentError("comm is MPI.COMM_NULL: this process is not in the communicator")
        if not isinstance(comm, MPI.Intracomm):
            raise ArgumentTypeError("comm must be an intracommunicator (MPI.Intracomm), got an intercommunicator")
        self._mpi = MPI
        self._comm = comm
        self._rank = int(comm.Get_rank())
        self._size = int(comm.Get_size())

    @property
    def rank(self) -> int:
        """This process's rank in ``comm``."""
        return self._rank

    @property
    def size(self) -> int:
        """The size of ``comm``."""
        return self._size

    @property
    def comm(self) -> Any:
        """The wrapped mpi4py communicator."""
        return self._comm

    def allgather(self, values: np.ndarray) -> np.ndarray:
        """``MPI_Allgather`` of a 1-D float64 array: (size, n) float64, row r from rank r."""
        send = _float64_vector(values)
        recv = np.empty((self._size, send.size), np.float64)
        self._comm.Allgather([send, self._mpi.DOUBLE], [recv, self._mpi.DOUBLE])
        return recv

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """``MPI_Allreduce`` with ``MPI_SUM`` of a 1-D float64 array."""
        send = _float64_vector(values)
        recv = np.empty_like(send)
        self._comm.Allreduce([send, self._mpi.DOUBLE], [recv, self._mpi.DOUBLE], op=self._mpi.SUM)
        return recv

    def __repr__(self) -> str:
        return f"MPICommunicator(rank={self._rank}, size={self._size})"


class TorchCommunicator:
    """:class:`Communicator` over a ``torch.distributed`` process group (None: the default group).

    ``allgather`` is ``torch.distributed.all_gather`` and ``allreduce_sum`` is
    ``torch.distributed.all_reduce`` with ``ReduceOp.SUM``, on float64 CPU
    tensors (any backend that takes those: gloo, mpi).

    Raises:
        ImportError: torch is not installed.
        ArgumentError: ``torch.distributed`` is not initialized, or this process is not in ``group``.
        ArgumentTypeError: ``group`` is not a ``torch.distributed.ProcessGroup``.
    """

    def __init__(self, group: Any = None) -> None:
        try:
            import torch
            import torch.distributed as dist
        except ImportError as exc:  # pragma: no cover - exercised only without torch
            raise ImportError("TorchCommunicator needs PyTorch: pip install 'darknet_bn[torch]'") from exc
        if not dist.is_available() or not dist.is_initialized():
            raise ArgumentError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group first"
            )
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise ArgumentTypeError(
                f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}"
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise ArgumentError("this process is not a member of the process group `group`")
        self._torch = torch
        self._dist = dist
        self._group = group
        self._rank = int(rank)
        self._size = int(dist.get_world_size(group))

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return self._rank

    @property
    def size(self) -> int:
        """The size of the group."""
        return self._size

    @property
    def group(self) -> Any:
        """The wrapped process group (None: the default group)."""
        return self._group

    def allgather(self, values: np.ndarray) -> np.ndarray:
        """``torch.distributed.all_gather`` of a 1-D float64 array: (size, n) float64, row r from rank r."""
        send = self._torch.from_numpy(_float64_vector(values).copy())
        rows = [self._torch.empty_like(send) for _ in range(self._size)]
        self._dist.all_gather(rows, send, group=self._group)
        return self._torch.stack(rows).numpy()

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """``torch.distributed.all_reduce`` with ``ReduceOp.SUM`` of a 1-D float64 array."""
        buf = self._torch.from_numpy(_float64_vector(values).copy())
        self._dist.all_reduce(buf, op=self._dist.ReduceOp.SUM, group=self._group)
        return buf.numpy()

    def __repr__(self) -> str:
        return f"TorchCommunicator(rank={self._rank}, size={self._size})"


def as_communicator(comm: Any) -> Communicator:
    """The :class:`Communicator` for ``comm``.

    ``comm`` may be an ``mpi4py`` communicator (wrapped in
    :class:`MPICommunicator`), a ``torch.distributed.ProcessGroup`` (wrapped in
    :class:`TorchCommunicator`), or any :class:`Communicator` (returned as it is).

    Raises:
        ArgumentTypeError: ``comm`` is none of these (the message names its type).
    """
    if isinstance(comm, (MPICommunicator, TorchCommunicator)):
        return comm
    mpi = sys.modules.get("mpi4py.MPI")  # an mpi4py object means mpi4py is imported
    if mpi is not None and isinstance(comm, mpi.Comm):
        return MPICommunicator(comm)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and isinstance(comm, dist.ProcessGroup):
        return TorchCommunicator(comm)
    if isinstance(comm, Communicator):
        return comm
    raise ArgumentTypeError(
        "comm must be an mpi4py communicator, a torch.distributed.ProcessGroup or an object with "
        f"rank, size, allgather and allreduce_sum (darknet_bn.distributed.Communicator), got {type(comm).__name__}"
    )


# ---------------------------------------------------------------- the protocol


def _rows(comm: Communicator, payload: np.ndarray, step: str) -> np.ndarray:
    """``comm.allgather(payload)``, checked to be (size, len(payload)) float64."""
    rows = np.asarray(comm.allgather(payload))
    if rows.shape != (comm.size, payload.size) or rows.dtype != np.float64:
        raise ArgumentError(
            f"{step}: comm.allgather returned a {rows.dtype} array of shape {rows.shape}, "
            f"expected float64 of shape {(comm.size, payload.size)}"
        )
    return rows


def _raise_failures(step: str, failure: Optional[BaseException], flags: np.ndarray, size: int) -> None:
    """After a collective: re-raise this rank's own failure, else a PeerError if any other rank failed."""
    if failure is not None:
        raise failure
    failed = tuple(int(r) for r in np.flatnonzero(flags != 0))
    if failed:
        raise PeerError(step, failed, len(failed), size)


def _dp(arr: np.ndarray) -> Any:
    """A ``double *`` onto a C-contiguous float64 array (the caller keeps it alive)."""
    return ffi.from_buffer("double[]", arr)


def sync_moments(
    comm: Communicator,
    count: float,
    mean: np.ndarray,
    m2: np.ndarray,
    failure: Optional[BaseException] = None,
    step: str = "sync_moments",
) -> Tuple[float, np.ndarray, np.ndarray]:
    """The global (count, mean, M2) per channel from every rank's, by one allgather.

    Each rank sends ``(status, count, mean[c], m2[c])`` as float64 (``mean``,
    ``m2``: its shard's per-channel mean and Σ(x − mean)², from
    ``dnbn_batchnorm_moments``; a shard without values sends count 0). The
    rows are merged with Chan's formula (``dnbn_batchnorm_moments_combine``)
    in rank order, so every rank returns the same bits.

    ``failure``: this rank's exception from before the step; the rank still
    joins the allgather (with a failure flag), then re-raises it. Every other
    rank then raises :class:`PeerError` naming the failed ranks.

    Returns:
        (total count, mean, m2), the last two new float64 arrays of c values.
    """
    c = int(np.size(mean))
    payload = np.zeros(2 + 2 * c, np.float64)
    if failure is None:
        payload[1] = count
        payload[2:2 + c] = mean
        payload[2 + c:] = m2
    else:
        payload[0] = 1.0
    rows = _rows(comm, payload, step)
    _raise_failures(step, failure, rows[:, 0], comm.size)
    total = float(rows[0, 1])
    g_mean = np.ascontiguousarray(rows[0, 2:2 + c])
    g_m2 = np.ascontiguousarray(rows[0, 2 + c:])
    for r in range(1, comm.size):
        n_b = float(rows[r, 1])
        lib.dnbn_batchnorm_moments_combine(
            c, total, _dp(g_mean), _dp(g_m2), n_b,
            _dp(np.ascontiguousarray(rows[r, 2:2 + c])), _dp(np.ascontiguousarray(rows[r, 2 + c:])),
        )
        total += n_b
    return total, g_mean, g_m2


def _agree_settings(comm: Communicator, settings: Dict[str, float], step: str) -> None:
    """Check by one allgather that every rank gave the same ``settings`` (name -> number).

    Every rank sees the same rows, so on a disagreement every rank raises the
    same :class:`ArgumentError`, naming the setting and each rank's value.
    """
    names = tuple(settings)
    rows = _rows(comm, np.array([float(settings[n]) for n in names], np.float64), step)
    for i, name in enumerate(names):
        _check_same(step, name, rows[:, i])


def _check_same(step: str, name: str, column: np.ndarray, show: Callable[[float], str] = "{:g}".format) -> None:
    """Raise ArgumentError naming ``name`` and each rank's value unless every rank's entry of ``column`` is equal."""
    if np.any(column != column[0]):
        values = ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(column))
        raise ArgumentError(f"{step}: every rank must give the same {name}, got {values}")


def sync_backward_sums(
    comm: Communicator,
    sum_dy: np.ndarray,
    sum_dy_dev: np.ndarray,
    failure: Optional[BaseException] = None,
    step: str = "sync_backward_sums",
) -> Tuple[np.ndarray, np.ndarray]:
    """The sums over all ranks of (Σdy, Σdy·(x − μ)) per channel, by one allreduce.

    Each rank sends ``(failed, rank + 1 if failed, sum_dy[c], sum_dy_dev[c])``
    as float64 (a shard without values sends zero sums). ``failure`` as in
    :func:`sync_moments`; the failed rank is named when exactly one failed.

    Returns:
        (Σdy, Σdy·(x − μ)) over every rank, new float64 arrays of c values.
    """
    c = int(np.size(sum_dy))
    payload = np.zeros(2 + 2 * c, np.float64)
    if failure is None:
        payload[2:2 + c] = sum_dy
        payload[2 + c:] = sum_dy_dev
    else:
        payload[0] = 1.0
        payload[1] = comm.rank + 1.0
    total = np.asarray(comm.allreduce_sum(payload))
    if total.shape != payload.shape or total.dtype != np.float64:
        raise ArgumentError(
            f"{step}: comm.allreduce_sum returned a {total.dtype} array of shape {total.shape}, "
            f"expected float64 of shape {payload.shape}"
        )
    if failure is not None:
        raise failure
    n_failed = int(round(total[0]))
    if n_failed:
        ranks = (int(round(total[1])) - 1,) if n_failed == 1 else None
        raise PeerError(step, ranks, n_failed, comm.size)
    return np.ascontiguousarray(total[2:2 + c]), np.ascontiguousarray(total[2 + c:])


# ---------------------------------------------------------------- the layer

_ACTIVATIONS = ("output", "delta", "x", "x_norm")
_CHANNELS = (
    "scales", "biases", "scale_updates", "bias_updates", "mean", "variance",
    "rolling_mean", "rolling_variance", "mean_delta", "variance_delta",
)
# The agreement header of the constructor: what every rank must share, and its own batch.
_HEADER = ("failed", "c", "h", "w", "numerics", "eps", "momentum", "batch")
_AGREED = ("c", "h", "w", "numerics", "eps", "momentum")


def _batch_size(value: Any) -> int:
    """``batch`` as a C int >= 0 (a rank may hold an empty shard)."""
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError("batch must be an integer, got bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise ArgumentTypeError(f"batch must be an integer, got {type(value).__name__}") from None
    if n < 0:
        raise ArgumentError(f"batch must be >= 0, got {n}")
    if n > _validate.INT_MAX:
        raise ArgumentError(f"batch must fit in a C int (<= {_validate.INT_MAX}), got {n}")
    return n


def _buffer_property(name: str, doc: str) -> property:
    """A buffer attribute: reads give the array itself, assignments copy values in (shape checked)."""

    def get(self: "SyncBatchNormLayer") -> np.ndarray:
        return self._arrays[name]

    def set(self: "SyncBatchNormLayer", value: Any) -> None:
        view = self._arrays[name]
        arr = np.asarray(value)
        if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ArgumentTypeError(f"{name} must be an array of real numbers, got {type(value).__name__}")
        if arr.shape != view.shape:
            raise ArgumentError(f"{name} must have shape {view.shape}, got {arr.shape}")
        np.copyto(view, arr, casting="unsafe")

    return property(get, set, doc=doc)


class SyncBatchNormLayer:
    """A batch-norm layer whose batch is split over the ranks of ``comm``: BatchNormLayer's interface.

    Every rank constructs its layer for its own shard of ``batch`` images
    (``batch`` may differ between ranks, and be 0); ``w``, ``h``, ``c``,
    ``numerics``, ``eps`` and ``momentum`` must be the same on every rank.
    Training ``forward`` and ``backward`` then compute, on each rank's shard,
    what a :class:`darknet_bn.BatchNormLayer` computes on the concatenated
    batch (rank 0's images first): ``output``, ``delta``, ``x_norm``, the
    batch ``mean`` and ``variance``, the running statistics (the same bits on
    every rank), ``mean_delta``, ``variance_delta``, and ``scale_updates`` and
    ``bias_updates``, which hold sums over the whole batch (the same on every
    rank). :meth:`update` is local: it divides by the whole batch (the sum of
    the ranks' ``batch``), so every rank takes the same step.

    Collective calls (every rank, in the same order): the constructor (one
    allgather checking that the ranks agree), ``forward(x, train=True)`` (one
    allgather) and ``backward`` (one allreduce). ``forward(x, train=False)``
    (the running statistics), :meth:`update` and the buffers are local.

    Args:
        batch: this rank's images, >= 0 (the sum over ranks must be >= 1).
        w, h, c: sizes, each >= 1, the same on every rank.
        comm: an mpi4py communicator, a ``torch.distributed.ProcessGroup`` or a
            :class:`Communicator` (see :func:`as_communicator`).
        numerics, eps, momentum: as :class:`darknet_bn.BatchNormLayer`.

    Buffers are float32 NumPy arrays owned by the layer (the C layer points
    into them): ``output``, ``delta``, ``x``, ``x_norm`` of shape (batch, c,
    h, w); ``scales``, ``biases``, ``scale_updates``, ``bias_updates``,
    ``mean``, ``variance``, ``rolling_mean``, ``rolling_variance``,
    ``mean_delta``, ``variance_delta`` of shape (c,). Assigning to a buffer
    copies values in. ``x_norm`` is written by every training forward.

    Raises:
        ArgumentTypeError: ``comm`` is not a communicator (raised at once, no
            collective); a size is not an integer, numerics not a str.
        ArgumentError: a size out of range, unknown numerics, eps or momentum
            out of range; the ranks disagree on c, h, w, numerics, eps or
            momentum (raised on every rank); the batch over all ranks is empty
            or beyond a C int.
        PeerError: another rank failed its own checks.
        AllocationError, MemoryError: the buffers could not be allocated.
    """

    def __init__(
        self,
        batch: int,
        w: int,
        h: int,
        c: int,
        comm: Any,
        numerics: str = "darknet",
        eps: float = 1e-5,
        momentum: Optional[float] = None,
    ) -> None:
        self._comm = as_communicator(comm)
        step = "SyncBatchNormLayer()"
        failure: Optional[BaseException] = None
        header = np.zeros(len(_HEADER), np.float64)
        try:
            self._setup(batch, w, h, c, numerics, eps, momentum)
            header[1:] = (self.c, self.h, self.w, _NUMERICS[self._numerics], self._eps, self._momentum, self.batch)
        except Exception as exc:  # joins the collective below, then re-raised
            failure = exc
            header[0] = 1.0
        rows = _rows(self._comm, header, step)
        _raise_failures(step, failure, rows[:, 0], self._comm.size)
        numerics_names = {code: text for text, code in _NUMERICS.items()}
        for i, name in enumerate(_HEADER):
            if name in _AGREED:
                _check_same(step, name, rows[:, i],
                            (lambda v: str(numerics_names.get(int(v), v))) if name == "numerics" else "{:g}".format)
        total = int(rows[:, _HEADER.index("batch")].sum())
        if total < 1:
            raise ArgumentError(f"{step}: the batch over all ranks is empty (every rank has batch=0)")
        if total > _validate.INT_MAX:
            raise ArgumentError(f"{step}: the batch over all ranks ({total}) must fit in a C int")
        self._global_batch = total
        self._build_update_struct()

    def _setup(self, batch: Any, w: Any, h: Any, c: Any, numerics: Any, eps: Any, momentum: Any) -> None:
        """Validate the arguments and allocate the buffers and the C layer over them (local)."""
        batch = _batch_size(batch)
        w = _validate.size(w, "w")
        h = _validate.size(h, "h")
        c = _validate.size(c, "c")
        numerics, eps, momentum = _validate.layer_options(c, h, w, numerics, eps, momentum)
        self._numerics, self._eps, self._momentum = numerics, eps, momentum
        self._shapes = ((batch, c, h, w), (batch, c * h * w))
        self._count = batch * c * h * w
        self._values = batch * h * w  # values per channel in this shard

        # Buffers: NumPy owns the memory, the C layer points into it. Activation
        # buffers have at least one element, so that their pointers are never NULL.
        self._keep: List[Any] = []
        self._arrays: Dict[str, np.ndarray] = {}
        layer = ffi.new("dnbn_layer *")
        for name in _ACTIVATIONS:
            store = np.zeros(max(self._count, 1), np.float32)
            self._arrays[name] = store[: self._count].reshape(batch, c, h, w)
            setattr(layer, name, self._pointer(store))
        for name in _CHANNELS:
            store = np.zeros(c, np.float32)
            self._arrays[name] = store[:]  # a view: NumPy refuses to resize it (the C layer points at store)
            setattr(layer, name, self._pointer(store))
        self._scratch = np.zeros(c * int(lib.DNBN_SCRATCH_DOUBLES), np.float64)
        layer.scratch = self._pointer(self._scratch)
        layer.batch, layer.out_c, layer.out_h, layer.out_w, layer.outputs = batch, c, h, w, c * h * w
        layer.keep_x_norm = 1
        layer.memory = ffi.NULL
        self._arrays["scales"][:] = 1.0
        check(lib.dnbn_batchnorm_layer_set_numerics(layer, _NUMERICS[numerics], eps, momentum), "numerics")
        self._layer = layer
        self._net = ffi.new("dnbn_network *")
        self._global_count = 0.0
        self._empty = np.zeros(1, np.float32)  # stands in for an empty input's pointer

    def _pointer(self, arr: np.ndarray) -> Any:
        """A pointer onto ``arr``'s memory, kept alive as long as the layer."""
        kind = "double[]" if arr.dtype == np.float64 else "float[]"
        buf = ffi.from_buffer(kind, arr)
        self._keep.append(buf)
        return buf

    def _build_update_struct(self) -> None:
        """A per-channel view of the layer whose batch is the whole batch, for Darknet's update."""
        upd = ffi.new("dnbn_layer *")
        src = self._layer
        upd.batch, upd.out_c, upd.out_h, upd.out_w, upd.outputs = self._global_batch, self.c, 1, 1, self.c
        for name in _CHANNELS:
            setattr(upd, name, getattr(src, name))
        upd.output = src.mean  # never written by update; only required to be a buffer
        upd.scratch = src.scratch
        upd.numerics, upd.eps, upd.momentum = src.numerics, src.eps, src.momentum
        upd.memory = ffi.NULL
        self._update_layer = upd

    # Sizes and settings.
    batch = property(lambda self: int(self._layer.batch), doc="This rank's images per batch (may be 0).")
    w = property(lambda self: int(self._layer.out_w), doc="Width.")
    h = property(lambda self: int(self._layer.out_h), doc="Height.")
    c = property(lambda self: int(self._layer.out_c), doc="Channels.")
    outputs = property(lambda self: int(self._layer.outputs), doc="c*h*w, values per image.")
    numerics = property(lambda self: self._numerics, doc="'darknet' or 'standard'.")
    eps = property(lambda self: self._eps, doc="Epsilon of standard numerics.")
    momentum = property(lambda self: self._momentum, doc="Weight of the batch statistic in the running ones.")
    comm = property(lambda self: self._comm, doc="The Communicator the layer synchronizes over.")
    global_batch = property(lambda self: self._global_batch, doc="Images over all ranks (the sum of their batch).")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a SyncBatchNormLayer is bound to its communicator and cannot be copied or pickled; "
            "copy its buffers (or build a darknet_bn.BatchNormLayer from them) instead"
        )

    def __repr__(self) -> str:
        return (
            f"SyncBatchNormLayer(batch={self.batch}, w={self.w}, h={self.h}, c={self.c}, comm={self._comm!r}, "
            f"numerics={self.numerics!r}, eps={self.eps}, momentum={self.momentum})"
        )

    def _input_pointer(self, arr: np.ndarray) -> Any:
        return ffi.from_buffer("float[]", arr if arr.size else self._empty)

    def forward(self, input: np.ndarray, train: bool = True) -> np.ndarray:
        """Normalize this rank's shard ``input``; return ``output`` (a view, in the input's shape).

        Training (collective): the statistics of the whole batch over all
        ranks, the running statistics updated from them, x and x_norm kept
        for backward. Inference (local): the running statistics.

        Args:
            input: float32 of shape (batch, c, h, w) or (batch, c*h*w); copied
                first if not C-contiguous.
            train: a bool.

        Raises:
            ArgumentTypeError: input is not a float32 array; train is not a bool
                (raised at once: without a valid ``train`` the rank cannot know
                whether to join the collective).
            ArgumentError: input has the wrong shape; fewer than 2 values per
                channel over all ranks (on every rank).
            PeerError: another rank failed in this step (training only).
        """
        train = _validate.flag(train, "train")
        if not train:
            arr = _validate.readable(input, "input", self._count, self._shapes)
            return self._run_forward(arr, train=False)
        step = "SyncBatchNormLayer.forward"
        c = self.c
        mean, m2 = np.zeros(c, np.float64), np.zeros(c, np.float64)
        failure: Optional[BaseException] = None
        arr = None
        try:
            arr = _validate.readable(input, "input", self._count, self._shapes)
            if self._values:
                lib.dnbn_batchnorm_moments(self._input_pointer(arr), self.batch, c, self.h * self.w,
                                           _dp(mean), _dp(m2))
        except Exception as exc:  # joins the collective, then re-raised
            failure = exc
        count, g_mean, g_m2 = sync_moments(self._comm, float(self._values), mean, m2, failure, step)
        if not count >= 2:
            raise ArgumentError(
                f"{step}: training needs at least 2 values per channel over all ranks "
                f"(sum of batch*h*w over {self._comm.size} ranks), got {count:g}"
            )
        assert arr is not None
        check(lib.dnbn_batchnorm_layer_forward_moments(self._layer, self._input_pointer(arr), count,
                                                       _dp(g_mean), _dp(g_m2)), step)
        self._global_count = count
        return self._arrays["output"].reshape(arr.shape)

    def _run_forward(self, arr: np.ndarray, train: bool) -> np.ndarray:
        net = self._net
        net.input = self._input_pointer(arr)
        net.train = train
        status = lib.dnbn_forward_batchnorm_layer(self._layer, net[0])
        net.input = ffi.NULL
        check(status, "forward")
        return self._arrays["output"].reshape(arr.shape)

    def backward(self, delta: np.ndarray) -> np.ndarray:
        """Back-propagate this rank's shard of ``delta`` through the last training forward (collective).

        ``delta`` is -dLoss/doutput (Darknet's convention; backward is linear).
        ``bias_updates`` and ``scale_updates`` accumulate the sums over the
        whole batch; ``mean_delta`` and ``variance_delta`` are the whole
        batch's. Returns a view of ``delta`` (the input's delta) in delta's shape.

        Raises:
            LayerStateError: the last forward was not a training forward.
            ArgumentTypeError: delta is not a float32 array.
            ArgumentError: delta has the wrong shape.
            PeerError: another rank failed in this step.
        """
        step = "SyncBatchNormLayer.backward"
        c = self.c
        sum_dy, sum_dy_dev = np.zeros(c, np.float64), np.zeros(c, np.float64)
        failure: Optional[BaseException] = None
        arr = None
        try:
            if lib.dnbn_batchnorm_layer_state(self._layer) != _STATE_TRAINING:
                raise LayerStateError("backward needs a training forward(input, train=True) first")
            arr = _validate.readable(delta, "delta", self._count, self._shapes)
            check(lib.dnbn_batchnorm_layer_backward_sums(self._layer, self._input_pointer(arr), _dp(sum_dy),
                                                         _dp(sum_dy_dev)), step)
        except Exception as exc:  # joins the collective, then re-raised
            failure = exc
        total_dy, total_dy_dev = sync_backward_sums(self._comm, sum_dy, sum_dy_dev, failure, step)
        assert arr is not None
        check(lib.dnbn_batchnorm_layer_backward_apply(self._layer, self._input_pointer(arr), self._global_count,
                                                      _dp(total_dy), _dp(total_dy_dev)), step)
        return self._arrays["delta"].reshape(arr.shape)

    def update(self, learning_rate: float, momentum: float = 0.9, decay: float = 0.0) -> None:
        """Darknet's SGD step over the whole batch (local; every rank takes the same step).

        biases += (learning_rate / global_batch) * bias_updates; bias_updates
        *= momentum; the same for scales. ``decay`` is accepted for Darknet's
        signature and ignored.
        """
        lr = _validate.real(learning_rate, "learning_rate")
        mom = _validate.real(momentum, "momentum")
        dec = _validate.real(decay, "decay")
        check(lib.dnbn_update_batchnorm_layer(self._update_layer, lr, mom, dec), "update")

    def load_weights(self, f: BinaryIO, layout: str = "batchnorm") -> None:
        """Read this layer's block of a Darknet ``.weights`` file (as BatchNormLayer.load_weights; local)."""
        arrays = _weights.read_block(f, self.c, layout)
        for name, values in arrays.items():
            np.copyto(self._arrays[name], values)

    def save_weights(self, f: BinaryIO, layout: str = "batchnorm") -> None:
        """Write this layer's block of a Darknet ``.weights`` file (as BatchNormLayer.save_weights; local)."""
        _weights.write_block(f, {name: self._arrays[name] for name in _weights.fields(layout)}, layout)

    def fold_into(self, weights: np.ndarray, biases: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Fold this layer's inference into the preceding layer (as BatchNormLayer.fold_into; local)."""
        return _fold.fold_batchnorm(
            weights,
            biases,
            scales=self._arrays["scales"],
            bn_biases=self._arrays["biases"],
            rolling_mean=self._arrays["rolling_mean"],
            rolling_variance=self._arrays["rolling_variance"],
            numerics=self._numerics,
            eps=float(self._layer.eps),
        )

    output = _buffer_property("output", "y of the last forward, (batch, c, h, w).")
    delta = _buffer_property("delta", "-dLoss/dx of the last backward, (batch, c, h, w).")
    x = _buffer_property("x", "The input of the last training forward, (batch, c, h, w).")
    x_norm = _buffer_property("x_norm", "The normalized input of the last training forward, (batch, c, h, w).")
    scales = _buffer_property("scales", "gamma, (c,); starts at 1.")
    biases = _buffer_property("biases", "beta, (c,); starts at 0.")
    scale_updates = _buffer_property("scale_updates", "Accumulated sum of delta*x_norm over the whole batch, (c,).")
    bias_updates = _buffer_property("bias_updates", "Accumulated sum of delta over the whole batch, (c,).")
    mean = _buffer_property("mean", "Batch mean (whole batch) of the last training forward, (c,).")
    variance = _buffer_property(
        "variance",
        "Variance (whole batch) that normalized the last training forward: unbiased (darknet), biased (standard).",
    )
    rolling_mean = _buffer_property("rolling_mean", "Running mean, (c,); starts at 0.")
    rolling_variance = _buffer_property(
        "rolling_variance", "Running (unbiased) variance, (c,); starts at 0 (darknet) or 1 (standard)."
    )
    mean_delta = _buffer_property("mean_delta", "dLoss/dmean of the last backward (whole batch), (c,).")
    variance_delta = _buffer_property("variance_delta", "dLoss/dvariance of the last backward (whole batch), (c,).")
