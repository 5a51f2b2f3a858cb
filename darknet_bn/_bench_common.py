"""Measurement helpers shared by the benchmark's sections (:mod:`darknet_bn.bench`).

Timing (:func:`calibrate`, :func:`sample`, :func:`interleaved`), thread
settings (:func:`set_threads`, :func:`default_threads`), the benchmark data
(:func:`make_data`), the agreement measure (:func:`scaled_diff`) and the
formatting of times, sizes and shapes. Nothing here imports torch: callers
pass the module in (``None`` when it is not used).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import darknet_bn
from darknet_bn import _cli

Shape = Tuple[int, int, int, int]
#: ``progress(amount, text)``: advance the progress bar by ``amount`` cells and show ``text``.
Progress = Callable[[float, str], None]

EPS = 1e-5
STD_MOMENTUM = 0.1
#: Largest agreement error, scaled by max(1, max |reference array|), that counts as agreeing.
AGREE_TOL = 1e-3
#: Pause between peers so a peer's idle worker threads (OpenMP spin-waits) stop competing.
SETTLE_S = 0.001


def no_progress(amount: float, text: str) -> None:
    """A :data:`Progress` that shows nothing."""


# --------------------------------------------------------------------------- threads


def usable_cores() -> int:
    """The number of cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(usable: Optional[int] = None) -> List[int]:
    """1, 2 and all usable cores, deduplicated, sorted, none above the usable cores or darknet_bn's limit."""
    n = usable_cores() if usable is None else usable
    top = max(1, min(n, _cli.MAX_THREADS))
    return sorted({t for t in (1, 2, top) if t <= top})


def set_threads(n: int, torch: Any) -> None:
    """Give darknet_bn and torch the same thread count."""
    darknet_bn.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------- data and agreement


def make_data(shape: Shape, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Input x (mean 0.5, std 2), delta dy, gamma and beta for ``shape``, float32."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 2.0
    x += 0.5
    dy = rng.standard_normal(shape, dtype=np.float32)
    gamma = (1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(c)).astype(np.float32)
    return x, dy, gamma, beta


def scaled_diff(got: Any, want: Any) -> float:
    """max |got - want| / max(1, max |want|), in float64; inf on a shape mismatch or NaN."""
    g = np.asarray(got, np.float64).reshape(-1)
    w = np.asarray(want, np.float64).reshape(-1)
    if g.shape != w.shape:
        return float("inf")
    d = float(np.max(np.abs(g - w))) if g.size else 0.0
    if not np.isfinite(d):
        return float("inf")
    return d / max(1.0, float(np.max(np.abs(w))) if w.size else 1.0)


# --------------------------------------------------------------------------- timing


def _timed(fn: Callable[[], None], inner: int) -> float:
    """Seconds per call of ``fn`` over ``inner`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def sample(fn: Callable[[], None], inner: int, before: Optional[Callable[[], None]] = None) -> float:
    """Seconds per call of ``fn`` over ``inner`` calls; with ``before``, each call follows an untimed ``before()``."""
    if before is None:
        return _timed(fn, inner)
    total = 0.0
    clock = time.perf_counter
    for _ in range(inner):
        before()
        t0 = clock()
        fn()
        total += clock() - t0
    return total / inner


def calibrate(fn: Callable[[], None], min_time: float, max_inner: int = 100_000) -> int:
    """How many back-to-back calls make one sample last at least ``min_time`` seconds."""
    inner = 1
    while True:
        t = _timed(fn, inner) * inner
        if t >= min_time or inner >= max_inner:
            return inner
        inner = min(max_inner, max(inner * 2, int(inner * 1.2 * min_time / max(t, 1e-9)) + 1))


def settle_tuning(fn: Callable[[], None], max_calls: int = 32) -> None:
    """Call ``fn`` while it advances the library's trials (docs/reference.md §5).

    The first calls of each kind of pass, size and thread count time plain
    against streaming stores, then channel-group sizes; samples taken during
    those trials would mix them. Stops when no trial is left or a call of
    ``fn`` advanced none (so a callable that makes no trial, PyTorch's or
    NumPy's, costs one call).
    """
    def trials() -> Dict[Tuple[str, int, int], int]:
        return {(d["pass"], d["bytes_at_least"], d["threads"]): d["trial_calls"]
                for d in darknet_bn.info()["tuning"]["stream_decisions"]
                if d["choice"] == "trying" or d["group_kb"] == "trying"}

    before = trials()
    for _ in range(max_calls):
        if not before:
            return
        fn()
        after = trials()
        if all(after.get(k) == v for k, v in before.items()) and after.keys() <= before.keys():
            return
        before = after


#: Fewest repetitions a budget chooses: a median of 3 is the middle sample,
#: which two disturbed samples out of three make (a 103 MB cell once read
#: 129 ms where 7 repetitions gave 52 ms).
MIN_REPS = 5


def rep_count(reps: Optional[int], budget: float, one_rep: float, max_reps: int) -> int:
    """``reps`` if given, else as many repetitions of ``one_rep`` seconds as fit in ``budget``.

    Between ``MIN_REPS`` and ``max_reps``.
    """
    if reps is not None:
        return reps
    return int(min(max_reps, max(MIN_REPS, budget // max(one_rep, 1e-9))))


def interleaved(
    fns: Dict[Any, Callable[[], None]],
    *,
    reps: Optional[int],
    min_time: float,
    budget: float,
    max_reps: int,
    progress: Progress,
    label: str,
    before: Optional[Callable[[], None]] = None,
    settle: float = SETTLE_S,
    weight: float = 1.0,
) -> Tuple[Dict[Any, Dict[str, Any]], int]:
    """Time each callable of ``fns`` (any hashable keys): warm-up, inner loop count, then repetitions interleaved.

    Each repetition runs every callable once, starting one further along each
    time (A B C, B C A, C A B, ...), so that none always follows the same one.

    With ``before``, every timed call follows an untimed ``before()`` and only
    the call is timed; the inner count then makes a sample (``before`` and the
    call) last ``min_time``. ``reps`` None: as many repetitions as fit in
    ``budget`` seconds (``MIN_REPS`` to ``max_reps``). Advances ``progress`` by
    ``weight`` cells in total. Returns ({name: {"s": median, "samples": [...], "inner": n}}, reps).
    """
    inner: Dict[Any, int] = {}
    one_rep = 0.0
    for name, fn in fns.items():
        if before is None:
            fn()
            settle_tuning(fn)
            inner[name] = calibrate(fn, min_time)
            one_rep += _timed(fn, inner[name]) * inner[name]
        else:
            pair = (lambda fn=fn: (before(), fn()))  # type: ignore[misc]
            pair()
            settle_tuning(pair)
            inner[name] = calibrate(pair, min_time)
            one_rep += _timed(pair, inner[name]) * inner[name]
    progress(0.2 * weight, f"{label} warm")
    n_reps = rep_count(reps, budget, one_rep, max_reps)
    samples: Dict[Any, List[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(n_reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            if settle and before is None:
                time.sleep(settle)
            samples[name].append(sample(fn, inner[name], before))
        progress(0.8 * weight / n_reps, f"{label} rep {r + 1}/{n_reps}")
    return ({name: {"s": statistics.median(v), "samples": v, "inner": inner[name]} for name, v in samples.items()},
            n_reps)


# --------------------------------------------------------------------------- formatting


def time_unit(s: float) -> Tuple[float, str]:
    """Seconds as (value, unit) in s, ms or us, whichever keeps the value at 1 or more (below 1 us: us)."""
    if s >= 1:
        return s, "s"
    if s >= 1e-3:
        return s * 1e3, "ms"
    return s * 1e6, "us"


def fmt_time(s: float) -> str:
    """A time per call with a unit that keeps 3-4 significant digits."""
    value, unit = time_unit(s)
    return f"{value:8.2f} us" if unit == "us" else f"{value:8.3f} {unit:2s}"


def fmt_size(megabytes: float) -> str:
    """``102.76`` -> "103 MB", ``0.26`` -> "262 KB"."""
    if megabytes >= 10:
        return f"{megabytes:.0f} MB"
    if megabytes >= 1:
        return f"{megabytes:.1f} MB"
    return f"{megabytes * 1e3:.2g} KB" if megabytes < 0.01 else f"{megabytes * 1e3:.0f} KB"


def shape_label(shape: Sequence[int]) -> str:
    """``(8, 32, 208, 208)`` -> "8x32x208x208"."""
    return "x".join(str(v) for v in shape)


def fmt_ratio(r: Optional[float]) -> str:
    """``3.0`` -> "   3.00x"; None -> "       -"."""
    return f"{r:7.2f}x" if r is not None else "       -"
