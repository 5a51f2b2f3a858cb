/*
 * fuzz_api.c - a random driver over the whole public C API (csrc/darknet_bn.h),
 * built with the library's sources under AddressSanitizer + UBSan (make fuzz).
 *
 * Each iteration allocates a caller-filled dnbn_layer with buffers of exactly
 * its true sizes (so any read or write past them is caught), then lies about
 * it in every way the header does not rule out: zero, negative and
 * inconsistent sizes, NULL buffers, any numerics, epsilon, momentum, state,
 * keep_x_norm; and calls every public function in random order with random
 * arguments (counts NaN, 0, 1, huge; NULL arrays; thread counts out of range),
 * on data with NaN, infinities, denormals and values near the float32 range.
 * The kernels get sizes that fit their buffers or are <= 0 (the header rules
 * out pointers too small for the sizes given). What is checked is that nothing
 * crashes, reads or writes out of bounds, or invokes undefined behaviour, and
 * that every status returned is one the header lists.
 *
 *   build/fuzz_api [--seconds S] [--iterations N] [--seed K]
 * prints "<iterations> passed, 0 failed" at the end (a failure aborts).
 */
#define _POSIX_C_SOURCE 200809L
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "darknet_bn.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t next(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int below(int n) { return (int)(next() % (uint64_t)n); }
static int chance(int percent) { return below(100) < percent; }

/* A float of every kind the API may meet. */
static float any_float(void)
{
    switch (below(12)) {
    case 0: return NAN;
    case 1: return INFINITY;
    case 2: return -INFINITY;
    case 3: return 1e-40f;                       /* denormal */
    case 4: return (chance(50) ? 1 : -1) * 3e38f; /* near the float32 range */
    case 5: return 0.0f;
    case 6: return 1e4f + (float)below(1000) / 997.0f;
    default: return (float)((int64_t)(next() % 20001) - 10000) / 1000.0f;
    }
}

static double any_count(void)
{
    const double counts[] = {NAN, -1, 0, 1, 2, 3, 1e300, INFINITY, 7.5};
    return counts[below(sizeof counts / sizeof *counts)];
}

/* A size claimed for a dimension whose true value is t. */
static int lie_about(int t)
{
    const int lies[] = {0, -1, -7, 1, 2, INT_MAX, INT_MIN};
    if (chance(50)) return lies[below(sizeof lies / sizeof *lies)];
    return t + below(3) - 1;
}

static float *floats(size_t n)
{
    float *p = malloc((n ? n : 1) * sizeof *p);
    for (size_t i = 0; i < n; i++) p[i] = chance(90) ? (float)((int)below(2001) - 1000) / 250.0f : any_float();
    return p;
}

static double *doubles(size_t n)
{
    double *p = malloc((n ? n : 1) * sizeof *p);
    for (size_t i = 0; i < n; i++) p[i] = chance(90) ? (double)below(1000) / 100.0 : (double)any_float();
    return p;
}

static void check_status(int s)
{
    if (s != DNBN_OK && s != DNBN_ERR_ARG && s != DNBN_ERR_NOMEM && s != DNBN_ERR_STATE) {
        fprintf(stderr, "fuzz_api: status %d is not one the header lists\n", s);
        abort();
    }
}

/* Kernel sizes that fit n values: all positive with a product <= n, or some <= 0. */
static void kernel_sizes(size_t n, int *batch, int *filters, int *spatial)
{
    if (chance(15) || n == 0) {
        *batch = below(3) - 1, *filters = below(3) - 1, *spatial = below(3) - 1;
        if (*batch > 0 && *filters > 0 && *spatial > 0) *spatial = 0;
        return;
    }
    *batch = 1 + below(3), *filters = 1 + below(4), *spatial = 1 + below(64);
    while ((size_t)*batch * *filters * *spatial > n) {
        if (*spatial > 1) *spatial /= 2;
        else if (*filters > 1) (*filters)--;
        else *batch = 1;
        if (*batch * *filters * *spatial == 1) break;
    }
}

static void fuzz_kernels(float *a, float *b, float *c, float *d, float *e, size_t n, size_t chans)
{
    int bt, f, s;
    kernel_sizes(n, &bt, &f, &s);
    if (f > 0 && (size_t)f > chans) f = (int)chans; /* per-channel buffers hold chans floats */
    for (int k = 0; k < 3; k++) {
        int which = below(10), ref = chance(30);
        switch (which) {
        case 0: (ref ? mean_cpu_ref : mean_cpu)(a, bt, f, s, c); break;
        case 1: (ref ? variance_cpu_ref : variance_cpu)(a, c, bt, f, s, d); break;
        case 2: (ref ? normalize_cpu_ref : normalize_cpu)(a, c, d, bt, f, s); break;
        case 3: (ref ? scale_bias_ref : scale_bias)(a, c, bt, f, s); break;
        case 4: (ref ? add_bias_ref : add_bias)(a, c, bt, f, s); break;
        case 5: (ref ? backward_bias_ref : backward_bias)(c, b, bt, f, s); break;
        case 6: (ref ? backward_scale_cpu_ref : backward_scale_cpu)(a, b, bt, f, s, c); break;
        case 7: (ref ? mean_delta_cpu_ref : mean_delta_cpu)(b, d, bt, f, s, c); break;
        case 8: (ref ? variance_delta_cpu_ref : variance_delta_cpu)(a, b, c, d, bt, f, s, e); break;
        default: (ref ? normalize_delta_cpu_ref : normalize_delta_cpu)(a, c, d, e, c, bt, f, s, b); break;
        }
    }
}

/* A layer the library allocates: sizes small, or out of range (rejected before any allocation). */
static void made_layer(void)
{
    int sz[4];
    for (int i = 0; i < 4; i++) sz[i] = chance(85) ? 1 + below(6) : lie_about(3);
    if (chance(5)) sz[1] = sz[2] = sz[3] = INT_MAX / 2; /* c*h*w beyond an int */
    /* sz = (batch, w, h, c): valid but large layers are not what this driver is for */
    double per_image = (double)sz[1] * sz[2] * sz[3];
    if (sz[0] > 0 && sz[1] > 0 && sz[2] > 0 && sz[3] > 0 && per_image <= INT_MAX && sz[0] * per_image > (1 << 20))
        return;
    dnbn_layer *l = dnbn_make_batchnorm_layer(sz[0], sz[1], sz[2], sz[3]);
    if (l) {
        size_t n = (size_t)l->batch * (size_t)l->outputs;
        float *in = floats(n);
        dnbn_network net = {.input = in, .delta = chance(50) ? NULL : in, .train = below(2)};
        if (chance(50)) check_status(dnbn_batchnorm_layer_set_numerics(l, below(2), 1e-5f, 0.1f));
        check_status(dnbn_forward_batchnorm_layer(l, net));
        check_status(dnbn_batchnorm_layer_fill_x_norm(l));
        check_status(dnbn_backward_batchnorm_layer(l, net));
        check_status(dnbn_update_batchnorm_layer(l, any_float(), any_float(), any_float()));
        free(in);
    }
    dnbn_free_batchnorm_layer(l);
}

static void iteration(void)
{
    if (chance(10)) made_layer();
    /* the truth */
    int batch = below(6), c = 1 + below(chance(20) ? 300 : 9);
    int h = 1 + below(chance(30) ? 40 : 4), w = chance(30) ? 1 : 1 + below(5);
    if (chance(2)) /* large enough for several threads, and for channels split across them */
        batch = 4 + below(4), c = 1 + below(3), h = 128 + below(64), w = 128;
    size_t n = (size_t)batch * (size_t)c * (size_t)h * (size_t)w, nc = (size_t)c;
    float *act[5], *chan[10];
    for (int i = 0; i < 5; i++) act[i] = floats(n);
    for (int i = 0; i < 10; i++) chan[i] = floats(nc);
    double *scratch = doubles(nc * DNBN_SCRATCH_DOUBLES), *m1 = doubles(nc), *m2 = doubles(nc), *m3 = doubles(nc);

    /* the claim */
    dnbn_layer l;
    memset(&l, 0, sizeof l);
    l.batch = chance(15) ? (chance(50) ? below(batch + 1) : -1 - below(5)) : batch;
    l.out_c = chance(10) ? lie_about(c) : c;
    l.out_h = chance(10) ? lie_about(h) : h;
    l.out_w = chance(10) ? lie_about(w) : w;
    if (chance(10)) { int t = l.out_h; l.out_h = l.out_w, l.out_w = t; } /* same total, other shape */
    l.outputs = chance(10) ? lie_about(c * h * w) : c * h * w;
    /* A consistent claim larger than the buffers is ruled out by the header (buffers hold what the
     * sizes say): such a lie is told only inconsistently. */
    if (l.out_c > 0 && l.out_h > 0 && l.out_w > 0 && l.batch >= 0 &&
        (int64_t)l.out_c * l.out_h <= INT_MAX && (int64_t)l.out_c * l.out_h * l.out_w == l.outputs &&
        ((int64_t)l.batch * l.outputs > (int64_t)n || l.out_c > c)) {
        l.out_c = c, l.out_h = h, l.out_w = w, l.outputs = c * h * w;
    }
    float **slots[] = {&l.output, &l.delta, &l.x, &l.x_norm};
    for (int i = 0; i < 4; i++) *slots[i] = chance(5) ? NULL : act[i];
    float **cslots[] = {&l.scales, &l.biases, &l.scale_updates, &l.bias_updates, &l.mean, &l.variance,
                        &l.rolling_mean, &l.rolling_variance, &l.mean_delta, &l.variance_delta};
    for (int i = 0; i < 10; i++) *cslots[i] = chance(4) ? NULL : chan[i];
    l.scratch = chance(4) ? NULL : scratch;
    l.numerics = chance(80) ? below(2) : below(7) - 3;
    l.eps = chance(70) ? 1e-5f : any_float();
    l.momentum = chance(70) ? 0.1f : any_float();
    l.keep_x_norm = below(3) - (chance(10) ? 5 : 0);
    l.state = chance(70) ? below(3) : (int)next();
    l.trained = below(2);
    if (chance(30)) check_status(dnbn_batchnorm_layer_set_numerics(&l, below(4) - 1, any_float(), any_float()));

    for (int k = 0, calls = 1 + below(10); k < calls; k++) {
        float *input = chance(10) ? NULL : (chance(30) ? l.output : act[4]);
        dnbn_network net = {.input = input, .delta = chance(50) ? NULL : act[4], .train = below(3) - (chance(5) ? 2 : 0)};
        double *mean = chance(5) ? NULL : m1, *sd = chance(5) ? NULL : m2;
        switch (below(13)) {
        case 0: check_status(dnbn_forward_batchnorm_layer(&l, net)); break;
        case 1: check_status(dnbn_backward_batchnorm_layer(&l, net)); break;
        case 2: check_status(dnbn_backward_batchnorm_layer_from(&l, chance(50) ? l.delta : act[4])); break;
        case 3: check_status(dnbn_update_batchnorm_layer(&l, any_float(), any_float(), any_float())); break;
        case 4: check_status(dnbn_batchnorm_layer_fill_x_norm(&l)); break;
        case 5: (void)dnbn_batchnorm_layer_state(chance(10) ? NULL : &l); break;
        case 6: check_status(dnbn_batchnorm_layer_forward_moments(&l, input, any_count(), mean, sd)); break;
        case 7: check_status(dnbn_batchnorm_layer_backward_sums(&l, chance(10) ? NULL : act[3], mean, sd)); break;
        case 8: check_status(dnbn_batchnorm_layer_backward_apply(&l, chance(10) ? NULL : act[3], any_count(), mean, sd));
            break;
        case 9: { /* moments of the true tensor, or of a claimed-empty shard */
            int bb = chance(20) ? below(3) - 2 : batch, ss = chance(20) ? below(3) - 2 : h * w;
            dnbn_batchnorm_moments(chance(5) ? NULL : act[0], bb, chance(10) ? below(3) - 2 : c, ss, mean, sd);
            dnbn_batchnorm_moments_combine(chance(10) ? below(3) - 2 : c, any_count(), mean, sd, any_count(), m3, m3);
            break;
        }
        case 10: fuzz_kernels(act[0], act[1], chan[0], chan[1], chan[2], n, nc); break;
        case 11: {
            int t = chance(70) ? 1 + below(3) : (chance(50) ? below(3) - 2 : 1000 + below(1000));
            check_status(dnbn_set_num_threads(t) == DNBN_OK ? DNBN_OK : DNBN_ERR_ARG);
            if (dnbn_get_num_threads() < 1) abort();
            break;
        }
        default:
            if (!dnbn_simd_path() || !dnbn_version() || !dnbn_kernel_flavor() || !dnbn_strerror((int)next()))
                abort();
            break;
        }
    }

    for (int i = 0; i < 5; i++) free(act[i]);
    for (int i = 0; i < 10; i++) free(chan[i]);
    free(scratch), free(m1), free(m2), free(m3);
}

int main(int argc, char **argv)
{
    double seconds = 5;
    long iterations = -1;
    for (int i = 1; i < argc; i++) {
        char *end = NULL;
        if (i + 1 < argc && !strcmp(argv[i], "--seconds")) {
            seconds = strtod(argv[++i], &end);
            if (*end || !(seconds > 0)) goto usage;
        } else if (i + 1 < argc && !strcmp(argv[i], "--iterations")) {
            iterations = strtol(argv[++i], &end, 10);
            if (*end || iterations < 1) goto usage;
        } else if (i + 1 < argc && !strcmp(argv[i], "--seed")) {
            rng_state = strtoull(argv[++i], &end, 10);
            if (*end) goto usage;
        } else {
            goto usage;
        }
    }
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long done = 0;
    for (;; done++) {
        if (iterations > 0 && done >= iterations) break;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (iterations < 0 && (double)(t.tv_sec - t0.tv_sec) + 1e-9 * (double)(t.tv_nsec - t0.tv_nsec) >= seconds) break;
        iteration();
    }
    dnbn_set_num_threads(2);
    printf("fuzz_api: %ld iterations\n%ld passed, 0 failed\n", done, done);
    return 0;
usage:
    fprintf(stderr, "usage: fuzz_api [--seconds S] [--iterations N] [--seed K]\n");
    return 2;
}
