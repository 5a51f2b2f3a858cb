/*
 * blas.c - Darknet's ten batch-norm kernels under Darknet's names.
 *
 * Each kernel is a per-channel reduction (dnbn_reduce_channels) or a
 * per-channel elementwise pass (dnbn_map_units) over the row primitives; the
 * formulas are Darknet's (src/blas.c), sums are in double.
 */
#include <math.h>

#include "internal.h"

/* Everything a kernel's unit function may need; unused fields stay NULL. */
typedef struct kernel_ctx {
    const dnbn_rows *r;
    const dnbn_part *pt;
    float *x, *delta, *mean, *variance, *scales, *mean_delta, *variance_delta;
    float *out; /* the per-channel output of a reduction */
    /* per-unit parameters of an elementwise pass, set by its unit function */
    float pa, pb, pc, pk;
} kernel_ctx;

static int sizes_ok(int batch, int filters, int spatial) { return batch > 0 && filters > 0 && spatial > 0; }

/* ---- reductions ---- */

#define RUN_FN(name, body)                                                                                  \
    static void name(void *arg, idx_t offset, idx_t len)                                                    \
    {                                                                                                       \
        struct run_acc *ra = arg;                                                                           \
        const kernel_ctx *c = ra->c;                                                                        \
        (void)c;                                                                                            \
        body;                                                                                               \
    }

struct run_acc {
    const kernel_ctx *c;
    float k;
    double acc[3];
};

RUN_FN(run_sum_x, ra->acc[0] += c->r->sum(c->x + offset, len))
RUN_FN(run_sum_delta, ra->acc[0] += c->r->sum(c->delta + offset, len))
RUN_FN(run_sq_dev, ra->acc[0] += c->r->sum_sq_dev(c->x + offset, len, ra->k))
RUN_FN(run_dot, ra->acc[0] += c->r->dot(c->delta + offset, c->x + offset, len))
RUN_FN(run_dot_dev, ra->acc[0] += c->r->dot_dev(c->delta + offset, c->x + offset, len, ra->k))

/* A reduction kernel: the run function, the per-channel constant it needs (k),
 * and what becomes of the channel's sum. */
typedef struct reduce_kernel {
    kernel_ctx c;
    dnbn_run_fn run;
    const float *k;                   /* per-channel shift (mean) or NULL */
    float (*result)(const kernel_ctx *c, idx_t f, double sum, float old);
} reduce_kernel;

static void reduce_unit(void *arg, idx_t unit, double acc[3])
{
    reduce_kernel *rk = arg;
    struct run_acc ra = {&rk->c, rk->k ? rk->k[unit / rk->c.pt->parts] : 0.0f, {0, 0, 0}};
    dnbn_for_runs(rk->c.pt, unit, rk->run, &ra);
    acc[0] = ra.acc[0];
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
    reduce_kernel rk = {.c = {.x = x, .out = mean}, .run = run_sum_x, .result = res_mean};
    run_reduction(&rk, batch, filters, spatial);
}

void variance_cpu(float *x, float *mean, int batch, int filters, int spatial, float *variance)
{
    reduce_kernel rk = {.c = {.x = x, .out = variance}, .run = run_sq_dev, .k = mean, .result = res_variance};
    run_reduction(&rk, batch, filters, spatial);
}

void backward_bias(float *bias_updates, float *delta, int batch, int n, int size)
{
    reduce_kernel rk = {.c = {.delta = delta, .out = bias_updates}, .run = run_sum_delta, .result = res_accumulate};
    run_reduction(&rk, batch, n, size);
}

void backward_scale_cpu(float *x_norm, float *delta, int batch, int n, int size, float *scale_updates)
{
    reduce_kernel rk = {.c = {.x = x_norm, .delta = delta, .out = scale_updates},
                        .run = run_dot,
                        .result = res_accumulate};
    run_reduction(&rk, batch, n, size);
}

void mean_delta_cpu(float *delta, float *variance, int batch, int filters, int spatial, float *mean_delta)
{
    reduce_kernel rk = {.c = {.delta = delta, .variance = variance, .out = mean_delta},
                        .run = run_sum_delta,
                        .result = res_mean_delta};
    run_reduction(&rk, batch, filters, spatial);
}

void variance_delta_cpu(float *x, float *delta, float *mean, float *variance, int batch, int filters, int spatial,
                        float *variance_delta)
{
    reduce_kernel rk = {.c = {.x = x, .delta = delta, .variance = variance, .out = variance_delta},
                        .run = run_dot_dev,
                        .k = mean,
                        .result = res_variance_delta};
    run_reduction(&rk, batch, filters, spatial);
}

/* ---- elementwise passes ---- */

typedef struct map_kernel {
    kernel_ctx c;
    /* sets the per-channel parameters of unit's channel into *p */
    void (*params)(const kernel_ctx *c, idx_t f, kernel_ctx *p);
    dnbn_run_fn run;
} map_kernel;

static void map_unit(void *arg, idx_t unit)
{
    map_kernel *mk = arg;
    kernel_ctx p = mk->c;
    mk->params(&mk->c, unit / mk->c.pt->parts, &p);
    dnbn_for_runs(mk->c.pt, unit, mk->run, &p);
}

static void run_map(map_kernel *mk, int batch, int filters, int spatial)
{
    if (!sizes_ok(batch, filters, spatial)) return;
    dnbn_part pt = dnbn_partition(batch, filters, spatial);
    mk->c.r = dnbn_rows_active();
    mk->c.pt = &pt;
    dnbn_map_units(&pt, map_unit, mk);
}

static void run_normalize(void *arg, idx_t offset, idx_t len)
{
    const kernel_ctx *p = arg;
    p->r->normalize(p->x + offset, len, p->pk, p->pa);
}

static void run_scale(void *arg, idx_t offset, idx_t len)
{
    const kernel_ctx *p = arg;
    p->r->scale(p->x + offset, len, p->pa);
}

static void run_shift(void *arg, idx_t offset, idx_t len)
{
    const kernel_ctx *p = arg;
    p->r->shift(p->x + offset, len, p->pa);
}

static void run_normalize_delta(void *arg, idx_t offset, idx_t len)
{
    const kernel_ctx *p = arg;
    p->r->normalize_delta(p->delta + offset, p->x + offset, len, p->pa, p->pk, p->pb, p->pc);
}

static void par_normalize(const kernel_ctx *c, idx_t f, kernel_ctx *p)
{
    p->pk = c->mean[f];
    p->pa = (float)(1.0 / (sqrt((double)c->variance[f]) + DARKNET_EPS_FORWARD));
}

static void par_scale(const kernel_ctx *c, idx_t f, kernel_ctx *p) { p->pa = c->scales[f]; }

static void par_normalize_delta(const kernel_ctx *c, idx_t f, kernel_ctx *p)
{
    double m = (double)c->pt->m;
    p->pk = c->mean[f];
    p->pa = (float)(1.0 / sqrt((double)c->variance[f] + DARKNET_EPS_BACKWARD));
    p->pb = (float)((double)c->variance_delta[f] * 2.0 / m);
    p->pc = (float)((double)c->mean_delta[f] / m);
}

void normalize_cpu(float *x, float *mean, float *variance, int batch, int filters, int spatial)
{
    map_kernel mk = {.c = {.x = x, .mean = mean, .variance = variance}, .params = par_normalize, .run = run_normalize};
    run_map(&mk, batch, filters, spatial);
}

void scale_bias(float *output, float *scales, int batch, int n, int size)
{
    map_kernel mk = {.c = {.x = output, .scales = scales}, .params = par_scale, .run = run_scale};
    run_map(&mk, batch, n, size);
}

void add_bias(float *output, float *biases, int batch, int n, int size)
{
    map_kernel mk = {.c = {.x = output, .scales = biases}, .params = par_scale, .run = run_shift};
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
                     .run = run_normalize_delta};
    run_map(&mk, batch, filters, spatial);
}
