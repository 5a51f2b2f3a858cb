/*
 * mpi_phases.c - synchronized batch norm over MPI with darknet_bn's phases
 * (csrc/darknet_bn.h, section 4): a batch split across processes, normalized
 * with the statistics of the whole batch.
 *
 *   pip install mpich            # mpicc and mpiexec (in .venv/bin with make's venv)
 *   make build/libdarknet_bn.a
 *   .venv/bin/mpicc -std=c11 -O2 -Wall -Wextra -Icsrc examples/mpi_phases.c build/libdarknet_bn.a \
 *       -o build/mpi_phases -lm -pthread
 *   .venv/bin/mpiexec -n 3 build/mpi_phases
 *
 * Each rank holds a shard of a batch of BATCH images; the shards are unequal,
 * and with 3 or more ranks the last one holds none (an empty shard joins
 * every collective with count 0). One training step, one collective per phase:
 *
 *   forward:  dnbn_batchnorm_moments on the shard          -> (count, mean, m2) in double
 *             MPI_Allgather of (count, mean, m2)
 *             dnbn_batchnorm_moments_combine in rank order   -> the same bits on every rank
 *             dnbn_batchnorm_layer_forward_moments
 *   backward: dnbn_batchnorm_layer_backward_sums            -> (sum dy, sum dy*(x - mean))
 *             MPI_Allreduce(MPI_SUM)
 *             dnbn_batchnorm_layer_backward_apply
 *   update:   dnbn_update_batchnorm_layer with the whole batch as l->batch
 *
 * Every rank can rebuild the whole batch (its values come from a formula), so
 * each checks its shard against one layer over the whole batch, and all
 * ranks check that their running statistics are bit-identical. Exit status 0
 * when everything agrees (docs/reference.md §6 tolerance: 1e-5 relative + 1e-5).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "darknet_bn.h"

enum { BATCH = 10, C = 4, H = 3, W = 5, S = H * W };
#define OFFSET 1e4f /* data at mean 10^4, std about 1: no cancellation in the statistics */

/* Value of element (b, f, i) of the whole batch: a hash of its index. */
static float value(int b, int f, int i, unsigned salt)
{
    unsigned u = (unsigned)((b * C + f) * S + i) * 2654435761u ^ salt;
    u ^= u >> 15, u *= 2246822519u, u ^= u >> 13, u *= 3266489917u, u ^= u >> 16;
    return (float)u / 4294967296.0f * 2.0f - 1.0f;
}

static void fill(float *dst, int b0, int batch, float offset, float scale, unsigned salt)
{
    for (int b = 0; b < batch; b++)
        for (int f = 0; f < C; f++)
            for (int i = 0; i < S; i++)
                dst[((size_t)b * C + f) * S + i] = offset + scale * (f + 1) * value(b0 + b, f, i, salt);
}

/* Images of each rank: unequal shards over the first k ranks, none for the last when size >= 3. */
static void shards(int size, int *count, int *first)
{
    int k = size >= 3 ? size - 1 : size, weights = k * (k + 1) / 2, used = 0;
    if (k < 1) return;
    for (int r = 0; r < size; r++) {
        count[r] = r < k ? BATCH * (r + 1) / weights : 0;
        used += count[r];
    }
    count[k - 1] += BATCH - used;
    for (int r = 0, at = 0; r < size; at += count[r], r++) first[r] = at;
}

/* A layer for a shard. dnbn_make_batchnorm_layer takes batch >= 1; an empty
 * shard is a caller-built layer of batch 0 (csrc/darknet_bn.h section 3). */
typedef struct {
    dnbn_layer *l;
    dnbn_layer own; /* the caller-built one */
    float *chan, one;
    double *scratch;
} shard_layer;

static int make_shard_layer(shard_layer *s, int batch)
{
    memset(s, 0, sizeof *s);
    if (batch > 0) {
        s->l = dnbn_make_batchnorm_layer(batch, W, H, C);
        return s->l ? 0 : -1;
    }
    dnbn_layer *l = &s->own;
    s->chan = calloc(10 * C, sizeof(float));
    s->scratch = calloc((size_t)DNBN_SCRATCH_DOUBLES * C, sizeof(double));
    if (!s->chan || !s->scratch) return -1;
    float **per_channel[] = {&l->scales, &l->biases, &l->scale_updates, &l->bias_updates, &l->mean,
                             &l->variance, &l->rolling_mean, &l->rolling_variance, &l->mean_delta,
                             &l->variance_delta};
    for (int k = 0; k < 10; k++) *per_channel[k] = s->chan + k * C;
    for (int f = 0; f < C; f++) l->scales[f] = 1.0f;
    l->batch = 0, l->out_c = C, l->out_h = H, l->out_w = W, l->outputs = C * H * W;
    l->output = l->delta = l->x = &s->one; /* no values: never read or written, but not NULL */
    l->scratch = s->scratch;
    /* darknet numerics, Darknet's momentum; also sets the running statistics to their start */
    if (dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_DARKNET, 1e-5f, 0.01f) != DNBN_OK) return -1;
    s->l = l;
    return 0;
}

static void free_shard_layer(shard_layer *s)
{
    if (s->l && s->l != &s->own) dnbn_free_batchnorm_layer(s->l);
    free(s->chan);
    free(s->scratch);
}

/* Largest |got - want| in units of the tolerance 1e-5 + 1e-5*|want| (<= 1 passes; NaN fails), and
 * the largest |got - want| itself in *abs_err. */
static double worst(const float *got, const float *want, size_t n, double *abs_err)
{
    double w = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]), e = d / (1e-5 + 1e-5 * fabs((double)want[i]));
        if (!(e <= w)) w = e; /* NaN counts as worst */
        if (!(d <= *abs_err)) *abs_err = d;
    }
    return w;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size, failed = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size > BATCH) {
        if (rank == 0) fprintf(stderr, "mpi_phases: at most %d ranks\n", BATCH);
        MPI_Finalize();
        return 2;
    }
    int *count = malloc(sizeof(int) * (size_t)size), *first = malloc(sizeof(int) * (size_t)size);
    float *whole_x = malloc(sizeof(float) * BATCH * C * S), *whole_dy = malloc(sizeof(float) * BATCH * C * S);
    float *whole_dx = malloc(sizeof(float) * BATCH * C * S);
    double *rows = malloc(sizeof(double) * (size_t)size * (1 + 2 * C));
    float *all_stats = malloc(sizeof(float) * (size_t)size * 2 * C);
    if (!count || !first || !whole_x || !whole_dy || !whole_dx || !rows || !all_stats) MPI_Abort(MPI_COMM_WORLD, 2);
    shards(size, count, first);
    int batch = count[rank];
    fill(whole_x, 0, BATCH, OFFSET, 1.0f, 1u);
    fill(whole_dy, 0, BATCH, 0.0f, 1.0f, 2u);
    const float *x = whole_x + (size_t)first[rank] * C * S, *dy = whole_dy + (size_t)first[rank] * C * S;
    float *x_in = batch ? (float *)x : whole_x, *dy_in = batch ? (float *)dy : whole_dy; /* never read when empty */

    shard_layer shard;
    if (make_shard_layer(&shard, batch) != 0) MPI_Abort(MPI_COMM_WORLD, 2);
    dnbn_layer *l = shard.l;
    for (int f = 0; f < C; f++) l->scales[f] = 0.5f + 0.25f * f, l->biases[f] = 0.1f * f;

    /* ---- forward: moments, one allgather, Chan's combine in rank order, elementwise pass ---- */
    double mine[1 + 2 * C], n;
    mine[0] = (double)batch * S;
    dnbn_batchnorm_moments(x_in, batch, C, S, mine + 1, mine + 1 + C); /* batch 0: mean = m2 = 0 */
    MPI_Allgather(mine, 1 + 2 * C, MPI_DOUBLE, rows, 1 + 2 * C, MPI_DOUBLE, MPI_COMM_WORLD);
    double mean[C], m2[C];
    n = rows[0];
    memcpy(mean, rows + 1, sizeof mean);
    memcpy(m2, rows + 1 + C, sizeof m2);
    for (int r = 1; r < size; r++) {
        const double *row = rows + (size_t)r * (1 + 2 * C);
        dnbn_batchnorm_moments_combine(C, n, mean, m2, row[0], row + 1, row + 1 + C);
        n += row[0];
    }
    if (dnbn_batchnorm_layer_forward_moments(l, x_in, n, mean, m2) != DNBN_OK) failed = 1;

    /* ---- backward: local sums, one allreduce, elementwise pass ---- */
    double sums[2 * C], total[2 * C];
    if (dnbn_batchnorm_layer_backward_sums(l, dy_in, sums, sums + C) != DNBN_OK) failed = 1;
    MPI_Allreduce(sums, total, 2 * C, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    if (dnbn_batchnorm_layer_backward_apply(l, dy_in, n, total, total + C) != DNBN_OK) failed = 1;

    /* ---- update: the updates hold whole-batch sums, so the step divides by the whole batch ---- */
    l->batch = BATCH; /* update reads batch only for learning_rate/batch */
    dnbn_update_batchnorm_layer(l, 0.1f, 0.9f, 0.0f);
    l->batch = batch;

    /* ---- check against one layer over the whole batch ---- */
    dnbn_layer *ref = dnbn_make_batchnorm_layer(BATCH, W, H, C);
    if (!ref) MPI_Abort(MPI_COMM_WORLD, 2);
    for (int f = 0; f < C; f++) ref->scales[f] = 0.5f + 0.25f * f, ref->biases[f] = 0.1f * f;
    dnbn_network net = {.input = whole_x, .delta = whole_dx, .train = 1};
    memcpy(ref->delta, whole_dy, sizeof(float) * BATCH * C * S);
    if (dnbn_forward_batchnorm_layer(ref, net) != DNBN_OK || dnbn_backward_batchnorm_layer(ref, net) != DNBN_OK)
        failed = 1;
    size_t off = (size_t)first[rank] * C * S, len = (size_t)batch * C * S;
    double a[4] = {0, 0, 0, 0}; /* largest absolute errors: output, delta, running statistics, parameters */
    double t = worst(l->output, ref->output + off, len, &a[0]);
    t = fmax(t, worst(l->delta, whole_dx + off, len, &a[1]));
    t = fmax(t, worst(l->rolling_mean, ref->rolling_mean, C, &a[2]));
    t = fmax(t, worst(l->rolling_variance, ref->rolling_variance, C, &a[2]));
    dnbn_update_batchnorm_layer(ref, 0.1f, 0.9f, 0.0f);
    t = fmax(t, worst(l->scales, ref->scales, C, &a[3]));
    t = fmax(t, worst(l->biases, ref->biases, C, &a[3]));
    if (!(t <= 1.0)) failed = 1;

    /* running statistics: the same bits on every rank */
    float stats[2 * C];
    memcpy(stats, l->rolling_mean, sizeof(float) * C);
    memcpy(stats + C, l->rolling_variance, sizeof(float) * C);
    MPI_Allgather(stats, 2 * C, MPI_FLOAT, all_stats, 2 * C, MPI_FLOAT, MPI_COMM_WORLD);
    int identical = 1;
    for (int r = 0; r < size; r++) identical &= memcmp(all_stats + (size_t)r * 2 * C, stats, sizeof stats) == 0;
    if (!identical) failed = 1;

    double e_max[4];
    MPI_Reduce(a, e_max, 4, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    int any_failed = 0;
    MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (rank == 0) {
        printf("mpi_phases: %d ranks, shards", size);
        for (int r = 0; r < size; r++) printf(" %d", count[r]);
        printf(" of %d images, %g values per channel\n", BATCH, n);
        printf("largest |error| against one layer over the whole batch: output %.3g, delta %.3g, "
               "running statistics %.3g, scales/biases after update %.3g\n",
               e_max[0], e_max[1], e_max[2], e_max[3]);
        printf("running statistics bit-identical on every rank: %s\n%s\n", identical ? "yes" : "NO",
               any_failed ? "FAILED" : "ok");
    }
    dnbn_free_batchnorm_layer(ref);
    free_shard_layer(&shard);
    free(count), free(first), free(whole_x), free(whole_dy), free(whole_dx), free(rows), free(all_stats);
    MPI_Finalize();
    return any_failed ? 1 : 0;
}
