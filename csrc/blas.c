/*
 * blas.c - Darknet's ten batch-norm kernels under Darknet's names.
 *
 * Each kernel is a per-channel reduction (dnbn_reduce_channels) or a
 * per-channel elementwise pass (dnbn_map_units) over the row primitives; the
 * formulas are Darknet's (src/blas.c), sums are in double. normalize_cpu and
 * normalize_delta_cpu follow the build's flavor (internal.h).
 */
#include <math.h>

#include "internal.h"

/* Everything a kernel's unit function may need; unused fields stay NULL. */
typedef struct kernel_ctx {
    const dnbn_rows *r;
    const dnbn_part *pt;
    float *x, *delta, *mean, *variance, *scales, *mean_delta, *variance_delta;
    float *out; /* the per-channel output of a reduction */
} kernel_ctx;

static int sizes_ok(int batch, int filters, int spatial) { return batch > 0 && filters > 0 && spatial > 0; }

/* ---- reductions ---- */

/* A run function adds one run's sum into its channel's accumulator; k is the
 * channel's shift (the given mean) where the kernel has one. */
#define RUN_FN(name, body)                                                                                  \
    static void name(void *arg, idx_t f, idx_t offset, idx_t len)                                           \
    {                                                                                                       \
        struct run_acc *ra = arg;                                                                           \
        const kernel_ctx *c = ra->c;                                                                        \
        double *acc = ra->acc[f - ra->f0];                                                                  \
        float k = ra->k ? ra->k[f] : 0.0f;                                                                  \
        (void)k;                                                                                            \
        body;                                                                                               \
    }

struct run_acc {
    const kernel_ctx *c;
    const float *k;
    idx_t f0;
    double (*acc)[3];
};

RUN_FN(run_sum_x, acc[0] += c->r->sum(c->x + offset, len))
RUN_FN(run_sum_delta, acc[0] += c->r->sum(c->delta + offset, len))
RUN_FN(run_sq_dev, acc[0] += c->r->sum_sq_dev(c->x + offset, len, k))
RUN_FN(run_dot, acc[0] += c->r->dot(c->delta + offset, c->x + offset, len))
RUN_FN(run_dot_dev, acc[0] += c->r->dot_dev(c->delta + offset, c->x + offset, len, k))

/* What a reduction sums when spatial == 1 (vectorized across channels):
 * sum of src, sum of (src - k)^2, or sum of delta * (x - k). */
enum fc_sum { FC_SUM, FC_SQ_DEV, FC_DOT_DEV };

/* A reduction kernel: the run function, the per-channel constant it needs (k),
 * and what becomes of the channel's sum. */
typedef struct reduce_kernel {
    kernel_ctx c;
    dnbn_run_fn run;
    const float *k;                   /* per-channel shift (mean) or NULL */
    float (*result)(const kernel_ctx *c, idx_t f, double sum, float old);
    enum fc_sum fc;                   /* the same sum for spatial == 1 ... */
    const float *fc_src;              /* ... over this tensor (FC_SUM, FC_SQ_DEV) */
} reduce_kernel;

static const float zeros[DNBN_TILE], ones[DNBN_TILE] = {
#define ONE8 1, 1, 1, 1, 1, 1, 1, 1
#define ONE64 ONE8, ONE8, ONE8, ONE8, ONE8, ONE8, ONE8, ONE8
    ONE64, ONE64, ONE64, ONE64
#undef ONE64
#undef ONE8
};

static void reduce_tile(void *arg, idx_t f0, idx_t n)
{
    reduce_kernel *rk = arg;
    const kernel_ctx *c = &rk->c;
    idx_t filters = c->pt->filters;
    const float *k = rk->k ? rk->k + f0 : zeros;
    double s1[DNBN_TILE] = {0}, s2[DNBN_TILE] = {0};
    for (idx_t b = 0; b < c->pt->batch; b++) {
        idx_t off = b * filters + f0;
        if (rk->fc == FC_DOT_DEV)
            c->r->v_sum_dot_dev(c->delta + off, c->x + off, k, n, s1, s2);
        else
            c->r->v_shifted_acc(rk->fc_src + off, k, n, s1, s2);
    }
    for (idx_t j = 0; j < n; j++) {
        double sum = rk->fc == FC_SUM ? s1[j] : s2[j];
        c->out[f0 + j] = rk->result(c, f0 + j, sum, c->out[f0 + j]);
    }
}

static void reduce_unit(void *arg, idx_t unit, double (*acc)[3])
{
    reduce_kernel *rk = arg;
    struct run_acc ra = {&rk->c, rk->k, dnbn_unit_first(rk->c.pt, unit), acc};
    dnbn_for_runs(rk->c.pt, unit, rk->run, &ra);
}

static void reduce_finish(void *arg, idx_t f, const double acc[3])
{
    reduce_kernel *rk = arg;
    rk->c.out[f] = rk->result(&rk->c, f, acc[0], rk->c.out[f]);
}

static void run_reduction(reduce_kernel *rk, int batch, int filters, int spatial)
{
    if (!sizes_ok(batch, filters, spatial)) return;
    dnbn_part pt = dnbn_partition(batch, filters, spatial);
    rk->c.r = dnbn_rows_active();
    rk->c.pt = &pt;
    if (spatial == 1) {
        dnbn_tiles t = dnbn_tile_partition(batch, filters);
        dnbn_map_tiles(&t, reduce_tile, rk);
        return;
    }
    dnbn_reduce r = {reduce_unit, NULL, reduce_finish, rk};
    dnbn_reduce_channels(&pt, &r);
}

static float res_mean(const kernel_ctx *c, idx_t f, double s, float old)
{
    (void)f, (void)old;
    return (float)(s / (double)c->pt->m);
}

static float res_variance(const kernel_ctx *c, idx_t f, double s, float old)
{
    (void)f, (void)old;
    return c->pt->m < 2 ? 0.0f : (float)(s / (double)(c->pt->m - 1));
}

static float res_accumulate(const kernel_ctx *c, idx_t f, double s, float old)
{
    (void)c, (void)f;
    return (float)((double)old + s);
}

static float res_mean_delta(const kernel_ctx *c, idx_t f, double s, float old)
{
    (void)old;
    return (float)(s * (-1.0 / sqrt((double)c->variance[f] + DARKNET_EPS_BACKWARD)));
}

static float res_variance_delta(const kernel_ctx *c, idx_t f, double s, float old)
{
    (void)old;
    return (float)(s * -0.5 * pow((double)c->variance[f] + DARKNET_EPS_BACKWARD, -1.5));
}

void mean_cpu(float *x, int batch, int filters, int spatial, float *mean)
{
    reduce_kernel rk = {.c = {.x = x, .out = mean}, .run = run_sum_x, .result = res_mean, .fc = FC_SUM, .fc_src = x};
    run_reduction(&rk, batch, filters, spatial);
}

void variance_cpu(float *x, float *mean, int batch, int filters, int spatial, float *variance)
{
    reduce_kernel rk = {.c = {.x = x, .out = variance},
                        .run = run_sq_dev,
                        .k = mean,
                        .result = res_variance,
                        .fc = FC_SQ_DEV,
                        .fc_src = x};
    run_reduction(&rk, batch, filters, spatial);
}

void backward_bias(float *bias_updates, float *delta, int batch, int n, int size)
{
    reduce_kernel rk = {.c = {.delta = delta, .out = bias_updates},
                        .run = run_sum_delta,
                        .result = res_accumulate,
                        .fc = FC_SUM,
                        .fc_src = delta};
    run_reduction(&rk, batch, n, size);
}

void backward_scale_cpu(float *x_norm, float *delta, int batch, int n, int size, float *scale_updates)
{
    reduce_kernel rk = {.c = {.x = x_norm, .delta = delta, .out = scale_updates},
                        .run = run_dot,
                        .result = res_accumulate,
                        .fc = FC_DOT_DEV};
    run_reduction(&rk, batch, n, size);
}

void mean_delta_cpu(float *delta, float *variance, int batch, int filters, int spatial, float *mean_delta)
{
    reduce_kernel rk = {.c = {.delta = delta, .variance = variance, .out = mean_delta},
                        .run = run_sum_delta,
                        .result = res_mean_delta,
                        .fc = FC_SUM,
                        .fc_src = delta};
    run_reduction(&rk, batch, filters, spatial);
}

void variance_delta_cpu(float *x, float *delta, float *mean, float *variance, int batch, int filters, int spatial,
                        float *variance_delta)
{
    reduce_kernel rk = {.c = {.x = x, .delta = delta, .variance = variance, .out = variance_delta},
                        .run = run_dot_dev,
                        .k = mean,
                        .result = res_variance_delta,
                        .fc = FC_DOT_DEV};
    run_reduction(&rk, batch, filters, spatial);
}

/* ---- elementwise passes ---- */

/* The four per-channel parameters of a pass, as arrays over a tile. */
typedef struct tile_params {
    float a[DNBN_TILE], k[DNBN_TILE];                        /* normalize, scale, shift */
    double da[DNBN_TILE], db[DNBN_TILE], dc[DNBN_TILE], dk[DNBN_TILE]; /* normalize_delta */
} tile_params;

typedef struct map_kernel {
    kernel_ctx c;
    /* sets channel f's parameters into entry j of *p */
    void (*params)(const kernel_ctx *c, idx_t f, tile_params *p, idx_t j);
    dnbn_run_fn run;
    /* the pass over n channels of one image at offset off, when spatial == 1 */
    void (*fc_run)(const kernel_ctx *c, idx_t off, idx_t n, const tile_params *p);
} map_kernel;

static void map_tile(void *arg, idx_t f0, idx_t n)
{
    map_kernel *mk = arg;
    tile_params tp;
    for (idx_t j = 0; j < n; j++) mk->params(&mk->c, f0 + j, &tp, j);
    for (idx_t b = 0; b < mk->c.pt->batch; b++) mk->fc_run(&mk->c, b * mk->c.pt->filters + f0, n, &tp);
}

/* Each as ((y - k) - 0) * a * 1 + 0 and its special cases: the same values as
 * the row primitives (x - 0, x * 1 and x + 0 are exact). */
static void fc_normalize(const kernel_ctx *c, idx_t off, idx_t n, const tile_params *p)
{
    c->r->v_forward_infer(c->x + off, c->x + off, n, p->k, zeros, p->a, ones, zeros);
}

static void fc_scale(const kernel_ctx *c, idx_t off, idx_t n, const tile_params *p)
{
    c->r->v_forward_infer(c->x + off, c->x + off, n, zeros, zeros, p->a, ones, zeros);
}

static void fc_shift(const kernel_ctx *c, idx_t off, idx_t n, const tile_params *p)
{
    c->r->v_forward_infer(c->x + off, c->x + off, n, zeros, zeros, ones, ones, p->a);
}

static void fc_normalize_delta(const kernel_ctx *c, idx_t off, idx_t n, const tile_params *p)
{
    c->r->v_backward_apply(c->delta + off, c->delta + off, c->x + off, n, p->da, p->dk, p->db, p->dc);
}

/* What a run function of an elementwise pass sees: the kernel, and the
 * parameters of the unit's channels (entry f - f0). */
struct map_run {
    const kernel_ctx *c;
    const tile_params *p;
    idx_t f0;
};

static void map_unit(void *arg, idx_t unit)
{
    map_kernel *mk = arg;
    tile_params tp;
    idx_t f0 = dnbn_unit_first(mk->c.pt, unit), n = dnbn_unit_channels(mk->c.pt, unit);
    for (idx_t j = 0; j < n; j++) mk->params(&mk->c, f0 + j, &tp, j);
    struct map_run mr = {&mk->c, &tp, f0};
    dnbn_for_runs(mk->c.pt, unit, mk->run, &mr);
}

/* One row in memory order: its channel's parameters, then the pass. */
static void map_row(void *arg, idx_t f, idx_t offset, idx_t len)
{
    map_kernel *mk = arg;
    tile_params tp;
    mk->params(&mk->c, f, &tp, 0);
    struct map_run mr = {&mk->c, &tp, f};
    mk->run(&mr, f, offset, len);
}

static void run_map(map_kernel *mk, int batch, int filters, int spatial)
{
    if (!sizes_ok(batch, filters, spatial)) return;
    dnbn_part pt = dnbn_partition(batch, filters, spatial);
    mk->c.r = dnbn_rows_active();
    mk->c.pt = &pt;
    if (spatial == 1) {
        dnbn_tiles t = dnbn_tile_partition(batch, filters);
        dnbn_map_tiles(&t, map_tile, mk);
        return;
    }
    if (spatial >= DNBN_ROW_ORDER_MIN_SPATIAL) {
        dnbn_map_rows(&pt, map_row, mk);
        return;
    }
    dnbn_map_units(&pt, map_unit, mk);
}

#define MAP_RUN_FN(name, body)                                                                              \
    static void name(void *arg, idx_t f, idx_t offset, idx_t len)                                           \
    {                                                                                                       \
        const struct map_run *mr = arg;                                                                     \
        const kernel_ctx *c = mr->c;                                                                        \
        idx_t j = f - mr->f0;                                                                               \
        const tile_params *p = mr->p;                                                                       \
        body;                                                                                               \
    }

MAP_RUN_FN(run_normalize, c->r->normalize(c->x + offset, len, p->k[j], p->a[j]))
MAP_RUN_FN(run_scale, c->r->scale(c->x + offset, len, p->a[j]))
MAP_RUN_FN(run_shift, c->r->shift(c->x + offset, len, p->a[j]))
/* in double, like the layer's backward: its three terms may nearly cancel */
MAP_RUN_FN(run_normalize_delta, c->r->backward_apply(c->delta + offset, c->delta + offset, c->x + offset, len,
                                                     p->da[j], p->dk[j], p->db[j], p->dc[j], 0))

static void par_normalize(const kernel_ctx *c, idx_t f, tile_params *p, idx_t j)
{
    p->k[j] = c->mean[f];
    p->a[j] = (float)dnbn_kernel_forward_inv((double)c->variance[f]);
}

static void par_scale(const kernel_ctx *c, idx_t f, tile_params *p, idx_t j) { p->a[j] = c->scales[f]; }

static void par_normalize_delta(const kernel_ctx *c, idx_t f, tile_params *p, idx_t j)
{
    double m = (double)c->pt->m;
    p->dk[j] = c->mean[f];
    p->da[j] = dnbn_kernel_delta_inv((double)c->variance[f]);
    p->db[j] = (double)c->variance_delta[f] * 2.0 / m;
    p->dc[j] = (double)c->mean_delta[f] / m;
}

void normalize_cpu(float *x, float *mean, float *variance, int batch, int filters, int spatial)
{
    map_kernel mk = {.c = {.x = x, .mean = mean, .variance = variance}, .params = par_normalize, .run = run_normalize,
                     .fc_run = fc_normalize};
    run_map(&mk, batch, filters, spatial);
}

void scale_bias(float *output, float *scales, int batch, int n, int size)
{
    map_kernel mk = {.c = {.x = output, .scales = scales}, .params = par_scale, .run = run_scale, .fc_run = fc_scale};
    run_map(&mk, batch, n, size);
}

void add_bias(float *output, float *biases, int batch, int n, int size)
{
    map_kernel mk = {.c = {.x = output, .scales = biases}, .params = par_scale, .run = run_shift, .fc_run = fc_shift};
    run_map(&mk, batch, n, size);
}

void normalize_delta_cpu(float *x, float *mean, float *variance, float *mean_delta, float *variance_delta, int batch,
                         int filters, int spatial, float *delta)
{
    map_kernel mk = {.c = {.x = x,
                           .delta = delta,
                           .mean = mean,
                           .variance = variance,
                           .mean_delta = mean_delta,
                           .variance_delta = variance_delta},
                     .params = par_normalize_delta,
                     .run = run_normalize_delta,
                     .fc_run = fc_normalize_delta};
    run_map(&mk, batch, filters, spatial);
}
