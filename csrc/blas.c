/*
 * blas.c - Darknet's ten batch-norm kernels under Darknet's names.
 *
 * Six are per-channel reductions and four per-channel elementwise passes.
 * Each kernel fills a description (what to sum or apply, over which
 * tensors, on which partition), then runs dnbn_parallel_for over the
 * partition's units with reduce_units or map_units, whose loops over a unit's
 * runs call the row primitives, where the loops over values are:
 *   kernel -> dnbn_parallel_for -> reduce_units / map_units -> row primitive.
 * The formulas are Darknet's (src/blas.c), sums are in double.
 * normalize_cpu and normalize_delta_cpu follow the build's flavor
 * (internal.h).
 */
#include <math.h>

#include "internal.h"

static const float zeros[DNBN_TILE], ones[DNBN_TILE] = {
#define ONE8 1, 1, 1, 1, 1, 1, 1, 1
#define ONE64 ONE8, ONE8, ONE8, ONE8, ONE8, ONE8, ONE8, ONE8
    ONE64, ONE64, ONE64, ONE64
#undef ONE64
#undef ONE8
};

static int sizes_ok(int batch, int filters, int spatial) { return batch > 0 && filters > 0 && spatial > 0; }

/* ---- reductions ---- */

/* What a reduction sums per channel: x, delta, (x - k)^2, delta * x, delta * (x - k). */
enum sum_kind { SUM_X, SUM_DELTA, SUM_SQ_DEV, SUM_DOT, SUM_DOT_DEV };

/* What becomes of a channel's sum s (old: the output's previous value). */
enum result_kind { MEAN, VARIANCE, ACCUMULATE, MEAN_DELTA, VARIANCE_DELTA };

typedef struct reduction {
    enum sum_kind sum;
    enum result_kind result;
    const float *x, *delta, *k, *variance; /* k: the per-channel shift (a mean) */
    float *out;                            /* per channel */
    const dnbn_rows *r;
    dnbn_part pt;
    double *partial; /* [f * parts + part]: the caller's DNBN_MAX_PARTIALS doubles, NULL when channels are whole */
} reduction;

static float result(const reduction *rd, idx_t f, double s)
{
    double m = (double)rd->pt.m;
    switch (rd->result) {
    case MEAN: return (float)(s / m);
    case VARIANCE: return rd->pt.m < 2 ? 0.0f : (float)(s / (m - 1));
    case ACCUMULATE: return (float)((double)rd->out[f] + s);
    case MEAN_DELTA: return (float)(s * (-1.0 / sqrt((double)rd->variance[f] + DARKNET_EPS_BACKWARD)));
    case VARIANCE_DELTA: return (float)(s * -0.5 * pow((double)rd->variance[f] + DARKNET_EPS_BACKWARD, -1.5));
    }
    return 0.0f;
}

/* The phase of every reduction: each unit's per-channel sums, then (whole
 * channels) their results, or (split channels) the unit's partial sum. */
static void reduce_units(void *arg, idx_t lo, idx_t hi)
{
    reduction *rd = arg;
    const dnbn_rows *r = rd->r;
    const idx_t F = rd->pt.filters, S = rd->pt.spatial;
    for (idx_t u = lo; u < hi; u++) {
        dnbn_unit w = dnbn_unit_at(&rd->pt, u);
        double s[DNBN_MAX_GROUP], s2[DNBN_MAX_GROUP];
        for (idx_t j = 0; j < w.nf; j++) s[j] = s2[j] = 0;
        if (S == 1) { /* a tile: image by image, vectorized across channels */
            const float *k = rd->k ? rd->k + w.f0 : zeros;
            for (idx_t b = w.j0; b < w.j1; b++) {
                idx_t off = b * F + w.f0;
                if (rd->sum == SUM_DOT || rd->sum == SUM_DOT_DEV) /* s2 = sum d * (x - k), k = 0 for SUM_DOT */
                    r->v_sum_dot_dev(rd->delta + off, rd->x + off, k, w.nf, s2, s);
                else /* s = sum (src - k), s2 = sum (src - k)^2 */
                    r->v_shifted_acc((rd->sum == SUM_DELTA ? rd->delta : rd->x) + off, k, w.nf, s, s2);
            }
            if (rd->sum == SUM_SQ_DEV)
                for (idx_t j = 0; j < w.nf; j++) s[j] = s2[j];
        } else { /* runs: image by image, channel by channel */
            for (dnbn_unit_row q = dnbn_rows_before(&rd->pt, w); dnbn_next_row(&rd->pt, w, &q);) {
                idx_t j = q.j, f = w.f0 + j, off = q.off, len = q.n;
                switch (rd->sum) {
                case SUM_X: s[j] += r->sum(rd->x + off, len); break;
                case SUM_DELTA: s[j] += r->sum(rd->delta + off, len); break;
                case SUM_SQ_DEV: s[j] += r->sum_sq_dev(rd->x + off, len, rd->k[f]); break;
                case SUM_DOT: s[j] += r->dot(rd->delta + off, rd->x + off, len); break;
                case SUM_DOT_DEV: s[j] += r->dot_dev(rd->delta + off, rd->x + off, len, rd->k[f]); break;
                }
            }
        }
        for (idx_t j = 0; j < w.nf; j++) {
            if (rd->partial)
                rd->partial[(w.f0 + j) * rd->pt.parts + u % rd->pt.parts] = s[j];
            else
                rd->out[w.f0 + j] = result(rd, w.f0 + j, s[j]);
        }
    }
}

/* A reduction's partition, or 0 when a size is <= 0 (nothing to do). */
static int reduction_start(reduction *rd, int batch, int filters, int spatial)
{
    if (!sizes_ok(batch, filters, spatial)) return 0;
    rd->r = dnbn_rows_active();
    rd->pt = dnbn_partition(batch, filters, spatial, 1); /* one pass */
    if (rd->pt.parts == 1) rd->partial = NULL;
    return 1;
}

/* Split channels: the parts of each channel summed in order, then its result. */
static void reduction_finish(reduction *rd)
{
    for (idx_t f = 0; rd->partial && f < rd->pt.filters; f++) {
        double s = rd->partial[f * rd->pt.parts];
        for (idx_t p = 1; p < rd->pt.parts; p++) s += rd->partial[f * rd->pt.parts + p];
        rd->out[f] = result(rd, f, s);
    }
}

/* Each reduction: describe it, then dnbn_parallel_for over the units with
 * reduce_units, then (split channels) the parts' sums. */
void mean_cpu(float *x, int batch, int filters, int spatial, float *mean)
{
    double partial[DNBN_MAX_PARTIALS];
    reduction rd = {.sum = SUM_X, .result = MEAN, .x = x, .out = mean, .partial = partial};
    if (!reduction_start(&rd, batch, filters, spatial)) return;
    dnbn_parallel_for(dnbn_units(&rd.pt), rd.pt.threads, reduce_units, &rd);
    reduction_finish(&rd);
}

void variance_cpu(float *x, float *mean, int batch, int filters, int spatial, float *variance)
{
    double partial[DNBN_MAX_PARTIALS];
    reduction rd = {.sum = SUM_SQ_DEV, .result = VARIANCE, .x = x, .k = mean, .out = variance, .partial = partial};
    if (!reduction_start(&rd, batch, filters, spatial)) return;
    dnbn_parallel_for(dnbn_units(&rd.pt), rd.pt.threads, reduce_units, &rd);
    reduction_finish(&rd);
}

void backward_bias(float *bias_updates, float *delta, int batch, int n, int size)
{
    double partial[DNBN_MAX_PARTIALS];
    reduction rd = {.sum = SUM_DELTA, .result = ACCUMULATE, .delta = delta, .out = bias_updates, .partial = partial};
    if (!reduction_start(&rd, batch, n, size)) return;
    dnbn_parallel_for(dnbn_units(&rd.pt), rd.pt.threads, reduce_units, &rd);
    reduction_finish(&rd);
}

void backward_scale_cpu(float *x_norm, float *delta, int batch, int n, int size, float *scale_updates)
{
    double partial[DNBN_MAX_PARTIALS];
    reduction rd = {.sum = SUM_DOT, .result = ACCUMULATE, .x = x_norm, .delta = delta, .out = scale_updates,
                    .partial = partial};
    if (!reduction_start(&rd, batch, n, size)) return;
    dnbn_parallel_for(dnbn_units(&rd.pt), rd.pt.threads, reduce_units, &rd);
    reduction_finish(&rd);
}

void mean_delta_cpu(float *delta, float *variance, int batch, int filters, int spatial, float *mean_delta)
{
    double partial[DNBN_MAX_PARTIALS];
    reduction rd = {.sum = SUM_DELTA, .result = MEAN_DELTA, .delta = delta, .variance = variance, .out = mean_delta,
                    .partial = partial};
    if (!reduction_start(&rd, batch, filters, spatial)) return;
    dnbn_parallel_for(dnbn_units(&rd.pt), rd.pt.threads, reduce_units, &rd);
    reduction_finish(&rd);
}

void variance_delta_cpu(float *x, float *delta, float *mean, float *variance, int batch, int filters, int spatial,
                        float *variance_delta)
{
    double partial[DNBN_MAX_PARTIALS];
    reduction rd = {.sum = SUM_DOT_DEV, .result = VARIANCE_DELTA, .x = x, .delta = delta, .k = mean,
                    .variance = variance, .out = variance_delta, .partial = partial};
    if (!reduction_start(&rd, batch, filters, spatial)) return;
    dnbn_parallel_for(dnbn_units(&rd.pt), rd.pt.threads, reduce_units, &rd);
    reduction_finish(&rd);
}

/* ---- elementwise passes ---- */

/* normalize: x = (x - mean) * inv; scale: x *= scales; shift: x += biases;
 * normalize_delta: delta = delta * a + (x - mean) * b + c in double. */
enum map_kind { NORMALIZE, SCALE, SHIFT, NORMALIZE_DELTA };

typedef struct elementwise {
    enum map_kind kind;
    float *x, *delta;
    const float *mean, *variance, *params, *mean_delta, *variance_delta; /* params: scales or biases */
    const dnbn_rows *r;
    dnbn_part pt;
} elementwise;

/* The phase of every elementwise pass: each unit's per-channel parameters,
 * then the pass over its runs (spatial == 1: image by image across channels,
 * each pass as ((x - k) - 0) * a * 1 + 0 and its special cases, the same
 * values as the row primitives, since x - 0, x * 1 and x + 0 are exact). */
static void map_units(void *arg, idx_t lo, idx_t hi)
{
    elementwise *ew = arg;
    const dnbn_rows *r = ew->r;
    const idx_t F = ew->pt.filters, S = ew->pt.spatial;
    double m = (double)ew->pt.m;
    for (idx_t u = lo; u < hi; u++) {
        dnbn_unit w = dnbn_unit_at(&ew->pt, u);
        float a[DNBN_MAX_GROUP], k[DNBN_MAX_GROUP];
        double da[DNBN_MAX_GROUP], db[DNBN_MAX_GROUP], dc[DNBN_MAX_GROUP], dk[DNBN_MAX_GROUP];
        for (idx_t j = 0; j < w.nf; j++) {
            idx_t f = w.f0 + j;
            if (ew->kind == NORMALIZE) {
                k[j] = ew->mean[f];
                a[j] = (float)dnbn_kernel_forward_inv((double)ew->variance[f]);
            } else if (ew->kind == NORMALIZE_DELTA) {
                dk[j] = ew->mean[f];
                da[j] = dnbn_kernel_delta_inv((double)ew->variance[f]);
                db[j] = (double)ew->variance_delta[f] * 2.0 / m;
                dc[j] = (double)ew->mean_delta[f] / m;
            } else {
                a[j] = ew->params[f];
            }
        }
        if (S == 1) {
            for (idx_t b = w.j0; b < w.j1; b++) {
                float *x = ew->x + b * F + w.f0;
                switch (ew->kind) {
                case NORMALIZE: r->v_forward_infer(x, x, w.nf, k, zeros, a, ones, zeros); break;
                case SCALE: r->v_forward_infer(x, x, w.nf, zeros, zeros, a, ones, zeros); break;
                case SHIFT: r->v_forward_infer(x, x, w.nf, zeros, zeros, ones, ones, a); break;
                case NORMALIZE_DELTA: {
                    float *d = ew->delta + b * F + w.f0;
                    r->v_backward_apply(d, d, x, w.nf, da, dk, db, dc);
                    break;
                }
                }
            }
            continue;
        }
        for (dnbn_unit_row q = dnbn_rows_before(&ew->pt, w); dnbn_next_row(&ew->pt, w, &q);) {
            idx_t j = q.j, off = q.off, len = q.n;
            switch (ew->kind) {
            case NORMALIZE: r->normalize(ew->x + off, len, k[j], a[j]); break;
            case SCALE: r->scale(ew->x + off, len, a[j]); break;
            case SHIFT: r->shift(ew->x + off, len, a[j]); break;
            case NORMALIZE_DELTA: /* in double, like the layer's backward: its three terms may nearly cancel */
                r->backward_apply(ew->delta + off, ew->delta + off, ew->x + off, len, da[j], dk[j], db[j], dc[j], 0);
                break;
            }
        }
    }
}

/* An elementwise pass's partition, or 0 when a size is <= 0 (nothing to do). */
static int map_start(elementwise *ew, int batch, int filters, int spatial)
{
    if (!sizes_ok(batch, filters, spatial)) return 0;
    ew->r = dnbn_rows_active();
    ew->pt = dnbn_partition(batch, filters, spatial, 1);
    return 1;
}

/* Each elementwise pass: describe it, then dnbn_parallel_for over the units with map_units. */
void normalize_cpu(float *x, float *mean, float *variance, int batch, int filters, int spatial)
{
    elementwise ew = {.kind = NORMALIZE, .x = x, .mean = mean, .variance = variance};
    if (map_start(&ew, batch, filters, spatial)) dnbn_parallel_for(dnbn_units(&ew.pt), ew.pt.threads, map_units, &ew);
}

void scale_bias(float *output, float *scales, int batch, int n, int size)
{
    elementwise ew = {.kind = SCALE, .x = output, .params = scales};
    if (map_start(&ew, batch, n, size)) dnbn_parallel_for(dnbn_units(&ew.pt), ew.pt.threads, map_units, &ew);
}

void add_bias(float *output, float *biases, int batch, int n, int size)
{
    elementwise ew = {.kind = SHIFT, .x = output, .params = biases};
    if (map_start(&ew, batch, n, size)) dnbn_parallel_for(dnbn_units(&ew.pt), ew.pt.threads, map_units, &ew);
}

void normalize_delta_cpu(float *x, float *mean, float *variance, float *mean_delta, float *variance_delta, int batch,
                         int filters, int spatial, float *delta)
{
    elementwise ew = {.kind = NORMALIZE_DELTA, .x = x, .delta = delta, .mean = mean, .variance = variance,
                      .mean_delta = mean_delta, .variance_delta = variance_delta};
    if (map_start(&ew, batch, filters, spatial)) dnbn_parallel_for(dnbn_units(&ew.pt), ew.pt.threads, map_units, &ew);
}
