/*
 * rows.inc.h - the row primitives (see dnbn_rows in internal.h), written once
 * with GCC/Clang vector extensions and compiled twice: rows_generic.c for any
 * x86-64 (SSE2) or other CPU, rows_avx2.c under target("avx2,fma"). Include it
 * after defining ROWS(name), which gives each function its per-file suffix.
 *
 * Reductions keep 4 x 4 double lanes (16 floats per step) and add the lanes in
 * a fixed order; elementwise loops take 8 floats per step. Tails are scalar.
 * Contraction to FMA is off (-ffp-contract=off), so both builds round alike.
 * The helpers are static and inlined, so GCC's note on how 32-byte vectors
 * pass between functions without AVX does not apply (-Wno-psabi).
 */
#include <stdint.h>
#include <string.h>

/* A loop the phases compile into themselves: no call per row. */
#define ROWS_INLINE static inline __attribute__((always_inline))
/* A loop kept a function of its own, which GCC clones for a constant argument
 * (the spatial == 1 loops below: inlined into the phases, 8 loop bodies in
 * one function, they measured 4-7 % slower on 64x1024x1x1). */
#define ROWS_OUTLINE static __attribute__((noinline))

typedef float rv8f __attribute__((vector_size(32)));
typedef float rv4f __attribute__((vector_size(16)));
typedef double rv4d __attribute__((vector_size(32)));

static inline rv8f ROWS(ld8)(const float *p)
{
    rv8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void ROWS(st8)(float *p, rv8f v) { memcpy(p, &v, sizeof v); }

static inline rv4d ROWS(ld4d)(const float *p)
{
#ifdef ROWS_AVX2
    return (rv4d)_mm256_cvtps_pd(_mm_loadu_ps(p)); /* one vcvtps2pd: GCC splits the generic form */
#else
    rv4f v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, rv4d);
#endif
}

/* Software prefetch for the passes that read a tensor from memory first (the
 * statistics, the backward sums, the reduction kernels, and inference, whose
 * one pass reads from memory): one request per 64-byte line (per 32 bytes in
 * the inference loop), PREFETCH_AHEAD bytes ahead of the loads. The hardware
 * prefetchers alone left a single-threaded statistics pass at about half the
 * machine's read bandwidth on a 2-core Intel Xeon VM (8x32x208x208 training
 * forward: 10.3-11.5 ms without, 7.3-8.4 ms with); inference on one core took
 * 16.8 ms without and 15.7 ms with on 32x64x112x112, 4.1 and 3.7 ms on
 * 8x32x208x208 (medians of 3, alternating builds). The address is
 * formed as an integer: it may lie past the end of the row, which a prefetch
 * may touch (it never faults) but pointer arithmetic may not. */
#define ROWS_PREFETCH_AHEAD 2048

static inline void ROWS(prefetch)(const float *p)
{
    __builtin_prefetch((const void *)((uintptr_t)p + ROWS_PREFETCH_AHEAD));
}

typedef int32_t rv8i __attribute__((vector_size(32)));

static inline int ROWS(finite)(float v) { return v - v == 0.0f; }

/* Overflow safety of the float passes. They form x - mean in float, which
 * overflows when x and the mean lie far apart near the ends of the float32
 * range although the normalized value is finite. Such a lane comes out
 * non-finite (an infinity stays one or becomes NaN, and carries into
 * y = xn * gamma + beta), so each 8-lane step checks its last result, and a
 * step with a non-finite lane is computed again in double before it is stored
 * (in place, its input is still there). Finite results are never touched; a
 * lane that is non-finite in double too (NaN or infinite input, a true result
 * beyond float32) keeps that value. */
static inline int ROWS(any_nonfinite)(rv8f a)
{
    rv8f z = a - a; /* 0, or NaN where a is not finite */
    rv8i m = (rv8i)(z != z);
#ifdef ROWS_AVX2
    return _mm256_movemask_ps((__m256)m) != 0;
#else
    uint64_t w[4];
    memcpy(w, &m, sizeof w);
    return (w[0] | w[1] | w[2] | w[3]) != 0;
#endif
}

/* One value of a normalizing pass: xn = ((v - mh) - ml) * inv and
 * y = xn * gamma + beta in float, or in double if float overflowed. */
static inline void ROWS(norm1)(float v, float mh, float ml, float inv, float gamma, float beta, float *xn, float *y)
{
    float t = ((v - mh) - ml) * inv, u = t * gamma + beta;
    if (ROWS(finite)(t) && ROWS(finite)(u)) {
        *xn = t, *y = u;
        return;
    }
    double d = (((double)v - mh) - ml) * inv;
    *xn = (float)d;
    *y = (float)(d * gamma + beta);
}

static inline double ROWS(hsum)(rv4d a, rv4d b, rv4d c, rv4d d)
{
    rv4d s = (a + b) + (c + d);
    return (s[0] + s[1]) + (s[2] + s[3]);
}

static double ROWS(sum)(const float *x, idx_t n)
{
    rv4d a = {0}, b = {0}, c = {0}, d = {0};
    idx_t i = 0;
    for (; i + 16 <= n; i += 16) {
        ROWS(prefetch)(x + i);
        a += ROWS(ld4d)(x + i);
        b += ROWS(ld4d)(x + i + 4);
        c += ROWS(ld4d)(x + i + 8);
        d += ROWS(ld4d)(x + i + 12);
    }
    double t = 0;
    for (; i < n; i++) t += x[i];
    return ROWS(hsum)(a, b, c, d) + t;
}

static double ROWS(sum_sq_dev)(const float *x, idx_t n, float c0)
{
    const rv4d k = {c0, c0, c0, c0};
    rv4d a = {0}, b = {0}, c = {0}, d = {0};
    idx_t i = 0;
    for (; i + 16 <= n; i += 16) {
        ROWS(prefetch)(x + i);
        rv4d u = ROWS(ld4d)(x + i) - k, v = ROWS(ld4d)(x + i + 4) - k;
        rv4d w = ROWS(ld4d)(x + i + 8) - k, z = ROWS(ld4d)(x + i + 12) - k;
        a += u * u;
        b += v * v;
        c += w * w;
        d += z * z;
    }
    double t = 0;
    for (; i < n; i++) {
        double u = (double)x[i] - c0;
        t += u * u;
    }
    return ROWS(hsum)(a, b, c, d) + t;
}

static double ROWS(dot)(const float *p, const float *q, idx_t n)
{
    rv4d a = {0}, b = {0}, c = {0}, d = {0};
    idx_t i = 0;
    for (; i + 16 <= n; i += 16) {
        ROWS(prefetch)(p + i);
        ROWS(prefetch)(q + i);
        a += ROWS(ld4d)(p + i) * ROWS(ld4d)(q + i);
        b += ROWS(ld4d)(p + i + 4) * ROWS(ld4d)(q + i + 4);
        c += ROWS(ld4d)(p + i + 8) * ROWS(ld4d)(q + i + 8);
        d += ROWS(ld4d)(p + i + 12) * ROWS(ld4d)(q + i + 12);
    }
    double t = 0;
    for (; i < n; i++) t += (double)p[i] * q[i];
    return ROWS(hsum)(a, b, c, d) + t;
}

static double ROWS(dot_dev)(const float *p, const float *x, idx_t n, float c0)
{
    const rv4d k = {c0, c0, c0, c0};
    rv4d a = {0}, b = {0}, c = {0}, d = {0};
    idx_t i = 0;
    for (; i + 16 <= n; i += 16) {
        ROWS(prefetch)(p + i);
        ROWS(prefetch)(x + i);
        a += ROWS(ld4d)(p + i) * (ROWS(ld4d)(x + i) - k);
        b += ROWS(ld4d)(p + i + 4) * (ROWS(ld4d)(x + i + 4) - k);
        c += ROWS(ld4d)(p + i + 8) * (ROWS(ld4d)(x + i + 8) - k);
        d += ROWS(ld4d)(p + i + 12) * (ROWS(ld4d)(x + i + 12) - k);
    }
    double t = 0;
    for (; i < n; i++) t += (double)p[i] * ((double)x[i] - c0);
    return ROWS(hsum)(a, b, c, d) + t;
}

ROWS_INLINE void ROWS(sums_dev)(const float *p, const float *x, idx_t n, double k0, double *s, double *sd)
{
    const rv4d k = {k0, k0, k0, k0};
    rv4d a = {0}, b = {0}, c = {0}, d = {0};
    idx_t i = 0;
    for (; i + 16 <= n; i += 16) { /* two steps of 8 per prefetched line */
        ROWS(prefetch)(p + i);
        ROWS(prefetch)(x + i);
        for (idx_t h = i; h < i + 16; h += 8) {
            rv4d p0 = ROWS(ld4d)(p + h), p1 = ROWS(ld4d)(p + h + 4);
            a += p0;
            b += p1;
            c += p0 * (ROWS(ld4d)(x + h) - k);
            d += p1 * (ROWS(ld4d)(x + h + 4) - k);
        }
    }
    for (; i + 8 <= n; i += 8) {
        rv4d p0 = ROWS(ld4d)(p + i), p1 = ROWS(ld4d)(p + i + 4);
        a += p0;
        b += p1;
        c += p0 * (ROWS(ld4d)(x + i) - k);
        d += p1 * (ROWS(ld4d)(x + i + 4) - k);
    }
    double t = 0, u = 0;
    for (; i < n; i++) {
        t += p[i];
        u += (double)p[i] * ((double)x[i] - k0);
    }
    rv4d ab = a + b, cd = c + d;
    *s += ((ab[0] + ab[1]) + (ab[2] + ab[3])) + t;
    *sd += ((cd[0] + cd[1]) + (cd[2] + cd[3])) + u;
}

ROWS_INLINE void ROWS(shifted_sums)(const float *x, idx_t n, double k0, double *s1, double *s2)
{
    const rv4d k = {k0, k0, k0, k0};
    rv4d a = {0}, b = {0}, c = {0}, d = {0};
    idx_t i = 0;
    for (; i + 16 <= n; i += 16) { /* two steps of 8 per prefetched line */
        ROWS(prefetch)(x + i);
        for (idx_t h = i; h < i + 16; h += 8) {
            rv4d u = ROWS(ld4d)(x + h) - k, v = ROWS(ld4d)(x + h + 4) - k;
            a += u;
            b += v;
            c += u * u;
            d += v * v;
        }
    }
    for (; i + 8 <= n; i += 8) {
        rv4d u = ROWS(ld4d)(x + i) - k, v = ROWS(ld4d)(x + i + 4) - k;
        a += u;
        b += v;
        c += u * u;
        d += v * v;
    }
    double t = 0, q = 0;
    for (; i < n; i++) {
        double u = (double)x[i] - k0;
        t += u;
        q += u * u;
    }
    rv4d ab = a + b, cd = c + d;
    *s1 += ((ab[0] + ab[1]) + (ab[2] + ab[3])) + t;
    *s2 += ((cd[0] + cd[1]) + (cd[2] + cd[3])) + q;
}

static void ROWS(scale)(float *y, idx_t n, float s)
{
    const rv8f vs = {s, s, s, s, s, s, s, s};
    idx_t i = 0;
    for (; i + 8 <= n; i += 8) ROWS(st8)(y + i, ROWS(ld8)(y + i) * vs);
    for (; i < n; i++) y[i] *= s;
}

static void ROWS(shift)(float *y, idx_t n, float b)
{
    const rv8f vb = {b, b, b, b, b, b, b, b};
    idx_t i = 0;
    for (; i + 8 <= n; i += 8) ROWS(st8)(y + i, ROWS(ld8)(y + i) + vb);
    for (; i < n; i++) y[i] += b;
}

static void ROWS(normalize)(float *y, idx_t n, float mean, float inv)
{
    const rv8f vm = {mean, mean, mean, mean, mean, mean, mean, mean};
    const rv8f vi = {inv, inv, inv, inv, inv, inv, inv, inv};
    idx_t i = 0;
    for (; i + 8 <= n; i += 8) {
        rv8f t = (ROWS(ld8)(y + i) - vm) * vi;
        if (ROWS(any_nonfinite)(t)) {
            float lanes[8], unused;
            for (int j = 0; j < 8; j++) ROWS(norm1)(y[i + j], mean, 0.0f, inv, 1.0f, 0.0f, &lanes[j], &unused);
            t = ROWS(ld8)(lanes);
        }
        ROWS(st8)(y + i, t);
    }
    for (float unused; i < n; i++) ROWS(norm1)(y[i], mean, 0.0f, inv, 1.0f, 0.0f, &y[i], &unused);
}

/* Stores for the passes that write a whole tensor. With `stream` (large
 * tensors, the caller's choice) the AVX2 build writes with non-temporal
 * stores, which skip reading each line before overwriting it and keep the
 * output from evicting the input; the values are the same. Streaming needs the
 * outputs 32-byte aligned at the same index, which the layer's buffers are. */
static inline int ROWS(stream_ok)(int stream, const float *a, const float *b, const float *c)
{
#ifdef ROWS_AVX2
    if (!stream) return 0; /* most rows: nothing to look at */
    uintptr_t first = (uintptr_t)(a ? a : b ? b : c) & 31;
    return (!a || ((uintptr_t)a & 31) == first) && (!b || ((uintptr_t)b & 31) == first) &&
           (!c || ((uintptr_t)c & 31) == first) && (first & 3) == 0;
#else
    (void)stream, (void)a, (void)b, (void)c;
    return 0;
#endif
}

static inline int ROWS(aligned32)(const float *a, const float *b, const float *c)
{
    return ((uintptr_t)(a ? a : b ? b : c) & 31) == 0;
}

static inline void ROWS(out8)(float *p, rv8f v, int nt)
{
#ifdef ROWS_AVX2
    if (nt) {
        _mm256_stream_ps(p, (__m256)v);
        return;
    }
#endif
    (void)nt;
    ROWS(st8)(p, v);
}

/* After a phase's last streamed row: orders its non-temporal stores before
 * the pass's end lets anyone read them (once per phase call, not per row:
 * a fence per 1 KB piece doubled a streamed 44 MB forward). */
static inline void ROWS(stream_end)(int stream)
{
#ifdef ROWS_AVX2
    if (stream) _mm_sfence();
#endif
    (void)stream;
}

static inline void ROWS(forward_train1)(const float *in, float *x, float *xn, float *y, idx_t i, float mh, float ml,
                                        float inv, float gamma, float beta)
{
    float v = in[i], t, u;
    ROWS(norm1)(v, mh, ml, inv, gamma, beta, &t, &u);
    if (x) x[i] = v;
    if (xn) xn[i] = t;
    if (y) y[i] = u;
}

/* The 8 lanes of a normalizing step at in + i, recomputed one by one (after a
 * non-finite lane). */
static inline void ROWS(norm8)(const float *in, const float *mh, const float *ml, const float *inv, const float *g,
                               const float *b, int per_lane, rv8f *t, rv8f *y)
{
    float tl[8], yl[8];
    for (int j = 0, k = 0; j < 8; j++, k += per_lane)
        ROWS(norm1)(in[j], mh[k], ml[k], inv[k], g[k], b[k], &tl[j], &yl[j]);
    *t = ROWS(ld8)(tl);
    *y = ROWS(ld8)(yl);
}

/* The 8-lane loops of the normalizing passes from i on, with `nt` a constant in
 * each call, so that the loop is compiled once with streaming stores and once
 * without; they return where the scalar tail starts. */
ROWS_INLINE idx_t ROWS(train_steps)(const float *in, float *x, float *xn, float *y, idx_t i, idx_t n, float mh,
                                    float ml, float inv, float gamma, float beta, const int nt)
{
    const rv8f vh = {mh, mh, mh, mh, mh, mh, mh, mh}, vl = {ml, ml, ml, ml, ml, ml, ml, ml};
    const rv8f vi = {inv, inv, inv, inv, inv, inv, inv, inv};
    const rv8f vg = {gamma, gamma, gamma, gamma, gamma, gamma, gamma, gamma};
    const rv8f vb = {beta, beta, beta, beta, beta, beta, beta, beta};
    for (; i + 8 <= n; i += 8) {
        rv8f v = ROWS(ld8)(in + i);
        rv8f t = ((v - vh) - vl) * vi, u = t * vg + vb;
        if (ROWS(any_nonfinite)(u)) ROWS(norm8)(in + i, &mh, &ml, &inv, &gamma, &beta, 0, &t, &u);
        if (x) ROWS(out8)(x + i, v, nt);
        if (xn) ROWS(out8)(xn + i, t, nt);
        if (y) ROWS(out8)(y + i, u, nt);
    }
    return i;
}

ROWS_INLINE idx_t ROWS(infer_steps)(const float *in, float *y, idx_t i, idx_t n, float mh, float ml, float inv,
                                    float gamma, float beta, const int nt)
{
    const rv8f vh = {mh, mh, mh, mh, mh, mh, mh, mh}, vl = {ml, ml, ml, ml, ml, ml, ml, ml};
    const rv8f vi = {inv, inv, inv, inv, inv, inv, inv, inv};
    const rv8f vg = {gamma, gamma, gamma, gamma, gamma, gamma, gamma, gamma};
    const rv8f vb = {beta, beta, beta, beta, beta, beta, beta, beta};
    for (; i + 8 <= n; i += 8) {
        ROWS(prefetch)(in + i);
        rv8f t = ((ROWS(ld8)(in + i) - vh) - vl) * vi, u = t * vg + vb;
        if (ROWS(any_nonfinite)(u)) ROWS(norm8)(in + i, &mh, &ml, &inv, &gamma, &beta, 0, &t, &u);
        ROWS(out8)(y + i, u, nt);
    }
    return i;
}

ROWS_INLINE void ROWS(forward_train)(const float *in, float *x, float *xn, float *y, idx_t n, float mh, float ml,
                                     float inv, float gamma, float beta, int stream)
{
    int nt = ROWS(stream_ok)(stream, x, xn, y);
    idx_t i = 0;
    if (nt)
        for (; i < n && !ROWS(aligned32)(x ? x + i : NULL, xn ? xn + i : NULL, y ? y + i : NULL); i++)
            ROWS(forward_train1)(in, x, xn, y, i, mh, ml, inv, gamma, beta);
    i = nt ? ROWS(train_steps)(in, x, xn, y, i, n, mh, ml, inv, gamma, beta, 1)
           : ROWS(train_steps)(in, x, xn, y, i, n, mh, ml, inv, gamma, beta, 0);
    for (; i < n; i++) ROWS(forward_train1)(in, x, xn, y, i, mh, ml, inv, gamma, beta);
}

ROWS_INLINE void ROWS(forward_infer)(const float *in, float *y, idx_t n, float mh, float ml, float inv, float gamma,
                                     float beta, int stream)
{
    int nt = ROWS(stream_ok)(stream, y, NULL, NULL);
    idx_t i = 0;
    float unused;
    if (nt)
        for (; i < n && !ROWS(aligned32)(y + i, NULL, NULL); i++)
            ROWS(norm1)(in[i], mh, ml, inv, gamma, beta, &unused, &y[i]);
    i = nt ? ROWS(infer_steps)(in, y, i, n, mh, ml, inv, gamma, beta, 1)
           : ROWS(infer_steps)(in, y, i, n, mh, ml, inv, gamma, beta, 0);
    for (; i < n; i++) ROWS(norm1)(in[i], mh, ml, inv, gamma, beta, &unused, &y[i]);
}

ROWS_INLINE void ROWS(backward_apply)(float *out, const float *dy, const float *x, idx_t n, double a, double k,
                                      double b, double c, int stream)
{
    const rv4d va = {a, a, a, a}, vk = {k, k, k, k}, vb = {b, b, b, b}, vc = {c, c, c, c};
    int nt = ROWS(stream_ok)(stream, out, NULL, NULL);
    idx_t i = 0;
    if (nt)
        for (; i < n && !ROWS(aligned32)(out + i, NULL, NULL); i++)
            out[i] = (float)((dy[i] * a + ((double)x[i] - k) * b) + c);
    for (; i + 8 <= n; i += 8) {
        rv4d lo = (ROWS(ld4d)(dy + i) * va + (ROWS(ld4d)(x + i) - vk) * vb) + vc;
        rv4d hi = (ROWS(ld4d)(dy + i + 4) * va + (ROWS(ld4d)(x + i + 4) - vk) * vb) + vc;
        rv4f flo = __builtin_convertvector(lo, rv4f), fhi = __builtin_convertvector(hi, rv4f);
        ROWS(out8)(out + i, __builtin_shufflevector(flo, fhi, 0, 1, 2, 3, 4, 5, 6, 7), nt);
    }
    for (; i < n; i++) out[i] = (float)((dy[i] * a + ((double)x[i] - k) * b) + c);
}

/* ---- channel-vector primitives: n consecutive channels of one image when
 * spatial == 1 (a fully connected layer), with per-channel parameter arrays.
 * Sums go to per-channel double arrays. ---- */

static void ROWS(v_sum_dot_dev)(const float *d, const float *x, const float *k, idx_t n, double *s, double *sd)
{
    idx_t j = 0;
    for (; j + 4 <= n; j += 4) {
        rv4d dd = ROWS(ld4d)(d + j), a, b;
        memcpy(&a, s + j, sizeof a);
        memcpy(&b, sd + j, sizeof b);
        a += dd;
        b += dd * (ROWS(ld4d)(x + j) - ROWS(ld4d)(k + j));
        memcpy(s + j, &a, sizeof a);
        memcpy(sd + j, &b, sizeof b);
    }
    for (; j < n; j++) {
        s[j] += d[j];
        sd[j] += (double)d[j] * ((double)x[j] - k[j]);
    }
}

/* ---- channel-vector loops over a block of images (spatial == 1): the
 * per-channel parameters and sums of a few channels are loaded once per block
 * and the block's images taken one after another, so each channel's
 * arithmetic is exactly that of image after image. A block is at most
 * ROWS_FC_BLOCK images, `stride` floats apart: few enough that their lines
 * share an L1 set without evicting each other when the stride is a power of
 * two. Their callers pass a full block's length as a constant
 * (ROWS_FC_BLOCKS), for which the compiler makes a copy of each loop whose
 * loop over the block's images unrolls (64x1024x1x1: 6.98 -> 6.47
 * instructions per value forward, 6.88 -> 6.19 backward). The backward
 * loads the block's images before storing any: with a stride of a multiple
 * of 4 KB an image's store and the next image's load share their low address
 * bits, and the CPU may hold the load until the store is done (64x1024x1x1
 * backward 37 -> 35 us, 1 thread; the forward, whose lanes may be recomputed
 * from the input, measured no faster that way and took 8 % more
 * instructions). ---- */
#define ROWS_FC_BLOCK 4

/* loop(rows, args...) for a block of `rows` images, a full block's length as
 * a constant (the copy of the loop compiled for it). */
#define ROWS_FC_BLOCKS(loop, rows, ...) \
    do { \
        if ((rows) == ROWS_FC_BLOCK) \
            loop(ROWS_FC_BLOCK, __VA_ARGS__); \
        else \
            loop((rows), __VA_ARGS__); \
    } while (0)

ROWS_OUTLINE void ROWS(fc_shifted_acc)(idx_t rows, const float *x, idx_t stride, const float *k, idx_t n, double *s1,
                                       double *s2)
{
    idx_t j = 0;
    for (; j + 4 <= n; j += 4) {
        rv4d kk = ROWS(ld4d)(k + j), a, c;
        memcpy(&a, s1 + j, sizeof a);
        memcpy(&c, s2 + j, sizeof c);
        for (idx_t r = 0; r < rows; r++) {
            rv4d u = ROWS(ld4d)(x + r * stride + j) - kk;
            a += u;
            c += u * u;
        }
        memcpy(s1 + j, &a, sizeof a);
        memcpy(s2 + j, &c, sizeof c);
    }
    for (; j < n; j++)
        for (idx_t r = 0; r < rows; r++) {
            double u = (double)x[r * stride + j] - k[j];
            s1[j] += u;
            s2[j] += u * u;
        }
}

ROWS_OUTLINE void ROWS(fc_sums_dev)(idx_t rows, const float *d, const float *x, idx_t stride, const double *k, idx_t n,
                                    double *s, double *sd)
{
    idx_t j = 0;
    for (; j + 4 <= n; j += 4) {
        rv4d kk, a, c;
        memcpy(&kk, k + j, sizeof kk);
        memcpy(&a, s + j, sizeof a);
        memcpy(&c, sd + j, sizeof c);
        for (idx_t r = 0; r < rows; r++) {
            rv4d dd = ROWS(ld4d)(d + r * stride + j);
            a += dd;
            c += dd * (ROWS(ld4d)(x + r * stride + j) - kk);
        }
        memcpy(s + j, &a, sizeof a);
        memcpy(sd + j, &c, sizeof c);
    }
    for (; j < n; j++)
        for (idx_t r = 0; r < rows; r++) {
            s[j] += d[r * stride + j];
            sd[j] += (double)d[r * stride + j] * ((double)x[r * stride + j] - k[j]);
        }
}

/* xn = ((in - mh) - ml) * inv, y = xn * g + b; x = in; each written when not NULL. */
ROWS_OUTLINE void ROWS(fc_forward)(idx_t rows, const float *in, float *x, float *xn, float *y, idx_t stride, idx_t n,
                                   const float *mh, const float *ml, const float *inv, const float *g, const float *b)
{
    idx_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const rv8f vh = ROWS(ld8)(mh + j), vl = ROWS(ld8)(ml + j), vi = ROWS(ld8)(inv + j);
        const rv8f vg = ROWS(ld8)(g + j), vb = ROWS(ld8)(b + j);
        for (idx_t r = 0, o = j; r < rows; r++, o += stride) {
            rv8f v = ROWS(ld8)(in + o);
            rv8f t = ((v - vh) - vl) * vi, u = t * vg + vb;
            if (ROWS(any_nonfinite)(u)) ROWS(norm8)(in + o, mh + j, ml + j, inv + j, g + j, b + j, 1, &t, &u);
            if (x) ROWS(st8)(x + o, v);
            if (xn) ROWS(st8)(xn + o, t);
            if (y) ROWS(st8)(y + o, u);
        }
    }
    for (; j < n; j++)
        for (idx_t r = 0, o = j; r < rows; r++, o += stride) {
            float v = in[o], t, u;
            ROWS(norm1)(v, mh[j], ml[j], inv[j], g[j], b[j], &t, &u);
            if (x) x[o] = v;
            if (xn) xn[o] = t;
            if (y) y[o] = u;
        }
}

/* y = ((in - mh) - ml) * inv * g + b (y may be in): the inference pass, and a
 * training forward that keeps neither x nor x_norm. */
ROWS_OUTLINE void ROWS(fc_forward_infer)(idx_t rows, const float *in, float *y, idx_t stride, idx_t n, const float *mh,
                                         const float *ml, const float *inv, const float *g, const float *b)
{
    idx_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const rv8f vh = ROWS(ld8)(mh + j), vl = ROWS(ld8)(ml + j), vi = ROWS(ld8)(inv + j);
        const rv8f vg = ROWS(ld8)(g + j), vb = ROWS(ld8)(b + j);
        for (idx_t r = 0, o = j; r < rows; r++, o += stride) {
            rv8f t = ((ROWS(ld8)(in + o) - vh) - vl) * vi, u = t * vg + vb;
            if (ROWS(any_nonfinite)(u)) ROWS(norm8)(in + o, mh + j, ml + j, inv + j, g + j, b + j, 1, &t, &u);
            ROWS(st8)(y + o, u);
        }
    }
    for (; j < n; j++)
        for (idx_t r = 0, o = j; r < rows; r++, o += stride) {
            float unused;
            ROWS(norm1)(in[o], mh[j], ml[j], inv[j], g[j], b[j], &unused, &y[o]);
        }
}

/* out = dy * a + (x - k) * b + c, in double (out may be dy). */
ROWS_OUTLINE void ROWS(fc_backward)(idx_t rows, float *out, const float *dy, const float *x, idx_t stride, idx_t n,
                                    const double *a, const double *k, const double *b, const double *c)
{
    idx_t j = 0;
    for (; j + 4 <= n; j += 4) {
        rv4d va, vk, vb, vc;
        memcpy(&va, a + j, sizeof va);
        memcpy(&vk, k + j, sizeof vk);
        memcpy(&vb, b + j, sizeof vb);
        memcpy(&vc, c + j, sizeof vc);
        rv4d d[ROWS_FC_BLOCK], v[ROWS_FC_BLOCK];
        for (idx_t r = 0; r < rows; r++) /* loads first (above) */
            d[r] = ROWS(ld4d)(dy + j + r * stride), v[r] = ROWS(ld4d)(x + j + r * stride);
        for (idx_t r = 0, o = j; r < rows; r++, o += stride) {
            rv4f f = __builtin_convertvector((d[r] * va + (v[r] - vk) * vb) + vc, rv4f);
            memcpy(out + o, &f, sizeof f);
        }
    }
    for (; j < n; j++)
        for (idx_t r = 0, o = j; r < rows; r++, o += stride)
            out[o] = (float)((dy[o] * a[j] + ((double)x[o] - k[j]) * b[j]) + c[j]);
}

/* The one-image forms of the loops above, for callers that walk the images themselves (blas.c). */
static void ROWS(v_shifted_acc)(const float *x, const float *k, idx_t n, double *s1, double *s2)
{
    ROWS(fc_shifted_acc)(1, x, 0, k, n, s1, s2);
}

static void ROWS(v_forward_infer)(const float *in, float *y, idx_t n, const float *mh, const float *ml,
                                  const float *inv, const float *g, const float *b)
{
    ROWS(fc_forward_infer)(1, in, y, 0, n, mh, ml, inv, g, b);
}

static void ROWS(v_backward_apply)(float *out, const float *dy, const float *x, idx_t n, const double *a,
                                   const double *k, const double *b, const double *c)
{
    ROWS(fc_backward)(1, out, dy, x, 0, n, a, k, b, c);
}
