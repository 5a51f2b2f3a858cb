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
#define _DEFAULT_SOURCE /* madvise */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

enum { STATE_NONE = DNBN_STATE_NONE, STATE_INFERENCE = DNBN_STATE_INFERENCE, STATE_TRAINING = DNBN_STATE_TRAINING };

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

/* Large buffers on huge pages where the system grants them on request
 * (transparent huge pages in "madvise" mode, as NumPy asks for its large
 * arrays): a pass over a tensor then misses the TLB once per 2 MB instead of
 * once per page. Measured on a 2-core Intel Xeon VM (C benchmark, one
 * thread, medians of 3, alternating builds): 32x64x112x112 inference 14.0 ->
 * 12.6 ms, training forward 24.3 -> 21.1 ms, backward 27.9 -> 26.4 ms;
 * 8x128x52x52 training step 4.15 -> 3.50 ms. Smaller buffers hold less than
 * the two huge pages' worth that makes one whole aligned huge page certain.
 * The advice covers the whole pages inside the buffer; where it is refused
 * or unknown nothing changes. */
#define HUGE_ADVICE_MIN_BYTES ((size_t)4 << 20)

static void advise_huge_pages(void *p, size_t bytes)
{
#ifdef MADV_HUGEPAGE
    long size = sysconf(_SC_PAGESIZE);
    if (bytes < HUGE_ADVICE_MIN_BYTES || size <= 0) return;
    const uintptr_t page = (uintptr_t)size, lo = ((uintptr_t)p + page - 1) / page * page,
                    hi = ((uintptr_t)p + bytes) / page * page;
    if (hi > lo) (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p, (void)bytes;
#endif
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
    size_t bytes = 64 + n_act * act + n_chan * chan + scratch;
    l->memory = calloc(1, bytes);
    if (!l->memory) {
        free(l);
        errno = ENOMEM;
        return NULL;
    }
    advise_huge_pages(l->memory, bytes);
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

/* ---- passes ----
 * Every call is: validate, describe the pass (dnbn_pass, internal.h: the
 * partition, the tensors, what each unit does), then dnbn_parallel_for over
 * the partition's units with one of the two phases (phases.inc.h), whose
 * walks over a unit's rows call the loops over values:
 *   public call -> dnbn_parallel_for -> phase -> loop over values.
 * Per-channel numbers between the halves of a phase, and between phases,
 * live in the layer's scratch rows (dnbn_pass_keep and the *_terms below). */

/* A pass over l reading `in` (its units read `reads` tensors twice), for a
 * call of the given kind touching `tensors` activation tensors in all: the
 * store and group-size choices for it (timed per kind, tuning.c), then its
 * partition into *pt. */
static dnbn_pass make_pass(dnbn_layer *l, dnbn_part *pt, int reads, const float *in, int tensors, int kind)
{
    int spatial = l->out_h * l->out_w, threads = dnbn_threads_for((idx_t)l->batch * l->outputs);
    dnbn_trial trial = {.slot = -1, .group_bytes = dnbn_group_bytes()};
    if (kind >= 0) {
        /* streaming needs whole 64-byte lines per row: a line written partly by
         * streaming and partly by ordinary stores is slow on both */
        dnbn_trial_begin(&trial, kind, (idx_t)l->batch * l->outputs * (idx_t)sizeof(float) * tensors, threads,
                         spatial % 16 == 0, dnbn_partition_grouped(l->out_c, spatial, threads));
    }
    *pt = dnbn_partition_sized(l->batch, l->out_c, spatial, reads, threads, trial.group_bytes);
    dnbn_pass p = {.l = l, .r = dnbn_rows_active(), .pt = pt, .in = in, .count = (double)pt->m, .trial = trial};
    return p;
}

/* ---- per-channel numbers ---- */

/* Channel f's statistics from its moments over m values: mean, variance,
 * running stats, and the normalizer kept for the elementwise pass and for
 * backward. per_m = 1/m and per_m1 = 1/(m - 1) come from the caller, once
 * for a group of channels: over many channels this loop waits on the
 * divider, so a channel divides once, for its normalizer. */
static inline void finish_stats(dnbn_layer *l, idx_t f, double per_m, double per_m1, double mean, double m2)
{
    double unbiased = m2 * per_m1, var, inv;
    if (l->numerics == DNBN_NUMERICS_DARKNET) {
        var = unbiased; /* Darknet quirk: unbiased variance, epsilon outside the root */
        inv = dnbn_pjreddie_forward_inv(var);
    } else {
        var = m2 * per_m;
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

/* The inference normalizer: 1/(sqrt(rolling variance) + 1e-6) in darknet
 * numerics, 1/sqrt(rolling variance + eps) in standard; the one place the
 * library computes it (Python reads it through dnbn_batchnorm_normalizer). */
static double infer_inv(int numerics, double eps, double rolling_variance)
{
    return numerics == DNBN_NUMERICS_DARKNET ? dnbn_pjreddie_forward_inv(rolling_variance)
                                             : 1.0 / sqrt(rolling_variance + eps);
}

int dnbn_batchnorm_normalizer(int numerics, double eps, const double *variance, int n, double *inv)
{
    if ((numerics != DNBN_NUMERICS_DARKNET && numerics != DNBN_NUMERICS_STANDARD) || n < 0 ||
        (n > 0 && (!variance || !inv)))
        return DNBN_ERR_ARG;
    if (numerics == DNBN_NUMERICS_STANDARD && !(eps >= 0 && isfinite(eps))) return DNBN_ERR_ARG;
    for (int f = 0; f < n; f++) inv[f] = infer_inv(numerics, eps, variance[f]);
    return DNBN_OK;
}

/* Channel f's parameter gradients and the coefficients of
 * dx = dy*A + (x - mean)*B + C, from sum dy and sum dy*(x - mean) over
 * count values, per_count = 1/count (the caller's, as in finish_stats). */
static inline void finish_sums(dnbn_layer *l, idx_t f, double per_count, double sum_dy, double sum_dy_dev)
{
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
        sc[SC_B] = vd * 2.0 * per_count;
        sc[SC_C] = md * per_count;
    } else {
        /* exact gradient: dx = gamma*inv*(dy - mean(dy) - x_hat*mean(dy*x_hat)) */
        double a = gamma * inv;
        if (l->mean_delta) l->mean_delta[f] = (float)(-a * sum_dy);
        if (l->variance_delta) l->variance_delta[f] = (float)(-0.5 * a * inv * inv * sum_dy_dev);
        sc[SC_A] = a;
        sc[SC_B] = -a * inv * inv * sum_dy_dev * per_count;
        sc[SC_C] = -a * sum_dy * per_count;
    }
}

/* What a training forward leaves in the layer's state fields. */
static void record_training(dnbn_layer *l)
{
    l->state = STATE_TRAINING;
    l->trained = 1;
    l->x_norm_current = l->keep_x_norm != 0;
}

/* ---- what the phases ask of the layer (internal.h) ---- */

/* Channels [f0, f0 + n)'s reductions over the whole batch, acc[j] for
 * channel f0 + j (a row of p->partial per channel when merged): into the
 * caller's arrays, or finished into the layer's statistics (forward) or
 * gradient coefficients (backward). */
static void keep_channels(const dnbn_pass *p, idx_t f0, idx_t n, double (*acc)[3], idx_t stride)
{
    /* every channel's count: the pass's (a training pass has m >= 2); its reciprocals once for all channels */
    const double m = p->count, per_m = 1.0 / m, per_m1 = 1.0 / (m - 1);
    if (p->sums[0])
        for (idx_t j = 0; j < n; j++) p->sums[0][f0 + j] = acc[j * stride][1], p->sums[1][f0 + j] = acc[j * stride][2];
    else if (p->backward)
        for (idx_t j = 0; j < n; j++) finish_sums(p->l, f0 + j, per_m, acc[j * stride][1], acc[j * stride][2]);
    else
        for (idx_t j = 0; j < n; j++)
            finish_stats(p->l, f0 + j, per_m, per_m1, acc[j * stride][1], acc[j * stride][2]);
}

void dnbn_pass_keep(const dnbn_pass *p, idx_t u, dnbn_unit w, double (*acc)[3])
{
    if (!p->partial) {
        keep_channels(p, w.f0, w.nf, acc, 1);
        return;
    }
    for (idx_t j = 0; j < w.nf; j++) {
        double *to = p->partial[(w.f0 + j) * p->pt->parts + u % p->pt->parts];
        to[0] = acc[j][0], to[1] = acc[j][1], to[2] = acc[j][2];
    }
}

void dnbn_pass_merge(const dnbn_pass *p)
{
    const dnbn_part *pt = p->pt;
    for (idx_t f = 0; f < pt->filters; f++) {
        double *acc = p->partial[f * pt->parts];
        for (idx_t q = 1; q < pt->parts; q++) {
            const double *b = p->partial[f * pt->parts + q];
            if (p->backward)
                acc[0] += b[0], acc[1] += b[1], acc[2] += b[2];
            else
                dnbn_moments_merge(acc, b);
        }
    }
    keep_channels(p, 0, pt->filters, p->partial, pt->parts);
}

void dnbn_pass_forward_terms(const dnbn_pass *p, dnbn_unit w, float *mh, float *ml, float *inv)
{
    const dnbn_layer *l = p->l;
    if (p->infer) {
        for (idx_t j = 0; j < w.nf; j++) {
            mh[j] = l->rolling_mean[w.f0 + j], ml[j] = 0.0f;
            inv[j] = (float)infer_inv(l->numerics, l->eps, l->rolling_variance[w.f0 + j]);
        }
        return;
    }
    for (idx_t j = 0; j < w.nf; j++) {
        const double *sc = l->scratch + (w.f0 + j) * SC_WIDTH;
        mh[j] = (float)sc[SC_MEAN], ml[j] = (float)(sc[SC_MEAN] - mh[j]), inv[j] = (float)sc[SC_INV];
    }
}

void dnbn_pass_means(const dnbn_pass *p, dnbn_unit w, double *k)
{
    for (idx_t j = 0; j < w.nf; j++) k[j] = p->l->scratch[(w.f0 + j) * SC_WIDTH + SC_MEAN];
}

void dnbn_pass_backward_terms(const dnbn_pass *p, dnbn_unit w, double *a, double *b, double *c)
{
    for (idx_t j = 0; j < w.nf; j++) {
        const double *sc = p->l->scratch + (w.f0 + j) * SC_WIDTH;
        a[j] = sc[SC_A], b[j] = sc[SC_B], c[j] = sc[SC_C];
    }
}

/* ---- forward ---- */

int dnbn_forward_batchnorm_layer(dnbn_layer *l, dnbn_network net)
{
    if (!layer_ok(l) || !net.input || (net.train && !train_buffers_ok(l))) return DNBN_ERR_ARG;
    int spatial = l->out_h * l->out_w;
    if (net.train && (idx_t)l->batch * spatial < 2) return DNBN_ERR_ARG;
    dnbn_part pt;
    dnbn_pass p = make_pass(l, &pt, 1, net.input, net.train ? 3 + (l->keep_x_norm != 0) : 2,
                            net.train ? DNBN_PASS_FORWARD_TRAIN : DNBN_PASS_FORWARD_INFER);
    p.y = l->output;
    p.map = 1;
    if (!net.train) {
        p.infer = 1;
        dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->forward_phase, &p);
        l->state = STATE_INFERENCE;
    } else {
        p.x = l->x == net.input ? NULL : l->x;
        p.xn = l->keep_x_norm ? l->x_norm : NULL;
        p.reduce = 1;
        if (pt.parts > 1) { /* split channels: every part's moments, merged, then the elementwise pass */
            double partial[DNBN_MAX_PARTIALS][3];
            p.partial = partial, p.map = 0;
            dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->forward_phase, &p);
            dnbn_pass_merge(&p);
            p.partial = NULL, p.reduce = 0, p.map = 1;
        }
        dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->forward_phase, &p);
        record_training(l);
    }
    dnbn_trial_end(&p.trial);
    return DNBN_OK;
}

/* ---- x_norm on request ---- */

int dnbn_batchnorm_layer_fill_x_norm(dnbn_layer *l)
{
    if (!layer_ok(l) || !l->x || !l->x_norm) return DNBN_ERR_ARG;
    if (!l->trained) return DNBN_ERR_STATE;
    dnbn_part pt;
    dnbn_pass p = make_pass(l, &pt, 1, l->x, 2, DNBN_PASS_FILL);
    p.xn = l->x_norm; /* the forward's own arithmetic on x (= its input), x_norm only */
    p.map = 1;
    dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->forward_phase, &p);
    l->x_norm_current = 1;
    dnbn_trial_end(&p.trial);
    return DNBN_OK;
}

/* ---- backward ---- */

/* The backward pass of l on delta_in (fused: the sums and the input delta of
 * each unit), its partition in *pt; DNBN_ERR_* when the call does not fit. */
static int backward_pass(dnbn_layer *l, float *delta_in, dnbn_part *pt, dnbn_pass *p)
{
    if (!layer_ok(l) || !backward_buffers_ok(l) || !delta_in) return DNBN_ERR_ARG;
    if (l->state != STATE_TRAINING) return DNBN_ERR_STATE;
    *p = make_pass(l, pt, 2, delta_in, 3, DNBN_PASS_BACKWARD);
    p->backward = p->reduce = p->map = 1;
    return DNBN_OK;
}

int dnbn_backward_batchnorm_layer_from(dnbn_layer *l, float *delta_in)
{
    dnbn_part pt;
    dnbn_pass p;
    int status = backward_pass(l, delta_in, &pt, &p);
    if (status != DNBN_OK) return status;
    if (pt.parts > 1) { /* split channels: every part's sums, merged, then the input delta */
        double partial[DNBN_MAX_PARTIALS][3];
        p.partial = partial, p.map = 0;
        dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->backward_phase, &p);
        dnbn_pass_merge(&p);
        p.partial = NULL, p.reduce = 0, p.map = 1;
    }
    dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->backward_phase, &p);
    dnbn_trial_end(&p.trial);
    return DNBN_OK;
}

/* The same on the layer's own delta (Darknet's signature), then a copy into
 * net.delta when it is another buffer. Its own phases rather than a call of
 * the function above, so that its loops are as near. */
int dnbn_backward_batchnorm_layer(dnbn_layer *l, dnbn_network net)
{
    if (!layer_ok(l) || !backward_buffers_ok(l)) return DNBN_ERR_ARG;
    if (!net.train) return DNBN_ERR_STATE;
    dnbn_part pt;
    dnbn_pass p;
    int status = backward_pass(l, l->delta, &pt, &p);
    if (status != DNBN_OK) return status;
    if (pt.parts > 1) {
        double partial[DNBN_MAX_PARTIALS][3];
        p.partial = partial, p.map = 0;
        dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->backward_phase, &p);
        dnbn_pass_merge(&p);
        p.partial = NULL, p.reduce = 0, p.map = 1;
    }
    dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->backward_phase, &p);
    dnbn_trial_end(&p.trial);
    if (net.delta && net.delta != l->delta)
        memcpy(net.delta, l->delta, (size_t)l->batch * (size_t)l->outputs * sizeof(float));
    return DNBN_OK;
}

/* ---- phases, for statistics combined across shards of a batch ---- */

int dnbn_batchnorm_layer_forward_moments(dnbn_layer *l, float *input, double count, const double *mean,
                                    const double *m2)
{
    if (!layer_ok(l) || !train_buffers_ok(l) || !input || !mean || !m2 || !(count >= 2)) return DNBN_ERR_ARG;
    dnbn_part pt;
    dnbn_pass p = make_pass(l, &pt, 1, input, 3 + (l->keep_x_norm != 0), DNBN_PASS_FORWARD_APPLY);
    for (idx_t f = 0; f < l->out_c; f++) finish_stats(l, f, 1.0 / count, 1.0 / (count - 1), mean[f], m2[f]);
    p.x = l->x == input ? NULL : l->x;
    p.xn = l->keep_x_norm ? l->x_norm : NULL;
    p.y = l->output;
    p.map = 1;
    dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->forward_phase, &p);
    record_training(l);
    dnbn_trial_end(&p.trial);
    return DNBN_OK;
}

int dnbn_batchnorm_layer_backward_sums(dnbn_layer *l, float *delta_in, double *sum_dy, double *sum_dy_dev)
{
    /* reads x and delta_in only: the layer's delta and update buffers may be NULL */
    if (!layer_ok(l) || !l->x || !delta_in || !sum_dy || !sum_dy_dev) return DNBN_ERR_ARG;
    if (l->state != STATE_TRAINING) return DNBN_ERR_STATE;
    dnbn_part pt;
    dnbn_pass p = make_pass(l, &pt, 2, delta_in, 0, -1);
    double partial[DNBN_MAX_PARTIALS][3];
    p.backward = p.reduce = 1;
    p.sums[0] = sum_dy, p.sums[1] = sum_dy_dev;
    p.partial = pt.parts > 1 ? partial : NULL;
    dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->backward_phase, &p);
    if (p.partial) dnbn_pass_merge(&p);
    return DNBN_OK;
}

int dnbn_batchnorm_layer_backward_apply(dnbn_layer *l, float *delta_in, double count, const double *sum_dy,
                                   const double *sum_dy_dev)
{
    if (!layer_ok(l) || !backward_buffers_ok(l) || !delta_in || !sum_dy || !sum_dy_dev || !(count >= 1))
        return DNBN_ERR_ARG;
    if (l->state != STATE_TRAINING) return DNBN_ERR_STATE;
    dnbn_part pt;
    dnbn_pass p = make_pass(l, &pt, 2, delta_in, 3, DNBN_PASS_BACKWARD_APPLY);
    p.count = count;
    for (idx_t f = 0; f < l->out_c; f++) finish_sums(l, f, 1.0 / count, sum_dy[f], sum_dy_dev[f]);
    p.backward = p.map = 1;
    dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->backward_phase, &p);
    dnbn_trial_end(&p.trial);
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
