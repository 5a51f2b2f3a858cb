/*
 * channels.c - cutting a tensor into per-channel work units, running them on
 * threads, and the per-channel moments every statistic is built from.
 */
#include <math.h>

#include "internal.h"

dnbn_part dnbn_partition(int batch, int filters, int spatial)
{
    dnbn_part pt = {0};
    if (batch <= 0 || filters <= 0 || spatial <= 0) return pt;
    pt.batch = batch;
    pt.filters = filters;
    pt.spatial = spatial;
    pt.m = (idx_t)batch * spatial;
    pt.threads = dnbn_threads_for(pt.m * filters);
    pt.parts = 1;
    pt.group = 1;
    if (spatial == 1) { /* tiles: the channels shared among the threads, in multiples of 8 */
        idx_t per_thread = ((filters + pt.threads - 1) / pt.threads + 7) / 8 * 8;
        pt.group = (int)(per_thread < DNBN_TILE ? per_thread : DNBN_TILE);
        return pt;
    }
    if (filters < pt.threads) {
        idx_t parts = (pt.threads + filters - 1) / filters;
        pt.parts = (int)(parts < pt.m ? parts : pt.m);
        return pt;
    }
    /* a group's input about fills a core's L2, so that its second pass finds it
     * there, while each image's rows of the group make one long contiguous
     * stretch (measured: 192 KB groups were 10-30 % slower than 1 MB ones on
     * a 1 MB-L2 machine) */
    idx_t group = dnbn_group_bytes() / (pt.m * (idx_t)sizeof(float));
    idx_t balanced = filters / (2 * (idx_t)pt.threads); /* at least two units per thread */
    if (group > balanced) group = balanced;
    if (group > 64) group = 64; /* enough to make each image's stretch long */
    pt.group = group < 1 ? 1 : (int)group;
    return pt;
}

/* An empty partition (a size <= 0) has no units. */
idx_t dnbn_units(const dnbn_part *pt)
{
    return pt->group > 0 ? (pt->filters + pt->group - 1) / pt->group * pt->parts : 0;
}

idx_t dnbn_unit_first(const dnbn_part *pt, idx_t unit) { return unit / pt->parts * pt->group; }

dnbn_unit dnbn_unit_at(const dnbn_part *pt, idx_t unit)
{
    idx_t p = unit % pt->parts;
    dnbn_unit w = {dnbn_unit_first(pt, unit), dnbn_unit_channels(pt, unit), pt->m * p / pt->parts,
                   pt->m * (p + 1) / pt->parts};
    return w;
}

idx_t dnbn_unit_channels(const dnbn_part *pt, idx_t unit)
{
    idx_t n = pt->filters - dnbn_unit_first(pt, unit);
    return n < pt->group ? n : pt->group;
}

void dnbn_for_runs(const dnbn_part *pt, idx_t unit, dnbn_run_fn fn, void *ctx)
{
    idx_t f0 = dnbn_unit_first(pt, unit), nf = dnbn_unit_channels(pt, unit);
    if (pt->parts == 1) {
        for (idx_t b = 0; b < pt->batch; b++)
            for (idx_t f = f0; f < f0 + nf; f++) fn(ctx, f, (b * pt->filters + f) * pt->spatial, pt->spatial);
        return;
    }
    idx_t p = unit % pt->parts;
    idx_t j = pt->m * p / pt->parts, end = pt->m * (p + 1) / pt->parts;
    while (j < end) {
        idx_t b = j / pt->spatial, i = j - b * pt->spatial;
        idx_t len = pt->spatial - i;
        if (len > end - j) len = end - j;
        fn(ctx, f0, (b * pt->filters + f0) * pt->spatial + i, len);
        j += len;
    }
}

/* ---- drivers ---- */

typedef struct reduce_job {
    const dnbn_part *pt;
    const dnbn_reduce *r;
    double (*partial)[3]; /* per unit, when parts > 1 */
} reduce_job;

static void reduce_range(void *arg, idx_t lo, idx_t hi)
{
    reduce_job *job = arg;
    for (idx_t u = lo; u < hi; u++) {
        double acc[DNBN_MAX_GROUP][3] = {{0}};
        idx_t f0 = dnbn_unit_first(job->pt, u), nf = dnbn_unit_channels(job->pt, u);
        job->r->unit(job->r->ctx, u, acc);
        if (job->partial) {
            for (int k = 0; k < 3; k++) job->partial[u][k] = acc[0][k];
        } else {
            for (idx_t j = 0; j < nf; j++) job->r->finish(job->r->ctx, f0 + j, acc[j]);
        }
    }
}

void dnbn_reduce_channels(const dnbn_part *pt, const dnbn_reduce *r)
{
    idx_t units = dnbn_units(pt);
    if (units <= 0) return;
    if (pt->parts == 1) {
        reduce_job job = {pt, r, NULL};
        dnbn_parallel_for(units, pt->threads, reduce_range, &job);
        return;
    }
    /* parts > 1 only when filters < threads <= DNBN_MAX_THREADS and group == 1,
     * so units < 2 * DNBN_MAX_THREADS. */
    double partial[2 * DNBN_MAX_THREADS][3];
    reduce_job job = {pt, r, partial};
    dnbn_parallel_for(units, pt->threads, reduce_range, &job);
    for (idx_t f = 0; f < pt->filters; f++) {
        double *acc = partial[f * pt->parts];
        for (idx_t p = 1; p < pt->parts; p++) {
            const double *b = partial[f * pt->parts + p];
            if (r->merge) {
                r->merge(acc, b);
            } else {
                for (int k = 0; k < 3; k++) acc[k] += b[k];
            }
        }
        r->finish(r->ctx, f, acc);
    }
}

typedef struct map_job {
    void (*unit)(void *ctx, idx_t unit);
    void *ctx;
} map_job;

static void map_range(void *arg, idx_t lo, idx_t hi)
{
    map_job *job = arg;
    for (idx_t u = lo; u < hi; u++) job->unit(job->ctx, u);
}

void dnbn_map_units(const dnbn_part *pt, void (*unit)(void *ctx, idx_t unit), void *ctx)
{
    map_job job = {unit, ctx};
    dnbn_parallel_for(dnbn_units(pt), pt->threads, map_range, &job);
}

typedef struct rows_job {
    const dnbn_part *pt;
    dnbn_run_fn fn;
    void *ctx;
} rows_job;

static void rows_range(void *arg, idx_t lo, idx_t hi)
{
    rows_job *job = arg;
    idx_t filters = job->pt->filters, spatial = job->pt->spatial;
    for (idx_t r = lo; r < hi; r++) job->fn(job->ctx, r % filters, r * spatial, spatial);
}

void dnbn_map_rows(const dnbn_part *pt, dnbn_run_fn fn, void *ctx)
{
    rows_job job = {pt, fn, ctx};
    dnbn_parallel_for(pt->batch * pt->filters, pt->threads, rows_range, &job);
}

/* ---- channel tiles ---- */

dnbn_tiles dnbn_tile_partition(int batch, int filters)
{
    dnbn_tiles t = {0};
    if (batch <= 0 || filters <= 0) return t;
    t.batch = batch;
    t.filters = filters;
    t.threads = dnbn_threads_for(t.batch * t.filters);
    idx_t per_thread = (t.filters + t.threads - 1) / t.threads;
    per_thread = (per_thread + 7) / 8 * 8;
    t.tile = per_thread < DNBN_TILE ? per_thread : DNBN_TILE;
    return t;
}

typedef struct tile_job {
    const dnbn_tiles *t;
    void (*fn)(void *ctx, idx_t f0, idx_t n);
    void *ctx;
} tile_job;

static void tile_range(void *arg, idx_t lo, idx_t hi)
{
    tile_job *job = arg;
    for (idx_t u = lo; u < hi; u++) {
        idx_t f0 = u * job->t->tile, n = job->t->filters - f0;
        job->fn(job->ctx, f0, n < job->t->tile ? n : job->t->tile);
    }
}

void dnbn_map_tiles(const dnbn_tiles *t, void (*fn)(void *ctx, idx_t f0, idx_t n), void *ctx)
{
    if (t->tile <= 0) return;
    tile_job job = {t, fn, ctx};
    dnbn_parallel_for((t->filters + t->tile - 1) / t->tile, t->threads, tile_range, &job);
}

/* ---- public statistics phase ---- */

typedef struct public_moments {
    const dnbn_rows *r;
    const dnbn_part *pt;
    const float *x;
    double *mean, *m2;
    double (*partial)[3]; /* per unit when channels are split in parts */
} public_moments;

static void public_moments_units(void *arg, idx_t lo, idx_t hi)
{
    public_moments *c = arg;
    for (idx_t u = lo; u < hi; u++) {
        dnbn_unit w = dnbn_unit_at(c->pt, u);
        double acc[DNBN_MAX_GROUP][3];
        c->r->unit_moments(c->x, c->pt, w, c->partial ? &c->partial[u] : acc);
        for (idx_t j = 0; !c->partial && j < w.nf; j++) c->mean[w.f0 + j] = acc[j][1], c->m2[w.f0 + j] = acc[j][2];
    }
}

void dnbn_batchnorm_moments(const float *x, int batch, int filters, int spatial, double *mean, double *m2)
{
    if (filters <= 0 || !mean || !m2) return;
    if (batch <= 0 || spatial <= 0) { /* a shard without values: count 0, mean 0, m2 0 */
        for (idx_t f = 0; f < filters; f++) mean[f] = m2[f] = 0;
        return;
    }
    if (!x) return;
    dnbn_part pt = dnbn_partition(batch, filters, spatial);
    double partial[2 * DNBN_MAX_THREADS][3]; /* parts > 1 only when filters < threads: fewer units than this */
    public_moments c = {dnbn_rows_active(), &pt, x, mean, m2, pt.parts > 1 ? partial : NULL};
    dnbn_parallel_for(dnbn_units(&pt), pt.threads, public_moments_units, &c);
    for (idx_t f = 0; c.partial && f < filters; f++) {
        for (idx_t p = 1; p < pt.parts; p++) dnbn_moments_merge(partial[f * pt.parts], partial[f * pt.parts + p]);
        mean[f] = partial[f * pt.parts][1];
        m2[f] = partial[f * pt.parts][2];
    }
}

void dnbn_batchnorm_moments_combine(int filters, double n_a, double *mean_a, double *m2_a, double n_b,
                               const double *mean_b, const double *m2_b)
{
    if (!mean_a || !m2_a || !mean_b || !m2_b) return;
    for (idx_t f = 0; f < filters; f++) {
        double a[3] = {n_a, mean_a[f], m2_a[f]}, b[3] = {n_b, mean_b[f], m2_b[f]};
        dnbn_moments_merge(a, b);
        mean_a[f] = a[1];
        m2_a[f] = a[2];
    }
}
