/*
 * tests/c/test_darknet_bn.c - the C test program of darknet_bn.
 *
 * Checks the public C API of csrc/darknet_bn.h against an independent oracle
 * written from docs/reference.md: §3 (Darknet numerics: the ten kernels, the layer's
 * forward/backward/update) and §4 (standard numerics), evaluated with naive
 * loops in double precision on the same float32 inputs the library gets.
 *
 * Tolerances are docs/reference.md §6's:
 *   outputs, deltas, accumulators:  |got - want| <= 1e-5*|want| + 1e-5
 *   batch mean and variance:        |got - want| <= 4 float32 ulps of want
 * Where the oracle is NaN or Inf (§5, non-finite input), the library must be
 * non-finite too.
 *
 * One "check" is one comparison of a buffer, a status or a value. A failing
 * check prints one line "FAIL <test>: <what>: <numbers>". The last line is
 * "N passed, N failed" (checks); the exit status is 0 only if none failed.
 *
 * Build (as the Makefile does, plus its extra flags):
 *   gcc -std=c11 -O2 -Wall -Wextra -Werror -Icsrc tests/c/test_darknet_bn.c \
 *       build/libdarknet_bn.a -lpthread -lm -o build/test_darknet_bn
 */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "darknet_bn.h"
#include "internal.h" /* the work split, for test_paths_run_what_they_name */

#define RTOL 1e-5
#define ATOL 1e-5
#define MAX_ULPS 4.0
#define MOMENTS_RTOL 1e-12 /* double moments: far below a float32 ulp */
#define TWO_PI 6.283185307179586476925286766559
#define GARBAGE 777.0f     /* pre-fill of buffers a kernel must overwrite */
#define TIMEOUT_S 120

#define IDX(b, f, i, F, S) ((((size_t)(b) * (size_t)(F)) + (size_t)(f)) * (size_t)(S) + (size_t)(i))

/* ======================================================================
 * Bookkeeping and checks
 * ====================================================================== */

static int g_pass, g_fail;
static const char *volatile g_test = "(start)";

static void fail_line(const char *test, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail_line(const char *test, const char *fmt, ...)
{
    va_list ap;
    printf("FAIL %s: ", test);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}

static void count(int ok)
{
    if (ok)
        g_pass++;
    else
        g_fail++;
}

/* Appends the decimal digits of v to buf (async-signal-safe). */
static size_t put_uint(char *buf, size_t at, unsigned v)
{
    char tmp[16];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        buf[at++] = tmp[--n];
    return at;
}

static size_t put_str(char *buf, size_t at, size_t cap, const char *s)
{
    while (*s && at < cap)
        buf[at++] = *s++;
    return at;
}

/* A hang is a failure: report it and the counts so far, then stop. */
static void on_alarm(int sig)
{
    (void)sig;
    char buf[512];
    size_t n = 0;
    n = put_str(buf, n, 300, "FAIL timeout: ");
    n = put_str(buf, n, 400, (const char *)g_test);
    n = put_str(buf, n, 420, " did not finish\n");
    n = put_uint(buf, n, (unsigned)g_pass);
    n = put_str(buf, n, 460, " passed, ");
    n = put_uint(buf, n, (unsigned)g_fail + 1);
    n = put_str(buf, n, 500, " failed\n");
    ssize_t w = write(STDOUT_FILENO, buf, n);
    (void)w;
    _exit(1);
}

static double ulp32(double w)
{
    w = fabs(w);
    if (w < FLT_MIN)
        return ldexp(1.0, -149);
    int e;
    frexp(w, &e); /* w = fr * 2^e, fr in [0.5, 1) */
    return ldexp(1.0, e - 24);
}

/* How far got is outside the tolerance (0: inside). */
static double excess(double got, double want, int ulps)
{
    if (!isfinite(want))
        return isfinite(got) ? INFINITY : 0.0;
    if (!isfinite(got))
        return INFINITY;
    double d = fabs(got - want);
    double t = ulps ? MAX_ULPS * ulp32(want) : RTOL * fabs(want) + ATOL;
    return d <= t ? 0.0 : d / t;
}

/* got (float) against want (double), docs/reference.md §6 tolerance or 4 float32 ulps. */
static int check_buf(const char *test, const char *what, const float *got, const double *want, size_t n, int ulps)
{
    size_t bad = 0, wi = 0;
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double e = excess(got[i], want[i], ulps);
        if (e > 0) {
            if (bad == 0 || e > worst) {
                worst = e;
                wi = i;
            }
            bad++;
        }
    }
    if (bad) {
        double g = got[wi], w = want[wi];
        if (ulps)
            fail_line(test, "%s: %zu of %zu values off by more than %.0f float32 ulps; worst [%zu]: got %.9g want %.12g (%.3g ulps)",
                      what, bad, n, MAX_ULPS, wi, g, w, fabs(g - w) / ulp32(w));
        else
            fail_line(test, "%s: %zu of %zu values out of tolerance; worst [%zu]: got %.9g want %.12g (|diff| %.3g > tol %.3g)",
                      what, bad, n, wi, g, w, fabs(g - w), RTOL * fabs(w) + ATOL);
    }
    count(!bad);
    return !bad;
}

/* got (float) against want (float), e.g. 2 threads against 1 thread. */
static int check_ff(const char *test, const char *what, const float *got, const float *want, size_t n, int ulps)
{
    double *w = malloc((n ? n : 1) * sizeof *w);
    if (!w) {
        fail_line(test, "%s: out of memory in the test", what);
        count(0);
        return 0;
    }
    for (size_t i = 0; i < n; i++)
        w[i] = want[i];
    int ok = check_buf(test, what, got, w, n, ulps);
    free(w);
    return ok;
}

/* Bit-identical buffers (copies, untouched inputs, "nothing written"). */
static int check_same(const char *test, const char *what, const float *got, const float *want, size_t n)
{
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        if (memcmp(&got[i], &want[i], sizeof(float)) != 0) {
            if (!bad)
                first = i;
            bad++;
        }
    }
    if (bad)
        fail_line(test, "%s: %zu of %zu values differ; first [%zu]: got %.9g want %.9g", what, bad, n, first,
                  (double)got[first], (double)want[first]);
    count(!bad);
    return !bad;
}

/* Every value equal to v exactly. */
static int check_const(const char *test, const char *what, const float *got, size_t n, float v)
{
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        if (!(got[i] == v)) {
            if (!bad)
                first = i;
            bad++;
        }
    }
    if (bad)
        fail_line(test, "%s: %zu of %zu values are not %g; first [%zu] = %.9g", what, bad, n, (double)v, first,
                  (double)got[first]);
    count(!bad);
    return !bad;
}

/* Doubles within a relative tolerance (moments). */
static int check_dd(const char *test, const char *what, const double *got, const double *want, size_t n, double rtol)
{
    size_t bad = 0, wi = 0;
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(got[i] - want[i]), t = rtol * fabs(want[i]) + 1e-300;
        if (!(d <= t)) {
            double e = isfinite(d) ? d / t : INFINITY;
            if (!bad || e > worst) {
                worst = e;
                wi = i;
            }
            bad++;
        }
    }
    if (bad)
        fail_line(test, "%s: %zu of %zu values off; worst [%zu]: got %.17g want %.17g (rel %.3g > %.3g)", what, bad, n,
                  wi, got[wi], want[wi], fabs(got[wi] - want[wi]) / fabs(want[wi]), rtol);
    count(!bad);
    return !bad;
}

static int check_int(const char *test, const char *what, long got, long want)
{
    if (got != want)
        fail_line(test, "%s: got %ld want %ld", what, got, want);
    count(got == want);
    return got == want;
}

static int check_true(const char *test, const char *what, int cond)
{
    if (!cond)
        fail_line(test, "%s: not true", what);
    count(cond);
    return cond;
}

/* ======================================================================
 * Memory and a deterministic PRNG (xorshift64* + Box-Muller)
 * ====================================================================== */

static void *xmalloc(size_t bytes)
{
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) {
        printf("FAIL %s: out of memory in the test\n%d passed, %d failed\n", (const char *)g_test, g_pass, g_fail + 1);
        exit(1);
    }
    return p;
}

static float *falloc(size_t n) { return xmalloc(n * sizeof(float)); }
static double *dalloc(size_t n) { return xmalloc(n * sizeof(double)); }

static float *fdup(const float *a, size_t n)
{
    float *p = falloc(n);
    memcpy(p, a, n * sizeof *p);
    return p;
}

static double *f2d(const float *a, size_t n)
{
    double *p = dalloc(n);
    for (size_t i = 0; i < n; i++)
        p[i] = a[i];
    return p;
}

static void fill_const(float *a, size_t n, float v)
{
    for (size_t i = 0; i < n; i++)
        a[i] = v;
}

typedef struct {
    uint64_t s;
    int have_spare;
    double spare;
} rng_t;

static void rng_init(rng_t *r, uint64_t seed)
{
    r->s = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
    if (!r->s)
        r->s = 1;
    r->have_spare = 0;
    r->spare = 0;
}

static uint64_t rng_u64(rng_t *r)
{
    uint64_t x = r->s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static double rng_unif(rng_t *r) { return ((double)(rng_u64(r) >> 11) + 0.5) * 0x1p-53; }

static double rng_gauss(rng_t *r)
{
    if (r->have_spare) {
        r->have_spare = 0;
        return r->spare;
    }
    double u1 = rng_unif(r), u2 = rng_unif(r), rad = sqrt(-2.0 * log(u1));
    r->spare = rad * sin(TWO_PI * u2);
    r->have_spare = 1;
    return rad * cos(TWO_PI * u2);
}

static void fill_gauss(rng_t *r, float *a, size_t n, double mu, double sd)
{
    for (size_t i = 0; i < n; i++)
        a[i] = (float)(mu + sd * rng_gauss(r));
}

/* ======================================================================
 * The oracle: docs/reference.md §3 and §4 in double, naive loops
 * ====================================================================== */

/* §3 mean_cpu: mean[f] = (1/m) sum x. */
static void o_mean(const double *x, int B, int F, int S, double *mean)
{
    double m = (double)B * S;
    for (int f = 0; f < F; f++) {
        double s = 0;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < S; i++)
                s += x[IDX(b, f, i, F, S)];
        mean[f] = s / m;
    }
}

/* sum (x - mean[f])^2 per channel. */
static void o_sumsq(const double *x, const double *mean, int B, int F, int S, double *ss)
{
    for (int f = 0; f < F; f++) {
        double s = 0;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < S; i++) {
                double d = x[IDX(b, f, i, F, S)] - mean[f];
                s += d * d;
            }
        ss[f] = s;
    }
}

/* §3 variance_cpu: (1/(m-1)) sum (x - mean[f])^2; m == 1 gives 0 (header). */
static void o_variance(const double *x, const double *mean, int B, int F, int S, double *var)
{
    double m = (double)B * S;
    o_sumsq(x, mean, B, F, S, var);
    for (int f = 0; f < F; f++)
        var[f] = m > 1 ? var[f] / (m - 1) : 0.0;
}

/* §3 normalize_cpu: (x - mean[f]) / (sqrt(variance[f]) + 1e-6). */
static void o_normalize(const double *x, const double *mean, const double *var, int B, int F, int S, double *out)
{
    for (int b = 0; b < B; b++)
        for (int f = 0; f < F; f++)
            for (int i = 0; i < S; i++) {
                size_t k = IDX(b, f, i, F, S);
                out[k] = (x[k] - mean[f]) / (sqrt(var[f]) + 1e-6);
            }
}

/* §3 scale_bias: x * scales[f]. */
static void o_scale_bias(const double *x, const double *s, int B, int F, int S, double *out)
{
    for (int b = 0; b < B; b++)
        for (int f = 0; f < F; f++)
            for (int i = 0; i < S; i++)
                out[IDX(b, f, i, F, S)] = x[IDX(b, f, i, F, S)] * s[f];
}

/* §3 add_bias: x + biases[f]. */
static void o_add_bias(const double *x, const double *bias, int B, int F, int S, double *out)
{
    for (int b = 0; b < B; b++)
        for (int f = 0; f < F; f++)
            for (int i = 0; i < S; i++)
                out[IDX(b, f, i, F, S)] = x[IDX(b, f, i, F, S)] + bias[f];
}

/* §3 backward_bias: acc0[f] + sum delta. */
static void o_backward_bias(const double *acc0, const double *delta, int B, int F, int S, double *acc)
{
    for (int f = 0; f < F; f++) {
        double s = 0;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < S; i++)
                s += delta[IDX(b, f, i, F, S)];
        acc[f] = acc0[f] + s;
    }
}

/* §3 backward_scale_cpu: acc0[f] + sum delta * x_norm. */
static void o_backward_scale(const double *acc0, const double *xn, const double *delta, int B, int F, int S,
                             double *acc)
{
    for (int f = 0; f < F; f++) {
        double s = 0;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < S; i++)
                s += delta[IDX(b, f, i, F, S)] * xn[IDX(b, f, i, F, S)];
        acc[f] = acc0[f] + s;
    }
}

/* §3 mean_delta_cpu: (sum delta) * (-1 / sqrt(variance[f] + 1e-5)). */
static void o_mean_delta(const double *delta, const double *var, int B, int F, int S, double *md)
{
    for (int f = 0; f < F; f++) {
        double s = 0;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < S; i++)
                s += delta[IDX(b, f, i, F, S)];
        md[f] = s * (-1.0 / sqrt(var[f] + 1e-5));
    }
}

/* §3 variance_delta_cpu: (sum delta (x - mean[f])) * (-1/2) (variance[f] + 1e-5)^(-3/2). */
static void o_variance_delta(const double *x, const double *delta, const double *mean, const double *var, int B,
                             int F, int S, double *vd)
{
    for (int f = 0; f < F; f++) {
        double s = 0;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < S; i++)
                s += delta[IDX(b, f, i, F, S)] * (x[IDX(b, f, i, F, S)] - mean[f]);
        vd[f] = s * (-0.5 * pow(var[f] + 1e-5, -1.5));
    }
}

/* §3 normalize_delta_cpu:
 * delta / sqrt(var + 1e-5) + variance_delta * 2 (x - mean) / m + mean_delta / m. */
static void o_normalize_delta(const double *x, const double *mean, const double *var, const double *md,
                              const double *vd, int B, int F, int S, const double *delta, double *out)
{
    double m = (double)B * S;
    for (int b = 0; b < B; b++)
        for (int f = 0; f < F; f++)
            for (int i = 0; i < S; i++) {
                size_t k = IDX(b, f, i, F, S);
                out[k] = delta[k] / sqrt(var[f] + 1e-5) + vd[f] * 2.0 * (x[k] - mean[f]) / m + md[f] / m;
            }
}

/* The layer's state, carried in double through the same steps as the library. */
typedef struct {
    int B, C, S, numerics;
    size_t N;
    double eps, mom;                       /* standard numerics */
    double *scales, *biases, *rm, *rv, *su, *bu, *mean, *var, *md, *vd; /* C each */
    double *x, *xn, *out, *delta;          /* N each */
} olayer;

/* §3/§4 initial state. */
static void ol_init(olayer *o, int B, int C, int S, int numerics, double eps, double mom)
{
    o->B = B;
    o->C = C;
    o->S = S;
    o->numerics = numerics;
    o->N = (size_t)B * C * S;
    o->eps = eps;
    o->mom = mom;
    double **pc[] = {&o->scales, &o->biases, &o->rm, &o->rv, &o->su, &o->bu, &o->mean, &o->var, &o->md, &o->vd};
    for (size_t k = 0; k < sizeof pc / sizeof pc[0]; k++) {
        *pc[k] = dalloc((size_t)C);
        for (int f = 0; f < C; f++)
            (*pc[k])[f] = 0;
    }
    double **pn[] = {&o->x, &o->xn, &o->out, &o->delta};
    for (size_t k = 0; k < sizeof pn / sizeof pn[0]; k++) {
        *pn[k] = dalloc(o->N);
        for (size_t i = 0; i < o->N; i++)
            (*pn[k])[i] = 0;
    }
    for (int f = 0; f < C; f++) {
        o->scales[f] = 1;
        o->rv[f] = numerics == DNBN_NUMERICS_STANDARD ? 1.0 : 0.0;
    }
}

static void ol_free(olayer *o)
{
    double *p[] = {o->scales, o->biases, o->rm, o->rv, o->su, o->bu, o->mean, o->var, o->md, o->vd,
                   o->x, o->xn, o->out, o->delta};
    for (size_t k = 0; k < sizeof p / sizeof p[0]; k++)
        free(p[k]);
}

/* §3 / §4 forward, training or inference. */
static void ol_forward(olayer *o, const float *in, int train)
{
    int B = o->B, C = o->C, S = o->S;
    size_t N = o->N;
    double m = (double)B * S;
    if (train) {
        for (size_t i = 0; i < N; i++)
            o->x[i] = in[i];
        o_mean(o->x, B, C, S, o->mean);
        if (o->numerics == DNBN_NUMERICS_DARKNET) {
            o_variance(o->x, o->mean, B, C, S, o->var);
            for (int f = 0; f < C; f++) {
                o->rm[f] = 0.99 * o->rm[f] + 0.01 * o->mean[f];
                o->rv[f] = 0.99 * o->rv[f] + 0.01 * o->var[f];
            }
            o_normalize(o->x, o->mean, o->var, B, C, S, o->xn);
        } else {
            double *ss = dalloc((size_t)C);
            o_sumsq(o->x, o->mean, B, C, S, ss);
            for (int f = 0; f < C; f++) {
                o->var[f] = ss[f] / m; /* biased: what normalizes */
                o->rm[f] = (1 - o->mom) * o->rm[f] + o->mom * o->mean[f];
                o->rv[f] = (1 - o->mom) * o->rv[f] + o->mom * ss[f] / (m - 1); /* unbiased */
            }
            free(ss);
            for (int b = 0; b < B; b++)
                for (int f = 0; f < C; f++)
                    for (int i = 0; i < S; i++) {
                        size_t k = IDX(b, f, i, C, S);
                        o->xn[k] = (o->x[k] - o->mean[f]) / sqrt(o->var[f] + o->eps);
                    }
        }
        for (int b = 0; b < B; b++)
            for (int f = 0; f < C; f++)
                for (int i = 0; i < S; i++) {
                    size_t k = IDX(b, f, i, C, S);
                    o->out[k] = o->xn[k] * o->scales[f] + o->biases[f];
                }
    } else {
        for (int b = 0; b < B; b++)
            for (int f = 0; f < C; f++)
                for (int i = 0; i < S; i++) {
                    size_t k = IDX(b, f, i, C, S);
                    double xh = o->numerics == DNBN_NUMERICS_DARKNET
                                    ? (in[k] - o->rm[f]) / (sqrt(o->rv[f]) + 1e-6)
                                    : (in[k] - o->rm[f]) / sqrt(o->rv[f] + o->eps);
                    o->out[k] = xh * o->scales[f] + o->biases[f];
                }
    }
}

/* §3 / §4 backward of the last training forward; dy = -dLoss/dy. */
static void ol_backward(olayer *o, const float *dy)
{
    int B = o->B, C = o->C, S = o->S;
    size_t N = o->N;
    double m = (double)B * S;
    double *d = dalloc(N), *t = dalloc(N);
    for (size_t i = 0; i < N; i++)
        d[i] = dy[i];
    o_backward_bias(o->bu, d, B, C, S, o->bu);
    o_backward_scale(o->su, o->xn, d, B, C, S, o->su);
    if (o->numerics == DNBN_NUMERICS_DARKNET) {
        o_scale_bias(d, o->scales, B, C, S, t);
        o_mean_delta(t, o->var, B, C, S, o->md);
        o_variance_delta(o->x, t, o->mean, o->var, B, C, S, o->vd);
        o_normalize_delta(o->x, o->mean, o->var, o->md, o->vd, B, C, S, t, o->delta);
    } else {
        /* dx = gamma/sqrt(var_b+eps) * (dy - mean(dy) - xhat*mean(dy*xhat)) */
        for (int f = 0; f < C; f++) {
            double sd = 0, sdx = 0;
            for (int b = 0; b < B; b++)
                for (int i = 0; i < S; i++) {
                    size_t k = IDX(b, f, i, C, S);
                    sd += d[k];
                    sdx += d[k] * o->xn[k];
                }
            double k0 = o->scales[f] / sqrt(o->var[f] + o->eps);
            for (int b = 0; b < B; b++)
                for (int i = 0; i < S; i++) {
                    size_t k = IDX(b, f, i, C, S);
                    o->delta[k] = k0 * (d[k] - sd / m - o->xn[k] * (sdx / m));
                }
        }
    }
    free(d);
    free(t);
}

/* §3 update: biases += lr/batch * bias_updates; bias_updates *= momentum; same for scales. */
static void ol_update(olayer *o, double lr, double mom)
{
    for (int f = 0; f < o->C; f++) {
        o->biases[f] += lr / o->B * o->bu[f];
        o->bu[f] *= mom;
        o->scales[f] += lr / o->B * o->su[f];
        o->su[f] *= mom;
    }
}

/* ======================================================================
 * Kernel tests
 * ====================================================================== */

typedef struct {
    const char *suffix;
    void (*mean)(float *, int, int, int, float *);
    void (*variance)(float *, float *, int, int, int, float *);
    void (*normalize)(float *, float *, float *, int, int, int);
    void (*scale_bias)(float *, float *, int, int, int);
    void (*add_bias)(float *, float *, int, int, int);
    void (*backward_bias)(float *, float *, int, int, int);
    void (*backward_scale)(float *, float *, int, int, int, float *);
    void (*mean_delta)(float *, float *, int, int, int, float *);
    void (*variance_delta)(float *, float *, float *, float *, int, int, int, float *);
    void (*normalize_delta)(float *, float *, float *, float *, float *, int, int, int, float *);
} kernel_set;

static const kernel_set K_LIB = {"",          mean_cpu,           variance_cpu,        normalize_cpu,
                                 scale_bias,  add_bias,           backward_bias,       backward_scale_cpu,
                                 mean_delta_cpu, variance_delta_cpu, normalize_delta_cpu};
static const kernel_set K_REF = {"_ref",          mean_cpu_ref,           variance_cpu_ref,
                                 normalize_cpu_ref, scale_bias_ref,       add_bias_ref,
                                 backward_bias_ref, backward_scale_cpu_ref, mean_delta_cpu_ref,
                                 variance_delta_cpu_ref, normalize_delta_cpu_ref};

/* The kernels' inputs. Kept apart from outputs so that "inputs untouched" is checkable. */
enum { KI_XO, KI_X, KI_XN, KI_DELTA, KI_SCALES, KI_BIASES, KI_BU0, KI_SU0, KI_MD, KI_VD,
       KI_MEAN_O, KI_MEAN_OS, KI_MEAN_X, KI_VAR_X, KI_N };
static const char *const ki_name[KI_N] = {"x (offset)", "x", "x_norm", "delta", "scales", "biases",
                                          "bias_updates0", "scale_updates0", "mean_delta", "variance_delta",
                                          "mean (offset)", "mean (shifted)", "mean", "variance"};

/* The kernels' outputs, one per call. */
enum { KO_MEAN, KO_VAR, KO_VARS, KO_NORM, KO_SCALE, KO_ADD, KO_BBIAS, KO_BSCALE, KO_MDELTA, KO_VDELTA,
       KO_NDELTA, KO_N };
static const char *const ko_kernel[KO_N] = {"mean_cpu",       "variance_cpu",       "variance_cpu",
                                            "normalize_cpu",  "scale_bias",         "add_bias",
                                            "backward_bias",  "backward_scale_cpu", "mean_delta_cpu",
                                            "variance_delta_cpu", "normalize_delta_cpu"};
static const char *const ko_what[KO_N] = {
    "mean of offset data (1e4 + N(0,1))", "variance of offset data", "variance about a shifted mean",
    "x normalized in place",              "output scaled in place",  "output biased in place",
    "bias_updates accumulated",           "scale_updates accumulated", "mean_delta overwritten",
    "variance_delta overwritten",         "delta normalized in place"};
static const int ko_ulps[KO_N] = {1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0};
static const int ko_per_channel[KO_N] = {1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0};

typedef struct {
    int B, F, S;
    size_t N;
    float *a[KI_N];
    size_t len[KI_N];
} kinputs;

/* Runs the ten kernels of one set; out[k] receives result k. */
static void run_kernels(const kernel_set *k, kinputs *in, float *out[KO_N])
{
    int B = in->B, F = in->F, S = in->S;
    size_t N = in->N, Fz = (size_t)F;
    float **a = in->a;
    fill_const(out[KO_MEAN], Fz, GARBAGE);
    k->mean(a[KI_XO], B, F, S, out[KO_MEAN]);
    fill_const(out[KO_VAR], Fz, GARBAGE);
    k->variance(a[KI_XO], a[KI_MEAN_O], B, F, S, out[KO_VAR]);
    fill_const(out[KO_VARS], Fz, GARBAGE);
    k->variance(a[KI_XO], a[KI_MEAN_OS], B, F, S, out[KO_VARS]);
    memcpy(out[KO_NORM], a[KI_X], N * sizeof(float));
    k->normalize(out[KO_NORM], a[KI_MEAN_X], a[KI_VAR_X], B, F, S);
    memcpy(out[KO_SCALE], a[KI_X], N * sizeof(float));
    k->scale_bias(out[KO_SCALE], a[KI_SCALES], B, F, S);
    memcpy(out[KO_ADD], a[KI_X], N * sizeof(float));
    k->add_bias(out[KO_ADD], a[KI_BIASES], B, F, S);
    memcpy(out[KO_BBIAS], a[KI_BU0], Fz * sizeof(float));
    k->backward_bias(out[KO_BBIAS], a[KI_DELTA], B, F, S);
    memcpy(out[KO_BSCALE], a[KI_SU0], Fz * sizeof(float));
    k->backward_scale(a[KI_XN], a[KI_DELTA], B, F, S, out[KO_BSCALE]);
    fill_const(out[KO_MDELTA], Fz, GARBAGE);
    k->mean_delta(a[KI_DELTA], a[KI_VAR_X], B, F, S, out[KO_MDELTA]);
    fill_const(out[KO_VDELTA], Fz, GARBAGE);
    k->variance_delta(a[KI_X], a[KI_DELTA], a[KI_MEAN_X], a[KI_VAR_X], B, F, S, out[KO_VDELTA]);
    memcpy(out[KO_NDELTA], a[KI_DELTA], N * sizeof(float));
    k->normalize_delta(a[KI_X], a[KI_MEAN_X], a[KI_VAR_X], a[KI_MD], a[KI_VD], B, F, S, out[KO_NDELTA]);
}

typedef struct {
    const char *name;
    int B, F, S;
} kshape;

/* The ten kernels and their _ref twins on one shape, at 1 and 2 threads, against the oracle and each other. */
static void test_kernels_shape(const kshape *sh)
{
    g_test = __func__;
    int B = sh->B, F = sh->F, S = sh->S;
    size_t N = (size_t)B * F * S, Fz = (size_t)F;
    rng_t r;
    rng_init(&r, (uint64_t)B * 1000003u + (uint64_t)F * 1009u + (uint64_t)S);

    kinputs in;
    in.B = B;
    in.F = F;
    in.S = S;
    in.N = N;
    for (int k = 0; k < KI_N; k++) {
        in.len[k] = (k <= KI_DELTA) ? N : Fz;
        in.a[k] = falloc(in.len[k]);
    }
    fill_gauss(&r, in.a[KI_XO], N, 1e4, 1.0);
    fill_gauss(&r, in.a[KI_X], N, 0.3, 1.5);
    fill_gauss(&r, in.a[KI_XN], N, 0.0, 1.0);
    fill_gauss(&r, in.a[KI_DELTA], N, 0.0, 1.0);
    fill_gauss(&r, in.a[KI_SCALES], Fz, 1.0, 0.5);
    fill_gauss(&r, in.a[KI_BIASES], Fz, 0.0, 1.0);
    fill_gauss(&r, in.a[KI_BU0], Fz, 0.0, 3.0);
    fill_gauss(&r, in.a[KI_SU0], Fz, 0.0, 3.0);
    fill_gauss(&r, in.a[KI_MD], Fz, 0.0, 2.0);
    fill_gauss(&r, in.a[KI_VD], Fz, 0.0, 2.0);

    double *d[KI_N];
    d[KI_XO] = f2d(in.a[KI_XO], N);
    d[KI_X] = f2d(in.a[KI_X], N);
    /* the float means/variances handed to the kernels: the oracle's statistics rounded to float */
    {
        double *tm = dalloc(Fz), *tv = dalloc(Fz);
        o_mean(d[KI_XO], B, F, S, tm);
        for (int f = 0; f < F; f++) {
            in.a[KI_MEAN_O][f] = (float)tm[f];
            in.a[KI_MEAN_OS][f] = (float)tm[f] + 0.5f; /* variance_cpu must use the mean it is given */
        }
        o_mean(d[KI_X], B, F, S, tm);
        o_variance(d[KI_X], tm, B, F, S, tv);
        for (int f = 0; f < F; f++) {
            in.a[KI_MEAN_X][f] = (float)tm[f];
            in.a[KI_VAR_X][f] = (float)(B * S > 1 ? tv[f] : 1.0);
        }
        free(tm);
        free(tv);
    }
    for (int k = 0; k < KI_N; k++)
        if (k != KI_XO && k != KI_X)
            d[k] = f2d(in.a[k], in.len[k]);

    double *want[KO_N];
    size_t olen[KO_N];
    for (int k = 0; k < KO_N; k++) {
        olen[k] = ko_per_channel[k] ? Fz : N;
        want[k] = dalloc(olen[k]);
    }
    o_mean(d[KI_XO], B, F, S, want[KO_MEAN]);
    o_variance(d[KI_XO], d[KI_MEAN_O], B, F, S, want[KO_VAR]);
    o_variance(d[KI_XO], d[KI_MEAN_OS], B, F, S, want[KO_VARS]);
    o_normalize(d[KI_X], d[KI_MEAN_X], d[KI_VAR_X], B, F, S, want[KO_NORM]);
    o_scale_bias(d[KI_X], d[KI_SCALES], B, F, S, want[KO_SCALE]);
    o_add_bias(d[KI_X], d[KI_BIASES], B, F, S, want[KO_ADD]);
    o_backward_bias(d[KI_BU0], d[KI_DELTA], B, F, S, want[KO_BBIAS]);
    o_backward_scale(d[KI_SU0], d[KI_XN], d[KI_DELTA], B, F, S, want[KO_BSCALE]);
    o_mean_delta(d[KI_DELTA], d[KI_VAR_X], B, F, S, want[KO_MDELTA]);
    o_variance_delta(d[KI_X], d[KI_DELTA], d[KI_MEAN_X], d[KI_VAR_X], B, F, S, want[KO_VDELTA]);
    o_normalize_delta(d[KI_X], d[KI_MEAN_X], d[KI_VAR_X], d[KI_MD], d[KI_VD], B, F, S, d[KI_DELTA],
                      want[KO_NDELTA]);

    float *pristine[KI_N];
    for (int k = 0; k < KI_N; k++)
        pristine[k] = fdup(in.a[k], in.len[k]);

    float *got[2][KO_N], *gref[KO_N];
    for (int k = 0; k < KO_N; k++) {
        got[0][k] = falloc(olen[k]);
        got[1][k] = falloc(olen[k]);
        gref[k] = falloc(olen[k]);
    }

    char tn[200], what[200];
    for (int t = 0; t < 2; t++) {
        int threads = t + 1;
        snprintf(tn, sizeof tn, "dnbn_set_num_threads [%s]", sh->name);
        check_int(tn, "status", dnbn_set_num_threads(threads), DNBN_OK);
        for (int s = 0; s < 2; s++) {
            const kernel_set *ks = s ? &K_REF : &K_LIB;
            float **outs = s ? gref : got[t];
            run_kernels(ks, &in, outs);
            for (int k = 0; k < KO_N; k++) {
                snprintf(tn, sizeof tn, "%s%s [%s, %d thread%s]", ko_kernel[k], ks->suffix, sh->name, threads,
                         threads > 1 ? "s" : "");
                check_buf(tn, ko_what[k], outs[k], want[k], olen[k], ko_ulps[k]);
            }
            snprintf(tn, sizeof tn, "kernels%s [%s, %d thread%s]", ks->suffix, sh->name, threads,
                     threads > 1 ? "s" : "");
            int untouched = 1;
            for (int k = 0; k < KI_N; k++) {
                if (untouched && memcmp(in.a[k], pristine[k], in.len[k] * sizeof(float)) != 0) {
                    snprintf(what, sizeof what, "input %s left untouched", ki_name[k]);
                    check_same(tn, what, in.a[k], pristine[k], in.len[k]);
                    untouched = 0;
                }
                memcpy(in.a[k], pristine[k], in.len[k] * sizeof(float));
            }
            if (untouched)
                count(1); /* every input left untouched */
        }
    }
    for (int k = 0; k < KO_N; k++) {
        snprintf(tn, sizeof tn, "%s [%s, 2 threads vs 1]", ko_kernel[k], sh->name);
        check_ff(tn, ko_what[k], got[1][k], got[0][k], olen[k], ko_ulps[k]);
    }

    for (int k = 0; k < KI_N; k++) {
        free(in.a[k]);
        free(d[k]);
        free(pristine[k]);
    }
    for (int k = 0; k < KO_N; k++) {
        free(want[k]);
        free(got[0][k]);
        free(got[1][k]);
        free(gref[k]);
    }
}

/* Calls kernel k (0..9) of a set on the given buffers (used by the size and NaN tests). */
static void call_kernel(const kernel_set *ks, int k, float *const buf[8], int B, int F, int S)
{
    switch (k) {
    case 0: ks->mean(buf[0], B, F, S, buf[4]); break;
    case 1: ks->variance(buf[0], buf[2], B, F, S, buf[4]); break;
    case 2: ks->normalize(buf[0], buf[2], buf[3], B, F, S); break;
    case 3: ks->scale_bias(buf[0], buf[2], B, F, S); break;
    case 4: ks->add_bias(buf[0], buf[2], B, F, S); break;
    case 5: ks->backward_bias(buf[4], buf[1], B, F, S); break;
    case 6: ks->backward_scale(buf[0], buf[1], B, F, S, buf[4]); break;
    case 7: ks->mean_delta(buf[1], buf[3], B, F, S, buf[4]); break;
    case 8: ks->variance_delta(buf[0], buf[1], buf[2], buf[3], B, F, S, buf[4]); break;
    default: ks->normalize_delta(buf[0], buf[2], buf[3], buf[5], buf[6], B, F, S, buf[1]); break;
    }
}

static const char *const kernel_names[10] = {"mean_cpu",       "variance_cpu",       "normalize_cpu",
                                              "scale_bias",     "add_bias",           "backward_bias",
                                              "backward_scale_cpu", "mean_delta_cpu", "variance_delta_cpu",
                                              "normalize_delta_cpu"};

/* Every kernel and _ref twin called with a zero or negative batch, filters or spatial writes nothing. */
static void test_kernels_zero_sizes(void)
{
    g_test = __func__;
    static const int sizes[6][3] = {{0, 4, 3}, {2, 0, 3}, {2, 4, 0}, {-1, 4, 3}, {2, -4, 3}, {2, 4, -3}};
    rng_t r;
    rng_init(&r, 77);
    float *buf[8], *copy[8];
    for (int j = 0; j < 8; j++) {
        buf[j] = falloc(64);
        fill_gauss(&r, buf[j], 64, 1.0, 0.5);
        copy[j] = fdup(buf[j], 64);
    }
    char tn[160], what[64];
    dnbn_set_num_threads(2);
    for (int z = 0; z < 6; z++)
        for (int s = 0; s < 2; s++) {
            const kernel_set *ks = s ? &K_REF : &K_LIB;
            for (int k = 0; k < 10; k++) {
                call_kernel(ks, k, buf, sizes[z][0], sizes[z][1], sizes[z][2]);
                snprintf(tn, sizeof tn, "%s%s [batch %d, filters %d, spatial %d]", kernel_names[k], ks->suffix,
                         sizes[z][0], sizes[z][1], sizes[z][2]);
                int ok = 1;
                for (int j = 0; j < 8 && ok; j++)
                    if (memcmp(buf[j], copy[j], 64 * sizeof(float)) != 0) {
                        snprintf(what, sizeof what, "buffer %d written", j);
                        check_same(tn, what, buf[j], copy[j], 64);
                        ok = 0;
                    }
                if (ok)
                    count(1);
                for (int j = 0; j < 8; j++)
                    memcpy(buf[j], copy[j], 64 * sizeof(float));
            }
        }
    for (int j = 0; j < 8; j++) {
        free(buf[j]);
        free(copy[j]);
    }
}

/* variance_cpu with m == 1 gives variance 0 (header); mean_cpu gives the value itself. */
static void test_variance_m1(void)
{
    g_test = __func__;
    float x[4] = {3.5f, -2.0f, 1e4f, 0.25f}, mean[4], var[4];
    for (int s = 0; s < 2; s++) {
        const kernel_set *ks = s ? &K_REF : &K_LIB;
        char tn[96];
        snprintf(tn, sizeof tn, "variance_cpu%s [1x4x1, m = 1]", ks->suffix);
        fill_const(mean, 4, GARBAGE);
        ks->mean(x, 1, 4, 1, mean);
        check_same(tn, "mean_cpu of one value", mean, x, 4);
        fill_const(var, 4, GARBAGE);
        ks->variance(x, mean, 1, 4, 1, var);
        check_const(tn, "variance", var, 4, 0.0f);
    }
}

/* Mean and variance of 346,112 values of mean 1e4 and std 1 in one channel: within 4 float32 ulps (docs/reference.md §3, §6). */
static void test_mean_variance_offset_large(void)
{
    g_test = __func__;
    const int B = 8, F = 1, S = 208 * 208;
    size_t N = (size_t)B * F * S;
    rng_t r;
    rng_init(&r, 346112);
    float *x = falloc(N);
    fill_gauss(&r, x, N, 1e4, 1.0);
    double *xd = f2d(x, N), om, ov, omf;
    o_mean(xd, B, F, S, &om);
    float meanf = (float)om, mean, var;
    omf = meanf;
    o_variance(xd, &omf, B, F, S, &ov);
    char tn[96];
    for (int t = 1; t <= 2; t++) {
        dnbn_set_num_threads(t);
        for (int s = 0; s < 2; s++) {
            const kernel_set *ks = s ? &K_REF : &K_LIB;
            snprintf(tn, sizeof tn, "mean/variance%s [8x1x208x208, offset 1e4, %d thread%s]", ks->suffix, t,
                     t > 1 ? "s" : "");
            mean = GARBAGE;
            ks->mean(x, B, F, S, &mean);
            check_buf(tn, "mean_cpu", &mean, &om, 1, 1);
            var = GARBAGE;
            ks->variance(x, &meanf, B, F, S, &var);
            check_buf(tn, "variance_cpu", &var, &ov, 1, 1);
        }
    }
    free(x);
    free(xd);
}

/* ======================================================================
 * Layer tests
 * ====================================================================== */

typedef struct {
    const char *name;
    int B, W, H, C;
} lshape;

typedef struct {
    float *out, *delta, *scales, *biases, *rm, *rv;
} lsnap;

static void snap_alloc(lsnap *s, size_t N, size_t C)
{
    s->out = falloc(N);
    s->delta = falloc(N);
    s->scales = falloc(C);
    s->biases = falloc(C);
    s->rm = falloc(C);
    s->rv = falloc(C);
}

static void snap_free(lsnap *s)
{
    free(s->out);
    free(s->delta);
    free(s->scales);
    free(s->biases);
    free(s->rm);
    free(s->rv);
}

/* Every buffer of the layer (for "unchanged" checks). */
#define LAYER_NBUF 14
static void layer_bufs(dnbn_layer *l, float *p[LAYER_NBUF], size_t len[LAYER_NBUF], const char *name[LAYER_NBUF])
{
    size_t N = (size_t)l->batch * l->outputs, C = (size_t)l->out_c;
    float *pp[LAYER_NBUF] = {l->output, l->delta, l->x, l->x_norm, l->scales, l->biases, l->scale_updates,
                             l->bias_updates, l->mean, l->variance, l->rolling_mean, l->rolling_variance,
                             l->mean_delta, l->variance_delta};
    static const char *const nn[LAYER_NBUF] = {"output", "delta", "x", "x_norm", "scales", "biases",
                                               "scale_updates", "bias_updates", "mean", "variance",
                                               "rolling_mean", "rolling_variance", "mean_delta",
                                               "variance_delta"};
    for (int k = 0; k < LAYER_NBUF; k++) {
        p[k] = pp[k];
        len[k] = k < 4 ? N : C;
        if (name)
            name[k] = nn[k];
    }
}

typedef struct {
    float *b[LAYER_NBUF];
    size_t len[LAYER_NBUF];
} lcopy;

static void layer_copy(dnbn_layer *l, lcopy *c)
{
    float *p[LAYER_NBUF];
    layer_bufs(l, p, c->len, NULL);
    for (int k = 0; k < LAYER_NBUF; k++)
        c->b[k] = fdup(p[k], c->len[k]);
}

/* Checks every buffer of l except those with skip[k] against the copy. */
static void layer_unchanged(const char *test, const char *when, dnbn_layer *l, lcopy *c, int skip_output)
{
    float *p[LAYER_NBUF];
    size_t len[LAYER_NBUF];
    const char *nm[LAYER_NBUF];
    char what[160];
    layer_bufs(l, p, len, nm);
    for (int k = skip_output ? 1 : 0; k < LAYER_NBUF; k++) {
        snprintf(what, sizeof what, "%s unchanged %s", nm[k], when);
        check_same(test, what, p[k], c->b[k], len[k]);
    }
}

static void layer_copy_free(lcopy *c)
{
    for (int k = 0; k < LAYER_NBUF; k++)
        free(c->b[k]);
}

/* One layer: make, three training steps and an inference forward, every buffer against the oracle. */
static void layer_sequence(const lshape *sh, int numerics, int threads, lsnap *snap)
{
    g_test = __func__;
    int B = sh->B, C = sh->C, S = sh->W * sh->H;
    size_t N = (size_t)B * C * S, Cz = (size_t)C;
    const int std_num = numerics == DNBN_NUMERICS_STANDARD;
    char tn[200], ts[220];
    snprintf(tn, sizeof tn, "layer %s [%s, %d thread%s]", std_num ? "standard" : "darknet", sh->name, threads,
             threads > 1 ? "s" : "");
    check_int(tn, "dnbn_set_num_threads", dnbn_set_num_threads(threads), DNBN_OK);
    rng_t r;
    rng_init(&r, 5000u + (uint64_t)numerics * 17u + (uint64_t)B * 31u + (uint64_t)C * 131u + (uint64_t)S * 7919u);

    errno = 0;
    dnbn_layer *l = dnbn_make_batchnorm_layer(B, sh->W, sh->H, C);
    if (!check_true(tn, "dnbn_make_batchnorm_layer returned a layer", l != NULL))
        return;

    /* initial state (§3) */
    check_int(tn, "batch", l->batch, B);
    check_int(tn, "out_c", l->out_c, C);
    check_int(tn, "out_h", l->out_h, sh->H);
    check_int(tn, "out_w", l->out_w, sh->W);
    check_int(tn, "outputs == c*h*w", l->outputs, (long)C * S);
    check_int(tn, "numerics of a new layer", l->numerics, DNBN_NUMERICS_DARKNET);
    check_int(tn, "dnbn_batchnorm_layer_state of a new layer", dnbn_batchnorm_layer_state(l), 0);
    check_const(tn, "initial scales", l->scales, Cz, 1.0f);
    check_const(tn, "initial biases", l->biases, Cz, 0.0f);
    check_const(tn, "initial rolling_mean", l->rolling_mean, Cz, 0.0f);
    check_const(tn, "initial rolling_variance", l->rolling_variance, Cz, 0.0f);
    check_const(tn, "initial scale_updates", l->scale_updates, Cz, 0.0f);
    check_const(tn, "initial bias_updates", l->bias_updates, Cz, 0.0f);
    check_const(tn, "initial mean_delta", l->mean_delta, Cz, 0.0f);
    check_const(tn, "initial variance_delta", l->variance_delta, Cz, 0.0f);
    check_const(tn, "initial delta", l->delta, N, 0.0f);

    double eps = 1e-5f, mom = 0.1f;
    if (std_num) {
        check_int(tn, "dnbn_batchnorm_layer_set_numerics(STANDARD, 1e-5, 0.1)",
                  dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_STANDARD, 1e-5f, 0.1f), DNBN_OK);
        check_int(tn, "numerics after set_numerics", l->numerics, DNBN_NUMERICS_STANDARD);
        check_true(tn, "eps field == 1e-5f", l->eps == 1e-5f);
        check_true(tn, "momentum field == 0.1f", l->momentum == 0.1f);
        check_const(tn, "rolling_variance reset to 1", l->rolling_variance, Cz, 1.0f);
        check_const(tn, "rolling_mean reset to 0", l->rolling_mean, Cz, 0.0f);
    }
    olayer o;
    ol_init(&o, B, C, S, numerics, eps, mom);

    const float lr = 0.05f, momentum = 0.9f, decay = 0.0005f;
    float *in = falloc(N), *dy = falloc(N), *netd = falloc(N);
    for (int step = 0; step < 3; step++) {
        snprintf(ts, sizeof ts, "%s step %d", tn, step + 1);
        fill_gauss(&r, in, N, 0.3 + 0.2 * step, 1.5 + 0.25 * step);
        dnbn_network net = {.input = in, .delta = netd, .train = 1};
        check_int(ts, "forward status", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
        check_int(ts, "state after a training forward", dnbn_batchnorm_layer_state(l), 2);
        ol_forward(&o, in, 1);
        check_buf(ts, "forward output", l->output, o.out, N, 0);
        check_same(ts, "x (the input kept)", l->x, in, N);
        check_buf(ts, "x_norm", l->x_norm, o.xn, N, 0);
        check_buf(ts, "mean", l->mean, o.mean, Cz, 1);
        check_buf(ts, std_num ? "variance (biased)" : "variance (unbiased)", l->variance, o.var, Cz, 1);
        check_buf(ts, "rolling_mean", l->rolling_mean, o.rm, Cz, 0);
        check_buf(ts, "rolling_variance", l->rolling_variance, o.rv, Cz, 0);

        fill_gauss(&r, l->delta, N, 0.0, 1.0);
        memcpy(dy, l->delta, N * sizeof(float));
        fill_const(netd, N, GARBAGE);
        check_int(ts, "backward status", dnbn_backward_batchnorm_layer(l, net), DNBN_OK);
        ol_backward(&o, dy);
        check_buf(ts, "bias_updates after backward", l->bias_updates, o.bu, Cz, 0);
        check_buf(ts, "scale_updates after backward", l->scale_updates, o.su, Cz, 0);
        if (!std_num) {
            check_buf(ts, "mean_delta", l->mean_delta, o.md, Cz, 0);
            check_buf(ts, "variance_delta", l->variance_delta, o.vd, Cz, 0);
        }
        check_buf(ts, "l->delta after backward (-dLoss/dx)", l->delta, o.delta, N, 0);
        check_buf(ts, "net.delta after backward (-dLoss/dx)", netd, o.delta, N, 0);

        check_int(ts, "update status", dnbn_update_batchnorm_layer(l, lr, momentum, decay), DNBN_OK);
        ol_update(&o, (double)lr, (double)momentum);
        check_buf(ts, "scales after update", l->scales, o.scales, Cz, 0);
        check_buf(ts, "biases after update", l->biases, o.biases, Cz, 0);
        check_buf(ts, "scale_updates after update", l->scale_updates, o.su, Cz, 0);
        check_buf(ts, "bias_updates after update", l->bias_updates, o.bu, Cz, 0);
    }

    /* inference with the rolling statistics: only output changes */
    snprintf(ts, sizeof ts, "%s inference", tn);
    fill_gauss(&r, in, N, 0.3, 1.5);
    lcopy before;
    layer_copy(l, &before);
    dnbn_network inet = {.input = in, .delta = NULL, .train = 0};
    check_int(ts, "forward status", dnbn_forward_batchnorm_layer(l, inet), DNBN_OK);
    check_int(ts, "state after an inference forward", dnbn_batchnorm_layer_state(l), 1);
    ol_forward(&o, in, 0);
    check_buf(ts, "inference output", l->output, o.out, N, 0);
    layer_unchanged(ts, "by inference", l, &before, 1);
    layer_copy_free(&before);

    if (snap) {
        memcpy(snap->out, l->output, N * sizeof(float));
        memcpy(snap->delta, l->delta, N * sizeof(float));
        memcpy(snap->scales, l->scales, Cz * sizeof(float));
        memcpy(snap->biases, l->biases, Cz * sizeof(float));
        memcpy(snap->rm, l->rolling_mean, Cz * sizeof(float));
        memcpy(snap->rv, l->rolling_variance, Cz * sizeof(float));
    }
    free(in);
    free(dy);
    free(netd);
    ol_free(&o);
    dnbn_free_batchnorm_layer(l);
}

/* The layer sequence in both numerics at 1 and 2 threads; the two thread counts agree within tolerance. */
static void test_layer_shape(const lshape *sh)
{
    size_t N = (size_t)sh->B * sh->C * sh->W * sh->H, C = (size_t)sh->C;
    for (int numerics = DNBN_NUMERICS_DARKNET; numerics <= DNBN_NUMERICS_STANDARD; numerics++) {
        lsnap s1, s2;
        snap_alloc(&s1, N, C);
        snap_alloc(&s2, N, C);
        layer_sequence(sh, numerics, 1, &s1);
        layer_sequence(sh, numerics, 2, &s2);
        char tn[200];
        snprintf(tn, sizeof tn, "layer %s [%s, 2 threads vs 1]",
                 numerics == DNBN_NUMERICS_STANDARD ? "standard" : "darknet", sh->name);
        check_ff(tn, "inference output", s2.out, s1.out, N, 0);
        check_ff(tn, "last delta", s2.delta, s1.delta, N, 0);
        check_ff(tn, "scales", s2.scales, s1.scales, C, 0);
        check_ff(tn, "biases", s2.biases, s1.biases, C, 0);
        check_ff(tn, "rolling_mean", s2.rm, s1.rm, C, 0);
        check_ff(tn, "rolling_variance", s2.rv, s1.rv, C, 0);
        snap_free(&s1);
        snap_free(&s2);
    }
}

/* Layer batch mean and variance of data with offsets up to 1e4 (std 2): within 4 float32 ulps, both numerics. */
static void test_layer_offset_stats(void)
{
    g_test = __func__;
    const int B = 4, W = 13, H = 13, C = 8, S = W * H;
    size_t N = (size_t)B * C * S;
    rng_t r;
    rng_init(&r, 99);
    float *in = falloc(N);
    for (int b = 0; b < B; b++)
        for (int f = 0; f < C; f++) {
            double off = (f % 2 ? -1.0 : 1.0) * 1e4 / (1 << (f / 2));
            fill_gauss(&r, in + IDX(b, f, 0, C, S), (size_t)S, off, 2.0);
        }
    for (int t = 1; t <= 2; t++)
        for (int numerics = 0; numerics <= 1; numerics++) {
            char tn[160];
            snprintf(tn, sizeof tn, "layer %s offset statistics [4x8x13x13, %d thread%s]",
                     numerics ? "standard" : "darknet", t, t > 1 ? "s" : "");
            dnbn_set_num_threads(t);
            dnbn_layer *l = dnbn_make_batchnorm_layer(B, W, H, C);
            if (!check_true(tn, "dnbn_make_batchnorm_layer", l != NULL))
                continue;
            if (numerics)
                dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_STANDARD, 1e-5f, 0.1f);
            olayer o;
            ol_init(&o, B, C, S, numerics, 1e-5f, 0.1f);
            dnbn_network net = {.input = in, .delta = NULL, .train = 1};
            check_int(tn, "forward status", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
            ol_forward(&o, in, 1);
            check_buf(tn, "mean", l->mean, o.mean, (size_t)C, 1);
            check_buf(tn, "variance", l->variance, o.var, (size_t)C, 1);
            check_buf(tn, "rolling_mean", l->rolling_mean, o.rm, (size_t)C, 0);
            check_buf(tn, "rolling_variance", l->rolling_variance, o.rv, (size_t)C, 0);
            ol_free(&o);
            dnbn_free_batchnorm_layer(l);
        }
    free(in);
}

/* A training forward with m = batch*h*w < 2 returns DNBN_ERR_ARG and writes nothing; inference still works. */
static void test_forward_m_below_2(void)
{
    g_test = __func__;
    const int C = 3;
    const char *tn = "dnbn_forward_batchnorm_layer [1x3x1x1, m = 1]";
    for (int t = 1; t <= 2; t++) {
        dnbn_set_num_threads(t);
        dnbn_layer *l = dnbn_make_batchnorm_layer(1, 1, 1, C);
        if (!check_true(tn, "dnbn_make_batchnorm_layer(1, 1, 1, 3) returns a layer", l != NULL))
            return;
        fill_const(l->output, C, 5.0f);
        fill_const(l->x, C, 5.5f);
        fill_const(l->x_norm, C, 6.0f);
        fill_const(l->mean, C, 6.5f);
        fill_const(l->variance, C, 7.0f);
        fill_const(l->rolling_mean, C, 3.0f);
        fill_const(l->rolling_variance, C, 5.0f);
        fill_const(l->scales, C, 2.0f);
        fill_const(l->biases, C, 0.5f);
        lcopy before;
        layer_copy(l, &before);
        float in[3] = {1.0f, -2.0f, 4.0f};
        dnbn_network net = {.input = in, .delta = NULL, .train = 1};
        check_int(tn, "training forward status", dnbn_forward_batchnorm_layer(l, net), DNBN_ERR_ARG);
        layer_unchanged(tn, "after the failed training forward", l, &before, 0);
        check_int(tn, "state after the failed forward", dnbn_batchnorm_layer_state(l), 0);
        check_int(tn, "backward after the failed forward", dnbn_backward_batchnorm_layer(l, net), DNBN_ERR_STATE);
        net.train = 0;
        check_int(tn, "inference forward status", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
        double want[3];
        for (int f = 0; f < C; f++)
            want[f] = (in[f] - 3.0) / (sqrt(5.0) + 1e-6) * 2.0 + 0.5;
        check_buf(tn, "inference output with m = 1", l->output, want, 3, 0);
        check_int(tn, "state after the inference forward", dnbn_batchnorm_layer_state(l), 1);
        layer_copy_free(&before);
        dnbn_free_batchnorm_layer(l);
    }
}

/* backward before any forward, after inference, or with net.train == 0: DNBN_ERR_STATE, nothing written. */
static void test_backward_state(void)
{
    g_test = __func__;
    const char *tn = "dnbn_backward_batchnorm_layer state [2x2x3x3]";
    dnbn_set_num_threads(2);
    dnbn_layer *l = dnbn_make_batchnorm_layer(2, 3, 3, 2);
    if (!check_true(tn, "dnbn_make_batchnorm_layer", l != NULL))
        return;
    size_t N = 2 * 2 * 9;
    rng_t r;
    rng_init(&r, 3);
    float in[36], netd[36], dbuf[36];
    fill_gauss(&r, in, N, 0.0, 1.0);
    fill_gauss(&r, l->delta, N, 0.0, 1.0);
    fill_gauss(&r, dbuf, N, 0.0, 1.0);
    fill_const(netd, N, GARBAGE);
    dnbn_network net = {.input = in, .delta = netd, .train = 1};
    lcopy c0;
    layer_copy(l, &c0);
    check_int(tn, "backward before any forward", dnbn_backward_batchnorm_layer(l, net), DNBN_ERR_STATE);
    check_int(tn, "dnbn_backward_batchnorm_layer_from before any forward", dnbn_backward_batchnorm_layer_from(l, dbuf),
              DNBN_ERR_STATE);
    layer_unchanged(tn, "after backward before any forward", l, &c0, 0);
    check_const(tn, "net.delta untouched by the failed backward", netd, N, GARBAGE);
    layer_copy_free(&c0);

    net.train = 0;
    check_int(tn, "inference forward", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
    net.train = 1;
    layer_copy(l, &c0);
    check_int(tn, "backward after an inference forward", dnbn_backward_batchnorm_layer(l, net), DNBN_ERR_STATE);
    check_int(tn, "dnbn_backward_batchnorm_layer_from after an inference forward", dnbn_backward_batchnorm_layer_from(l, dbuf),
              DNBN_ERR_STATE);
    layer_unchanged(tn, "after backward after inference", l, &c0, 0);
    layer_copy_free(&c0);

    check_int(tn, "training forward", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
    net.train = 0;
    layer_copy(l, &c0);
    check_int(tn, "backward with net.train == 0", dnbn_backward_batchnorm_layer(l, net), DNBN_ERR_STATE);
    layer_unchanged(tn, "after backward with net.train == 0", l, &c0, 0);
    layer_copy_free(&c0);
    net.train = 1;
    check_int(tn, "backward after the training forward", dnbn_backward_batchnorm_layer(l, net), DNBN_OK);

    /* NULL arguments */
    check_int(tn, "dnbn_forward_batchnorm_layer(NULL, net)", dnbn_forward_batchnorm_layer(NULL, net), DNBN_ERR_ARG);
    check_int(tn, "dnbn_backward_batchnorm_layer(NULL, net)", dnbn_backward_batchnorm_layer(NULL, net), DNBN_ERR_ARG);
    check_int(tn, "dnbn_update_batchnorm_layer(NULL, ...)", dnbn_update_batchnorm_layer(NULL, 0.1f, 0.9f, 0.0f), DNBN_ERR_ARG);
    dnbn_network nonet = {.input = NULL, .delta = NULL, .train = 1};
    layer_copy(l, &c0);
    check_int(tn, "forward with net.input == NULL", dnbn_forward_batchnorm_layer(l, nonet), DNBN_ERR_ARG);
    layer_unchanged(tn, "after forward with net.input == NULL", l, &c0, 0);
    layer_copy_free(&c0);
    dnbn_free_batchnorm_layer(l);
}

/* dnbn_make_batchnorm_layer with a zero, negative or overflowing size returns NULL with errno EINVAL; free(NULL) is fine. */
static void test_make_errors(void)
{
    g_test = __func__;
    static const int bad[][4] = {{0, 3, 3, 2},  {2, 0, 3, 2},  {2, 3, 0, 2},  {2, 3, 3, 0},
                                 {-1, 3, 3, 2}, {2, -3, 3, 2}, {2, 3, -3, 2}, {2, 3, 3, -2},
                                 {INT_MAX, INT_MAX, INT_MAX, INT_MAX}};
    char tn[128];
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        snprintf(tn, sizeof tn, "dnbn_make_batchnorm_layer(%d, %d, %d, %d)", bad[k][0], bad[k][1], bad[k][2], bad[k][3]);
        errno = 0;
        dnbn_layer *l = dnbn_make_batchnorm_layer(bad[k][0], bad[k][1], bad[k][2], bad[k][3]);
        int e = errno;
        check_true(tn, "returns NULL", l == NULL);
        check_int(tn, "errno", e, EINVAL);
        dnbn_free_batchnorm_layer(l);
    }
    dnbn_free_batchnorm_layer(NULL);
    check_true("dnbn_free_batchnorm_layer(NULL)", "returns", 1);
}

/* The VmFlags line of the mapping holding address a in /proc/self/smaps into
 * flags (empty when it cannot be read); returns whether the mapping was found. */
static int mapping_flags(const void *a, char *flags, size_t size)
{
    flags[0] = '\0';
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return 0;
    char line[512];
    int in = 0, found = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long long lo, hi;
        if (sscanf(line, "%llx-%llx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            in = (uintptr_t)a >= lo && (uintptr_t)a < hi;
        } else if (in && strncmp(line, "VmFlags:", 8) == 0) {
            size_t n = strlen(line + 8) < size - 1 ? strlen(line + 8) : size - 1;
            memcpy(flags, line + 8, n);
            flags[n] = '\0';
            found = 1;
            break;
        }
    }
    fclose(f);
    return found;
}

/* A layer of 4 MB and more asks for huge pages over its buffers (docs/reference.md §5): the mapping
 * holding its activations carries the kernel's "hg" flag. Checked where the kernel has transparent
 * huge pages and shows the flags (Linux); elsewhere the advice is not given and nothing is asserted. */
static void test_huge_page_advice(void)
{
    g_test = __func__;
    const char *tn = "dnbn_make_batchnorm_layer(8, 52, 52, 128)";
    if (access("/sys/kernel/mm/transparent_hugepage/enabled", R_OK) != 0) {
        check_true(tn, "skipped: no transparent huge pages here", 1);
        return;
    }
    dnbn_layer *l = dnbn_make_batchnorm_layer(8, 52, 52, 128); /* 11 MB per activation tensor */
    char flags[256];
    check_true(tn, "made", l != NULL);
    if (!l) return;
    const float *buffers[] = {l->output, l->delta, l->x, l->x_norm};
    for (size_t k = 0; k < sizeof buffers / sizeof *buffers; k++) {
        int found = mapping_flags(buffers[k] + 1024 * 1024, flags, sizeof flags); /* 4 MB in: a whole page */
        check_true(tn, "mapping of an activation buffer listed in /proc/self/smaps", found);
        check_true(tn, "that mapping advised for huge pages (VmFlags hg)", found && strstr(flags, " hg") != NULL);
    }
    dnbn_free_batchnorm_layer(l);
}

/* Layer functions on a layer whose sizes are zero, negative or inconsistent, or whose buffers are NULL,
 * return DNBN_ERR_ARG and write nothing; moments of a shard without values are 0; a layer of batch 0
 * (an empty shard) takes global statistics and moves its running statistics. */
static void test_layer_edges(void)
{
    g_test = __func__;
    const char *tn = "caller-built layer edges";
    dnbn_layer *made = dnbn_make_batchnorm_layer(2, 3, 2, 4);
    float input[48];
    for (int i = 0; i < 48; i++) input[i] = (float)(i % 7) - 2.5f;
    dnbn_network net = {.input = input, .delta = NULL, .train = 1};
    int sizes[][5] = {{0, 4, 2, 3, 24}, {2, 0, 2, 3, 24}, {2, 4, -2, 3, 24}, {-1, 4, 2, 3, 24},
                      {2, 4, 2, 3, 25}, {2, 4, 2, INT_MAX, 24}, {2, INT_MAX, INT_MAX, INT_MAX, 24}};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        dnbn_layer l = *made;
        l.batch = sizes[k][0], l.out_c = sizes[k][1], l.out_h = sizes[k][2], l.out_w = sizes[k][3];
        l.outputs = sizes[k][4];
        float before = l.output[0], rm = l.rolling_mean[0];
        /* (batch 0 is a valid size, but cannot train: m < 2) */
        check_int(tn, "forward", dnbn_forward_batchnorm_layer(&l, net), DNBN_ERR_ARG);
        check_true(tn, "forward wrote nothing", l.output[0] == before && l.rolling_mean[0] == rm);
        if (sizes[k][0] != 0) {
            net.train = 0;
            check_int(tn, "inference forward", dnbn_forward_batchnorm_layer(&l, net), DNBN_ERR_ARG);
            net.train = 1;
            check_int(tn, "fill_x_norm", dnbn_batchnorm_layer_fill_x_norm(&l), DNBN_ERR_ARG);
            check_int(tn, "backward", dnbn_backward_batchnorm_layer(&l, net), DNBN_ERR_ARG);
            check_int(tn, "update", dnbn_update_batchnorm_layer(&l, 0.1f, 0.9f, 0), DNBN_ERR_ARG);
        }
    }
    float **bufs[] = {&made->output, &made->x, &made->delta, &made->scales, &made->rolling_mean};
    for (size_t k = 0; k < sizeof bufs / sizeof *bufs; k++) {
        dnbn_layer l = *made;
        *(float **)((char *)&l + ((char *)bufs[k] - (char *)made)) = NULL;
        /* forward does not need delta; backward needs all five */
        check_int(tn, "forward with a NULL buffer", dnbn_forward_batchnorm_layer(&l, net),
                  bufs[k] == &made->delta ? DNBN_OK : DNBN_ERR_ARG);
        check_int(tn, "backward with a NULL buffer", dnbn_backward_batchnorm_layer(&l, net), DNBN_ERR_ARG);
    }
    dnbn_layer nos = *made;
    nos.scratch = NULL;
    check_int(tn, "forward without scratch", dnbn_forward_batchnorm_layer(&nos, net), DNBN_ERR_ARG);

    double mean[3] = {9, 9, 9}, m2[3] = {9, 9, 9};
    dnbn_batchnorm_moments(input, 0, 3, 8, mean, m2);
    check_true(tn, "moments of batch 0", mean[0] == 0 && m2[2] == 0);
    mean[1] = 9;
    dnbn_batchnorm_moments(input, 2, 3, 0, mean, m2);
    check_true(tn, "moments of spatial 0", mean[1] == 0);

    /* an empty shard: batch 0, global statistics given */
    dnbn_layer empty = *made;
    empty.batch = 0;
    check_int(tn, "set_numerics (running statistics reset)",
              dnbn_batchnorm_layer_set_numerics(&empty, DNBN_NUMERICS_DARKNET, 1e-5f, 0.01f), DNBN_OK);
    double gmean[4] = {1, 2, 3, 4}, gm2[4] = {4, 8, 12, 16}; /* the layer's 4 channels */
    check_int(tn, "forward_moments on an empty shard", dnbn_batchnorm_layer_forward_moments(&empty, input, 5, gmean, gm2),
              DNBN_OK);
    /* darknet numerics, rolling from 0: 0.01 * mean and 0.01 * m2/(count-1) */
    check_true(tn, "empty shard: rolling_mean", fabs(empty.rolling_mean[2] - 0.03) < 1e-7);
    check_true(tn, "empty shard: rolling_variance", fabs(empty.rolling_variance[1] - 0.02) < 1e-7);
    double s[4], sd[4];
    check_int(tn, "backward_sums on an empty shard", dnbn_batchnorm_layer_backward_sums(&empty, empty.delta, s, sd),
              DNBN_OK);
    dnbn_free_batchnorm_layer(made);
}

/* The shapes tests/_reliability.py PATHS gives each work split really take it at their thread count:
 * "channels" (whole channels, a few per unit, several threads), "groups" (many channels per unit),
 * "split" (fewer channels than threads: parts > 1), "fc" (spatial == 1 tiles on several threads).
 * Keep the two lists in step. */
static void test_paths_run_what_they_name(void)
{
    g_test = __func__;
    const char *tn = "work split of the PATHS shapes";
    int saved = dnbn_get_num_threads();
    dnbn_set_num_threads(2);
    dnbn_part ch = dnbn_partition(2, 32, 128 * 128, 1);
    check_true(tn, "channels: 2 threads, whole channels, 2..8 per unit",
               ch.threads == 2 && ch.parts == 1 && ch.group >= 2 && ch.group < 8);
    dnbn_part gr = dnbn_partition(8, 128, 12 * 12, 1);
    check_true(tn, "groups: 2 threads, >= 8 channels per unit", gr.threads == 2 && gr.parts == 1 && gr.group >= 8);
    dnbn_part fc = dnbn_partition(8192, 40, 1, 1);
    check_true(tn, "fc (tall): 2 threads over ranges of whole images", fc.threads == 2 && fc.parts > 2 && fc.group == 40);
    dnbn_part wide = dnbn_partition(64, 1024, 1, 1);
    check_true(tn, "fc (wide): tiles over all the images", wide.parts == 1 && wide.group < 1024);
    dnbn_set_num_threads(3);
    dnbn_part sp = dnbn_partition(2, 2, 320 * 320, 1);
    check_true(tn, "split: 3 threads, channels cut in parts", sp.threads == 3 && sp.parts > 1);
    dnbn_set_num_threads(saved);
}

/* Values covered by the units of a partition (each once: units tile channels x values). */
static idx_t partition_values(const dnbn_part *pt)
{
    idx_t covered = 0;
    for (idx_t u = 0; u < dnbn_units(pt); u++) {
        dnbn_unit w = dnbn_unit_at(pt, u);
        covered += w.nf * (w.j1 - w.j0);
    }
    return covered;
}

/* Several threads: enough units that a worker which wakes late still finds some (about eight channel
 * groups per thread; a tall spatial == 1 tensor about four image ranges per thread); one thread: groups
 * sized by the cache alone, and a tall tensor in one tile. Units always tile the tensor exactly. */
static void test_partition_leaves_work_for_late_workers(void)
{
    g_test = __func__;
    const char *tn = "partition";
    int saved = dnbn_get_num_threads();
    dnbn_set_num_threads(2);
    for (int reads = 1; reads <= 2; reads++) {
        dnbn_part pt = dnbn_partition(8, 128, 52 * 52, reads);
        check_true(tn, "8x128x52x52 at 2 threads: whole channels, >= 16 units", pt.threads == 2 && pt.parts == 1 &&
                                                                                  dnbn_units(&pt) >= 16);
        check_true(tn, "8x128x52x52 at 2 threads: units tile the tensor", partition_values(&pt) == 128 * 8 * 2704);
    }
    dnbn_part tall = dnbn_partition(21632, 128, 1, 1);
    check_true(tn, "21632x128 at 2 threads: 8 ranges of whole images", tall.parts == 8 && tall.group == 128);
    check_true(tn, "21632x128 at 2 threads: units tile the tensor", partition_values(&tall) == (idx_t)21632 * 128);
    dnbn_set_num_threads(1);
    dnbn_part one = dnbn_partition(8, 128, 52 * 52, 1);
    idx_t by_cache = dnbn_group_bytes() / (8 * 2704 * (idx_t)sizeof(float));
    check_true(tn, "8x128x52x52 at 1 thread: groups sized by the cache",
               one.group == (by_cache > 64 ? 64 : by_cache < 1 ? 1 : by_cache));
    dnbn_part tall1 = dnbn_partition(21632, 128, 1, 1);
    check_true(tn, "21632x128 at 1 thread: one tile of all the images", tall1.parts == 1 && dnbn_units(&tall1) == 1);
    check_true(tn, "21632x128 at 1 thread: units tile the tensor", partition_values(&tall1) == (idx_t)21632 * 128);
    dnbn_set_num_threads(saved);
}

/* Threads of this process (entries of /proc/self/task), or -1 where that is not available. */
static int process_threads(void)
{
    DIR *d = opendir("/proc/self/task");
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

static void wait_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* The worker pool persists between calls (no thread is created per call) and shrinks with the setting. */
static void test_pool_persists_and_shrinks(void)
{
    g_test = __func__;
    const char *tn = "worker pool";
    if (process_threads() < 0) return;
    int saved = dnbn_get_num_threads();
    dnbn_layer *l = dnbn_make_batchnorm_layer(4, 128, 128, 8); /* 2^19 values: 4 threads' worth */
    dnbn_network net = {.input = l->output, .delta = NULL, .train = 1};
    /* this test program runs no other thread between tests: the process is the main thread + workers */
    dnbn_set_num_threads(4);
    check_int(tn, "forward at 4 threads", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
    check_int(tn, "three workers stay after the call", process_threads(), 1 + 3);
    check_int(tn, "another call", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
    check_int(tn, "no thread created per call", process_threads(), 1 + 3);
    dnbn_set_num_threads(2);
    int after = process_threads();
    for (int i = 0; i < 200 && after > 1 + 1; i++) {
        wait_ms(5);
        after = process_threads();
    }
    check_int(tn, "workers above the setting exit", after, 1 + 1);
    check_int(tn, "forward at 2 threads", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
    dnbn_free_batchnorm_layer(l);
    dnbn_set_num_threads(saved);
}

/* A thread team for test_team, with GOMP_parallel's contract: body(arg) on `threads` threads, the caller
 * among them (at most 8 here), returning when all have returned. Counts its calls and members. */
static atomic_int team_calls, team_members;
typedef struct team_task {
    void (*body)(void *);
    void *arg;
} team_task;

static void *team_member(void *p)
{
    team_task *t = p;
    atomic_fetch_add(&team_members, 1);
    t->body(t->arg);
    return NULL;
}

static void test_team_run(void (*body)(void *), void *arg, unsigned threads, unsigned flags)
{
    (void)flags;
    atomic_fetch_add(&team_calls, 1);
    team_task t = {body, arg};
    pthread_t ids[8];
    int started[8] = {0};
    unsigned n = threads < 8 ? threads : 8;
    for (unsigned k = 1; k < n; k++) started[k] = pthread_create(&ids[k], NULL, team_member, &t) == 0;
    team_member(&t);
    for (unsigned k = 1; k < n; k++)
        if (started[k]) pthread_join(ids[k], NULL);
}

/* One training step and an inference forward of a fresh layer on x and dy; the outputs into out (4 tensors). */
static void team_step(int B, int C, int W, const float *x, const float *dy, float *out)
{
    size_t N = (size_t)B * C * W * W;
    dnbn_layer *l = dnbn_make_batchnorm_layer(B, W, W, C);
    dnbn_network net = {.input = (float *)x, .delta = NULL, .train = 1};
    dnbn_forward_batchnorm_layer(l, net);
    memcpy(out, l->output, N * sizeof(float));
    memcpy(out + N, l->x_norm, N * sizeof(float));
    dnbn_backward_batchnorm_layer_from(l, (float *)dy);
    memcpy(out + 2 * N, l->delta, N * sizeof(float));
    net.train = 0;
    dnbn_forward_batchnorm_layer(l, net);
    memcpy(out + 3 * N, l->output, N * sizeof(float));
    dnbn_free_batchnorm_layer(l);
}

/* dnbn_set_team: parallel calls run on the given team (every call of several threads, each with the
 * thread count it asks for), with the pool's results bit for bit; NULL returns to the pool; a forked
 * child starts with the pool; the tuning report says which. */
static void test_team(void)
{
    g_test = __func__;
    const char *tn = "dnbn_set_team";
    const int B = 4, C = 16, W = 64; /* 2^18 values: 2 threads at the tests' fixed threshold */
    size_t N = (size_t)B * C * W * W;
    int saved = dnbn_get_num_threads();
    dnbn_set_num_threads(2);
    rng_t r;
    rng_init(&r, 1205);
    float *x = falloc(N), *dy = falloc(N), *pool_out = falloc(4 * N), *team_out = falloc(4 * N);
    fill_gauss(&r, x, N, 0.5, 2.0);
    fill_gauss(&r, dy, N, 0.0, 1.0);
    check_true(tn, "the pool at first", dnbn_get_team() == NULL);
    team_step(B, C, W, x, dy, pool_out);
    atomic_store(&team_calls, 0), atomic_store(&team_members, 0);
    dnbn_set_team(test_team_run);
    check_true(tn, "the team given is the team", dnbn_get_team() == test_team_run);
    char report[256];
    dnbn_tuning_report(report, sizeof report);
    check_true(tn, "report: team external", strstr(report, "\"team\": \"external\"") != NULL);
    team_step(B, C, W, x, dy, team_out);
    int calls = atomic_load(&team_calls);
    check_true(tn, "the step's parallel calls ran on the team", calls >= 3);
    check_int(tn, "each with 2 members", atomic_load(&team_members), 2 * calls);
    check_same(tn, "outputs on the team are the pool's", team_out, pool_out, 4 * N);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGALRM, SIG_DFL);
        alarm(20);
        int bad = dnbn_get_team() != NULL;
        float *child_out = falloc(4 * N);
        team_step(B, C, W, x, dy, child_out);
        bad += atomic_load(&team_calls) != calls; /* the child ran none on the team */
        bad += memcmp(child_out, pool_out, 4 * N * sizeof(float)) != 0;
        free(child_out), free(x), free(dy), free(pool_out), free(team_out);
        _exit(bad ? 1 : 0);
    }
    int status = 0;
    check_true(tn, "fork", pid > 0 && waitpid(pid, &status, 0) == pid);
    check_true(tn, "child: the pool again, the same outputs", WIFEXITED(status) && WEXITSTATUS(status) == 0);
    check_true(tn, "the parent keeps its team", dnbn_get_team() == test_team_run);
    dnbn_set_team(NULL);
    check_true(tn, "NULL: the pool again", dnbn_get_team() == NULL);
    team_step(B, C, W, x, dy, team_out);
    check_int(tn, "no call on the team after NULL", atomic_load(&team_calls), calls);
    check_same(tn, "outputs back on the pool", team_out, pool_out, 4 * N);
    dnbn_tuning_report(report, sizeof report);
    check_true(tn, "report: team pool", strstr(report, "\"team\": \"pool\"") != NULL);
    free(x), free(dy), free(pool_out), free(team_out);
    dnbn_set_num_threads(saved);
}

/* A float for the primitive tests: mostly ordinary, sometimes NaN, infinite, denormal or near FLT_MAX. */
static float prim_value(rng_t *r)
{
    switch (rng_u64(r) % 16) {
    case 0: return NAN;
    case 1: return (rng_u64(r) & 1) ? INFINITY : -INFINITY;
    case 2: return 1e-41f;
    case 3: return (rng_u64(r) & 1) ? 3.2e38f : -3.2e38f;
    default: return (float)(rng_gauss(r) * 3 + 1);
    }
}

/* The same bits, or NaN in both (a NaN's payload depends on which NaN operand an operation meets first,
 * and the two builds add in the same order but may meet two NaNs in another). */
static int same_doubles(const double *a, const double *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof *a) != 0 && !(isnan(a[i]) && isnan(b[i]))) return 0;
    return 1;
}

static int same_floats(const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof *a) != 0 && !(isnan(a[i]) && isnan(b[i]))) return 0;
    return 1;
}

/* Whether this CPU runs the AVX2 build (else a note that `test` is skipped). */
static int have_avx2(const char *test)
{
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    printf("note: no AVX2+FMA on this CPU, %s skipped\n", test);
    return 0;
}

/* Every row primitive of the portable build and of the AVX2 build (where this CPU has it) gives the same
 * bits on the same inputs: lengths 0..67 (vector bodies and scalar tails), unaligned starts, special values. */
static void test_row_primitives_bit_identical(void)
{
    g_test = __func__;
    const char *tn = "generic vs avx2 row primitives";
    const dnbn_rows *g = &dnbn_rows_generic, *v = &dnbn_rows_avx2;
    if (!have_avx2(__func__)) return;
    enum { N = 67, OFF = 3 };
    rng_t r;
    rng_init(&r, 20261204);
    float in[N + OFF], x2[N + OFF], par[8][N];
    double dk[4][N];
    int compared = 0, differ = 0;
    for (int trial = 0; trial < 40; trial++) {
        for (int i = 0; i < N + OFF; i++) in[i] = prim_value(&r), x2[i] = prim_value(&r);
        if (trial % 2) /* half the trials without special values */
            for (int i = 0; i < N + OFF; i++) in[i] = (float)rng_gauss(&r), x2[i] = (float)rng_gauss(&r);
        for (int k = 0; k < 8; k++)
            for (int i = 0; i < N; i++) par[k][i] = k == 2 ? (float)(0.5 + rng_unif(&r)) : (float)rng_gauss(&r);
        for (int k = 0; k < 4; k++)
            for (int i = 0; i < N; i++) dk[k][i] = rng_gauss(&r);
        for (idx_t n = 0; n <= N; n++) {
            const float *a = in + trial % OFF, *b = x2 + (trial / OFF) % OFF;
            float mh = par[0][0], ml = par[1][0] * 1e-8f, inv = par[2][0], gm = par[3][0], bt = par[4][0];
            /* reductions */
            double rg[2], rv[2], sg[2] = {0, 0}, sv[2] = {0, 0};
            rg[0] = g->sum(a, n), rv[0] = v->sum(a, n);
            differ += !same_doubles(rg, rv, 1);
            rg[0] = g->sum_sq_dev(a, n, mh), rv[0] = v->sum_sq_dev(a, n, mh);
            rg[1] = g->dot(a, b, n), rv[1] = v->dot(a, b, n);
            differ += !same_doubles(rg, rv, 2);
            rg[0] = g->dot_dev(a, b, n, mh), rv[0] = v->dot_dev(a, b, n, mh);
            differ += !same_doubles(rg, rv, 1);
            g->sums_dev(a, b, n, dk[0][0], &sg[0], &sg[1]);
            v->sums_dev(a, b, n, dk[0][0], &sv[0], &sv[1]);
            differ += !same_doubles(sg, sv, 2);
            rg[0] = rg[1] = rv[0] = rv[1] = 0; /* shifted_sums adds to them */
            g->shifted_sums(a, n, dk[1][0], &rg[0], &rg[1]);
            v->shifted_sums(a, n, dk[1][0], &rv[0], &rv[1]);
            differ += !same_doubles(rg, rv, 2);
            /* elementwise, each output compared */
            float og[4][N], ov[4][N];
            memcpy(og[0], a, (size_t)n * 4), memcpy(ov[0], a, (size_t)n * 4);
            g->scale(og[0], n, gm), v->scale(ov[0], n, gm);
            g->shift(og[0], n, bt), v->shift(ov[0], n, bt);
            g->normalize(og[0], n, mh, inv), v->normalize(ov[0], n, mh, inv);
            differ += !same_floats(og[0], ov[0], (size_t)n);
            for (int stream = 0; stream < 2; stream++) {
                g->forward_train(a, og[0], og[1], og[2], n, mh, ml, inv, gm, bt, stream);
                v->forward_train(a, ov[0], ov[1], ov[2], n, mh, ml, inv, gm, bt, stream);
                g->forward_infer(a, og[3], n, mh, ml, inv, gm, bt, stream);
                v->forward_infer(a, ov[3], n, mh, ml, inv, gm, bt, stream);
                for (int k = 0; k < 4; k++) differ += !same_floats(og[k], ov[k], (size_t)n);
                g->backward_apply(og[0], a, b, n, dk[0][1], dk[1][1], dk[2][1], dk[3][1], stream);
                v->backward_apply(ov[0], a, b, n, dk[0][1], dk[1][1], dk[2][1], dk[3][1], stream);
                differ += !same_floats(og[0], ov[0], (size_t)n);
            }
            /* channel-vector twins */
            double vg[2][N] = {{0}}, vv[2][N] = {{0}};
            g->v_shifted_acc(a, par[0], n, vg[0], vg[1]), v->v_shifted_acc(a, par[0], n, vv[0], vv[1]);
            differ += !same_doubles(vg[0], vv[0], N) + !same_doubles(vg[1], vv[1], N);
            g->v_sum_dot_dev(a, b, par[0], n, vg[0], vg[1]), v->v_sum_dot_dev(a, b, par[0], n, vv[0], vv[1]);
            differ += !same_doubles(vg[0], vv[0], N) + !same_doubles(vg[1], vv[1], N);
            g->v_forward_infer(a, og[3], n, par[0], par[1], par[2], par[3], par[4]);
            v->v_forward_infer(a, ov[3], n, par[0], par[1], par[2], par[3], par[4]);
            for (int k = 0; k < 4; k++) differ += !same_floats(og[k], ov[k], (size_t)n);
            g->v_backward_apply(og[0], a, b, n, dk[0], dk[1], dk[2], dk[3]);
            v->v_backward_apply(ov[0], a, b, n, dk[0], dk[1], dk[2], dk[3]);
            differ += !same_floats(og[0], ov[0], (size_t)n);
            compared++;
        }
    }
    check_int(tn, "calls whose outputs differ in any bit", differ, 0);
    check_true(tn, "cases compared", compared == 40 * (N + 1));
}

/* What test_phases_bit_identical records of one build's passes over a layer. */
enum { PR_OUT, PR_X, PR_XN, PR_DELTA, PR_INFER, PR_XN_ONLY, PR_LIGHT, PR_IN_PLACE, PR_N }; /* tensors */
enum { PC_FLOATS = 8 };                                                                    /* per-channel floats */
#define PC_N (PC_FLOATS + DNBN_SCRATCH_DOUBLES + 4)                                        /* per-channel numbers */
typedef struct phase_record {
    float *t[PR_N]; /* tensors; PR_XN_ONLY: x_norm alone (fill_x_norm), PR_LIGHT: y alone, PR_IN_PLACE: delta with dy == delta */
    double *chan;   /* [k * F + f]: mean, variance, rolling mean and variance, updates, mean and variance delta; scratch;
                       backward sums, public moments */
} phase_record;

/* Runs a phase over units [0, units): in one call (a fused phase then walks each unit's elementwise
 * half beside the next unit's reduction), or in one call per unit (each unit alone). */
static void run_units(void (*phase)(void *, idx_t, idx_t), dnbn_pass *p, idx_t units, int one_by_one)
{
    if (!one_by_one) phase(p, 0, units);
    for (idx_t u = 0; one_by_one && u < units; u++) phase(p, u, u + 1);
}

/* Runs the layer's passes through build r's phases on one thread, unit by unit of the hand-made
 * partition pt (in one call or a call per unit: run_units), as the public calls sequence them: a training forward (fused, or with split channels
 * the parts' moments, merged, then the elementwise pass), the forward's elementwise pass again writing
 * x_norm alone and y alone, the backward likewise and again in place, the backward sums and the public
 * moments (reduction alone, into arrays), an inference forward. Every output starts as GARBAGE. */
static void run_phases(const dnbn_rows *r, dnbn_layer *l, const dnbn_part *pt, const float *x, const float *dy,
                       int stream, int one_by_one, phase_record rec)
{
    idx_t total = (idx_t)l->batch * l->outputs, F = l->out_c, units = dnbn_units(pt);
    double partial[DNBN_MAX_PARTIALS][3], sums[4][64];
    dnbn_trial trial = {.slot = -1, .stream = stream};
    float *bufs[] = {l->output, l->x, l->x_norm, l->delta, l->mean, l->variance, l->mean_delta, l->variance_delta};
    for (int k = 0; k < 8; k++) fill_const(bufs[k], k < 4 ? (size_t)total : (size_t)F, GARBAGE);
    for (int k = PR_XN_ONLY; k < PR_N; k++) fill_const(rec.t[k], (size_t)total, GARBAGE);
    for (int backward = 0; backward < 2; backward++) {
        dnbn_pass p = {.l = l, .r = r, .pt = pt, .in = backward ? dy : x, .x = l->x, .xn = l->x_norm, .y = l->output,
                       .backward = backward, .reduce = 1, .map = 1, .count = (double)pt->m, .trial = trial};
        void (*phase)(void *, idx_t, idx_t) = backward ? r->backward_phase : r->forward_phase;
        if (pt->parts > 1) {
            p.partial = partial, p.map = 0;
            run_units(phase, &p, units, one_by_one);
            dnbn_pass_merge(&p);
            p.partial = NULL, p.reduce = 0, p.map = 1;
        }
        run_units(phase, &p, units, one_by_one);
        if (!backward) { /* the elementwise pass alone: x_norm only, then y only (the lighter loop) */
            dnbn_pass q = {.l = l, .r = r, .pt = pt, .in = x, .xn = rec.t[PR_XN_ONLY], .map = 1, .trial = trial};
            run_units(phase, &q, units, one_by_one);
            q.xn = NULL, q.y = rec.t[PR_LIGHT];
            run_units(phase, &q, units, one_by_one);
        }
        /* the reduction alone, into the caller's arrays (backward sums; public moments) */
        dnbn_pass q = {.l = backward ? l : NULL, .r = r, .pt = pt, .in = p.in, .backward = backward, .reduce = 1,
                       .sums = {sums[2 * backward], sums[2 * backward + 1]},
                       .partial = pt->parts > 1 ? partial : NULL, .trial = trial};
        run_units(phase, &q, units, one_by_one);
        if (q.partial) dnbn_pass_merge(&q);
    }
    const float *chan[PC_FLOATS] = {l->mean,          l->variance,     l->rolling_mean, l->rolling_variance,
                                    l->scale_updates, l->bias_updates, l->mean_delta,   l->variance_delta};
    for (int k = 0; k < PC_FLOATS; k++)
        for (idx_t f = 0; f < F; f++) rec.chan[k * F + f] = chan[k][f];
    memcpy(rec.chan + PC_FLOATS * F, l->scratch, (size_t)F * DNBN_SCRATCH_DOUBLES * sizeof(double));
    for (int k = 0; k < 4; k++)
        memcpy(rec.chan + (PC_FLOATS + DNBN_SCRATCH_DOUBLES + k) * F, sums[k], (size_t)F * sizeof(double));
    for (int k = 0; k < PR_XN_ONLY; k++) memcpy(rec.t[k], bufs[k == PR_INFER ? 0 : k], (size_t)total * sizeof(float));
    /* the backward's input delta once more with dy in the delta buffer (in place) */
    memcpy(l->delta, dy, (size_t)total * sizeof(float));
    dnbn_pass b = {.l = l, .r = r, .pt = pt, .in = l->delta, .backward = 1, .reduce = pt->parts == 1, .map = 1,
                   .count = (double)pt->m, .trial = trial};
    run_units(r->backward_phase, &b, units, one_by_one);
    memcpy(rec.t[PR_IN_PLACE], l->delta, (size_t)total * sizeof(float));
    dnbn_pass p = {.l = l, .r = r, .pt = pt, .in = x, .y = l->output, .map = 1, .infer = 1, .trial = trial};
    run_units(r->forward_phase, &p, units, one_by_one);
    memcpy(rec.t[PR_INFER], l->output, (size_t)total * sizeof(float));
}

/* The layer's phases of the portable and the AVX2 build give the same bits on the same passes: whole
 * channels one by one and in groups, channels split in parts whose units start and end inside images,
 * spatial == 1 tiles and image ranges, more than one block of moments; ordinary and special values,
 * streaming stores on and off. The passes that write one output alone, and the backward in place,
 * give the bits of the full pass; each build's passes give the same bits in one call (each unit's
 * reduction beside the last unit's elementwise half) as unit by unit (rows longer than a piece, and
 * a block of moments ending inside a row, in the cases of 300 values and more); and the portable build's results on ordinary values are the
 * float64 oracle's (docs/reference.md §3/§4, §6 tolerance), so that what both builds share is
 * checked too. */
static void test_phases_bit_identical(void)
{
    g_test = __func__;
    const char *tn = "generic vs avx2 phases";
    const dnbn_rows *g = &dnbn_rows_generic, *v = &dnbn_rows_avx2;
    if (!have_avx2(__func__)) return;
    /* batch, filters, spatial; the partition's group and parts */
    static const int cases[][5] = {{3, 4, 37, 1, 1},   {3, 4, 37, 3, 1},   {3, 4, 37, 1, 5},  {2, 3, 16, 2, 1},
                                   {4, 2, 5, 1, 3},    {2, 3, 64, 1, 7},   {5, 19, 1, 19, 1}, {5, 19, 1, 8, 1},
                                   {70, 9, 1, 9, 4},   {70, 9, 1, 4, 3},   {9, 40, 1, 40, 2}, {4, 16, 2048 + 37, 2, 1},
                                   {4200, 6, 1, 6, 1}, {4200, 6, 1, 3, 2}, {2, 6, 300, 1, 1},  {4, 16, 2048 + 37, 2, 1},
                                   {3, 5, 777, 2, 1}};
    enum { CASES = sizeof cases / sizeof cases[0] };
    rng_t r;
    rng_init(&r, 20261205);
    int compared = 0, differ = 0, alone_differ = 0, walk_differ = 0;
    for (int c = 0; c < CASES; c++) {
        int B = cases[c][0], F = cases[c][1], S = cases[c][2], special = c % 3 == 2;
        int numerics = c % 2 ? DNBN_NUMERICS_STANDARD : DNBN_NUMERICS_DARKNET;
        dnbn_part pt = {.batch = B, .filters = F, .spatial = S, .m = (idx_t)B * S, .parts = cases[c][4],
                        .group = cases[c][3], .threads = 1};
        idx_t total = (idx_t)B * F * S, nchan = (idx_t)F * PC_N;
        if (F > 64 || (idx_t)F * pt.parts > DNBN_MAX_PARTIALS) {
            check_true(tn, "case fits the test's arrays", 0);
            continue;
        }
        float *x = falloc((size_t)total), *dy = falloc((size_t)total);
        for (idx_t i = 0; i < total; i++) {
            x[i] = special ? prim_value(&r) : (float)ldexp(rng_gauss(&r), (int)(rng_unif(&r) * 24) - 12) + 2;
            dy[i] = (float)ldexp(rng_gauss(&r), (int)(rng_unif(&r) * 24) - 12);
        }
        float par[4][64];
        for (int k = 0; k < 4; k++)
            for (int f = 0; f < F; f++) par[k][f] = k == 3 ? (float)(0.5 + rng_unif(&r)) : (float)rng_gauss(&r);
        for (int stream = 0; stream < 2; stream++) {
            phase_record rec[4]; /* generic, avx2; each in one call, then unit by unit */
            for (int b = 0; b < 4; b++) {
                dnbn_layer *l = dnbn_make_batchnorm_layer(B, S, 1, F);
                if (numerics == DNBN_NUMERICS_STANDARD) dnbn_batchnorm_layer_set_numerics(l, numerics, 1e-3f, 0.1f);
                for (int f = 0; f < F; f++)
                    l->scales[f] = par[0][f], l->biases[f] = par[1][f], l->rolling_mean[f] = par[2][f],
                    l->rolling_variance[f] = par[3][f];
                for (int k = 0; k < PR_N; k++) rec[b].t[k] = falloc((size_t)total);
                rec[b].chan = dalloc((size_t)nchan);
                run_phases(b % 2 ? v : g, l, &pt, x, dy, stream, b >= 2, rec[b]);
                dnbn_free_batchnorm_layer(l);
            }
            for (int k = 0; k < PR_N; k++) differ += !same_floats(rec[0].t[k], rec[1].t[k], (size_t)total);
            differ += !same_doubles(rec[0].chan, rec[1].chan, (size_t)nchan);
            for (int b = 0; b < 2; b++) {
                for (int k = 0; k < PR_N; k++) walk_differ += !same_floats(rec[b].t[k], rec[b + 2].t[k], (size_t)total);
                walk_differ += !same_doubles(rec[b].chan, rec[b + 2].chan, (size_t)nchan);
            }
            for (int b = 0; b < 2; b++)
                alone_differ += !same_floats(rec[b].t[PR_XN_ONLY], rec[b].t[PR_XN], (size_t)total) +
                                !same_floats(rec[b].t[PR_LIGHT], rec[b].t[PR_OUT], (size_t)total) +
                                !same_floats(rec[b].t[PR_IN_PLACE], rec[b].t[PR_DELTA], (size_t)total);
            compared++;
            if (!special && stream == 0) { /* the portable build against the float64 oracle */
                olayer o;
                ol_init(&o, B, F, S, numerics, 1e-3, 0.1);
                for (int f = 0; f < F; f++)
                    o.scales[f] = par[0][f], o.biases[f] = par[1][f], o.rm[f] = par[2][f], o.rv[f] = par[3][f];
                ol_forward(&o, x, 1);
                check_buf(tn, "training output vs oracle", rec[0].t[PR_OUT], o.out, (size_t)total, 0);
                check_buf(tn, "x_norm vs oracle", rec[0].t[PR_XN], o.xn, (size_t)total, 0);
                float row[64];
                for (int f = 0; f < F; f++) row[f] = (float)rec[0].chan[0 * F + f];
                check_buf(tn, "batch mean vs oracle", row, o.mean, (size_t)F, 1);
                for (int f = 0; f < F; f++) row[f] = (float)rec[0].chan[1 * F + f];
                check_buf(tn, "batch variance vs oracle", row, o.var, (size_t)F, 1);
                check_dd(tn, "public moments: mean vs oracle", rec[0].chan + (PC_FLOATS + DNBN_SCRATCH_DOUBLES + 0) * F,
                         o.mean, (size_t)F, MOMENTS_RTOL);
                ol_backward(&o, dy);
                check_buf(tn, "input delta vs oracle", rec[0].t[PR_DELTA], o.delta, (size_t)total, 0);
                for (int f = 0; f < F; f++) row[f] = (float)rec[0].chan[4 * F + f];
                check_buf(tn, "scale updates vs oracle", row, o.su, (size_t)F, 0);
                for (int f = 0; f < F; f++) row[f] = (float)rec[0].chan[5 * F + f];
                check_buf(tn, "bias updates vs oracle", row, o.bu, (size_t)F, 0);
                ol_forward(&o, x, 0);
                check_buf(tn, "inference output vs oracle", rec[0].t[PR_INFER], o.out, (size_t)total, 0);
                ol_free(&o);
            }
            for (int b = 0; b < 4; b++) {
                for (int k = 0; k < PR_N; k++) free(rec[b].t[k]);
                free(rec[b].chan);
            }
        }
        free(x), free(dy);
    }
    check_int(tn, "passes whose outputs differ in any bit", differ, 0);
    check_int(tn, "outputs written alone or in place that differ from the full pass's", alone_differ, 0);
    check_int(tn, "passes whose outputs differ between one call and a call per unit", walk_differ, 0);
    check_int(tn, "passes compared", compared, 2 * CASES);
}

/* dnbn_set_num_threads rejects n < 1 (DNBN_ERR_ARG, setting kept), clamps n > 256; get reads it back. */
static void test_threads_setting(void)
{
    g_test = __func__;
    const char *tn = "dnbn_set_num_threads";
    check_true(tn, "default dnbn_get_num_threads() >= 1", dnbn_get_num_threads() >= 1);
    check_int(tn, "set 2", dnbn_set_num_threads(2), DNBN_OK);
    check_int(tn, "get after set 2", dnbn_get_num_threads(), 2);
    check_int(tn, "set 0", dnbn_set_num_threads(0), DNBN_ERR_ARG);
    check_int(tn, "get after set 0", dnbn_get_num_threads(), 2);
    check_int(tn, "set -3", dnbn_set_num_threads(-3), DNBN_ERR_ARG);
    check_int(tn, "get after set -3", dnbn_get_num_threads(), 2);
    check_int(tn, "set 1000", dnbn_set_num_threads(1000), DNBN_OK);
    check_int(tn, "get after set 1000 (clamped)", dnbn_get_num_threads(), 256);
    check_int(tn, "set 1", dnbn_set_num_threads(1), DNBN_OK);
    check_int(tn, "get after set 1", dnbn_get_num_threads(), 1);
    dnbn_set_num_threads(2);
}

/* dnbn_simd_path, dnbn_version and dnbn_strerror return what the header promises. */
static void test_info(void)
{
    g_test = __func__;
    const char *tn = "library info";
    const char *p = dnbn_simd_path();
    check_true(tn, "dnbn_simd_path() is \"avx2\" or \"generic\"",
               p && (strcmp(p, "avx2") == 0 || strcmp(p, "generic") == 0));
    const char *v = dnbn_version();
    unsigned a, b, c;
    char tail;
    check_true(tn, "dnbn_version() is MAJOR.MINOR.PATCH", v && sscanf(v, "%u.%u.%u%c", &a, &b, &c, &tail) == 3);
    int codes[] = {DNBN_OK, DNBN_ERR_ARG, DNBN_ERR_NOMEM, DNBN_ERR_STATE, 42, -1};
    for (size_t k = 0; k < sizeof codes / sizeof codes[0]; k++) {
        const char *m = dnbn_strerror(codes[k]);
        char what[64];
        snprintf(what, sizeof what, "dnbn_strerror(%d) is a non-empty string", codes[k]);
        check_true(tn, what, m && m[0]);
    }
}

/* The report's value of a numeric key, or -1 when absent. */
static double report_number(const char *report, const char *key)
{
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\": ", key);
    const char *at = strstr(report, pattern);
    return at ? atof(at + strlen(pattern)) : -1;
}

/* A size class's store choice is shared by the layers whose passes fall in it, but only a layer whose
 * rows are whole 64-byte lines (layout_ok) may stream: a row that starts or ends inside a line would be
 * written partly by streaming and partly by plain stores. Driven through dnbn_trial_begin/end directly,
 * in classes no layer of these tests uses; each plain trial call's start is moved a second back before
 * it ends, so that the streaming trials win without a real delay; the other layer's calls are grouped
 * ones (an NCHW layer with at least as many channels as threads), which take part in the class's
 * group-size trials. */
static void test_stream_whole_lines_only(const char *tn)
{
    const int pass = DNBN_PASS_BACKWARD_APPLY, threads = 1;
    const idx_t decided = (idx_t)1 << 40, trying = (idx_t)1 << 41;
    dnbn_trial t;
    int calls = 0;
    for (; calls < 40; calls++) { /* until the class has decided: the first call left untimed after it */
        int stream = dnbn_trial_begin(&t, pass, decided, threads, 1, 0);
        int timed = t.slot >= 0;
        if (!stream) t.start -= 1e9; /* ns: this plain call "took" a second longer */
        dnbn_trial_end(&t);
        if (!timed && stream && calls > 8) break;
    }
    check_true(tn, "trials: a class of whole-line layers decides to stream (plain calls made slower)", calls < 40);
    check_int(tn, "decided: a whole-line layer streams", dnbn_trial_begin(&t, pass, decided, threads, 1, 0), 1);
    dnbn_trial_end(&t);
    check_int(tn, "decided: a layer whose rows are not whole lines does not",
              dnbn_trial_begin(&t, pass, decided, threads, 0, 1), 0);
    dnbn_trial_end(&t);
    /* while the class is trying: after its plain trial calls, a call that cannot stream stays plain and
     * untimed, and the whole-line layer's next call is still the first streaming one */
    for (int k = 0; k < 5; k++) {
        dnbn_trial_begin(&t, pass, trying, threads, 1, 0);
        dnbn_trial_end(&t);
    }
    check_int(tn, "trying: a layer whose rows are not whole lines does not stream",
              dnbn_trial_begin(&t, pass, trying, threads, 0, 1), 0);
    check_true(tn, "trying: nor is it timed", t.slot < 0);
    dnbn_trial_end(&t);
    check_int(tn, "trying: the whole-line layer's streaming trials start",
              dnbn_trial_begin(&t, pass, trying, threads, 1, 0), 1);
    check_true(tn, "trying: its first streaming call untimed (a warm-up)", t.slot < 0);
    dnbn_trial_end(&t);
}

/* The machine-dependent choices: the thread threshold is calibrated at the first parallel call (measured
 * wake-up), the report is well formed and says so, and streaming stores change no value. */
static void test_tuning(void)
{
    g_test = __func__;
    const char *tn = "tuning";
    char report[8192];
    int saved = dnbn_get_num_threads();
    dnbn_set_num_threads(2);
    dnbn_layer *l = dnbn_make_batchnorm_layer(4, 64, 64, 16);
    if (!check_true(tn, "dnbn_make_batchnorm_layer", l != NULL)) return;
    dnbn_network net = {.input = l->output, .delta = NULL, .train = 1};
    check_int(tn, "a parallel forward", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
    int need = dnbn_tuning_report(NULL, 0);
    check_true(tn, "report length without a buffer", need > 100 && need < (int)sizeof report);
    check_int(tn, "report length with a buffer", dnbn_tuning_report(report, sizeof report), need);
    check_int(tn, "report is NUL-terminated where its length says", (long)strlen(report), need);
    char small[16];
    check_int(tn, "a short buffer gets the length still", dnbn_tuning_report(small, sizeof small), need);
    check_int(tn, "and a truncated, terminated text", (long)strlen(small), (long)sizeof small - 1);
    if (!getenv("DARKNET_BN_MIN_WORK")) {
        check_true(tn, "thread threshold calibrated at the first parallel call",
                   strstr(report, "\"min_work_source\": \"calibrated\"") != NULL);
        check_true(tn, "a measured wake-up time", report_number(report, "wake_us") > 0);
        check_true(tn, "a measured time per value", report_number(report, "value_ns") > 0);
    }
    double mw = report_number(report, "min_work_per_thread");
    check_true(tn, "threshold within its bounds", mw >= 4096 && mw <= 4194304);
    check_true(tn, "group bytes within its bounds",
               report_number(report, "group_bytes") >= 262144 || getenv("DARKNET_BN_GROUP_KB"));
    check_true(tn, "a JSON object", report[0] == '{' && report[need - 1] == '}');
    dnbn_free_batchnorm_layer(l);

    /* streaming stores: the same bits; 2x8x256x256 touches 4 tensors of 4 MB in a training forward */
    l = dnbn_make_batchnorm_layer(2, 256, 256, 8);
    if (!check_true(tn, "dnbn_make_batchnorm_layer (4 MB)", l != NULL)) return;
    size_t n = (size_t)2 * l->outputs;
    float *in = malloc(n * sizeof *in), *dy = malloc(n * sizeof *dy), *got[2][4];
    rng_t r;
    rng_init(&r, 7);
    for (size_t i = 0; i < n; i++) in[i] = (float)(rng_gauss(&r) * 2 + 0.5), dy[i] = (float)rng_gauss(&r);
    for (int mode = 0; mode < 2; mode++) {
        dnbn_tuning_set_stream(mode ? DNBN_STREAM_ALWAYS : DNBN_STREAM_NEVER);
        dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_STANDARD, 1e-5f, 0.1f);
        dnbn_network tr = {.input = in, .delta = NULL, .train = 1}, inf = {.input = in, .delta = NULL, .train = 0};
        check_int(tn, "forward (train)", dnbn_forward_batchnorm_layer(l, tr), DNBN_OK);
        for (int k = 0; k < 3; k++) got[mode][k] = malloc(n * sizeof(float));
        memcpy(got[mode][0], l->output, n * sizeof(float));
        memcpy(got[mode][1], l->x_norm, n * sizeof(float));
        memcpy(l->delta, dy, n * sizeof(float));
        check_int(tn, "backward", dnbn_backward_batchnorm_layer(l, tr), DNBN_OK);
        memcpy(got[mode][2], l->delta, n * sizeof(float));
        check_int(tn, "forward (infer)", dnbn_forward_batchnorm_layer(l, inf), DNBN_OK);
        got[mode][3] = malloc(n * sizeof(float));
        memcpy(got[mode][3], l->output, n * sizeof(float));
    }
    const char *what[4] = {"output", "x_norm", "input delta", "inference output"};
    for (int k = 0; k < 4; k++) {
        char label[64];
        snprintf(label, sizeof label, "%s: streaming stores write the same bits", what[k]);
        check_true(tn, label, memcmp(got[0][k], got[1][k], n * sizeof(float)) == 0);
        free(got[0][k]);
        free(got[1][k]);
    }
    /* auto: the first 9 calls of a pass try both stores, then one choice is kept */
    dnbn_tuning_set_stream(DNBN_STREAM_AUTO);
    dnbn_network tr = {.input = in, .delta = NULL, .train = 1};
    const char *key = "{\"pass\": \"forward_train\", \"bytes_at_least\": 16777216, \"threads\": 2";
    for (int k = 0; k < 8; k++) dnbn_forward_batchnorm_layer(l, tr);
    dnbn_tuning_report(report, sizeof report);
    const char *entry = strstr(report, key);
    check_true(tn, "auto: the 16 MB training forward has an entry", entry != NULL);
    check_true(tn, "auto: still trying after 8 calls (the last streaming trial to come)",
               entry && strncmp(strstr(entry, "\"choice\": ") + 10, "\"trying\"", 8) == 0);
    dnbn_forward_batchnorm_layer(l, tr);
    dnbn_tuning_report(report, sizeof report);
    entry = strstr(report, key);
    check_true(tn, "auto: decided after 9 calls",
               entry && (strncmp(strstr(entry, "\"choice\": ") + 10, "\"stream\"", 8) == 0 ||
                         strncmp(strstr(entry, "\"choice\": ") + 10, "\"plain\"", 7) == 0));
    /* then, channel groups being this pass's units, 4 group sizes x 3 calls; each writes the same bits */
    if (!getenv("DARKNET_BN_GROUP_KB")) {
        check_true(tn, "auto: group sizes still to try after the store trials",
                   entry && strncmp(strstr(entry, "\"group_kb\": ") + 12, "\"trying\"", 8) == 0);
        float *first = malloc(n * sizeof(float));
        memcpy(first, l->output, n * sizeof(float));
        int same = 1;
        for (int k = 0; k < 12; k++) {
            dnbn_forward_batchnorm_layer(l, tr);
            same &= memcmp(first, l->output, n * sizeof(float)) == 0;
        }
        free(first);
        check_true(tn, "auto: every group size tried writes the same output", same);
        dnbn_tuning_report(report, sizeof report);
        entry = strstr(report, key);
        const char *kb = entry ? strstr(entry, "\"group_kb\": ") : NULL;
        check_true(tn, "auto: a group size kept after 21 calls", kb && kb[12] >= '1' && kb[12] <= '9');
    }
    free(in);
    free(dy);
    dnbn_free_batchnorm_layer(l);
    test_stream_whole_lines_only(tn);
    dnbn_set_num_threads(saved);
    /* the rest of the tests name work splits: a fixed threshold, the same on every machine */
    dnbn_tuning_set_min_work(65536);
}

/* set_numerics rejects bad arguments (DNBN_ERR_ARG, nothing changed), resets running stats, uses its eps/momentum. */
static void test_set_numerics(void)
{
    g_test = __func__;
    const char *tn = "dnbn_batchnorm_layer_set_numerics [3x4x3x3]";
    const int B = 3, W = 3, H = 3, C = 4, S = 9;
    size_t N = (size_t)B * C * S;
    dnbn_set_num_threads(2);
    dnbn_layer *l = dnbn_make_batchnorm_layer(B, W, H, C);
    if (!check_true(tn, "dnbn_make_batchnorm_layer", l != NULL))
        return;
    rng_t r;
    rng_init(&r, 11);
    float *in = falloc(N);
    fill_gauss(&r, in, N, 0.5, 2.0);
    dnbn_network net = {.input = in, .delta = NULL, .train = 1};
    check_int(tn, "training forward", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);

    lcopy c0;
    layer_copy(l, &c0);
    check_int(tn, "numerics = 2", dnbn_batchnorm_layer_set_numerics(l, 2, 1e-5f, 0.1f), DNBN_ERR_ARG);
    check_int(tn, "numerics = -1", dnbn_batchnorm_layer_set_numerics(l, -1, 1e-5f, 0.1f), DNBN_ERR_ARG);
    check_int(tn, "standard, eps = 0", dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_STANDARD, 0.0f, 0.1f),
              DNBN_ERR_ARG);
    check_int(tn, "standard, eps = -1e-5", dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_STANDARD, -1e-5f, 0.1f),
              DNBN_ERR_ARG);
    check_int(tn, "standard, momentum = -0.1", dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_STANDARD, 1e-5f, -0.1f),
              DNBN_ERR_ARG);
    check_int(tn, "standard, momentum = 1.5", dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_STANDARD, 1e-5f, 1.5f),
              DNBN_ERR_ARG);
    check_int(tn, "set_numerics(NULL, ...)", dnbn_batchnorm_layer_set_numerics(NULL, DNBN_NUMERICS_STANDARD, 1e-5f, 0.1f),
              DNBN_ERR_ARG);
    check_int(tn, "numerics after the rejected calls", l->numerics, DNBN_NUMERICS_DARKNET);
    layer_unchanged(tn, "after the rejected calls", l, &c0, 0);
    layer_copy_free(&c0);

    check_int(tn, "standard, eps 1e-3, momentum 0.2",
              dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_STANDARD, 1e-3f, 0.2f), DNBN_OK);
    check_const(tn, "rolling_mean reset to 0", l->rolling_mean, (size_t)C, 0.0f);
    check_const(tn, "rolling_variance reset to 1", l->rolling_variance, (size_t)C, 1.0f);
    /* a training and an inference forward with eps 1e-3 and momentum 0.2 */
    olayer o;
    ol_init(&o, B, C, S, DNBN_NUMERICS_STANDARD, (double)1e-3f, (double)0.2f);
    for (int f = 0; f < C; f++)
        o.scales[f] = l->scales[f], o.biases[f] = l->biases[f];
    check_int(tn, "training forward (standard)", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
    ol_forward(&o, in, 1);
    check_buf(tn, "output with eps 1e-3", l->output, o.out, N, 0);
    check_buf(tn, "rolling_mean with momentum 0.2", l->rolling_mean, o.rm, (size_t)C, 0);
    check_buf(tn, "rolling_variance with momentum 0.2", l->rolling_variance, o.rv, (size_t)C, 0);
    net.train = 0;
    check_int(tn, "inference forward (standard)", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
    ol_forward(&o, in, 0);
    check_buf(tn, "inference output with eps 1e-3", l->output, o.out, N, 0);
    ol_free(&o);

    check_int(tn, "back to darknet", dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_DARKNET, 1e-5f, 0.01f), DNBN_OK);
    check_int(tn, "numerics", l->numerics, DNBN_NUMERICS_DARKNET);
    check_const(tn, "darknet rolling_mean reset to 0", l->rolling_mean, (size_t)C, 0.0f);
    check_const(tn, "darknet rolling_variance reset to 0", l->rolling_variance, (size_t)C, 0.0f);
    free(in);
    dnbn_free_batchnorm_layer(l);
}

/* A forward whose net.input is l->output itself gives the same result as one with a separate input. */
static void test_input_is_output(void)
{
    g_test = __func__;
    const char *tn = "forward with net.input == l->output [4x5x6x7]";
    const int B = 4, W = 6, H = 7, C = 5;
    size_t N = (size_t)B * C * W * H;
    dnbn_set_num_threads(2);
    for (int numerics = 0; numerics <= 1; numerics++) {
        dnbn_layer *a = dnbn_make_batchnorm_layer(B, W, H, C), *b = dnbn_make_batchnorm_layer(B, W, H, C);
        if (!check_true(tn, "dnbn_make_batchnorm_layer", a && b)) {
            dnbn_free_batchnorm_layer(a);
            dnbn_free_batchnorm_layer(b);
            return;
        }
        if (numerics) {
            dnbn_batchnorm_layer_set_numerics(a, DNBN_NUMERICS_STANDARD, 1e-5f, 0.1f);
            dnbn_batchnorm_layer_set_numerics(b, DNBN_NUMERICS_STANDARD, 1e-5f, 0.1f);
        }
        rng_t r;
        rng_init(&r, 21 + (uint64_t)numerics);
        float *in = falloc(N);
        fill_gauss(&r, in, N, 0.3, 1.5);
        dnbn_network na = {.input = in, .delta = NULL, .train = 1};
        memcpy(b->output, in, N * sizeof(float));
        dnbn_network nb = {.input = b->output, .delta = NULL, .train = 1};
        check_int(tn, "training forward, separate input", dnbn_forward_batchnorm_layer(a, na), DNBN_OK);
        check_int(tn, "training forward, input == output", dnbn_forward_batchnorm_layer(b, nb), DNBN_OK);
        check_ff(tn, "training output", b->output, a->output, N, 0);
        check_same(tn, "x", b->x, in, N);
        check_ff(tn, "x_norm", b->x_norm, a->x_norm, N, 0);
        check_ff(tn, "mean", b->mean, a->mean, (size_t)C, 1);
        check_ff(tn, "variance", b->variance, a->variance, (size_t)C, 1);
        fill_gauss(&r, in, N, 0.3, 1.5);
        memcpy(b->output, in, N * sizeof(float));
        na.train = nb.train = 0;
        check_int(tn, "inference forward, separate input", dnbn_forward_batchnorm_layer(a, na), DNBN_OK);
        check_int(tn, "inference forward, input == output", dnbn_forward_batchnorm_layer(b, nb), DNBN_OK);
        check_ff(tn, "inference output", b->output, a->output, N, 0);
        free(in);
        dnbn_free_batchnorm_layer(a);
        dnbn_free_batchnorm_layer(b);
    }
}

/* dnbn_backward_batchnorm_layer_from(l, d) equals backward with d in l->delta, also when d is l->delta itself. */
static void test_backward_from(void)
{
    g_test = __func__;
    const char *tn = "dnbn_backward_batchnorm_layer_from [3x6x5x4]";
    const int B = 3, W = 5, H = 4, C = 6;
    size_t N = (size_t)B * C * W * H;
    dnbn_set_num_threads(2);
    for (int numerics = 0; numerics <= 1; numerics++) {
        dnbn_layer *l[3];
        rng_t r;
        rng_init(&r, 31 + (uint64_t)numerics);
        float *in = falloc(N), *dy = falloc(N), *dyc = falloc(N);
        fill_gauss(&r, in, N, 0.3, 1.5);
        fill_gauss(&r, dy, N, 0.0, 1.0);
        memcpy(dyc, dy, N * sizeof(float));
        dnbn_network net = {.input = in, .delta = NULL, .train = 1};
        int ok = 1;
        for (int k = 0; k < 3; k++) {
            l[k] = dnbn_make_batchnorm_layer(B, W, H, C);
            ok = ok && l[k];
            if (l[k] && numerics)
                dnbn_batchnorm_layer_set_numerics(l[k], DNBN_NUMERICS_STANDARD, 1e-5f, 0.1f);
            if (l[k])
                dnbn_forward_batchnorm_layer(l[k], net);
        }
        if (check_true(tn, "dnbn_make_batchnorm_layer", ok)) {
            memcpy(l[0]->delta, dy, N * sizeof(float));
            check_int(tn, "dnbn_backward_batchnorm_layer", dnbn_backward_batchnorm_layer(l[0], net), DNBN_OK);
            fill_const(l[1]->delta, N, GARBAGE);
            check_int(tn, "dnbn_backward_batchnorm_layer_from(l, separate)", dnbn_backward_batchnorm_layer_from(l[1], dy),
                      DNBN_OK);
            check_same(tn, "delta_in not written", dy, dyc, N);
            memcpy(l[2]->delta, dy, N * sizeof(float));
            check_int(tn, "dnbn_backward_batchnorm_layer_from(l, l->delta)",
                      dnbn_backward_batchnorm_layer_from(l[2], l[2]->delta), DNBN_OK);
            for (int k = 1; k < 3; k++) {
                check_ff(tn, k == 1 ? "delta (separate delta_in)" : "delta (delta_in == l->delta)", l[k]->delta,
                         l[0]->delta, N, 0);
                check_ff(tn, "scale_updates", l[k]->scale_updates, l[0]->scale_updates, (size_t)C, 0);
                check_ff(tn, "bias_updates", l[k]->bias_updates, l[0]->bias_updates, (size_t)C, 0);
            }
        }
        for (int k = 0; k < 3; k++)
            dnbn_free_batchnorm_layer(l[k]);
        free(in);
        free(dy);
        free(dyc);
    }
}

/* An infinity that is its channel's first value (the first value of a moment block is the block's shift)
 * gives that channel an infinite mean, as the exact one, not inf - inf = NaN: the layer's statistics with
 * spatial > 1 and == 1, and dnbn_batchnorm_moments; the other channels stay as they were. */
static void test_inf_first_value(void)
{
    g_test = __func__;
    const char *tn = "an infinite first value";
    const int B = 4, F = 3;
    for (int spatial = 1; spatial <= 9; spatial += 8) {
        size_t N = (size_t)B * F * spatial;
        float *x = falloc(N);
        for (size_t i = 0; i < N; i++) x[i] = (float)(i % 7) * 0.25f - 0.5f;
        x[IDX(0, 0, 0, F, spatial)] = INFINITY;
        x[IDX(0, 2, 0, F, spatial)] = -INFINITY;
        dnbn_layer *l = dnbn_make_batchnorm_layer(B, spatial, 1, F);
        if (!check_true(tn, "dnbn_make_batchnorm_layer", l != NULL)) {
            free(x);
            continue;
        }
        dnbn_network net = {.input = x, .delta = NULL, .train = 1};
        check_int(tn, "training forward", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
        char what[96];
        snprintf(what, sizeof what, "spatial %d: layer mean of the +inf channel is +inf", spatial);
        check_true(tn, what, isinf(l->mean[0]) && l->mean[0] > 0);
        snprintf(what, sizeof what, "spatial %d: layer mean of the -inf channel is -inf", spatial);
        check_true(tn, what, isinf(l->mean[2]) && l->mean[2] < 0);
        snprintf(what, sizeof what, "spatial %d: rolling mean of the +inf channel is +inf", spatial);
        check_true(tn, what, isinf(l->rolling_mean[0]) && l->rolling_mean[0] > 0);
        snprintf(what, sizeof what, "spatial %d: the finite channel's mean is finite", spatial);
        check_true(tn, what, isfinite(l->mean[1]));
        double mean[3], m2[3];
        dnbn_batchnorm_moments(x, B, F, spatial, mean, m2);
        snprintf(what, sizeof what, "spatial %d: dnbn_batchnorm_moments means +inf, finite, -inf", spatial);
        check_true(tn, what, isinf(mean[0]) && mean[0] > 0 && isfinite(mean[1]) && isinf(mean[2]) && mean[2] < 0);
        dnbn_free_batchnorm_layer(l);
        free(x);
    }
}

/* NaN and Inf in the input make only their own channels non-finite, in the kernels and the layer. */
static void test_nan_inf_channels(void)
{
    g_test = __func__;
    const int B = 3, F = 5, S = 7;
    size_t N = (size_t)B * F * S, Fz = (size_t)F;
    dnbn_set_num_threads(2);
    rng_t r;
    rng_init(&r, 4242);
    float *x = falloc(N);
    fill_gauss(&r, x, N, 0.3, 1.5);
    x[IDX(1, 1, 3, F, S)] = NAN;
    x[IDX(2, 3, 0, F, S)] = INFINITY;
    double *xd = f2d(x, N), *om = dalloc(Fz), *ov = dalloc(Fz), *on = dalloc(N);
    o_mean(xd, B, F, S, om);
    float *meanf = falloc(Fz), *varf = falloc(Fz), *got = falloc(N), *gf = falloc(Fz);
    for (int f = 0; f < F; f++)
        meanf[f] = (float)om[f];
    double *omf = f2d(meanf, Fz);
    o_variance(xd, omf, B, F, S, ov);
    for (int f = 0; f < F; f++)
        varf[f] = (float)ov[f];
    double *ovf = f2d(varf, Fz);
    o_normalize(xd, omf, ovf, B, F, S, on);
    char tn[128];
    for (int s = 0; s < 2; s++) {
        const kernel_set *ks = s ? &K_REF : &K_LIB;
        snprintf(tn, sizeof tn, "NaN/Inf in channels 1 and 3, kernels%s [3x5x7]", ks->suffix);
        fill_const(gf, Fz, GARBAGE);
        ks->mean(x, B, F, S, gf);
        check_buf(tn, "mean_cpu", gf, om, Fz, 1);
        fill_const(gf, Fz, GARBAGE);
        ks->variance(x, meanf, B, F, S, gf);
        check_buf(tn, "variance_cpu", gf, ov, Fz, 1);
        memcpy(got, x, N * sizeof(float));
        ks->normalize(got, meanf, varf, B, F, S);
        check_buf(tn, "normalize_cpu", got, on, N, 0);
    }
    for (int numerics = 0; numerics <= 1; numerics++) {
        snprintf(tn, sizeof tn, "NaN/Inf in channels 1 and 3, layer %s [3x5x7x1]", numerics ? "standard" : "darknet");
        dnbn_layer *l = dnbn_make_batchnorm_layer(B, S, 1, F);
        if (!check_true(tn, "dnbn_make_batchnorm_layer", l != NULL))
            continue;
        if (numerics)
            dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_STANDARD, 1e-5f, 0.1f);
        olayer o;
        ol_init(&o, B, F, S, numerics, (double)1e-5f, (double)0.1f);
        float *netd = falloc(N), *dy = falloc(N);
        dnbn_network net = {.input = x, .delta = netd, .train = 1};
        check_int(tn, "training forward status", dnbn_forward_batchnorm_layer(l, net), DNBN_OK);
        ol_forward(&o, x, 1);
        check_buf(tn, "output", l->output, o.out, N, 0);
        check_buf(tn, "mean", l->mean, o.mean, Fz, 1);
        check_buf(tn, "variance", l->variance, o.var, Fz, 1);
        check_buf(tn, "rolling_mean", l->rolling_mean, o.rm, Fz, 0);
        check_buf(tn, "rolling_variance", l->rolling_variance, o.rv, Fz, 0);
        fill_gauss(&r, dy, N, 0.0, 1.0);
        memcpy(l->delta, dy, N * sizeof(float));
        check_int(tn, "backward status", dnbn_backward_batchnorm_layer(l, net), DNBN_OK);
        ol_backward(&o, dy);
        check_buf(tn, "delta", l->delta, o.delta, N, 0);
        check_buf(tn, "bias_updates", l->bias_updates, o.bu, Fz, 0);
        check_buf(tn, "scale_updates", l->scale_updates, o.su, Fz, 0);
        free(netd);
        free(dy);
        ol_free(&o);
        dnbn_free_batchnorm_layer(l);
    }
    free(x);
    free(xd);
    free(om);
    free(ov);
    free(on);
    free(meanf);
    free(varf);
    free(got);
    free(gf);
    free(omf);
    free(ovf);
}

/* dnbn_batchnorm_moments of two shards merged by dnbn_batchnorm_moments_combine equal the moments of the whole batch. */
static void test_moments(void)
{
    g_test = __func__;
    static const int shapes[][3] = {{6, 5, 37}, {4, 1, 2704}, {7, 3, 1}, {2, 2, 101}};
    for (size_t q = 0; q < sizeof shapes / sizeof shapes[0]; q++) {
        int B = shapes[q][0], F = shapes[q][1], S = shapes[q][2];
        size_t N = (size_t)B * F * S, Fz = (size_t)F, per = (size_t)F * S;
        rng_t r;
        rng_init(&r, 600 + q);
        float *x = falloc(N);
        for (int b = 0; b < B; b++)
            for (int f = 0; f < F; f++)
                fill_gauss(&r, x + IDX(b, f, 0, F, S), (size_t)S, 1e4 + 100.0 * f, 1.0);
        double *xd = f2d(x, N), *om = dalloc(Fz), *om2 = dalloc(Fz);
        o_mean(xd, B, F, S, om);
        o_sumsq(xd, om, B, F, S, om2);
        double *mw = dalloc(Fz), *m2w = dalloc(Fz), *ma = dalloc(Fz), *m2a = dalloc(Fz), *mb = dalloc(Fz),
               *m2b = dalloc(Fz);
        for (int t = 1; t <= 2; t++) {
            dnbn_set_num_threads(t);
            char tn[160];
            snprintf(tn, sizeof tn, "dnbn_batchnorm_moments [%dx%dx%d, offset 1e4, %d thread%s]", B, F, S, t,
                     t > 1 ? "s" : "");
            dnbn_batchnorm_moments(x, B, F, S, mw, m2w);
            check_dd(tn, "mean of the whole batch vs oracle", mw, om, Fz, MOMENTS_RTOL);
            check_dd(tn, "m2 of the whole batch vs oracle", m2w, om2, Fz, MOMENTS_RTOL);
            int splits[2] = {B / 2, B / 3 > 0 ? B / 3 : 1};
            for (int k = 0; k < 2; k++) {
                int b1 = splits[k], b2 = B - b1;
                char what[128];
                dnbn_batchnorm_moments(x, b1, F, S, ma, m2a);
                dnbn_batchnorm_moments(x + (size_t)b1 * per, b2, F, S, mb, m2b);
                dnbn_batchnorm_moments_combine(F, (double)b1 * S, ma, m2a, (double)b2 * S, mb, m2b);
                snprintf(what, sizeof what, "mean of shards %d + %d combined vs whole", b1, b2);
                check_dd(tn, what, ma, mw, Fz, MOMENTS_RTOL);
                snprintf(what, sizeof what, "m2 of shards %d + %d combined vs whole", b1, b2);
                check_dd(tn, what, m2a, m2w, Fz, MOMENTS_RTOL);
            }
        }
        free(x);
        free(xd);
        free(om);
        free(om2);
        free(mw);
        free(m2w);
        free(ma);
        free(m2a);
        free(mb);
        free(m2b);
    }
}

/* ----- reentrancy: two layers trained at once from two threads ----- */

typedef struct {
    int B, W, H, C, numerics;
    uint64_t seed;
    float *out, *delta, *scales;
    int status;
} rjob;

static void *rjob_run(void *arg)
{
    rjob *j = arg;
    rng_t r;
    rng_init(&r, j->seed);
    size_t N = (size_t)j->B * j->C * j->W * j->H;
    j->status = 0;
    dnbn_layer *l = dnbn_make_batchnorm_layer(j->B, j->W, j->H, j->C);
    if (!l) {
        j->status = -1;
        return NULL;
    }
    if (j->numerics)
        j->status |= dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_STANDARD, 1e-5f, 0.1f);
    float *in = malloc(N * sizeof(float)), *netd = malloc(N * sizeof(float));
    if (!in || !netd) {
        j->status = -1;
    } else {
        for (int step = 0; step < 3; step++) {
            fill_gauss(&r, in, N, 0.3, 1.5);
            dnbn_network net = {.input = in, .delta = netd, .train = 1};
            j->status |= dnbn_forward_batchnorm_layer(l, net);
            fill_gauss(&r, l->delta, N, 0.0, 1.0);
            j->status |= dnbn_backward_batchnorm_layer(l, net);
            j->status |= dnbn_update_batchnorm_layer(l, 0.05f, 0.9f, 0.0f);
        }
        memcpy(j->delta, l->delta, N * sizeof(float));
        fill_gauss(&r, in, N, 0.3, 1.5);
        dnbn_network inet = {.input = in, .delta = NULL, .train = 0};
        j->status |= dnbn_forward_batchnorm_layer(l, inet);
        memcpy(j->out, l->output, N * sizeof(float));
        memcpy(j->scales, l->scales, (size_t)j->C * sizeof(float));
    }
    free(in);
    free(netd);
    dnbn_free_batchnorm_layer(l);
    return NULL;
}

static void rjob_alloc(rjob *j, int B, int W, int H, int C, int numerics, uint64_t seed)
{
    size_t N = (size_t)B * C * W * H;
    j->B = B;
    j->W = W;
    j->H = H;
    j->C = C;
    j->numerics = numerics;
    j->seed = seed;
    j->out = falloc(N);
    j->delta = falloc(N);
    j->scales = falloc((size_t)C);
    j->status = 0;
}

static void rjob_free(rjob *j)
{
    free(j->out);
    free(j->delta);
    free(j->scales);
}

/* Two layers trained at the same time from two threads give the results they give one after the other. */
static void test_reentrant(void)
{
    g_test = __func__;
    const char *tn = "two layers at once from two threads";
    dnbn_set_num_threads(2);
    rjob seq[2], par[2];
    rjob_alloc(&seq[0], 8, 26, 26, 16, 0, 1234);
    rjob_alloc(&seq[1], 6, 20, 20, 24, 1, 5678);
    rjob_alloc(&par[0], 8, 26, 26, 16, 0, 1234);
    rjob_alloc(&par[1], 6, 20, 20, 24, 1, 5678);
    rjob_run(&seq[0]);
    rjob_run(&seq[1]);
    check_int(tn, "status of the sequential runs", seq[0].status | seq[1].status, 0);
    for (int round = 0; round < 3; round++) {
        pthread_t th[2];
        int started[2];
        for (int k = 0; k < 2; k++)
            started[k] = pthread_create(&th[k], NULL, rjob_run, &par[k]) == 0;
        for (int k = 0; k < 2; k++)
            if (started[k])
                pthread_join(th[k], NULL);
        if (!check_true(tn, "pthread_create", started[0] && started[1]))
            break;
        char what[96];
        for (int k = 0; k < 2; k++) {
            size_t N = (size_t)par[k].B * par[k].C * par[k].W * par[k].H;
            snprintf(what, sizeof what, "round %d layer %d status", round + 1, k + 1);
            check_int(tn, what, par[k].status, 0);
            snprintf(what, sizeof what, "round %d layer %d inference output", round + 1, k + 1);
            check_ff(tn, what, par[k].out, seq[k].out, N, 0);
            snprintf(what, sizeof what, "round %d layer %d last delta", round + 1, k + 1);
            check_ff(tn, what, par[k].delta, seq[k].delta, N, 0);
            snprintf(what, sizeof what, "round %d layer %d scales", round + 1, k + 1);
            check_ff(tn, what, par[k].scales, seq[k].scales, (size_t)par[k].C, 0);
        }
    }
    for (int k = 0; k < 2; k++) {
        rjob_free(&seq[k]);
        rjob_free(&par[k]);
    }
}

/* After fork, the child still computes correct results with 2 threads (no deadlock on the thread pool). */
static void test_fork(void)
{
    g_test = __func__;
    const char *tn = "kernels in a child process after fork";
    const int B = 4, F = 3, S = 52 * 52;
    size_t N = (size_t)B * F * S;
    dnbn_set_num_threads(2);
    rng_t r;
    rng_init(&r, 808);
    float *x = falloc(N), *mean = falloc((size_t)F), *norm = falloc(N), *var = falloc((size_t)F);
    fill_gauss(&r, x, N, 0.3, 1.5);
    double *xd = f2d(x, N), *om = dalloc((size_t)F), *ov = dalloc((size_t)F), *on = dalloc(N);
    o_mean(xd, B, F, S, om);
    o_variance(xd, om, B, F, S, ov);
    mean_cpu(x, B, F, S, mean); /* the parent has used its threads */
    for (int f = 0; f < F; f++)
        var[f] = (float)ov[f];
    double *ovf = f2d(var, (size_t)F);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGALRM, SIG_DFL);
        alarm(20);
        dnbn_set_num_threads(2);
        fill_const(mean, (size_t)F, GARBAGE);
        mean_cpu(x, B, F, S, mean);
        memcpy(norm, x, N * sizeof(float));
        normalize_cpu(norm, mean, var, B, F, S);
        int bad = 0;
        for (int f = 0; f < F; f++)
            bad += excess(mean[f], om[f], 1) > 0;
        double *omf = f2d(mean, (size_t)F);
        o_normalize(xd, omf, ovf, B, F, S, on);
        for (size_t i = 0; i < N; i++)
            bad += excess(norm[i], on[i], 0) > 0;
        /* free everything, so a leak checker following the child finds no loss */
        float *fs[] = {x, mean, norm, var};
        double *ds[] = {xd, om, ov, on, ovf, omf};
        for (size_t i = 0; i < sizeof fs / sizeof *fs; i++)
            free(fs[i]);
        for (size_t i = 0; i < sizeof ds / sizeof *ds; i++)
            free(ds[i]);
        if (bad)
            printf("FAIL %s: %d values wrong in the child\n", tn, bad);
        fflush(stdout);
        _exit(bad ? 1 : 0);
    }
    if (!check_true(tn, "fork succeeded", pid > 0)) {
        free(x);
        free(mean);
        free(norm);
        free(var);
        free(xd);
        free(om);
        free(ov);
        free(on);
        free(ovf);
        return;
    }
    int st = 0;
    waitpid(pid, &st, 0);
    if (WIFSIGNALED(st))
        fail_line(tn, "child killed by signal %d (hung or crashed)", WTERMSIG(st));
    check_true(tn, "child exited with status 0", WIFEXITED(st) && WEXITSTATUS(st) == 0);
    free(x);
    free(mean);
    free(norm);
    free(var);
    free(xd);
    free(om);
    free(ov);
    free(on);
    free(ovf);
}

/* ====================================================================== */

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGALRM, on_alarm);
    alarm(TIMEOUT_S);

    test_info();
    test_inf_first_value();
    test_threads_setting();
    test_tuning();
    test_team();

    static const kshape kshapes[] = {
        {"64x1024x1 (fully connected)", 64, 1024, 1},
        {"3x5x1 (fully connected)", 3, 5, 1},
        {"1x8x63 (batch 1)", 1, 8, 63},
        {"3x7x13 (primes)", 3, 7, 13},
        {"5x11x17 (primes)", 5, 11, 17},
        {"16x1x1023 (one channel)", 16, 1, 31 * 33},
        {"4x32x52x52", 4, 32, 52 * 52},
    };
    for (size_t k = 0; k < sizeof kshapes / sizeof kshapes[0]; k++)
        test_kernels_shape(&kshapes[k]);
    test_kernels_zero_sizes();
    test_variance_m1();
    test_mean_variance_offset_large();
    test_moments();

    static const lshape lshapes[] = {
        {"4x3x5x7", 4, 7, 5, 3},
        {"16x64x1x1 (fully connected)", 16, 1, 1, 64},
        {"1x8x9x11 (batch 1)", 1, 11, 9, 8},
        {"2x1x32x33 (one channel)", 2, 33, 32, 1},
        {"2x3x1x1 (m = 2)", 2, 1, 1, 3},
        {"8x32x13x13", 8, 13, 13, 32},
    };
    for (size_t k = 0; k < sizeof lshapes / sizeof lshapes[0]; k++)
        test_layer_shape(&lshapes[k]);
    test_layer_offset_stats();
    test_forward_m_below_2();
    test_backward_state();
    test_make_errors();
    test_huge_page_advice();
    test_layer_edges();
    test_paths_run_what_they_name();
    test_partition_leaves_work_for_late_workers();
    test_pool_persists_and_shrinks();
    test_row_primitives_bit_identical();
    test_phases_bit_identical();
    test_set_numerics();
    test_input_is_output();
    test_backward_from();
    test_nan_inf_channels();
    test_reentrant();
    test_fork();

    alarm(0);
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
