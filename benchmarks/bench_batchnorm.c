/*
 * bench_batchnorm - times darknet_bn's kernels and layer against the reference
 * loops (Darknet's loops with double accumulators) on realistic shapes, and
 * against the machine's copy bandwidth measured in the same run.
 *
 *   build/bench_batchnorm [--shape BxCxHxW]... [--threads N]... [--reps N]
 *                         [--min-time SECONDS] [--no-kernels] [--json FILE]
 *
 * The layer runs as the Python package runs it, x_norm written only on request
 * (keep_x_norm = 0); "...keeping x_norm" is the step with Darknet's default.
 * Every figure is the median of --reps repetitions. "roof" is the least time
 * the pass could take at the measured copy bandwidth: training step = read the
 * input, write the output and one tensor kept for backward, then read delta
 * and that tensor and write delta (6 floats per value; 5 for "...input in x",
 * whose kept tensor is the input itself); inference = read input,
 * write output (2 floats per value); a kernel = the floats it must read and
 * write. "%roof" = roof / measured time.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "darknet_bn.h"

typedef struct shape {
    int b, c, h, w;
} shape;

static const shape default_shapes[] = {
    {8, 32, 208, 208}, {32, 64, 112, 112}, {8, 128, 52, 52}, {16, 512, 13, 13}, {64, 1024, 1, 1}, {4, 16, 4, 4},
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ---- what is timed: a closure over one shape's buffers ---- */

typedef struct bufs {
    shape s;
    long long n;      /* values */
    int spatial;
    float *input, *delta0, *work, *work2, *out;
    float *c_mean, *c_var, *c_a, *c_b, *c_out;
    dnbn_layer *fast;   /* the library's layer */
    dnbn_layer *ref;    /* same buffers, driven by the reference loops */
} bufs;

typedef void (*bench_fn)(bufs *);

/* Calls fn while a call changes the library's trials (docs/reference.md §5:
 * the first calls of a pass time plain against streaming stores, then
 * channel-group sizes), so that no timed call is a trial; at most 32 calls, at
 * least one (page faults, caches). */
static void warm_up(bench_fn fn, bufs *b)
{
    static char before[1 << 16], after[1 << 16];
    dnbn_tuning_report(before, sizeof before);
    for (int k = 0; k < 32; k++) {
        fn(b);
        dnbn_tuning_report(after, sizeof after);
        if (!strstr(after, "\"trying\"") || strcmp(before, after) == 0) return;
        memcpy(before, after, sizeof before);
    }
}

static double median_time(bench_fn fn, bufs *b, int reps, double min_time)
{
    double *t = malloc(sizeof(double) * (size_t)reps);
    warm_up(fn, b);
    double start = now();
    int done = 0;
    for (; done < reps; done++) {
        double t0 = now();
        fn(b);
        t[done] = now() - t0;
        if (done + 1 >= 3 && now() - start > min_time * 4) {
            done++;
            break;
        }
    }
    qsort(t, (size_t)done, sizeof(double), cmp_double);
    double med = t[done / 2];
    free(t);
    return med;
}

/* The layer, as Darknet's forward_batchnorm_layer / backward_batchnorm_layer
 * write it, on the reference kernels. */
static void ref_forward_train(bufs *b)
{
    dnbn_layer *l = b->ref;
    size_t bytes = sizeof(float) * (size_t)b->n;
    int sp = b->spatial;
    memcpy(l->output, b->input, bytes);
    memcpy(l->x, l->output, bytes);
    mean_cpu_ref(l->output, l->batch, l->out_c, sp, l->mean);
    variance_cpu_ref(l->output, l->mean, l->batch, l->out_c, sp, l->variance);
    for (int f = 0; f < l->out_c; f++) {
        l->rolling_mean[f] = .99f * l->rolling_mean[f] + .01f * l->mean[f];
        l->rolling_variance[f] = .99f * l->rolling_variance[f] + .01f * l->variance[f];
    }
    normalize_cpu_ref(l->output, l->mean, l->variance, l->batch, l->out_c, sp);
    memcpy(l->x_norm, l->output, bytes);
    scale_bias_ref(l->output, l->scales, l->batch, l->out_c, sp);
    add_bias_ref(l->output, l->biases, l->batch, l->out_c, sp);
}

static void ref_backward(bufs *b)
{
    dnbn_layer *l = b->ref;
    int sp = b->spatial;
    memcpy(l->delta, b->delta0, sizeof(float) * (size_t)b->n); /* the next layer's write */
    backward_bias_ref(l->bias_updates, l->delta, l->batch, l->out_c, sp);
    backward_scale_cpu_ref(l->x_norm, l->delta, l->batch, l->out_c, sp, l->scale_updates);
    scale_bias_ref(l->delta, l->scales, l->batch, l->out_c, sp);
    mean_delta_cpu_ref(l->delta, l->variance, l->batch, l->out_c, sp, l->mean_delta);
    variance_delta_cpu_ref(l->x, l->delta, l->mean, l->variance, l->batch, l->out_c, sp, l->variance_delta);
    normalize_delta_cpu_ref(l->x, l->mean, l->variance, l->mean_delta, l->variance_delta, l->batch, l->out_c, sp,
                            l->delta);
}

static void ref_step(bufs *b)
{
    ref_forward_train(b);
    ref_backward(b);
}

static void ref_infer(bufs *b)
{
    dnbn_layer *l = b->ref;
    int sp = b->spatial;
    memcpy(l->output, b->input, sizeof(float) * (size_t)b->n);
    normalize_cpu_ref(l->output, l->rolling_mean, l->rolling_variance, l->batch, l->out_c, sp);
    scale_bias_ref(l->output, l->scales, l->batch, l->out_c, sp);
    add_bias_ref(l->output, l->biases, l->batch, l->out_c, sp);
}

static void fast_step(bufs *b)
{
    dnbn_network net = {b->input, NULL, 1};
    dnbn_forward_batchnorm_layer(b->fast, net);
    dnbn_backward_batchnorm_layer_from(b->fast, b->delta0); /* reads the next layer's delta where it is */
}

/* The same step with x_norm written by forward, as Darknet's C callers get by default. */
static void fast_step_keep(bufs *b)
{
    b->fast->keep_x_norm = 1;
    fast_step(b);
    b->fast->keep_x_norm = 0;
}

/* The same step with the input where backward reads it (l->x = the input):
 * forward copies nothing, as a caller that keeps its input does. */
static void fast_step_in_x(bufs *b)
{
    float *own = b->fast->x;
    b->fast->x = b->input;
    fast_step(b);
    b->fast->x = own;
}

static void fast_forward_train(bufs *b)
{
    dnbn_network net = {b->input, NULL, 1};
    dnbn_forward_batchnorm_layer(b->fast, net);
}

static void fast_backward(bufs *b) { dnbn_backward_batchnorm_layer_from(b->fast, b->delta0); }

static void fast_infer(bufs *b)
{
    dnbn_network net = {b->input, NULL, 0};
    dnbn_forward_batchnorm_layer(b->fast, net);
}

/* ---- kernels: each timed on private buffers so in-place ones stay finite ---- */
#define SZ b->s.b, b->s.c, b->spatial
static void k_mean(bufs *b) { mean_cpu(b->input, SZ, b->c_out); }
static void k_mean_ref(bufs *b) { mean_cpu_ref(b->input, SZ, b->c_out); }
static void k_var(bufs *b) { variance_cpu(b->input, b->c_mean, SZ, b->c_out); }
static void k_var_ref(bufs *b) { variance_cpu_ref(b->input, b->c_mean, SZ, b->c_out); }
static void k_norm(bufs *b) { normalize_cpu(b->work, b->c_a, b->c_b, SZ); } /* mean 0, var 1: stays finite */
static void k_norm_ref(bufs *b) { normalize_cpu_ref(b->work, b->c_a, b->c_b, SZ); }
static void k_scale(bufs *b) { scale_bias(b->work, b->c_b, SZ); }
static void k_scale_ref(bufs *b) { scale_bias_ref(b->work, b->c_b, SZ); }
static void k_add(bufs *b) { add_bias(b->work, b->c_a, SZ); }
static void k_add_ref(bufs *b) { add_bias_ref(b->work, b->c_a, SZ); }
static void k_bbias(bufs *b) { backward_bias(b->c_out, b->delta0, SZ); }
static void k_bbias_ref(bufs *b) { backward_bias_ref(b->c_out, b->delta0, SZ); }
static void k_bscale(bufs *b) { backward_scale_cpu(b->input, b->delta0, SZ, b->c_out); }
static void k_bscale_ref(bufs *b) { backward_scale_cpu_ref(b->input, b->delta0, SZ, b->c_out); }
static void k_md(bufs *b) { mean_delta_cpu(b->delta0, b->c_var, SZ, b->c_out); }
static void k_md_ref(bufs *b) { mean_delta_cpu_ref(b->delta0, b->c_var, SZ, b->c_out); }
static void k_vd(bufs *b) { variance_delta_cpu(b->input, b->delta0, b->c_mean, b->c_var, SZ, b->c_out); }
static void k_vd_ref(bufs *b) { variance_delta_cpu_ref(b->input, b->delta0, b->c_mean, b->c_var, SZ, b->c_out); }
static void k_nd(bufs *b) { normalize_delta_cpu(b->input, b->c_mean, b->c_var, b->c_a, b->c_a, SZ, b->work2); }
static void k_nd_ref(bufs *b) { normalize_delta_cpu_ref(b->input, b->c_mean, b->c_var, b->c_a, b->c_a, SZ, b->work2); }
#undef SZ

typedef struct bench_case {
    const char *name;
    bench_fn fast, ref;
    double floats_moved; /* least floats per value a pass must read + write */
    int kernel;          /* 1: a Darknet kernel (skipped by --no-kernels) */
} bench_case;

static const bench_case cases[] = {
    {"layer train step", fast_step, ref_step, 6, 0},
    {"  ...keeping x_norm", fast_step_keep, ref_step, 6, 0},
    {"  ...input in x", fast_step_in_x, ref_step, 5, 0},
    {"layer forward (train)", fast_forward_train, ref_forward_train, 3, 0},
    {"layer backward", fast_backward, ref_backward, 3, 0},
    {"layer forward (infer)", fast_infer, ref_infer, 2, 0},
    {"mean_cpu", k_mean, k_mean_ref, 1, 1},
    {"variance_cpu", k_var, k_var_ref, 1, 1},
    {"normalize_cpu", k_norm, k_norm_ref, 2, 1},
    {"scale_bias", k_scale, k_scale_ref, 2, 1},
    {"add_bias", k_add, k_add_ref, 2, 1},
    {"backward_bias", k_bbias, k_bbias_ref, 1, 1},
    {"backward_scale_cpu", k_bscale, k_bscale_ref, 2, 1},
    {"mean_delta_cpu", k_md, k_md_ref, 1, 1},
    {"variance_delta_cpu", k_vd, k_vd_ref, 2, 1},
    {"normalize_delta_cpu", k_nd, k_nd_ref, 3, 1},
};

/* ---- copy bandwidth: bytes read + written per second by memcpy on `threads` ---- */

#include <pthread.h>
typedef struct copy_job {
    float *dst, *src;
    size_t n;
} copy_job;

static void *copy_part(void *arg)
{
    copy_job *j = arg;
    memcpy(j->dst, j->src, j->n * sizeof(float));
    return NULL;
}

static double copy_bandwidth(int threads, int reps)
{
    size_t n = (size_t)64 << 20; /* 256 MB each way: far out of cache */
    float *a = malloc(n * sizeof(float)), *c = malloc(n * sizeof(float));
    if (!a || !c) return NAN;
    memset(a, 1, n * sizeof(float));
    memset(c, 2, n * sizeof(float));
    double best = 1e30, times[64];
    if (reps > 64) reps = 64;
    for (int r = 0; r < reps; r++) {
        pthread_t ids[256];
        copy_job jobs[256];
        double t0 = now();
        for (int t = 0; t < threads; t++) {
            jobs[t] = (copy_job){c + n * t / threads, a + n * t / threads, n * (t + 1) / threads - n * t / threads};
            if (t) pthread_create(&ids[t], NULL, copy_part, &jobs[t]);
        }
        copy_part(&jobs[0]);
        for (int t = 1; t < threads; t++) pthread_join(ids[t], NULL);
        times[r] = now() - t0;
        if (times[r] < best) best = times[r];
    }
    qsort(times, (size_t)reps, sizeof(double), cmp_double);
    free(a);
    free(c);
    return 2.0 * n * sizeof(float) / times[reps / 2];
}

/* ---- setup ---- */

static unsigned long long rng_state = 0x9E3779B97F4A7C15ull;
static float rnd(void) /* roughly N(0, 1): sum of uniforms */
{
    double s = 0;
    for (int k = 0; k < 4; k++) {
        rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
        s += (double)(rng_state >> 11) / 9007199254740992.0;
    }
    return (float)((s - 2.0) * 1.7320508);
}

static float *alloc_floats(long long n, int fill)
{
    float *p = malloc(sizeof(float) * (size_t)n);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    for (long long i = 0; i < n; i++) p[i] = fill ? rnd() : 0.0f;
    return p;
}

static bufs make_bufs(shape s)
{
    bufs b = {0};
    b.s = s;
    b.spatial = s.h * s.w;
    b.n = (long long)s.b * s.c * s.h * s.w;
    b.input = alloc_floats(b.n, 1);
    b.delta0 = alloc_floats(b.n, 1);
    b.work = alloc_floats(b.n, 1);
    b.work2 = alloc_floats(b.n, 1);
    b.c_mean = alloc_floats(s.c, 1);
    b.c_var = alloc_floats(s.c, 0);
    b.c_a = alloc_floats(s.c, 0);
    b.c_b = alloc_floats(s.c, 0);
    b.c_out = alloc_floats(s.c, 0);
    for (int f = 0; f < s.c; f++) b.c_var[f] = 1.0f + 0.1f * (float)(f % 7), b.c_b[f] = 1.0f, b.c_a[f] = 0.0f;
    b.fast = dnbn_make_batchnorm_layer(s.b, s.w, s.h, s.c);
    b.ref = dnbn_make_batchnorm_layer(s.b, s.w, s.h, s.c);
    if (!b.fast || !b.ref) {
        fprintf(stderr, "cannot allocate layers for %dx%dx%dx%d\n", s.b, s.c, s.h, s.w);
        exit(1);
    }
    b.fast->keep_x_norm = 0; /* as the Python layer runs it: x_norm only on request */
    fast_step(&b);
    ref_step(&b);
    return b;
}

static void free_bufs(bufs *b)
{
    float *p[] = {b->input, b->delta0, b->work, b->work2, b->c_mean, b->c_var, b->c_a, b->c_b, b->c_out};
    for (size_t i = 0; i < sizeof p / sizeof *p; i++) free(p[i]);
    dnbn_free_batchnorm_layer(b->fast);
    dnbn_free_batchnorm_layer(b->ref);
}

static int parse_shape(const char *s, shape *out)
{
    return sscanf(s, "%dx%dx%dx%d", &out->b, &out->c, &out->h, &out->w) == 4 && out->b > 0 && out->c > 0 &&
           out->h > 0 && out->w > 0;
}

static void usage(void)
{
    puts("usage: bench_batchnorm [--shape BxCxHxW]... [--threads N]... [--reps N] [--min-time S]\n"
         "                       [--no-kernels] [--json FILE]\n"
         "Times darknet_bn's layer and kernels against the reference loops and the\n"
         "copy bandwidth. Defaults: docs/reference.md §7's six shapes, 1 thread and all cores, 11 reps.");
}

int main(int argc, char **argv)
{
    shape shapes[32];
    int nshapes = 0, threads[8], nthreads = 0, reps = 11, kernels = 1;
    double min_time = 0.2;
    const char *json_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--shape") && i + 1 < argc && nshapes < 32) {
            if (!parse_shape(argv[++i], &shapes[nshapes++])) {
                fprintf(stderr, "bad --shape %s (want BxCxHxW)\n", argv[i]);
                return 2;
            }
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc && nthreads < 8) {
            threads[nthreads] = atoi(argv[++i]);
            if (threads[nthreads++] < 1) {
                fprintf(stderr, "bad --threads\n");
                return 2;
            }
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
            if (reps < 1) reps = 1;
        } else if (!strcmp(argv[i], "--min-time") && i + 1 < argc) {
            min_time = atof(argv[++i]);
        } else if (!strcmp(argv[i], "--no-kernels")) {
            kernels = 0;
        } else if (!strcmp(argv[i], "--json") && i + 1 < argc) {
            json_path = argv[++i];
        } else {
            usage();
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    if (!nshapes) {
        nshapes = (int)(sizeof default_shapes / sizeof *default_shapes);
        memcpy(shapes, default_shapes, sizeof default_shapes);
    }
    int all = dnbn_get_num_threads();
    if (!nthreads) {
        threads[nthreads++] = 1;
        if (all > 1) threads[nthreads++] = all;
    }

    FILE *json = json_path ? fopen(json_path, "w") : NULL;
    if (json_path && !json) {
        fprintf(stderr, "cannot write %s\n", json_path);
        return 2;
    }
    printf("darknet_bn %s, path %s, reps %d (medians)\n", dnbn_version(), dnbn_simd_path(), reps);
    if (json) fprintf(json, "{\"version\": \"%s\", \"simd\": \"%s\", \"results\": [\n", dnbn_version(), dnbn_simd_path());
    int first_json = 1;
    for (int ti = 0; ti < nthreads; ti++) {
        dnbn_set_num_threads(threads[ti]);
        double bw = copy_bandwidth(threads[ti], 7);
        printf("\n== %d thread%s, copy bandwidth %.1f GB/s ==\n", threads[ti], threads[ti] > 1 ? "s" : "", bw / 1e9);
        printf("%-17s %-22s %11s %11s %8s %8s %7s\n", "shape", "pass", "fast ms", "ref ms", "speedup", "GB/s",
               "%roof");
        for (int si = 0; si < nshapes; si++) {
            bufs b = make_bufs(shapes[si]);
            char label[64];
            snprintf(label, sizeof label, "%dx%dx%dx%d", b.s.b, b.s.c, b.s.h, b.s.w);
            for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
                const bench_case *c = &cases[ci];
                if (c->kernel && !kernels) continue;
                double tf = median_time(c->fast, &b, reps, min_time);
                double tr = median_time(c->ref, &b, reps, min_time);
                double bytes = c->floats_moved * sizeof(float) * (double)b.n;
                double roof = bytes / bw;
                printf("%-17s %-22s %11.4f %11.4f %7.1fx %8.1f %6.0f%%\n", label, c->name, tf * 1e3, tr * 1e3,
                       tr / tf, bytes / tf / 1e9, 100.0 * roof / tf);
                if (json)
                    fprintf(json,
                            "%s  {\"shape\": [%d, %d, %d, %d], \"threads\": %d, \"pass\": \"%s\", "
                            "\"fast_s\": %.9g, \"ref_s\": %.9g, \"bytes\": %.0f, \"copy_bandwidth\": %.6g, "
                            "\"roofline_s\": %.9g}",
                            first_json ? "" : ",\n", b.s.b, b.s.c, b.s.h, b.s.w, threads[ti], c->name, tf, tr,
                            bytes, bw, roof);
                first_json = 0;
                fflush(stdout);
            }
            free_bufs(&b);
        }
    }
    /* the machine-dependent choices the library made during the run */
    int need = dnbn_tuning_report(NULL, 0);
    char *tuning = malloc((size_t)need + 1);
    if (tuning) {
        dnbn_tuning_report(tuning, need + 1);
        printf("\ntuning: %s\n", tuning);
    }
    if (json) {
        fprintf(json, "\n], \"tuning\": %s}\n", tuning ? tuning : "null");
        fclose(json);
    }
    free(tuning);
    return 0;
}
