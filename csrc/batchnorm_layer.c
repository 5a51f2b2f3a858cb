/*
 * batchnorm_layer.c - the batch-norm layer: lifecycle, fused forward and
 * backward, Darknet's update.
 *
 * Forward (training) is two phases per channel: moments (one read of the
 * input), then one elementwise pass that writes x, x_norm and output. Backward
 * is two phases too: the sums (sum dy, sum dy*x_norm), then one pass writing
 * the input delta. When every thread owns whole channels, both phases of a
 * channel run back to back on one core, so the second pass reads the channel
 * from cache; otherwise a channel's parts are reduced first and then mapped.
 *
 * Backward reads delta and x (not x_norm): it evaluates x - mean and the input
 * delta in double, so the cancellation between its three terms costs nothing
 * even when 1/sqrt(var) is large. x_norm is therefore only for the caller:
 * forward writes it when l->keep_x_norm is set (the default, as Darknet), and
 * dnbn_batchnorm_layer_fill_x_norm computes it later, bit for bit the same.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum { STATE_NONE = 0, STATE_INFERENCE = 1, STATE_TRAINING = 2 };

/* Per-channel doubles kept from forward for backward (layer->scratch): the
 * batch mean and normalizer, then the coefficients of the input delta. */
enum { SC_MEAN, SC_INV, SC_A, SC_B, SC_C, SC_WIDTH };
_Static_assert(SC_WIDTH == DNBN_SCRATCH_DOUBLES && SC_MEAN == DNBN_SCRATCH_MEAN &&
                   SC_INV == DNBN_SCRATCH_INV,
               "the scratch layout the header documents");

static void reset_running(dnbn_layer *l)
{
    for (int f = 0; f < l->out_c; f++) {
        l->rolling_mean[f] = 0.0f;
        l->rolling_variance[f] = l->numerics == DNBN_NUMERICS_STANDARD ? 1.0f : 0.0f;
    }
}

dnbn_layer *dnbn_make_batchnorm_layer(int batch, int w, int h, int c)
{
    /* c*h*w must fit Darknet's int `outputs`; batch*outputs then fits 63 bits. */
    if (batch <= 0 || w <= 0 || h <= 0 || c <= 0 || (idx_t)c * h > INT_MAX || (idx_t)c * h * w > INT_MAX ||
        (uint64_t)batch * (uint64_t)(c * h * w) > SIZE_MAX / 4 / sizeof(float)) {
        errno = EINVAL;
        return NULL;
    }
    dnbn_layer *l = calloc(1, sizeof *l);
    if (!l) {
        errno = ENOMEM;
        return NULL;
    }
    l->batch = batch;
    l->out_c = c;
    l->out_h = h;
    l->out_w = w;
    l->outputs = c * h * w;
    l->numerics = DNBN_NUMERICS_DARKNET;
    l->eps = 0.00001f;
    l->momentum = 0.01f;
    l->keep_x_norm = 1;
    l->state = STATE_NONE;

    /* One zeroed allocation (calloc: pages are committed only when touched),
     * every buffer at a 64-byte boundary so that all activation buffers share
     * their alignment and the same offset is aligned in each. */
    size_t total = (size_t)batch * (size_t)l->outputs;
    size_t act = (total * sizeof(float) + 63) / 64 * 64, chan = ((size_t)c * sizeof(float) + 63) / 64 * 64;
    size_t scratch = (size_t)c * SC_WIDTH * sizeof(double);
    float **activations[] = {&l->output, &l->delta, &l->x, &l->x_norm};
    float **channels[] = {&l->scales,       &l->biases,           &l->scale_updates, &l->bias_updates,
                          &l->mean,         &l->variance,         &l->rolling_mean,  &l->rolling_variance,
                          &l->mean_delta,   &l->variance_delta};
    size_t n_act = sizeof activations / sizeof *activations, n_chan = sizeof channels / sizeof *channels;
    if (act > (SIZE_MAX - 64 - scratch - n_chan * chan) / n_act) {
        free(l);
        errno = EINVAL;
        return NULL;
    }
    l->memory = calloc(1, 64 + n_act * act + n_chan * chan + scratch);
    if (!l->memory) {
        free(l);
        errno = ENOMEM;
        return NULL;
    }
    char *next = (char *)(((uintptr_t)l->memory + 63) / 64 * 64);
    for (size_t i = 0; i < n_act; i++, next += act) *activations[i] = (float *)next;
    for (size_t i = 0; i < n_chan; i++, next += chan) *channels[i] = (float *)next;
    l->scratch = (double *)next;
    for (int f = 0; f < c; f++) l->scales[f] = 1.0f;
    reset_running(l);
    return l;
}

void dnbn_free_batchnorm_layer(dnbn_layer *l)
{
    if (!l) return;
    free(l->memory);
    free(l);
}

/* What every call needs of a layer, made here or filled in by the caller:
 * sizes that describe a tensor (batch may be 0, a shard without values),
 * outputs consistent with them, and the buffers every phase touches. Calls
 * given anything else return DNBN_ERR_ARG and write nothing. */
static int layer_ok(const dnbn_layer *l)
{
    if (!l || l->batch < 0 || l->out_c < 1 || l->out_h < 1 || l->out_w < 1) return 0;
    idx_t ch = (idx_t)l->out_c * l->out_h; /* <= 2^62; outputs is an int */
    if (ch > INT_MAX || ch * l->out_w != (idx_t)l->outputs) return 0;
    return l->output && l->scales && l->biases && l->mean && l->variance && l->rolling_mean &&
           l->rolling_variance && l->scratch;
}

/* A training forward also keeps x (and x_norm when asked to). */
static int train_buffers_ok(const dnbn_layer *l) { return l->x && (!l->keep_x_norm || l->x_norm); }

/* Backward reads x and delta and accumulates into the update buffers. */
static int backward_buffers_ok(const dnbn_layer *l)
{
    return l->x && l->delta && l->scale_updates && l->bias_updates;
}

int dnbn_batchnorm_layer_set_numerics(dnbn_layer *l, int numerics, float eps, float momentum)
{
    if (!layer_ok(l) || (numerics != DNBN_NUMERICS_DARKNET && numerics != DNBN_NUMERICS_STANDARD)) return DNBN_ERR_ARG;
    if (!(momentum >= 0.0f && momentum <= 1.0f)) return DNBN_ERR_ARG;
    if (numerics == DNBN_NUMERICS_STANDARD && !(eps > 0.0f && isfinite(eps))) return DNBN_ERR_ARG;
    l->numerics = numerics;
    l->eps = numerics == DNBN_NUMERICS_STANDARD ? eps : 0.00001f;
    l->momentum = momentum;
    l->state = STATE_NONE;
    l->trained = 0;
    l->x_norm_current = 0;
    reset_running(l);
    return DNBN_OK;
}

int dnbn_batchnorm_layer_state(const dnbn_layer *l) { return l ? l->state : STATE_NONE; }

/* ---- forward ---- */

/* What a training forward leaves in the layer's state fields. */
static void record_training(dnbn_layer *l)
{
    l->state = STATE_TRAINING;
    l->trained = 1;
    l->x_norm_current = l->keep_x_norm != 0;
}

typedef struct pass {
    dnbn_layer *l;
    const dnbn_rows *r;
    const dnbn_part *pt;
    const float *in; /* forward: the input; backward: dy */
    int stream;      /* write activations with non-temporal stores */
    float *x;        /* forward: where the input is kept (NULL when l->x is the input itself) */
    double count;    /* backward: values per channel in the whole (maybe sharded) batch */
    double *sums[2]; /* backward phase 1: per-channel outputs, or NULL */
    dnbn_stream_trial trial;
} pass;

/* Whether a pass over l touching `tensors` activation tensors streams its
 * output past the caches: when they are too large to stay in them anyway, and
 * rows are whole 64-byte lines (a line written partly by streaming and partly
 * by ordinary stores is slow on both). */
static int streams(const dnbn_layer *l, int tensors, int kind, int threads, dnbn_stream_trial *trial)
{
    if (kind < 0) return trial->slot = -1, trial->stream = 0;
    return dnbn_stream_begin(trial, kind, (idx_t)l->batch * l->outputs * (idx_t)sizeof(float) * tensors, threads,
                             (l->out_h * l->out_w) % 16 == 0 && l->out_h * l->out_w > 1);
}

/* Channel f's statistics from its moments: mean, variance, running stats, and
 * the normalizer kept for the elementwise pass and for backward. */
static void finish_stats(void *arg, idx_t f, const double acc[3])
{
    pass *p = arg;
    dnbn_layer *l = p->l;
    double m = acc[0], mean = acc[1], unbiased = acc[2] / (m - 1);
    double var, inv;
    if (l->numerics == DNBN_NUMERICS_DARKNET) {
        var = unbiased; /* Darknet quirk: unbiased variance, epsilon outside the root */
        inv = dnbn_pjreddie_forward_inv(var);
    } else {
        var = acc[2] / m;
        inv = 1.0 / sqrt(var + (double)l->eps);
    }
    double mom = l->momentum;
    l->mean[f] = (float)mean;
    l->variance[f] = (float)var;
    l->rolling_mean[f] = (float)((1 - mom) * l->rolling_mean[f] + mom * mean);
    l->rolling_variance[f] = (float)((1 - mom) * l->rolling_variance[f] + mom * unbiased);
    double *sc = l->scratch + f * SC_WIDTH;
    sc[SC_MEAN] = mean;
    sc[SC_INV] = inv;
}

static void train_run(void *arg, idx_t f, idx_t off, idx_t len)
{
    pass *p = arg;
    dnbn_layer *l = p->l;
    const double *sc = l->scratch + f * SC_WIDTH;
    float mh = (float)sc[SC_MEAN], ml = (float)(sc[SC_MEAN] - mh);
    p->r->forward_train(p->in + off, p->x ? p->x + off : NULL, l->keep_x_norm ? l->x_norm + off : NULL,
                        l->output + off, len, mh, ml, (float)sc[SC_INV], l->scales[f], l->biases[f], p->stream);
}

static void train_map_unit(void *arg, idx_t unit)
{
    pass *p = arg;
    dnbn_for_runs(p->pt, unit, train_run, p);
}

static void stats_unit(void *arg, idx_t unit, double (*acc)[3])
{
    pass *p = arg;
    dnbn_unit_moments(p->r, p->pt, p->in, unit, acc);
}

/* parts == 1: whole channels per unit, statistics then transform. */
static void train_fused_unit(void *arg, idx_t unit)
{
    pass *p = arg;
    double acc[DNBN_MAX_GROUP][3];
    idx_t f0 = dnbn_unit_first(p->pt, unit), n = dnbn_unit_channels(p->pt, unit);
    stats_unit(arg, unit, acc);
    for (idx_t j = 0; j < n; j++) finish_stats(arg, f0 + j, acc[j]);
    train_map_unit(arg, unit);
}

static void infer_run(void *arg, idx_t f, idx_t off, idx_t len)
{
    pass *p = arg;
    dnbn_layer *l = p->l;
    float rm = l->rolling_mean[f];
    double rv = l->rolling_variance[f];
    double inv = l->numerics == DNBN_NUMERICS_DARKNET ? dnbn_pjreddie_forward_inv(rv)
                                                      : 1.0 / sqrt(rv + (double)l->eps);
    p->r->forward_infer(p->in + off, l->output + off, len, rm, 0.0f, (float)inv, l->scales[f], l->biases[f],
                        p->stream);
}

static void infer_unit(void *arg, idx_t unit)
{
    pass *p = arg;
    dnbn_for_runs(p->pt, unit, infer_run, p);
}

/* ---- spatial == 1: tiles of channels, vectorized across channels ---- */

/* The forward pass's parameters of a tile: the mean as a sum of two floats,
 * and the normalizer, from the channels' scratch rows. */
static void tile_params(const dnbn_layer *l, idx_t f0, idx_t n, float *mh, float *ml, float *inv)
{
    for (idx_t j = 0; j < n; j++) {
        const double *sc = l->scratch + (f0 + j) * SC_WIDTH;
        mh[j] = (float)sc[SC_MEAN];
        ml[j] = (float)(sc[SC_MEAN] - mh[j]);
        inv[j] = (float)sc[SC_INV];
    }
}

/* The elementwise pass of a tile whose statistics are in the scratch rows. */
static void train_apply_tile(void *arg, idx_t f0, idx_t n)
{
    pass *p = arg;
    dnbn_layer *l = p->l;
    float mh[DNBN_TILE], ml[DNBN_TILE], inv[DNBN_TILE];
    tile_params(l, f0, n, mh, ml, inv);
    for (idx_t b = 0; b < l->batch; b++) {
        idx_t off = b * l->out_c + f0;
        p->r->v_forward_train(p->in + off, p->x ? p->x + off : NULL, l->keep_x_norm ? l->x_norm + off : NULL,
                              l->output + off, n, mh, ml, inv, l->scales + f0, l->biases + f0);
    }
}

static void train_tile(void *arg, idx_t f0, idx_t n)
{
    pass *p = arg;
    double mean[DNBN_TILE], m2[DNBN_TILE];
    dnbn_tile_moments(p->r, p->in, p->l->batch, p->l->out_c, f0, n, mean, m2);
    for (idx_t j = 0; j < n; j++) {
        double acc[3] = {(double)p->l->batch, mean[j], m2[j]};
        finish_stats(p, f0 + j, acc);
    }
    train_apply_tile(arg, f0, n);
}

static void infer_tile(void *arg, idx_t f0, idx_t n)
{
    pass *p = arg;
    dnbn_layer *l = p->l;
    float zero[DNBN_TILE] = {0}, inv[DNBN_TILE];
    for (idx_t j = 0; j < n; j++) {
        double rv = l->rolling_variance[f0 + j];
        inv[j] = (float)(l->numerics == DNBN_NUMERICS_DARKNET ? dnbn_pjreddie_forward_inv(rv)
                                                              : 1.0 / sqrt(rv + (double)l->eps));
    }
    for (idx_t b = 0; b < l->batch; b++) {
        idx_t off = b * l->out_c + f0;
        p->r->v_forward_infer(p->in + off, l->output + off, n, l->rolling_mean + f0, zero, inv, l->scales + f0,
                              l->biases + f0);
    }
}

/* A pass over l reading `in` and touching `tensors` activation tensors in
 * all: the partition and everything its units share. */
static pass make_pass(dnbn_layer *l, const dnbn_part *pt, const float *in, int tensors, int kind)
{
    pass p = {l, dnbn_rows_active(), pt, in, 0, l->x == in ? NULL : l->x, (double)pt->m, {NULL, NULL}, {-1, 0, 0}};
    p.stream = streams(l, tensors, kind, pt->threads, &p.trial);
    return p;
}

int dnbn_forward_batchnorm_layer(dnbn_layer *l, dnbn_network net)
{
    if (!layer_ok(l) || !net.input || (net.train && !train_buffers_ok(l))) return DNBN_ERR_ARG;
    int spatial = l->out_h * l->out_w;
    if (net.train && (idx_t)l->batch * spatial < 2) return DNBN_ERR_ARG;
    dnbn_part pt = dnbn_partition(l->batch, l->out_c, spatial);
    pass p = make_pass(l, &pt, net.input, net.train ? 3 + (l->keep_x_norm != 0) : 2,
                       net.train ? DNBN_PASS_FORWARD_TRAIN : DNBN_PASS_FORWARD_INFER);
    if (spatial == 1) {
        dnbn_tiles t = dnbn_tile_partition(l->batch, l->out_c);
        dnbn_map_tiles(&t, net.train ? train_tile : infer_tile, &p);
        if (net.train)
            record_training(l);
        else
            l->state = STATE_INFERENCE;
        dnbn_stream_end(&p.trial);
        return DNBN_OK;
    }
    if (!net.train) {
        if (spatial >= DNBN_ROW_ORDER_MIN_SPATIAL)
            dnbn_map_rows(&pt, infer_run, &p);
        else
            dnbn_map_units(&pt, infer_unit, &p);
        l->state = STATE_INFERENCE;
        dnbn_stream_end(&p.trial);
        return DNBN_OK;
    }
    if (pt.parts == 1) {
        dnbn_map_units(&pt, train_fused_unit, &p);
    } else {
        dnbn_reduce r = {stats_unit, dnbn_moments_merge, finish_stats, &p};
        dnbn_reduce_channels(&pt, &r);
        dnbn_map_units(&pt, train_map_unit, &p);
    }
    record_training(l);
    dnbn_stream_end(&p.trial);
    return DNBN_OK;
}

/* ---- x_norm on request ---- */

static void fill_run(void *arg, idx_t f, idx_t off, idx_t len)
{
    pass *p = arg;
    dnbn_layer *l = p->l;
    const double *sc = l->scratch + f * SC_WIDTH;
    float mh = (float)sc[SC_MEAN], ml = (float)(sc[SC_MEAN] - mh), inv = (float)sc[SC_INV];
    /* the forward's own arithmetic on x (= its input), x_norm only */
    p->r->forward_train(l->x + off, NULL, l->x_norm + off, NULL, len, mh, ml, inv, 0.0f, 0.0f, p->stream);
}

static void fill_unit(void *arg, idx_t unit)
{
    pass *p = arg;
    dnbn_for_runs(p->pt, unit, fill_run, p);
}

int dnbn_batchnorm_layer_fill_x_norm(dnbn_layer *l)
{
    if (!layer_ok(l) || !l->x || !l->x_norm) return DNBN_ERR_ARG;
    if (!l->trained) return DNBN_ERR_STATE;
    /* spatial == 1 is the same arithmetic with runs of length 1 per channel:
     * treat the tensor as (batch, filters, 1) through the generic partition. */
    dnbn_part pt = dnbn_partition(l->batch, l->out_c, l->out_h * l->out_w);
    pass p = make_pass(l, &pt, NULL, 2, DNBN_PASS_FILL);
    dnbn_map_units(&pt, fill_unit, &p);
    l->x_norm_current = 1;
    dnbn_stream_end(&p.trial);
    return DNBN_OK;
}

/* ---- backward ---- */

struct sums_ctx {
    pass *p;
    idx_t f0;
    double (*acc)[3];
};

static void sums_run(void *arg, idx_t f, idx_t off, idx_t len)
{
    struct sums_ctx *c = arg;
    double *acc = c->acc[f - c->f0];
    c->p->r->sums_dev(c->p->in + off, c->p->l->x + off, len, c->p->l->scratch[f * SC_WIDTH + SC_MEAN], &acc[0],
                      &acc[1]);
}

static void sums_unit(void *arg, idx_t unit, double (*acc)[3])
{
    pass *p = arg;
    struct sums_ctx c = {p, dnbn_unit_first(p->pt, unit), acc};
    for (idx_t j = 0; j < dnbn_unit_channels(p->pt, unit); j++) acc[j][0] = acc[j][1] = acc[j][2] = 0;
    dnbn_for_runs(p->pt, unit, sums_run, &c);
}

/* Channel f's parameter gradients and the coefficients of
 * dx = dy*A + (x - mean)*B + C, from sum dy and sum dy*(x - mean). */
static void finish_sums(void *arg, idx_t f, const double acc[3])
{
    pass *p = arg;
    dnbn_layer *l = p->l;
    double sum_dy = acc[0], sum_dy_dev = acc[1], m = p->count;
    double gamma = l->scales[f], *sc = l->scratch + f * SC_WIDTH, inv = sc[SC_INV];
    l->bias_updates[f] = (float)((double)l->bias_updates[f] + sum_dy);
    l->scale_updates[f] = (float)((double)l->scale_updates[f] + inv * sum_dy_dev); /* sum dy*x_norm */
    if (l->numerics == DNBN_NUMERICS_DARKNET) {
        /* Darknet's mean_delta_cpu, variance_delta_cpu and normalize_delta_cpu on
         * delta*gamma; Darknet quirk: epsilon inside the root here. */
        double r = dnbn_pjreddie_delta_inv((double)l->variance[f]);
        double md = gamma * sum_dy * -r;
        double vd = gamma * sum_dy_dev * -0.5 * r * r * r;
        if (l->mean_delta) l->mean_delta[f] = (float)md;
        if (l->variance_delta) l->variance_delta[f] = (float)vd;
        sc[SC_A] = gamma * r;
        sc[SC_B] = vd * 2.0 / m;
        sc[SC_C] = md / m;
    } else {
        /* exact gradient: dx = gamma*inv*(dy - mean(dy) - x_hat*mean(dy*x_hat)) */
        double a = gamma * inv;
        if (l->mean_delta) l->mean_delta[f] = (float)(-a * sum_dy);
        if (l->variance_delta) l->variance_delta[f] = (float)(-0.5 * a * inv * inv * sum_dy_dev);
        sc[SC_A] = a;
        sc[SC_B] = -a * inv * inv * sum_dy_dev / m;
        sc[SC_C] = -a * sum_dy / m;
    }
}

static void apply_run(void *arg, idx_t f, idx_t off, idx_t len)
{
    pass *p = arg;
    const double *sc = p->l->scratch + f * SC_WIDTH;
    p->r->backward_apply(p->l->delta + off, p->in + off, p->l->x + off, len, sc[SC_A], sc[SC_MEAN], sc[SC_B],
                         sc[SC_C], p->stream);
}

static void apply_unit(void *arg, idx_t unit)
{
    pass *p = arg;
    dnbn_for_runs(p->pt, unit, apply_run, p);
}

static void backward_fused_unit(void *arg, idx_t unit)
{
    pass *p = arg;
    double acc[DNBN_MAX_GROUP][3];
    idx_t f0 = dnbn_unit_first(p->pt, unit), n = dnbn_unit_channels(p->pt, unit);
    sums_unit(arg, unit, acc);
    for (idx_t j = 0; j < n; j++) finish_sums(arg, f0 + j, acc[j]);
    apply_unit(arg, unit);
}

static void tile_means(const dnbn_layer *l, idx_t f0, idx_t n, double *k)
{
    for (idx_t j = 0; j < n; j++) k[j] = l->scratch[(f0 + j) * SC_WIDTH + SC_MEAN];
}

static void sums_tile(const pass *p, idx_t f0, idx_t n, double *s, double *sd)
{
    const dnbn_layer *l = p->l;
    double k[DNBN_TILE];
    tile_means(l, f0, n, k);
    for (idx_t j = 0; j < n; j++) s[j] = sd[j] = 0;
    for (idx_t i = 0; i < l->batch; i++) {
        idx_t off = i * l->out_c + f0;
        p->r->v_sums_dev(p->in + off, l->x + off, k, n, s, sd);
    }
}

/* The input delta of a tile whose coefficients are in the scratch rows. */
static void apply_tile(void *arg, idx_t f0, idx_t n)
{
    pass *p = arg;
    dnbn_layer *l = p->l;
    double a[DNBN_TILE], k[DNBN_TILE], b[DNBN_TILE], c[DNBN_TILE];
    tile_means(l, f0, n, k);
    for (idx_t j = 0; j < n; j++) {
        const double *sc = l->scratch + (f0 + j) * SC_WIDTH;
        a[j] = sc[SC_A], b[j] = sc[SC_B], c[j] = sc[SC_C];
    }
    for (idx_t i = 0; i < l->batch; i++) {
        idx_t off = i * l->out_c + f0;
        p->r->v_backward_apply(l->delta + off, p->in + off, l->x + off, n, a, k, b, c);
    }
}

static void backward_tile(void *arg, idx_t f0, idx_t n)
{
    pass *p = arg;
    double s[DNBN_TILE], sd[DNBN_TILE];
    sums_tile(p, f0, n, s, sd);
    for (idx_t j = 0; j < n; j++) {
        double acc[3] = {s[j], sd[j], 0};
        finish_sums(p, f0 + j, acc);
    }
    apply_tile(arg, f0, n);
}

/* Phase 1 of a sharded backward: the sums go out instead of into the layer. */
static void sums_out_tile(void *arg, idx_t f0, idx_t n)
{
    pass *p = arg;
    sums_tile(p, f0, n, p->sums[0] + f0, p->sums[1] + f0);
}

static void sums_out_finish(void *arg, idx_t f, const double acc[3])
{
    pass *p = arg;
    p->sums[0][f] = acc[0];
    p->sums[1][f] = acc[1];
}

int dnbn_backward_batchnorm_layer_from(dnbn_layer *l, float *delta_in)
{
    if (!layer_ok(l) || !backward_buffers_ok(l) || !delta_in) return DNBN_ERR_ARG;
    if (l->state != STATE_TRAINING) return DNBN_ERR_STATE;
    dnbn_part pt = dnbn_partition(l->batch, l->out_c, l->out_h * l->out_w);
    pass p = make_pass(l, &pt, delta_in, 3, DNBN_PASS_BACKWARD);
    if (l->out_h * l->out_w == 1) {
        dnbn_tiles t = dnbn_tile_partition(l->batch, l->out_c);
        dnbn_map_tiles(&t, backward_tile, &p);
    } else if (pt.parts == 1) {
        dnbn_map_units(&pt, backward_fused_unit, &p);
    } else {
        dnbn_reduce r = {sums_unit, NULL, finish_sums, &p};
        dnbn_reduce_channels(&pt, &r);
        dnbn_map_units(&pt, apply_unit, &p);
    }
    dnbn_stream_end(&p.trial);
    return DNBN_OK;
}

int dnbn_backward_batchnorm_layer(dnbn_layer *l, dnbn_network net)
{
    if (!layer_ok(l) || !backward_buffers_ok(l)) return DNBN_ERR_ARG;
    if (!net.train) return DNBN_ERR_STATE;
    int status = dnbn_backward_batchnorm_layer_from(l, l->delta);
    if (status == DNBN_OK && net.delta && net.delta != l->delta)
        memcpy(net.delta, l->delta, (size_t)l->batch * (size_t)l->outputs * sizeof(float));
    return status;
}

/* ---- phases, for statistics combined across shards of a batch ---- */

int dnbn_batchnorm_layer_forward_moments(dnbn_layer *l, float *input, double count, const double *mean,
                                    const double *m2)
{
    if (!layer_ok(l) || !train_buffers_ok(l) || !input || !mean || !m2 || !(count >= 2)) return DNBN_ERR_ARG;
    int spatial = l->out_h * l->out_w;
    dnbn_part pt = dnbn_partition(l->batch, l->out_c, spatial);
    pass p = make_pass(l, &pt, input, 3 + (l->keep_x_norm != 0), DNBN_PASS_FORWARD_APPLY);
    for (idx_t f = 0; f < l->out_c; f++) {
        double acc[3] = {count, mean[f], m2[f]};
        finish_stats(&p, f, acc);
    }
    if (spatial == 1) {
        dnbn_tiles t = dnbn_tile_partition(l->batch, l->out_c);
        dnbn_map_tiles(&t, train_apply_tile, &p);
    } else {
        dnbn_map_units(&pt, train_map_unit, &p);
    }
    record_training(l);
    dnbn_stream_end(&p.trial);
    return DNBN_OK;
}

int dnbn_batchnorm_layer_backward_sums(dnbn_layer *l, float *delta_in, double *sum_dy, double *sum_dy_dev)
{
    /* reads x and delta_in only: the layer's delta and update buffers may be NULL */
    if (!layer_ok(l) || !l->x || !delta_in || !sum_dy || !sum_dy_dev) return DNBN_ERR_ARG;
    if (l->state != STATE_TRAINING) return DNBN_ERR_STATE;
    dnbn_part pt = dnbn_partition(l->batch, l->out_c, l->out_h * l->out_w);
    pass p = make_pass(l, &pt, delta_in, 0, -1);
    p.sums[0] = sum_dy;
    p.sums[1] = sum_dy_dev;
    if (l->out_h * l->out_w == 1) {
        dnbn_tiles t = dnbn_tile_partition(l->batch, l->out_c);
        dnbn_map_tiles(&t, sums_out_tile, &p);
    } else {
        dnbn_reduce r = {sums_unit, NULL, sums_out_finish, &p};
        dnbn_reduce_channels(&pt, &r);
    }
    return DNBN_OK;
}

int dnbn_batchnorm_layer_backward_apply(dnbn_layer *l, float *delta_in, double count, const double *sum_dy,
                                   const double *sum_dy_dev)
{
    if (!layer_ok(l) || !backward_buffers_ok(l) || !delta_in || !sum_dy || !sum_dy_dev || !(count >= 1))
        return DNBN_ERR_ARG;
    if (l->state != STATE_TRAINING) return DNBN_ERR_STATE;
    dnbn_part pt = dnbn_partition(l->batch, l->out_c, l->out_h * l->out_w);
    pass p = make_pass(l, &pt, delta_in, 3, DNBN_PASS_BACKWARD_APPLY);
    p.count = count;
    for (idx_t f = 0; f < l->out_c; f++) {
        double acc[3] = {sum_dy[f], sum_dy_dev[f], 0};
        finish_sums(&p, f, acc);
    }
    if (l->out_h * l->out_w == 1) {
        dnbn_tiles t = dnbn_tile_partition(l->batch, l->out_c);
        dnbn_map_tiles(&t, apply_tile, &p);
    } else {
        dnbn_map_units(&pt, apply_unit, &p);
    }
    dnbn_stream_end(&p.trial);
    return DNBN_OK;
}

/* ---- update ---- */

int dnbn_update_batchnorm_layer(dnbn_layer *l, float learning_rate, float momentum, float decay)
{
    (void)decay; /* Darknet applies no weight decay to batch-norm scales and biases */
    if (!layer_ok(l) || !l->scale_updates || !l->bias_updates) return DNBN_ERR_ARG;
    float step = learning_rate / (float)l->batch;
    for (int f = 0; f < l->out_c; f++) {
        l->biases[f] += step * l->bias_updates[f];
        l->bias_updates[f] *= momentum;
        l->scales[f] += step * l->scale_updates[f];
        l->scale_updates[f] *= momentum;
    }
    return DNBN_OK;
}
