"""Correctly rounded float32 arithmetic for the demo (``darknet_bn.demo``).

Every function returns, for float32 inputs, the float32 nearest to the exact
value of its formula, so its results are a function of the inputs alone: not
of the BLAS kernel, its thread count or NumPy's SIMD level. A float64
approximation with a proven error bound is rounded to float32; the rare entries
whose bound straddles a rounding boundary are computed exactly (``math.fsum``,
60-digit ``decimal``). Assumes IEEE 754 float64, a BLAS ``dgemm`` that is the
classical algorithm (any order, with or without FMA), and NumPy's float64
``exp``/``log`` within :data:`FLOAT64_MATH_ERROR`.
"""
from __future__ import annotations

import decimal
import math
from fractions import Fraction
from typing import Any, List, Tuple

import numpy as np

UNIT_ROUNDOFF = 2.0 ** -53
"""Relative rounding error of one float64 operation."""

FLOAT64_MATH_ERROR = 2.0 ** -46
"""Assumed bound on the relative error of NumPy's float64 ``exp`` and ``log``.

Every implementation NumPy dispatches to (scalar libm, AVX2, AVX-512) is
accurate to a few float64 ulps (2^-52 each); this allows 128 of them.
"""

EXACT_DIGITS = 60
"""Decimal digits of the exact fallback (``decimal``): far more than float32's rounding needs."""

_INF32 = np.float32(np.inf)
FLOAT32_MAX = float(np.finfo(np.float32).max)
_FEW = 4  # up to this many ambiguous entries of a product are summed one by one


def _round_unambiguous(approx: np.ndarray, bound: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rounds ``approx`` to float32 where every value within ``bound`` of it rounds the same way.

    ``approx`` is a float64 approximation of exact values ``x`` with
    ``|approx - x| <= bound``. Where ``approx - bound`` and ``approx + bound``
    round to the same float32, so does ``x`` (rounding is monotonic): that
    float32 is the correctly rounded ``x``, however ``approx`` was computed.
    Returns it, and a mask of the entries where the interval straddles a
    rounding boundary, which the caller computes exactly. Non-finite
    ``approx`` (from NaN or Inf inputs) is rounded as it is and not masked.
    Overwrites ``bound``.
    """
    high = (approx + bound).astype(np.float32)
    low = np.subtract(approx, bound, out=bound).astype(np.float32)  # bound is not needed any more
    ambiguous = low != high  # NaN != NaN: masked, then unmasked below
    if ambiguous.any():
        nonfinite = ~np.isfinite(approx)
        if nonfinite.any():
            low[nonfinite] = approx[nonfinite].astype(np.float32)
            ambiguous &= ~nonfinite
    return low, ambiguous


_OVERFLOW32 = Fraction(2**128 - 2**103)  # halfway between float32's largest and 2^128: rounds to infinity


def _float32_nearest(x: Fraction) -> np.float32:
    """The float32 nearest to the rational ``x`` (ties to even; infinity from 2^128 - 2^103 on)."""
    if abs(x) >= _OVERFLOW32:
        return np.float32(math.copysign(math.inf, x))
    with np.errstate(over="ignore"):
        guess = np.float32(float(x))  # float() rounds once; float32() may round a second time
        if not np.isfinite(guess):
            guess = np.float32(math.copysign(FLOAT32_MAX, x))
        neighbours = (np.nextafter(guess, -_INF32), np.nextafter(guess, _INF32))
    best = guess
    for cand in neighbours:
        if not np.isfinite(cand):
            continue
        d_cand, d_best = abs(Fraction(float(cand)) - x), abs(Fraction(float(best)) - x)
        if d_cand < d_best or (d_cand == d_best and int(cand.view(np.uint32)) % 2 == 0):
            best = cand
    return best


def _float32_of_sum(terms: List[float]) -> np.float32:
    """The float32 nearest to the exact sum of the finite float64 ``terms`` (ties to even)."""
    total = math.fsum(terms)  # the float64 nearest to the exact sum
    if not abs(total) < FLOAT32_MAX:  # near or past float32's range: exactly, slowly
        return _float32_nearest(sum((Fraction(t) for t in terms), Fraction(0)))
    rounded = np.float32(total)
    if float(rounded) == total:
        return rounded
    other = np.nextafter(rounded, np.float32(math.copysign(math.inf, total - float(rounded))))
    if (float(rounded) + float(other)) / 2 != total:
        # total is not halfway between two float32s, and the exact sum lies
        # within half a float64 ulp of it: both round to the same float32.
        return rounded
    rest = math.fsum(terms + [-total])  # the sign of (exact sum - total) breaks the tie
    if rest > 0:
        return max(rounded, other)
    if rest < 0:
        return min(rounded, other)
    return rounded


def _quantum_exponents(x: np.ndarray, axis: int) -> np.ndarray:
    """Along ``axis``, the least exponent e such that every float32 in ``x`` is a multiple of 2^e.

    (Zeros count as multiples of anything.) Products of such numbers are
    multiples of 2^(e_a + e_b); a sum of them whose magnitude stays below
    2^(53 + e_a + e_b) is exact in float64 in any order.
    """
    mant, exp = np.frexp(x.astype(np.float64))
    m = np.abs(mant * 2.0 ** 24).astype(np.int64)  # the 24-bit integer significand
    low_bit = np.frexp((m & -m).astype(np.float64))[1] - 1  # its trailing zeros
    e = np.where(m != 0, exp - 24 + low_bit, 1 << 20)
    return e.min(axis=axis)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The float32 matrix product ``a @ b``, every entry correctly rounded from the exact sum.

    Each entry is the float32 nearest to the exact ``sum_k a[i, k] * b[k, j]``
    (ties to even), so it does not depend on the BLAS, its kernel, its thread
    count or its summation order. How: float32 products are exact in float64,
    so a float64 ``a @ b`` by any BLAS (any order, with or without FMA) is
    within ``(K - 1) u S`` of the exact sum, ``S = sum_k |a_ik b_kj|`` and
    ``u`` = 2^-53; ``S`` itself comes from a float32 ``|a| @ |b|`` (relative
    error below ``K`` 2^-24, plus underflow), and the bound used is four times
    that. Where the interval straddles a float32 rounding boundary, the entry
    is either shown exact (every partial sum is a multiple of the products'
    common power of two and below 2^53 times it: inputs of few significant
    bits, such as the digits' pixels, make exact ties) or summed exactly with
    ``math.fsum``.

    Args:
        a: (n, K) float32.
        b: (K, m) float32.

    Returns:
        (n, m) float32.
    """
    k = a.shape[1]
    approx = a.astype(np.float64) @ b.astype(np.float64)
    # S <= (S32 + underflow) (1 + 2 K 2^-24), S32 = |a| @ |b| in float32; 2^-125 a term covers
    # a BLAS that flushes subnormals to zero.
    s_max = np.multiply(np.abs(a) @ np.abs(b), 1.0 + 2.0 * k * 2.0**-24, dtype=np.float64)
    s_max += k * 2.0**-124
    out, ambiguous = _round_unambiguous(approx, s_max * (4.0 * (k + 2) * UNIT_ROUNDOFF))
    if not ambiguous.any():
        return out
    rows, cols = np.nonzero(ambiguous)
    if len(rows) > _FEW:  # many: most are exact ties, shown exact at once
        q = _quantum_exponents(a[rows], axis=1) + _quantum_exponents(b[:, cols], axis=0)
        exact = s_max[rows, cols] < np.ldexp(1.0, np.minimum(q + 53, 1000))
        out[rows[exact], cols[exact]] = approx[rows[exact], cols[exact]].astype(np.float32)
        rows, cols = rows[~exact], cols[~exact]
    if len(rows):
        products = np.multiply(a[rows, :], b[:, cols].T, dtype=np.float64)  # exact
        for i, j, terms in zip(rows.tolist(), cols.tolist(), products.tolist()):
            out[i, j] = _float32_of_sum(terms)
    return out


def sharded_matmul(a: np.ndarray, b: np.ndarray, comm: Any) -> np.ndarray:
    """:func:`matmul` of a product whose inner dimension is split over the ranks of ``comm``.

    Rank r holds ``a_r`` (n, k_r) and ``b_r`` (k_r, m), the columns of A and
    the rows of B it owns (A = [a_0 | a_1 | ...], B = [b_0; b_1; ...]), and
    every rank gets the float32 nearest to the exact ``sum over all K`` (ties
    to even): bit for bit ``matmul(A, B)`` on the concatenation, whatever the
    split, the BLAS, or the order in which ``comm`` adds. This is how the
    data-parallel demo sums a gradient over a batch split across ranks.

    ``comm`` needs ``size``, ``allreduce_sum`` and ``allgather`` of 1-D
    float64 arrays (:class:`darknet_bn.distributed.Communicator`), and must
    give every rank the same bits from ``allreduce_sum``. Every rank calls
    this collectively with the same n and m; entries must be finite.

    How: each rank sends its float64 ``a_r @ b_r`` and an upper bound of
    ``S_r = sum_k |a_ik b_kj|`` over its own k (as :func:`matmul`), and one
    ``allreduce_sum`` adds them. Each rank's float64 product is within
    ``(k_r - 1) u S_r`` of its exact part, adding P of them costs at most
    ``(P - 1) u`` times the sum of their magnitudes, so the total is within
    ``(K + P) u S`` of the exact sum (u = 2^-53); four times that bound is
    used, as in :func:`matmul`. Entries whose interval straddles a float32
    rounding boundary (the same on every rank, since they follow from the
    reduced values) take one ``allgather`` of every rank's quantum exponent
    (see :func:`_quantum_exponents`: the sums of few-bit or zero data are
    exact, the common case) and, for any left, one ``allgather`` of the
    ranks' exact float64 products, summed exactly (:func:`_float32_of_sum`).

    Args:
        a: (n, k_r) float32, this rank's columns of A (k_r may be 0).
        b: (k_r, m) float32, this rank's rows of B.
        comm: the communicator.

    Returns:
        (n, m) float32, the same on every rank.
    """
    n, k = a.shape
    m = b.shape[1]
    if b.shape[0] != k:
        raise ValueError(f"a is {a.shape} and b is {b.shape}: the inner sizes differ")
    size = int(comm.size)
    approx = a.astype(np.float64) @ b.astype(np.float64)
    s_max = np.multiply(np.abs(a) @ np.abs(b), 1.0 + 2.0 * k * 2.0**-24, dtype=np.float64)
    s_max += k * 2.0**-124
    nm = n * m
    payload = np.empty(2 * nm + 1, np.float64)
    payload[:nm] = approx.ravel()
    payload[nm:2 * nm] = s_max.ravel()
    payload[-1] = k
    total = np.asarray(comm.allreduce_sum(payload), np.float64)
    approx = total[:nm].reshape(n, m)
    s_sum = total[nm:2 * nm].reshape(n, m)
    # The adds of the allreduce may round the bounds' sum down by (P - 1) u: 1 + 2^-40 covers it.
    inflate = 1.0 + 2.0**-40
    k_all = float(total[-1])  # integers: exact
    out, ambiguous = _round_unambiguous(approx, s_sum * (inflate * 4.0 * (k_all + size + 2) * UNIT_ROUNDOFF))
    if not ambiguous.any():
        return out
    rows, cols = np.nonzero(ambiguous)
    if k:
        q = _quantum_exponents(a[rows], axis=1) + _quantum_exponents(b[:, cols], axis=0)
    else:
        q = np.full(len(rows), 1 << 21)
    # Every partial sum anywhere (inside a rank's BLAS, or across ranks) is a multiple of
    # 2^q for the least q over the ranks, and at most S in magnitude: exact below 2^(q + 53).
    gathered = np.asarray(comm.allgather(np.concatenate([[float(k)], q.astype(np.float64)])))
    q_all = gathered[:, 1:].min(axis=0)
    exact = s_sum[rows, cols] * inflate < np.ldexp(1.0, np.minimum(q_all + 53, 1000).astype(np.int64))
    out[rows[exact], cols[exact]] = approx[rows[exact], cols[exact]].astype(np.float32)
    rows, cols = rows[~exact], cols[~exact]
    if not len(rows):
        return out
    k_max = int(gathered[:, 0].max())
    products = np.zeros((len(rows), k_max), np.float64)  # zero padding adds nothing to an exact sum
    products[:, :k] = np.multiply(a[rows, :], b[:, cols].T, dtype=np.float64)  # exact
    terms = np.asarray(comm.allgather(products.ravel())).reshape(size, len(rows), k_max)
    for e, (i, j) in enumerate(zip(rows.tolist(), cols.tolist())):
        out[i, j] = _float32_of_sum(terms[:, e, :].ravel().tolist())
    return out


def sharded_column_sums(x: np.ndarray, comm: Any) -> np.ndarray:
    """:func:`column_sums` of an (n, m) array whose rows are split over the ranks of ``comm``.

    Rank r passes its (n_r, m) rows; every rank gets the correctly rounded sum
    over all rows, bit for bit :func:`column_sums` of the concatenation
    (:func:`sharded_matmul` of a row of ones).
    """
    return sharded_matmul(np.ones((1, x.shape[0]), np.float32), x, comm)[0]


def column_sums(x: np.ndarray) -> np.ndarray:
    """Sums over the rows of a float32 (n, m) array, each correctly rounded to float32 (as :func:`matmul`)."""
    x64 = x.astype(np.float64)
    approx = x64.sum(axis=0)
    bound = np.abs(x64).sum(axis=0) * (4.0 * (x.shape[0] + 2) * UNIT_ROUNDOFF)
    out, ambiguous = _round_unambiguous(approx, bound)
    for j in np.flatnonzero(ambiguous):
        out[j] = _float32_of_sum(x64[:, j].tolist())
    return out


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function ``1 / (1 + exp(-z))``, correctly rounded to float32.

    Evaluated in float64 with NumPy's ``exp``; entries whose float32 rounding
    that cannot settle (see :data:`FLOAT64_MATH_ERROR`) are recomputed with
    :data:`EXACT_DIGITS`-digit decimals.
    """
    z64 = np.asarray(z, np.float64)
    with np.errstate(over="ignore"):
        approx = np.exp(np.negative(z64))
    approx += 1.0
    np.reciprocal(approx, out=approx)
    out, ambiguous = _round_unambiguous(approx, approx * (4 * FLOAT64_MATH_ERROR))
    if ambiguous.any():
        with decimal.localcontext() as ctx:
            ctx.prec = EXACT_DIGITS
            for idx in zip(*np.nonzero(ambiguous)):
                s = 1 / (1 + (-decimal.Decimal(float(z64[idx]))).exp())
                out[idx] = _float32_nearest(Fraction(s))
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, k) float32 logits, correctly rounded to float32 (as :func:`sigmoid`)."""
    z64 = np.asarray(z, np.float64)
    d = z64 - z64.max(axis=1, keepdims=True)
    e = np.exp(d)
    approx = e / e.sum(axis=1, keepdims=True)
    # exp(d) is off by |d| u from d's rounding plus exp's own error; the sum
    # adds k u; the division u. Doubled.
    rel = 2 * (np.abs(d).max(axis=1, keepdims=True) * (2 * UNIT_ROUNDOFF)
               + 2 * FLOAT64_MATH_ERROR + (z.shape[1] + 2) * UNIT_ROUNDOFF)
    out, ambiguous = _round_unambiguous(approx, approx * rel)
    if ambiguous.any():
        with decimal.localcontext() as ctx:
            ctx.prec = EXACT_DIGITS
            for i, j in zip(*np.nonzero(ambiguous)):
                row = [decimal.Decimal(float(v)) for v in z64[i]]
                top = max(row)
                exps = [(v - top).exp() for v in row]
                out[i, j] = _float32_nearest(Fraction(exps[j] / sum(exps)))
    return out


def neg_log(p: np.ndarray) -> np.ndarray:
    """``-log(p)`` of positive float32 values, correctly rounded to float32 (as :func:`sigmoid`)."""
    p64 = np.asarray(p, np.float64)
    approx = -np.log(p64)
    out, ambiguous = _round_unambiguous(approx, np.abs(approx) * (2 * FLOAT64_MATH_ERROR))
    if ambiguous.any():
        with decimal.localcontext() as ctx:
            ctx.prec = EXACT_DIGITS
            for idx in zip(*np.nonzero(ambiguous)):
                out[idx] = _float32_nearest(-Fraction(decimal.Decimal(float(p64[idx])).ln()))
    return out


