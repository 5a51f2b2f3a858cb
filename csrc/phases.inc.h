/*
 * phases.inc.h - the layer's two phases, compiled with each set of row
 * primitives (included after rows.inc.h by rows_generic.c and rows_avx2.c).
 *
 * A phase is the function dnbn_parallel_for runs over work units [lo, hi) of
 * a pass (internal.h: dnbn_pass): per unit, a reduction (the forward's
 * moments, the backward's sums) and an elementwise pass, whichever the pass
 * asks for, each a visible walk over the unit's rows that calls the loop over
 * values. Between the two, the per-channel numbers come from the layer
 * (batchnorm_layer.c: dnbn_pass_keep and the *_terms functions), so that a
 * fused phase runs both halves on one unit while it is in cache:
 *   public call -> dnbn_parallel_for -> phase -> loop over values.
 *
 * The walks. spatial > 1: the unit's rows image by image and channel by
 * channel (dnbn_next_row, internal.h), each the values of one image's row that belong to the
 * unit (a unit of a split channel starts and ends inside images). In a fused
 * pass, a unit's elementwise half walks in step with the next unit's
 * reduction (whole images: the two units' rows match), ROWS_PIECE values of
 * one, then of the other (see forward_phase).
 * spatial == 1: the unit is a tile of channels over a range of images,
 * walked in blocks of ROWS_FC_BLOCK images through the channel-vector loops,
 * per-channel sums and parameters in arrays that stay in L1. (Walking down
 * all the images 8 channels at a time, sums in registers, takes fewer
 * instructions but is slower: with a power-of-two channel count every image's
 * 8 channels fall in the same L1 set.) Per-channel arrays are indexed from
 * the unit's first channel.
 */

/* Values summed with one shift before they are folded into a channel's
 * moments: bounds the cancellation in sum (x-k)^2 - (sum (x-k))^2 / n. */
#define ROWS_MOMENT_BLOCK 2048

/* The step of two walks in step (1 KB of each tensor). Every reduction sums
 * a row in pieces of this many values from its start, so that a channel's
 * sums are the same bits whether its unit was walked alone or beside
 * another. Measured on one core (medians of 3, alternating builds),
 * 8x32x208x208 training step: pieces of 1,024 values 21.5 ms against 20.2 ms
 * for 256; 128 19.1 against 19.9 ms, but 8x128x52x52 3.35 against 3.33 ms,
 * with more instructions per value. */
#define ROWS_PIECE 256

/* Folds a block of n values with shift k, sums s1 = sum (x-k) and s2 = sum
 * (x-k)^2, into acc = {n, mean, m2}; per_n = 1/n, the caller's, once for
 * many channels where it can (a division per channel is what the per-channel
 * work waits on when rows are short). */
static inline void ROWS(fold_block)(double acc[3], double n, double per_n, double k, double s1, double s2)
{
    double d = s1 * per_n, m2 = s2 - s1 * d;
    double block[3] = {n, k + d, m2 < 0 ? 0 : m2};
    dnbn_moments_merge(acc, block);
}

static inline idx_t ROWS(min)(idx_t a, idx_t b) { return a < b ? a : b; }

/* A block's shift: its first value, or 0 when that is not finite (a shift of
 * +-inf would turn the block's own infinity into inf - inf = NaN, and an
 * infinite channel's mean into NaN). */
static inline float ROWS(shift_of)(float v) { return ROWS(finite)(v) ? v : 0.0f; }

/* A channel's moments while its values go by (spatial > 1): the folded
 * blocks acc = {count, mean, m2}, and the open block's sums s1 = sum (x - k),
 * s2 = sum (x - k)^2 of its n values. A block spans rows, so that short rows
 * share a shift and a fold. */
typedef struct ROWS(moments) {
    double acc[3], k, s1, s2;
    idx_t n;
} ROWS(moments);

static inline void ROWS(moments_start)(ROWS(moments) *m, idx_t nf)
{
    for (idx_t j = 0; j < nf; j++) m[j] = (ROWS(moments)){{0, 0, 0}, 0, 0, 0, 0};
}

static inline void ROWS(moments_add)(ROWS(moments) *m, const float *v, idx_t n)
{
    for (idx_t i = 0; i < n;) {
        if (m->n == 0) m->k = ROWS(shift_of)(v[i]);
        idx_t c = ROWS(min)(n - i, ROWS_MOMENT_BLOCK - m->n);
        ROWS(shifted_sums)(v + i, c, m->k, &m->s1, &m->s2);
        i += c;
        if ((m->n += c) == ROWS_MOMENT_BLOCK) {
            ROWS(fold_block)(m->acc, (double)m->n, 1.0 / (double)m->n, m->k, m->s1, m->s2);
            m->n = 0, m->s1 = m->s2 = 0;
        }
    }
}

/* A row's values, in the pieces every reduction cuts it in. */
ROWS_INLINE void ROWS(moments_row)(ROWS(moments) *m, const float *v, idx_t n)
{
    idx_t i = 0;
    for (; n - i > ROWS_PIECE; i += ROWS_PIECE) ROWS(moments_add)(m, v + i, ROWS_PIECE);
    ROWS(moments_add)(m, v + i, n - i);
}

static inline void ROWS(moments_end)(ROWS(moments) *m, double acc[3])
{
    if (m->n) ROWS(fold_block)(m->acc, (double)m->n, 1.0 / (double)m->n, m->k, m->s1, m->s2);
    acc[0] = m->acc[0], acc[1] = m->acc[1], acc[2] = m->acc[2];
}

/* The forward's elementwise half on values [o, o + n) of the unit's channel j. */
typedef struct ROWS(forward_args) {
    const float *in, *mh, *ml, *inv, *g, *bt;
    float *x, *xn, *y;
    int light, stream; /* light: nothing to keep (neither x nor xn) */
} ROWS(forward_args);

ROWS_INLINE void ROWS(forward_values)(const ROWS(forward_args) *f, idx_t o, idx_t n, idx_t j)
{
    if (f->light) /* the lighter loop, the same arithmetic */
        ROWS(forward_infer)(f->in + o, f->y + o, n, f->mh[j], f->ml[j], f->inv[j], f->g[j], f->bt[j], f->stream);
    else
        ROWS(forward_train)(f->in + o, f->x ? f->x + o : NULL, f->xn ? f->xn + o : NULL, f->y ? f->y + o : NULL, n,
                            f->mh[j], f->ml[j], f->inv[j], f->g[j], f->bt[j], f->stream);
}

/* Forward: acc[j] = {count, mean, m2} of channel f0 + j over the unit's
 * values (p->in), then xn = ((in - mh) - ml) * inv, y = xn * gamma + beta and
 * x = in over the unit, each written when the pass gives it.
 *
 * Fused passes, spatial > 1: while a unit's elementwise half runs, the next
 * unit of the call has its moments summed, a piece of one between pieces of
 * the other, so that memory reads the next unit while it takes this one's
 * stores rather than the two waiting on each other (one core, 8x32x208x208:
 * the training forward 8.9 -> 7.8 ms, the backward 11.7 -> 9.2 ms). */
static void ROWS(forward_phase)(void *arg, idx_t lo, idx_t hi)
{
    const dnbn_pass *p = arg;
    const dnbn_part *pt = p->pt;
    const idx_t F = pt->filters, S = pt->spatial;
    const float *in = p->in;
    float *x = p->x, *xn = p->xn, *y = p->y;
    const int stream = p->trial.stream, light = !x && !xn;
    ROWS(moments) mo[2][DNBN_MAX_GROUP]; /* spatial > 1: this unit's [cur] and the next one's */
    int cur = 0, summed = 0;             /* summed: this unit's moments came with the last unit */
    for (idx_t u = lo; u < hi; u++) {
        const dnbn_unit w = dnbn_unit_at(pt, u);
        if (p->reduce) {
            double acc[DNBN_MAX_GROUP][3];
            if (S > 1) {
                ROWS(moments) *m = mo[cur];
                if (!summed) {
                    ROWS(moments_start)(m, w.nf);
                    for (dnbn_unit_row r = dnbn_rows_before(pt, w); dnbn_next_row(pt, w, &r);)
                        ROWS(moments_row)(&m[r.j], in + r.off, r.n);
                }
                for (idx_t j = 0; j < w.nf; j++) ROWS(moments_end)(&m[j], acc[j]);
            } else { /* blocks of images share a shift, the block's first image */
                double s1[DNBN_MAX_GROUP], s2[DNBN_MAX_GROUP];
                float k[DNBN_MAX_GROUP];
                for (idx_t j = 0; j < w.nf; j++) acc[j][0] = acc[j][1] = acc[j][2] = 0;
                for (idx_t b0 = w.j0; b0 < w.j1; b0 += ROWS_MOMENT_BLOCK) {
                    idx_t rows = ROWS(min)(w.j1 - b0, ROWS_MOMENT_BLOCK);
                    for (idx_t j = 0; j < w.nf; j++) s1[j] = s2[j] = 0, k[j] = ROWS(shift_of)(in[b0 * F + w.f0 + j]);
                    for (idx_t b = 0; b < rows; b += ROWS_FC_BLOCK)
                        ROWS_FC_BLOCKS(ROWS(fc_shifted_acc), ROWS(min)(rows - b, ROWS_FC_BLOCK),
                                       in + (b0 + b) * F + w.f0, F, k, w.nf, s1, s2);
                    double per_rows = 1.0 / (double)rows;
                    for (idx_t j = 0; j < w.nf; j++)
                        ROWS(fold_block)(acc[j], (double)rows, per_rows, k[j], s1[j], s2[j]);
                }
            }
            dnbn_pass_keep(p, u, w, acc);
            if (!p->map) continue;
        }
        float mh[DNBN_MAX_GROUP], ml[DNBN_MAX_GROUP], inv[DNBN_MAX_GROUP];
        dnbn_pass_forward_terms(p, w, mh, ml, inv);
        const float *g = p->l->scales + w.f0, *bt = p->l->biases + w.f0;
        if (S > 1) {
            const ROWS(forward_args) f = {in, mh, ml, inv, g, bt, x, xn, y, light, stream};
            summed = p->reduce && u + 1 < hi && pt->parts == 1;
            if (summed) { /* this unit's values and the next one's moments, piece by piece (the next unit has
                           * at most this one's channels: only a pass's last unit has fewer) */
                const dnbn_unit v = dnbn_unit_at(pt, u + 1);
                ROWS(moments) *m = mo[cur ^= 1];
                ROWS(moments_start)(m, v.nf);
                for (idx_t im = 0; im < pt->batch; im++)
                    for (idx_t j = 0; j < w.nf; j++) {
                        const idx_t ow = (im * F + w.f0 + j) * S, ov = (im * F + v.f0 + j) * S;
                        for (idx_t i = 0; i < S; i += ROWS_PIECE) {
                            const idx_t n = ROWS(min)(S - i, ROWS_PIECE);
                            ROWS(forward_values)(&f, ow + i, n, j);
                            if (j < v.nf) ROWS(moments_add)(&m[j], in + ov + i, n);
                        }
                    }
            } else {
                for (dnbn_unit_row r = dnbn_rows_before(pt, w); dnbn_next_row(pt, w, &r);)
                    ROWS(forward_values)(&f, r.off, r.n, r.j);
            }
        } else if (light) {
            for (idx_t b = w.j0; b < w.j1; b += ROWS_FC_BLOCK) {
                idx_t off = b * F + w.f0;
                ROWS_FC_BLOCKS(ROWS(fc_forward_infer), ROWS(min)(w.j1 - b, ROWS_FC_BLOCK), in + off, y + off, F, w.nf,
                               mh, ml, inv, g, bt);
            }
        } else {
            for (idx_t b = w.j0; b < w.j1; b += ROWS_FC_BLOCK) {
                idx_t off = b * F + w.f0;
                ROWS_FC_BLOCKS(ROWS(fc_forward), ROWS(min)(w.j1 - b, ROWS_FC_BLOCK), in + off, x ? x + off : NULL,
                               xn ? xn + off : NULL, y ? y + off : NULL, F, w.nf, mh, ml, inv, g, bt);
            }
        }
    }
    ROWS(stream_end)(stream);
}

/* A unit's backward sums before its values: the forward's means k, sums s and sd at 0. */
static inline void ROWS(sums_start)(const dnbn_pass *p, dnbn_unit w, double *k, double *s, double *sd)
{
    dnbn_pass_means(p, w, k);
    for (idx_t j = 0; j < w.nf; j++) s[j] = sd[j] = 0;
}

/* A row's backward sums, in the pieces every reduction cuts it in. */
ROWS_INLINE void ROWS(sums_row)(const float *dy, const float *x, idx_t n, double k, double *s, double *sd)
{
    idx_t i = 0;
    for (; n - i > ROWS_PIECE; i += ROWS_PIECE) ROWS(sums_dev)(dy + i, x + i, ROWS_PIECE, k, s, sd);
    ROWS(sums_dev)(dy + i, x + i, n - i, k, s, sd);
}

/* Backward: acc[j] = {count, sum dy, sum dy * (x - mean)} of channel f0 + j
 * over the unit's values (dy = p->in, x = the layer's x), then the input
 * delta dy * a + (x - mean) * b + c, in double, into the layer's delta (which
 * may be dy). Fused passes, spatial > 1: the next unit's sums walk with this
 * unit's input delta, as the forward's moments do. */
static void ROWS(backward_phase)(void *arg, idx_t lo, idx_t hi)
{
    const dnbn_pass *p = arg;
    const dnbn_part *pt = p->pt;
    const idx_t F = pt->filters, S = pt->spatial;
    const float *dy = p->in, *x = p->l->x;
    float *out = p->l->delta;
    const int stream = p->trial.stream;
    /* means and sums of this unit [cur] and the next one */
    double k[2][DNBN_MAX_GROUP], s[2][DNBN_MAX_GROUP], sd[2][DNBN_MAX_GROUP];
    int cur = 0, summed = 0;
    for (idx_t u = lo; u < hi; u++) {
        const dnbn_unit w = dnbn_unit_at(pt, u);
        double *kw = k[cur], *sw = s[cur], *sdw = sd[cur];
        if (!summed) ROWS(sums_start)(p, w, kw, sw, sdw);
        if (p->reduce) {
            if (!summed) {
                if (S > 1) {
                    for (dnbn_unit_row r = dnbn_rows_before(pt, w); dnbn_next_row(pt, w, &r);)
                        ROWS(sums_row)(dy + r.off, x + r.off, r.n, kw[r.j], &sw[r.j], &sdw[r.j]);
                } else {
                    for (idx_t im = w.j0; im < w.j1; im += ROWS_FC_BLOCK) {
                        idx_t off = im * F + w.f0;
                        ROWS_FC_BLOCKS(ROWS(fc_sums_dev), ROWS(min)(w.j1 - im, ROWS_FC_BLOCK), dy + off, x + off, F,
                                       kw, w.nf, sw, sdw);
                    }
                }
            }
            double acc[DNBN_MAX_GROUP][3];
            for (idx_t j = 0; j < w.nf; j++) acc[j][0] = (double)(w.j1 - w.j0), acc[j][1] = sw[j], acc[j][2] = sdw[j];
            dnbn_pass_keep(p, u, w, acc);
            if (!p->map) continue;
        }
        double a[DNBN_MAX_GROUP], b[DNBN_MAX_GROUP], c[DNBN_MAX_GROUP];
        dnbn_pass_backward_terms(p, w, a, b, c);
        if (S > 1) {
            summed = p->reduce && u + 1 < hi && pt->parts == 1;
            if (summed) { /* this unit's input delta and the next one's sums, piece by piece */
                const dnbn_unit v = dnbn_unit_at(pt, u + 1);
                cur ^= 1;
                double *kv = k[cur], *sv = s[cur], *sdv = sd[cur];
                ROWS(sums_start)(p, v, kv, sv, sdv);
                for (idx_t im = 0; im < pt->batch; im++)
                    for (idx_t j = 0; j < w.nf; j++) {
                        const idx_t ow = (im * F + w.f0 + j) * S, ov = (im * F + v.f0 + j) * S;
                        for (idx_t i = 0; i < S; i += ROWS_PIECE) {
                            const idx_t n = ROWS(min)(S - i, ROWS_PIECE), o = ow + i;
                            ROWS(backward_apply)(out + o, dy + o, x + o, n, a[j], kw[j], b[j], c[j], stream);
                            if (j < v.nf) ROWS(sums_dev)(dy + ov + i, x + ov + i, n, kv[j], &sv[j], &sdv[j]);
                        }
                    }
            } else {
                for (dnbn_unit_row r = dnbn_rows_before(pt, w); dnbn_next_row(pt, w, &r);)
                    ROWS(backward_apply)(out + r.off, dy + r.off, x + r.off, r.n, a[r.j], kw[r.j], b[r.j], c[r.j],
                                         stream);
            }
        } else {
            for (idx_t im = w.j0; im < w.j1; im += ROWS_FC_BLOCK) {
                idx_t off = im * F + w.f0;
                ROWS_FC_BLOCKS(ROWS(fc_backward), ROWS(min)(w.j1 - im, ROWS_FC_BLOCK), out + off, dy + off, x + off, F,
                               w.nf, a, kw, b, c);
            }
        }
    }
    ROWS(stream_end)(stream);
}

#define ROWS_TABLE(label) \
    { \
        .name = label, \
        .sum = ROWS(sum), \
        .sum_sq_dev = ROWS(sum_sq_dev), \
        .dot = ROWS(dot), \
        .dot_dev = ROWS(dot_dev), \
        .sums_dev = ROWS(sums_dev), \
        .shifted_sums = ROWS(shifted_sums), \
        .scale = ROWS(scale), \
        .shift = ROWS(shift), \
        .normalize = ROWS(normalize), \
        .forward_train = ROWS(forward_train), \
        .forward_infer = ROWS(forward_infer), \
        .backward_apply = ROWS(backward_apply), \
        .v_shifted_acc = ROWS(v_shifted_acc), \
        .v_sum_dot_dev = ROWS(v_sum_dot_dev), \
        .v_forward_infer = ROWS(v_forward_infer), \
        .v_backward_apply = ROWS(v_backward_apply), \
        .forward_phase = ROWS(forward_phase), \
        .backward_phase = ROWS(backward_phase), \
    }
