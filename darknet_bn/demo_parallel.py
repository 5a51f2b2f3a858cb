"""The demo's data-parallel experiment: per-rank batch norm, synchronized batch norm, one process.

A batch of ``RANKS x b`` examples is split over ``RANKS`` = 4 ranks, ``b``
examples each (``b`` = 2, 4 and 8: global batches of 8, 16 and 32), and the
figure-1 network of :mod:`darknet_bn.demo` (784-100-100-100-10, sigmoid, batch
norm before each hidden sigmoid) is trained three ways on the same batches,
from the same weights, at the demo's base learning rate:

- **per-rank batch norm** ("per-rank BN"): each rank normalizes with its own
  shard's statistics, a plain :class:`darknet_bn.BatchNormLayer` of batch
  ``b`` per rank, what data-parallel training does without synchronized batch
  norm. Each rank keeps its own rolling statistics; evaluation uses rank 0's
  (as ``DistributedDataParallel``, which broadcasts rank 0's buffers);
- **synchronized batch norm** ("SyncBN"): every rank's layer is a
  :class:`darknet_bn.distributed.SyncBatchNormLayer`, all ranks normalizing
  with the statistics of the whole batch;
- **one process** on the whole batch of ``RANKS x b`` (a
  :class:`darknet_bn.BatchNormLayer` of that batch): what SyncBN should equal.

Data-parallel SGD: every rank holds a replica of the network and takes the
same step. The dense layers' gradients are summed over the whole batch by
:func:`darknet_bn._exact.sharded_matmul` (one ``allreduce_sum``; float32 sums
correctly rounded, so bit for bit what one process computes on the whole
batch, whatever the split or the order of the reduction), and their updates
divide by the whole batch. SyncBN's scale and bias gradients are sums over the
whole batch already (its backward all-reduces); with per-rank batch norm each
rank's are averaged over the ranks (one ``allgather``, added in rank order)
before each rank's update, which divides by its own batch: the same step
``lr / (RANKS b) x sum``. The reported loss is the mean over the whole batch.

So SyncBN differs from the one process only in how darknet_bn sums its
statistics: per-shard moments in float64 merged by Chan's formula and
all-reduced gradient sums, against one pass over the whole batch. Those float64
results can differ in the last bits, and round to a float32 output one ulp
apart now and then (less than one value per layer and step here). So the two
runs are bit-identical for their first steps, then differ in the last float32
digits: in the full run (seed 0, 1,000 steps) the training losses part after
5, 3 and 60 steps for per-rank batches 2, 4 and 8 and never differ by more
than 7.2e-7, and the test accuracies are the same at every evaluation. With
the batch norm taken out, the data-parallel replicas equal the one process
bit for bit at every step (``tests/test_demo_parallel.py``).

The ranks are threads of this process, synchronized by
:class:`ThreadCommunicator`, an in-process implementation of
:class:`darknet_bn.distributed.Communicator` (``rank``, ``size``,
``allgather``, ``allreduce_sum`` of float64 vectors) whose reductions add in
rank order; like every other float32 value of the demo, the results depend only
on the seed and the number of steps.
"""
from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from darknet_bn import BatchNormLayer
from darknet_bn import demo as _demo
from darknet_bn._exact import sharded_column_sums, sharded_matmul
from darknet_bn.distributed import SyncBatchNormLayer

__all__ = [
    "RANKS",
    "PER_RANK_BATCHES",
    "MODES",
    "ThreadGroup",
    "ThreadCommunicator",
    "run_ranks",
    "RankNetwork",
    "ParallelRunResult",
    "train_parallel_run",
    "run_parallel",
    "compare_runs",
    "results_section",
    "format_table",
    "plot",
]

RANKS = 4
"""Simulated ranks (threads)."""

PER_RANK_BATCHES: Tuple[int, ...] = (2, 4, 8)
"""Examples per rank and step; the global batch is RANKS times as many."""

PER_RANK_BN, SYNC_BN, SINGLE_PROCESS = "per_rank_bn", "sync_bn", "single_process"
MODES: Tuple[str, ...] = (PER_RANK_BN, SYNC_BN, SINGLE_PROCESS)
"""The three ways of training, in the order of the table and the figure."""

FULL_STEPS = 1000
QUICK_STEPS = 200
"""Steps of each data-parallel run (full run, ``--quick``)."""

LEARNING_RATE = _demo.BASE_LEARNING_RATE
"""Darknet-convention rate: lr / (global batch) times the summed gradient, as in the figure-1 runs."""


# ----------------------------------------------------------------------------
# Ranks as threads: an in-process Communicator
# ----------------------------------------------------------------------------


class ThreadGroup:
    """The shared state of ``size`` thread ranks; :meth:`communicators` gives one Communicator per rank.

    Every collective is one ``threading.Barrier`` wait: each rank leaves its
    float64 vector in its slot, the last rank to arrive combines the slots
    (the barrier's action: stack them, or add them in rank order), and every
    rank takes its own copy of the result. The next collective cannot combine
    before every rank has arrived at it, so after it has taken that copy. A
    rank that fails calls :meth:`abort`, which breaks the barrier for the
    others (``threading.BrokenBarrierError``) instead of leaving them waiting.
    """

    def __init__(self, size: int, timeout: Optional[float] = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._slots: List[Optional[np.ndarray]] = [None] * size
        self._ops: List[Optional[str]] = [None] * size
        self._result: Any = None
        self._barrier = threading.Barrier(size, action=self._combine, timeout=timeout)

    def communicators(self) -> List["ThreadCommunicator"]:
        """One communicator per rank, rank 0 first."""
        return [ThreadCommunicator(self, r) for r in range(self.size)]

    def abort(self) -> None:
        """Break every pending and future collective of the group."""
        self._barrier.abort()

    def _combine(self) -> None:
        """The barrier's action, run by one rank once every rank has arrived."""
        ops, slots = list(self._ops), list(self._slots)
        if len(set(ops)) != 1 or len({s.shape for s in slots if s is not None}) != 1:
            shapes = [None if s is None else s.shape for s in slots]
            self._result = RuntimeError(f"ranks called different collectives: {ops}, shapes {shapes}")
            return
        if ops[0] == "allgather":
            self._result = np.stack(slots)  # type: ignore[arg-type]
        else:
            total = np.array(slots[0], copy=True)
            for r in range(1, self.size):  # rank order: the same bits every time
                total += slots[r]
            self._result = total

    def exchange(self, rank: int, op: str, values: np.ndarray) -> np.ndarray:
        """Rank ``rank``'s side of one collective ``op`` ("allgather" or "allreduce_sum")."""
        arr = np.asarray(values, dtype=np.float64)  # read only while this rank waits: no copy needed
        if arr.ndim != 1:
            raise ValueError(f"{op}: values must be a 1-D array, got shape {arr.shape}")
        self._slots[rank] = arr
        self._ops[rank] = op
        self._barrier.wait()
        result = self._result
        if isinstance(result, Exception):
            raise result
        return np.array(result, copy=True)


class ThreadCommunicator:
    """:class:`darknet_bn.distributed.Communicator` for one thread rank of a :class:`ThreadGroup`."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self._group = group
        self._rank = rank

    @property
    def rank(self) -> int:
        """This rank, 0 to size - 1."""
        return self._rank

    @property
    def size(self) -> int:
        """The number of ranks."""
        return self._group.size

    def allgather(self, values: np.ndarray) -> np.ndarray:
        """Every rank's 1-D float64 ``values``: a (size, n) float64 array, row r from rank r."""
        return self._group.exchange(self._rank, "allgather", values)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """The sum over ranks of a 1-D float64 array, added in rank order (the same bits on every rank)."""
        return self._group.exchange(self._rank, "allreduce_sum", values)

    def __repr__(self) -> str:
        return f"ThreadCommunicator(rank={self._rank}, size={self.size})"


def run_ranks(size: int, fn: Callable[[ThreadCommunicator], Any]) -> List[Any]:
    """Runs ``fn(comm)`` on ``size`` thread ranks; returns each rank's result, rank 0 first.

    If a rank raises, the group is aborted (the other ranks stop at their next
    collective) and the first exception that is not such a consequence is
    re-raised here.
    """
    group = ThreadGroup(size)
    comms = group.communicators()
    results: List[Any] = [None] * size
    errors: List[Optional[BaseException]] = [None] * size

    def body(r: int) -> None:
        try:
            results[r] = fn(comms[r])
        except BaseException as exc:  # reported to the caller
            errors[r] = exc
            group.abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}", daemon=True) for r in range(size)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except BaseException:  # e.g. Ctrl-C in the main thread: stop the ranks at their next collective
        group.abort()
        raise
    failures = [e for e in errors if e is not None]
    if failures:
        primary = [e for e in failures if not isinstance(e, threading.BrokenBarrierError)]
        raise (primary or failures)[0]
    return results


# ----------------------------------------------------------------------------
# A rank's replica of the network
# ----------------------------------------------------------------------------


class RankNetwork(_demo.Network):
    """One rank's replica of the demo's network in data-parallel training.

    Its batch is the rank's shard (``per_rank_batch`` examples); the dense
    layers' gradients and the loss are summed over every rank's shard, and the
    updates divide by the whole batch, so every replica takes the same step.

    Args:
        rng: generator for the initial weights (the same seed on every rank).
        comm: this rank's communicator.
        bn: ``"per_rank_bn"`` (a BatchNormLayer per rank), ``"sync_bn"``
            (SyncBatchNormLayer), or None (no batch norm).
        per_rank_batch: examples per rank and step.
        eval_batch: size of the evaluation set.
    """

    def __init__(self, rng: np.random.Generator, comm: Any, bn: Optional[str], per_rank_batch: int,
                 eval_batch: int = _demo.TEST_SIZE) -> None:
        if bn not in (PER_RANK_BN, SYNC_BN, None):
            raise ValueError(f"bn must be {PER_RANK_BN!r}, {SYNC_BN!r} or None, got {bn!r}")
        self.comm = comm
        self.bn_mode = bn
        super().__init__(rng, bn is not None, batch=per_rank_batch, eval_batch=eval_batch)
        self.update_batch = per_rank_batch * comm.size
        for d in self.dense:
            d.sum_product = functools.partial(sharded_matmul, comm=comm)
            d.sum_columns = functools.partial(sharded_column_sums, comm=comm)

    def make_bn(self, width: int) -> Any:
        """A SyncBatchNormLayer over ``comm`` (collective), or a BatchNormLayer of this rank's batch."""
        if self.bn_mode == SYNC_BN:
            return SyncBatchNormLayer(self.batch, 1, 1, width, self.comm, momentum=self.bn_momentum)
        return BatchNormLayer(self.batch, 1, 1, width, momentum=self.bn_momentum)

    def mean_loss(self, losses: np.ndarray) -> float:
        """The mean loss over every rank's shard (gathered, exactly summed): the same on every rank."""
        rows = np.asarray(self.comm.allgather(losses.astype(np.float64)))
        return math.fsum(rows.ravel().tolist()) / rows.size

    def before_update(self) -> None:
        """Per-rank batch norm: average the scale and bias updates over the ranks (rank order, float64)."""
        if self.bn_mode != PER_RANK_BN:
            return
        local = np.concatenate([np.concatenate([bn.bias_updates, bn.scale_updates]) for bn in self.bn])
        rows = np.asarray(self.comm.allgather(local.astype(np.float64)))
        total = rows[0].copy()
        for r in range(1, rows.shape[0]):
            total += rows[r]
        mean = (total / rows.shape[0]).astype(np.float32)
        at = 0
        for bn in self.bn:
            c = bn.bias_updates.shape[0]
            bn.bias_updates[:] = mean[at:at + c]
            bn.scale_updates[:] = mean[at + c:at + 2 * c]
            at += 2 * c


# ----------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------


@dataclass
class ParallelRunResult(_demo.RunResult):
    """A data-parallel run: a :class:`darknet_bn.demo.RunResult` and how it was split."""

    mode: str = SINGLE_PROCESS
    ranks: int = 1
    per_rank_batch: int = 0
    global_batch: int = 0

    def to_json(self) -> Dict[str, Any]:
        doc = {"name": self.name, "mode": self.mode, "ranks": self.ranks, "per_rank_batch": self.per_rank_batch,
               "global_batch": self.global_batch}
        doc.update((k, v) for k, v in super().to_json().items() if k != "name")
        doc["last_quarter_mean_test_accuracy"] = _demo._finite(self.tail_accuracy, 6)
        return doc

    @property
    def tail_accuracy(self) -> float:
        """Mean test accuracy over the evaluations in the last quarter of the steps (less noisy than the last)."""
        last = self.steps[-1]
        tail = [a for s, a in zip(self.steps, self.test_accuracy) if s >= 0.75 * last and s > 0]
        return float(np.mean(tail)) if tail else self.final_accuracy


def parallel_run_name(mode: str, per_rank_batch: int, ranks: int = RANKS) -> str:
    """E.g. ``"per-rank BN, 4x2"``, ``"SyncBN, 4x2"``, ``"one process, 8"``."""
    if mode == SINGLE_PROCESS:
        return f"one process, {ranks * per_rank_batch}"
    return f"{'SyncBN' if mode == SYNC_BN else 'per-rank BN'}, {ranks}x{per_rank_batch}"


def train_parallel_run(
    data: _demo.Dataset,
    mode: str,
    per_rank_batch: int,
    steps: int,
    eval_every: int,
    seed: int = 0,
    ranks: int = RANKS,
    learning_rate: float = LEARNING_RATE,
    progress: bool = False,
    batch_norm: bool = True,
) -> ParallelRunResult:
    """Trains one network by data-parallel SGD (or in one process) and evaluates it along the way.

    The global batch of step s is the one a single process with batch
    ``ranks * per_rank_batch`` draws (:func:`darknet_bn.demo.batch_indices`,
    same seed); rank r trains on its r-th slice. Rank 0 evaluates.

    Args:
        data: the dataset.
        mode: one of :data:`MODES`.
        per_rank_batch: examples per rank and step.
        steps, eval_every, seed: as :func:`darknet_bn.demo.train_run`.
        ranks: number of thread ranks (1 process for ``single_process``).
        learning_rate: Darknet-convention learning rate.
        progress: show a tqdm progress bar.
        batch_norm: False trains the network without batch norm (every mode
            is then the same arithmetic: a test of the gradient reduction).

    Returns:
        The :class:`ParallelRunResult`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if steps < 1 or eval_every < 1 or per_rank_batch < 1 or ranks < 1:
        raise ValueError("steps, eval_every, per_rank_batch and ranks must be >= 1")
    global_batch = ranks * per_rank_batch
    name = parallel_run_name(mode, per_rank_batch, ranks)
    if not batch_norm:
        name += ", no BN"
    if mode == SINGLE_PROCESS:
        base = _demo.train_run(data, batch_norm, learning_rate, steps, eval_every, seed, progress,
                               batch=global_batch, name=name)
        fields = {k: getattr(base, k) for k in base.__dataclass_fields__}
        return ParallelRunResult(**fields, mode=mode, ranks=1, per_rank_batch=global_batch,
                                 global_batch=global_batch)
    if global_batch < 2 and batch_norm:
        raise ValueError("batch norm needs a global batch of at least 2")
    result = ParallelRunResult(name, batch_norm, learning_rate, mode=mode, ranks=ranks,
                               per_rank_batch=per_rank_batch, global_batch=global_batch)
    init_seq, order_seq = _demo.run_seeds(seed)
    bar = _demo.progress_bar(name, steps, progress)

    def rank_main(comm: ThreadCommunicator) -> None:
        r = comm.rank
        net = RankNetwork(np.random.default_rng(init_seq), comm, mode if batch_norm else None, per_rank_batch,
                          eval_batch=data.x_test.shape[0])
        _demo.train_loop(net, data, learning_rate, steps, eval_every, order_seq, global_batch,
                         shard=slice(r * per_rank_batch, (r + 1) * per_rank_batch),
                         result=result if r == 0 else None, bar=bar if r == 0 else None)

    start = time.perf_counter()
    with _demo.single_threaded_blas():
        run_ranks(ranks, rank_main)
    result.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return result


def run_parallel(data: _demo.Dataset, steps: int, eval_every: int, seed: int = 0,
                 per_rank_batches: Sequence[int] = PER_RANK_BATCHES, progress: bool = True) -> List[ParallelRunResult]:
    """Every data-parallel run: for each per-rank batch, the three :data:`MODES`."""
    return [train_parallel_run(data, mode, b, steps, eval_every, seed, progress=progress)
            for b in per_rank_batches for mode in MODES]


# ----------------------------------------------------------------------------
# Comparison, JSON, table, figure
# ----------------------------------------------------------------------------


def compare_runs(a: _demo.RunResult, b: _demo.RunResult) -> Dict[str, Any]:
    """How far run ``a`` is from run ``b`` (same steps): identical losses, accuracy differences.

    Keys: ``identical_loss_steps`` (how many first steps have bit-identical
    training losses), ``first_loss_difference_step`` (None if none differs),
    ``max_abs_loss_difference``, ``max_abs_test_accuracy_difference`` (over
    every evaluation), ``final_test_accuracy_difference`` and
    ``last_quarter_mean_test_accuracy_difference`` (a - b).
    """
    n = min(len(a.losses), len(b.losses))
    same = 0
    while same < n and a.losses[same] == b.losses[same]:
        same += 1
    finite = [abs(x - y) for x, y in zip(a.losses, b.losses) if math.isfinite(x) and math.isfinite(y)]
    acc = [abs(x - y) for x, y in zip(a.test_accuracy, b.test_accuracy)]
    tail = getattr(a, "tail_accuracy", a.final_accuracy) - getattr(b, "tail_accuracy", b.final_accuracy)
    return {
        "identical_loss_steps": same,
        "first_loss_difference_step": None if same == n else same + 1,
        "max_abs_loss_difference": _demo._finite(max(finite, default=0.0), 8),
        "max_abs_test_accuracy_difference": _demo._finite(max(acc, default=0.0), 6),
        "final_test_accuracy_difference": _demo._finite(a.final_accuracy - b.final_accuracy, 6),
        "last_quarter_mean_test_accuracy_difference": _demo._finite(tail, 6),
    }


def _by_batch(runs: Sequence[ParallelRunResult]) -> Dict[int, Dict[str, ParallelRunResult]]:
    """The runs keyed by per-rank batch (of the sharded runs) then mode."""
    table: Dict[int, Dict[str, ParallelRunResult]] = {}
    for r in runs:
        per_rank = r.global_batch // RANKS if r.mode == SINGLE_PROCESS else r.per_rank_batch
        table.setdefault(per_rank, {})[r.mode] = r
    return table


def comparisons(runs: Sequence[ParallelRunResult]) -> List[Dict[str, Any]]:
    """For each per-rank batch: SyncBN and per-rank BN, each against the one process."""
    out = []
    for b, modes in sorted(_by_batch(runs).items()):
        single = modes.get(SINGLE_PROCESS)
        if single is None:
            continue
        entry: Dict[str, Any] = {"per_rank_batch": b, "global_batch": single.global_batch}
        for mode in (SYNC_BN, PER_RANK_BN):
            if mode in modes:
                entry[f"{mode}_vs_single_process"] = compare_runs(modes[mode], single)
        out.append(entry)
    return out


def results_section(runs: Sequence[ParallelRunResult], steps: int, eval_every: int) -> Dict[str, Any]:
    """The ``data_parallel`` section of results.json: its settings, the runs and the comparisons."""
    return {
        "config": {
            "ranks": RANKS,
            "ranks_are": "threads of one process, darknet_bn.demo_parallel.ThreadCommunicator (rank-order sums)",
            "per_rank_batches": sorted({r.per_rank_batch for r in runs if r.mode != SINGLE_PROCESS}),
            "modes": {
                PER_RANK_BN: "darknet_bn.BatchNormLayer per rank: each rank's shard statistics; scale and bias "
                             "updates averaged over ranks; evaluation with rank 0's rolling statistics",
                SYNC_BN: "darknet_bn.distributed.SyncBatchNormLayer: statistics of the whole batch on every rank",
                SINGLE_PROCESS: "darknet_bn.BatchNormLayer on the whole batch of ranks x per-rank batch",
            },
            "dense_gradients": "summed over every rank's shard by darknet_bn._exact.sharded_matmul (one "
                               "allreduce_sum, correctly rounded: bit for bit the one process's sum)",
            "learning_rate": LEARNING_RATE,
            "steps": steps,
            "eval_every": eval_every,
        },
        "runs": [r.to_json() for r in runs],
        "comparisons": comparisons(runs),
    }


def format_table(runs: Sequence[ParallelRunResult]) -> str:
    """The data-parallel table, and one line per per-rank batch comparing SyncBN with the one process."""
    head = (f"{'data-parallel run':<22} {'per-rank batch':>14} {'global batch':>12} {'final test acc':>14} "
            f"{'last-quarter mean':>17} {'steps to 90%':>12}")
    lines = [head, "-" * len(head)]
    for r in runs:
        reach = r.steps_to(_demo.TARGET_ACCURACY)
        per_rank = "-" if r.mode == SINGLE_PROCESS else str(r.per_rank_batch)
        lines.append(
            f"{r.name:<22} {per_rank:>14} {r.global_batch:>12} {100 * r.final_accuracy:>13.1f}% "
            f"{100 * r.tail_accuracy:>16.1f}% {('never' if reach is None else str(reach)):>12}"
        )
    for entry in comparisons(runs):
        sync = entry.get(f"{SYNC_BN}_vs_single_process")
        if sync is None:
            continue
        if sync["first_loss_difference_step"] is None:
            same = "bit-identical losses at every step"
        else:
            same = (f"bit-identical losses for the first {sync['identical_loss_steps']} steps, then within "
                    f"{sync['max_abs_loss_difference']:.1e}")
        gap = sync["max_abs_test_accuracy_difference"]
        acc = ("the same test accuracy at every evaluation" if gap == 0 else
               f"test accuracy within {100 * gap:.1f} points at every evaluation")
        lines.append(f"SyncBN vs one process, per-rank batch {entry['per_rank_batch']}: {same}; {acc}")
    return "\n".join(lines)


_MODE_STYLE = {
    SINGLE_PROCESS: dict(color="0.55", lw=3.2, alpha=0.6, ls="-"),
    SYNC_BN: dict(color="tab:red", lw=1.3, alpha=1.0, ls="--"),
    PER_RANK_BN: dict(color="tab:blue", lw=1.3, alpha=1.0, ls="-"),
}
_MODE_SHORT = {SINGLE_PROCESS: "one process", SYNC_BN: "SyncBN", PER_RANK_BN: "per-rank BN"}
_MODE_LABEL = {
    SINGLE_PROCESS: "one process, whole batch",
    SYNC_BN: "SyncBN (SyncBatchNormLayer)",
    PER_RANK_BN: "per-rank BN (BatchNormLayer per rank)",
}


def plot(runs: Sequence[ParallelRunResult], path: Path) -> None:
    """data_parallel.png: test accuracy against steps, one panel per per-rank batch, the three modes in each."""
    plt = _demo._pyplot()
    table = _by_batch(runs)
    fig, axes = plt.subplots(1, len(table), figsize=(4.2 * len(table), 4.4), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (b, modes) in zip(axes, sorted(table.items())):
        notes = []
        for mode in (SINGLE_PROCESS, SYNC_BN, PER_RANK_BN):
            r = modes.get(mode)
            if r is None:
                continue
            ax.plot(r.steps, r.test_accuracy, label=_MODE_LABEL[mode], **_MODE_STYLE[mode])
            notes.append(f"{_MODE_SHORT[mode]:<12} {100 * r.tail_accuracy:5.1f}%")
        ax.axhline(_demo.TARGET_ACCURACY, color="0.5", lw=1, ls=":", zorder=0)
        ax.text(0.97, 0.04, "mean, last quarter of steps\n" + "\n".join(notes), transform=ax.transAxes, ha="right",
                va="bottom", multialignment="left", fontsize=8.5, family="monospace",
                bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="0.8", alpha=0.9))
        ax.set_title(f"{RANKS} ranks x {b} examples (global batch {RANKS * b})", fontsize=11)
        ax.set_xlabel("training steps")
        ax.set_ylim(0, 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"Data-parallel training on MNIST, {RANKS} simulated ranks (lr={LEARNING_RATE:g})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
