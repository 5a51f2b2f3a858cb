/*
 * driver.c - trains a small batch-normalized network through Darknet's own
 * API, for comparing plain Darknet with the same binary run under an
 * LD_PRELOADed library that replaces Darknet's batch-norm functions
 * (forward_batchnorm_layer / backward_batchnorm_layer).
 *
 * Darknet: Debian's `darknet` package (pjreddie's Darknet, git 2018-09-14,
 * CPU only, single-threaded): /usr/lib/darknet/libdarknet.so and
 * /usr/lib/darknet/include/darknet.h.
 *
 * Build:
 *   cc -std=c11 -O2 -Wall -Wextra -Werror -I/usr/lib/darknet/include \
 *      tests/darknet/driver.c -L/usr/lib/darknet -ldarknet \
 *      -Wl,-rpath,/usr/lib/darknet -lm -pthread -o /tmp/driver
 *
 * Run:
 *   driver [--steps N] [--standalone-bn] [--dump FILE] [--bench-bn REPS]
 *          [--batch B]
 *   (defaults: 20 steps, batch 32; batch at least 2, since Darknet's
 *   unbiased variance divides by batch*spatial - 1, which is 0 for the
 *   connected layer at batch 1; invalid arguments: one line on stderr,
 *   exit status 2; a failed dump: exit status 1)
 *
 * What it does:
 *   - writes a cfg to a mkstemp file in /tmp, loads it with
 *     parse_network_cfg and removes it: 28x28x3 input, 4 convolutional
 *     layers with batch_normalize=1 (16,32,32,64 filters, 3x3, strides
 *     1,2,1,2, leaky), with --standalone-bn a Darknet [batchnorm] layer
 *     right after the 2nd convolution, a batch-normalized connected layer
 *     of 32 (leaky), a connected layer of 10 (linear) and a softmax, which
 *     computes the cross-entropy cost itself (no [cost] layer).
 *     Plain Darknet segfaults on [batchnorm] in the first forward pass
 *     (make_batchnorm_layer never allocates l.x, l.x_norm, l.mean_delta,
 *     l.variance_delta), so --standalone-bn is only meant for a
 *     replacement library that copes.
 *   - Darknet initializes weights with rand(); srand(DN_WEIGHT_SEED) is
 *     called right before parsing so the weights are fixed.  The data come
 *     from a private splitmix64 generator: DN_NBATCHES fixed batches of B
 *     images, class k having a bright square at a class-dependent place,
 *     mostly in channel k%3, on uniform noise; step i trains on batch
 *     i % DN_NBATCHES with train_network().
 *   - net->delta is set to a buffer of B*inputs floats, zeroed before
 *     every step, so layer 0's backward writes the gradient with respect
 *     to the network input into it.
 *
 * Output on stdout:
 *   step <i> loss <%.9g>            one line per step, i from 0; the loss is
 *                                   train_network()'s value, the mean
 *                                   cross-entropy per image
 *   time_per_step_ms <median>       median wall time of a train_network() call
 *   with --bench-bn REPS, after the dump:
 *   bn_ms <median>                  median over REPS of the summed time of
 *                                   forward_batchnorm_layer +
 *                                   backward_batchnorm_layer over all
 *                                   batch-normalized conv layers
 *   step_ms <median>                median of REPS more train_network() steps
 *
 * --dump FILE, written after the last step (text, values %.9g):
 *   loss <step> <value>                      for every step
 *   L<index> <field> <count> v1 v2 ...       for every layer with batch
 *       normalization (conv/connected with batch_normalize, [batchnorm]);
 *       fields shape (batch, out_c, out_h*out_w), x (the normalized
 *       layer's input as the last training forward kept it, batch*outputs
 *       values; 0 values where l.x is not allocated), mean, variance,
 *       rolling_mean, rolling_variance, scales, biases (out_c values each)
 *       and delta (batch*outputs values)
 *   input_delta <count> v1 v2 ...            gradient w.r.t. the network input
 *                                            of the last step
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* darknet.h is clean under gcc -Wall -Wextra; it does declare
 * `double what_time_is_it_now();` without a prototype, which compilers or
 * flags with -Wstrict-prototypes would flag. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include "darknet.h"
#pragma GCC diagnostic pop

/* Exported by libdarknet.so, not declared in darknet.h. */
void forward_batchnorm_layer(layer l, network net);
void backward_batchnorm_layer(layer l, network net);

enum {
    DN_W = 28, DN_H = 28, DN_C = 3,
    DN_CLASSES = 10,
    DN_NBATCHES = 4,          /* fixed batches, cycled over the steps */
    DN_MAX_BATCH = 4096,      /* --batch range 2..DN_MAX_BATCH */
    DN_MAX_STEPS = 1000000,
    DN_MAX_REPS = 1000000
};

#define DN_WEIGHT_SEED 20180914u
#define DN_DATA_SEED 0x5eed0fda7a5eedULL

typedef struct {
    int steps;
    int batch;
    int standalone_bn;
    const char *dump;
    int bench_reps;           /* 0: no bench */
} options;

/* ------------------------------------------------------------------ */
/* Command line                                                        */

#define USAGE "usage: driver [--steps N] [--standalone-bn] [--dump FILE] " \
              "[--bench-bn REPS] [--batch B]"

static int parse_count(const char *s, int min, int max, int *out)
{
    char *end;
    long v;
    if (!s || !*s || *s == '-' || *s == '+') return -1;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || v < min || v > max) return -1;
    *out = (int)v;
    return 0;
}

/* parse_count for option `name`; on error prints one line and returns -1. */
static int count_option(const char *name, const char *s, int min, int max, int *out)
{
    if (parse_count(s, min, max, out) == 0) return 0;
    fprintf(stderr, "driver: %s needs an integer in %d..%d; " USAGE "\n", name, min, max);
    return -1;
}

/* 0 on success, 1 for --help; on error prints one line and returns -1. */
static int parse_args(int argc, char **argv, options *o)
{
    o->steps = 20;
    o->batch = 32;
    o->standalone_bn = 0;
    o->dump = NULL;
    o->bench_reps = 0;
    for (int i = 1; i < argc; ++i) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            return 1;
        } else if (!strcmp(a, "--standalone-bn")) {
            o->standalone_bn = 1;
        } else if (!strcmp(a, "--steps")) {
            if (count_option(a, v, 1, DN_MAX_STEPS, &o->steps)) return -1;
            ++i;
        } else if (!strcmp(a, "--batch")) {
            /* Batch 1 makes Darknet's variance_cpu divide by
             * batch*spatial - 1 = 0 in the connected layer: NaN. */
            if (count_option(a, v, 2, DN_MAX_BATCH, &o->batch)) return -1;
            ++i;
        } else if (!strcmp(a, "--bench-bn")) {
            if (count_option(a, v, 1, DN_MAX_REPS, &o->bench_reps)) return -1;
            ++i;
        } else if (!strcmp(a, "--dump")) {
            if (!v || !*v) {
                fprintf(stderr, "driver: --dump needs a file name; "
                        USAGE "\n");
                return -1;
            }
            o->dump = v;
            ++i;
        } else {
            fprintf(stderr, "driver: unknown argument '%s'; " USAGE "\n", a);
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Small helpers                                                       */

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (!p) {
        fprintf(stderr, "driver: out of memory\n");
        exit(1);
    }
    return p;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(const double *v, int n)
{
    double *s = xcalloc((size_t)n, sizeof *s);
    memcpy(s, v, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, cmp_double);
    double m = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
    free(s);
    return m;
}

/* splitmix64: the data generator (rand() is left to Darknet). */
static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static float uniform01(uint64_t *state)      /* [0, 1), 24 bits */
{
    return (float)(splitmix64(state) >> 40) * (1.0f / 16777216.0f);
}

/* ------------------------------------------------------------------ */
/* Network                                                             */

static void write_cfg(FILE *f, int batch, int standalone_bn)
{
    fprintf(f,
            "[net]\n"
            "batch=%d\n"
            "subdivisions=1\n"
            "width=%d\n"
            "height=%d\n"
            "channels=%d\n"
            "learning_rate=0.01\n"
            "momentum=0.9\n"
            "decay=0.0005\n"
            "policy=constant\n"
            "max_batches=1000000\n\n",
            batch, DN_W, DN_H, DN_C);
    static const int filters[4] = {16, 32, 32, 64};
    static const int strides[4] = {1, 2, 1, 2};
    for (int i = 0; i < 4; ++i) {
        fprintf(f,
                "[convolutional]\n"
                "batch_normalize=1\n"
                "filters=%d\n"
                "size=3\n"
                "stride=%d\n"
                "pad=1\n"
                "activation=leaky\n\n",
                filters[i], strides[i]);
        if (i == 1 && standalone_bn) fprintf(f, "[batchnorm]\n\n");
    }
    fprintf(f,
            "[connected]\n"
            "output=32\n"
            "batch_normalize=1\n"
            "activation=leaky\n\n"
            "[connected]\n"
            "output=%d\n"
            "activation=linear\n\n"
            "[softmax]\n",
            DN_CLASSES);
}

/* Writes the cfg to a temporary file, parses it, removes the file. */
static network *load_net(const options *o)
{
    char path[] = "/tmp/darknet_driver_cfg_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) {
        perror("driver: mkstemp");
        exit(1);
    }
    FILE *f = fdopen(fd, "w");
    if (!f) {
        perror("driver: fdopen");
        close(fd);
        unlink(path);
        exit(1);
    }
    write_cfg(f, o->batch, o->standalone_bn);
    if (ferror(f) | fclose(f)) {
        fprintf(stderr, "driver: cannot write %s\n", path);
        unlink(path);
        exit(1);
    }
    /* Darknet draws its initial weights from rand(). */
    srand(DN_WEIGHT_SEED);
    network *net = parse_network_cfg(path);  /* Darknet exits on errors */
    unlink(path);
    if (net->batch != o->batch || net->inputs != DN_W * DN_H * DN_C ||
        net->outputs != DN_CLASSES) {
        fprintf(stderr, "driver: unexpected network (batch %d, inputs %d, "
                "outputs %d)\n", net->batch, net->inputs, net->outputs);
        exit(1);
    }
    return net;
}

static int has_bn(const layer *l)
{
    return l->type == BATCHNORM ||
           ((l->type == CONVOLUTIONAL || l->type == CONNECTED) &&
            l->batch_normalize);
}

/* ------------------------------------------------------------------ */
/* Data                                                                */

static float **alloc_rows(int rows, int cols)
{
    float **v = xcalloc((size_t)rows, sizeof *v);
    for (int r = 0; r < rows; ++r) v[r] = xcalloc((size_t)cols, sizeof **v);
    return v;
}

static void free_rows(float **v, int rows)
{
    if (!v) return;
    for (int r = 0; r < rows; ++r) free(v[r]);
    free(v);
}

/*
 * One batch: image rows in Darknet's layout (channel planes of h rows of w),
 * one-hot labels.  Class k: a 5x5 square centred at
 * (4 + 5*(k%5), 8 + 12*(k/5)) +-1 pixel, +0.7 in channel k%3 and +0.3 in
 * the other channels, over uniform noise in [0, 0.3).
 */
static data make_batch(int batch, uint64_t *rng)
{
    const int inputs = DN_W * DN_H * DN_C;
    data d;
    memset(&d, 0, sizeof d);
    d.shallow = 0;
    d.X.rows = batch;
    d.X.cols = inputs;
    d.X.vals = alloc_rows(batch, inputs);
    d.y.rows = batch;
    d.y.cols = DN_CLASSES;
    d.y.vals = alloc_rows(batch, DN_CLASSES);
    for (int b = 0; b < batch; ++b) {
        int k = (int)(splitmix64(rng) % DN_CLASSES);
        int cx = 4 + 5 * (k % 5) + (int)(splitmix64(rng) % 3) - 1;
        int cy = 8 + 12 * (k / 5) + (int)(splitmix64(rng) % 3) - 1;
        float *img = d.X.vals[b];
        for (int i = 0; i < inputs; ++i) img[i] = 0.3f * uniform01(rng);
        for (int c = 0; c < DN_C; ++c) {
            float add = c == k % 3 ? 0.7f : 0.3f;
            for (int y = cy - 2; y <= cy + 2; ++y) {
                for (int x = cx - 2; x <= cx + 2; ++x) {
                    float *p = &img[(c * DN_H + y) * DN_W + x];
                    *p += add;
                    if (*p > 1.0f) *p = 1.0f;
                }
            }
        }
        d.y.vals[b][k] = 1.0f;
    }
    return d;
}

static void free_batch(data *d)
{
    free_rows(d->X.vals, d->X.rows);
    free_rows(d->y.vals, d->y.rows);
    memset(d, 0, sizeof *d);
}

/* ------------------------------------------------------------------ */
/* Training                                                            */

/*
 * One step.  backward_network() hands layer 0 the caller's network struct
 * (`net = orig`), so layer 0 writes the input gradient into net->delta; the
 * convolutional backward *adds* into it (col2im_cpu accumulates) and nothing
 * in train_network() clears it, so it is zeroed before every step.
 */
static float train_step(network *net, data *d, float *input_delta,
                        double *ms)
{
    memset(input_delta, 0,
           (size_t)net->batch * (size_t)net->inputs * sizeof *input_delta);
    double t0 = now_ms();
    /* Returns the summed softmax cross-entropy divided by the batch size. */
    float loss = train_network(net, *d);
    *ms = now_ms() - t0;
    return loss;
}

/* ------------------------------------------------------------------ */
/* Dump                                                                */

static void dump_values(FILE *f, int index, const char *field,
                        const float *v, int n)
{
    if (!v) n = 0;   /* not allocated (e.g. plain Darknet [batchnorm]) */
    if (index >= 0) fprintf(f, "L%d %s %d", index, field, n);
    else fprintf(f, "%s %d", field, n);
    for (int i = 0; i < n; ++i) fprintf(f, " %.9g", (double)v[i]);
    fputc('\n', f);
}

static int write_dump(const char *path, const network *net,
                      const float *losses, int steps,
                      const float *input_delta)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "driver: cannot open %s: %s\n", path,
                strerror(errno));
        return -1;
    }
    for (int s = 0; s < steps; ++s)
        fprintf(f, "loss %d %.9g\n", s, (double)losses[s]);
    for (int i = 0; i < net->n; ++i) {
        const layer *l = &net->layers[i];
        if (!has_bn(l)) continue;
        fprintf(f, "L%d shape 3 %d %d %d\n", i, l->batch, l->out_c, l->out_h * l->out_w);
        dump_values(f, i, "x", l->x, l->batch * l->outputs);
        dump_values(f, i, "mean", l->mean, l->out_c);
        dump_values(f, i, "variance", l->variance, l->out_c);
        dump_values(f, i, "rolling_mean", l->rolling_mean, l->out_c);
        dump_values(f, i, "rolling_variance", l->rolling_variance, l->out_c);
        dump_values(f, i, "scales", l->scales, l->out_c);
        dump_values(f, i, "biases", l->biases, l->out_c);
        dump_values(f, i, "delta", l->delta, l->batch * l->outputs);
    }
    dump_values(f, -1, "input_delta", input_delta, net->batch * net->inputs);
    if (ferror(f) | fclose(f)) {
        fprintf(stderr, "driver: cannot write %s\n", path);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Batch-norm bench                                                    */

/* A saved copy of one array that the bench overwrites. */
typedef struct {
    float *ptr;
    float *copy;
    size_t n;
} saved_array;

typedef struct {
    saved_array *a;
    int n, cap;
} snapshot;

static float *snap_add(snapshot *s, float *ptr, size_t n)
{
    if (!ptr) return NULL;
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 32;
        s->a = realloc(s->a, (size_t)s->cap * sizeof *s->a);
        if (!s->a) {
            fprintf(stderr, "driver: out of memory\n");
            exit(1);
        }
    }
    saved_array *e = &s->a[s->n++];
    e->ptr = ptr;
    e->n = n;
    e->copy = xcalloc(n, sizeof *e->copy);
    memcpy(e->copy, ptr, n * sizeof *ptr);
    return e->copy;
}

static void snap_restore_free(snapshot *s)
{
    for (int i = 0; i < s->n; ++i) {
        memcpy(s->a[i].ptr, s->a[i].copy, s->a[i].n * sizeof(float));
        free(s->a[i].copy);
    }
    free(s->a);
    s->a = NULL;
    s->n = s->cap = 0;
}

/*
 * Times forward_batchnorm_layer + backward_batchnorm_layer on every
 * batch-normalized convolutional layer, the way forward/backward_
 * convolutional_layer call them: BN works in place on l.output (and
 * l.delta), net.train = 1, net.input = l.output, net.delta = the previous
 * layer's delta (the network input delta for layer 0), net.index = i.
 * Before each call (untimed) l.output is reset to the layer's pre-BN
 * output of the last training step (kept by Darknet in l.x) and l.delta to
 * its value after training, so every repetition sees the same data and
 * values cannot drift.  Afterwards every array the calls touch is restored,
 * so the timed training steps that follow continue from the trained state.
 */
static double bench_bn(network *net, int reps)
{
    snapshot snap = {0};
    float **x_in = xcalloc((size_t)net->n, sizeof *x_in);
    float **delta_in = xcalloc((size_t)net->n, sizeof *delta_in);
    for (int i = 0; i < net->n; ++i) {
        layer *l = &net->layers[i];
        if (l->type != CONVOLUTIONAL || !l->batch_normalize) continue;
        size_t big = (size_t)l->batch * (size_t)l->outputs;
        size_t c = (size_t)l->out_c;
        x_in[i] = snap_add(&snap, l->x, big);
        delta_in[i] = snap_add(&snap, l->delta, big);
        snap_add(&snap, l->output, big);
        snap_add(&snap, l->x_norm, big);
        snap_add(&snap, l->mean, c);
        snap_add(&snap, l->variance, c);
        snap_add(&snap, l->rolling_mean, c);
        snap_add(&snap, l->rolling_variance, c);
        snap_add(&snap, l->mean_delta, c);
        snap_add(&snap, l->variance_delta, c);
        snap_add(&snap, l->bias_updates, c);
        snap_add(&snap, l->scale_updates, c);
        /* In case a replacement writes net.delta of a conv layer. */
        if (i == 0) snap_add(&snap, net->delta,
                             (size_t)net->batch * (size_t)net->inputs);
    }

    double *ms = xcalloc((size_t)reps, sizeof *ms);
    for (int r = 0; r < reps; ++r) {
        double total = 0;
        for (int i = 0; i < net->n; ++i) {
            layer l = net->layers[i];
            if (!x_in[i]) continue;
            size_t big = (size_t)l.batch * (size_t)l.outputs;
            memcpy(l.output, x_in[i], big * sizeof(float));
            memcpy(l.delta, delta_in[i], big * sizeof(float));
            network bn = *net;
            bn.train = 1;
            bn.index = i;
            bn.input = l.output;
            bn.delta = i ? net->layers[i - 1].delta : net->delta;
            double t0 = now_ms();
            forward_batchnorm_layer(l, bn);
            backward_batchnorm_layer(l, bn);
            total += now_ms() - t0;
        }
        ms[r] = total;
    }
    double m = median(ms, reps);
    free(ms);
    free(x_in);
    free(delta_in);
    snap_restore_free(&snap);
    return m;
}

/* ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    options o;
    int rc = parse_args(argc, argv, &o);
    if (rc < 0) return 2;
    if (rc > 0) {
        printf(USAGE "\n");
        return 0;
    }

    network *net = load_net(&o);
    size_t in_n = (size_t)net->batch * (size_t)net->inputs;
    float *input_delta = xcalloc(in_n, sizeof *input_delta);
    net->delta = input_delta;    /* not freed by free_network() */

    uint64_t rng = DN_DATA_SEED;
    data batches[DN_NBATCHES];
    for (int b = 0; b < DN_NBATCHES; ++b)
        batches[b] = make_batch(o.batch, &rng);

    float *losses = xcalloc((size_t)o.steps, sizeof *losses);
    double *step_ms = xcalloc((size_t)o.steps, sizeof *step_ms);
    for (int s = 0; s < o.steps; ++s) {
        losses[s] = train_step(net, &batches[s % DN_NBATCHES], input_delta,
                               &step_ms[s]);
        printf("step %d loss %.9g\n", s, (double)losses[s]);
        fflush(stdout);
    }
    printf("time_per_step_ms %.6f\n", median(step_ms, o.steps));
    fflush(stdout);

    int status = 0;
    if (o.dump && write_dump(o.dump, net, losses, o.steps, input_delta))
        status = 1;

    if (o.bench_reps && !status) {
        double bn = bench_bn(net, o.bench_reps);
        double *ms = xcalloc((size_t)o.bench_reps, sizeof *ms);
        for (int r = 0; r < o.bench_reps; ++r)
            train_step(net, &batches[(o.steps + r) % DN_NBATCHES],
                       input_delta, &ms[r]);
        printf("bn_ms %.6f\n", bn);
        printf("step_ms %.6f\n", median(ms, o.bench_reps));
        free(ms);
    }

    free_network(net);
    free(input_delta);
    for (int b = 0; b < DN_NBATCHES; ++b) free_batch(&batches[b]);
    free(losses);
    free(step_ms);
    return status;
}
