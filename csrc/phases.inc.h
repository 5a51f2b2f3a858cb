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
 * unit (a unit of a split channel starts and ends inside images).
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

/* Forward: acc[j] = {count, mean, m2} of channel f0 + j over the unit's
 * values (p->in), then xn = ((in - mh) - ml) * inv, y = xn * gamma + beta and
 * x = in over the unit, each written when the pass gives it. */
static void ROWS(forward_phase)(void *arg, idx_t lo, idx_t hi)
{
    const dnbn_pass *p = arg;
    const dnbn_part *pt = p->pt;
    const idx_t F = pt->filters, S = pt->spatial;
    const float *in = p->in;
    float *x = p->x, *xn = p->xn, *y = p->y;
    const int stream = p->trial.stream;
    for (idx_t u = lo; u < hi; u++) {
        const dnbn_unit w = dnbn_unit_at(pt, u);
        if (p->reduce) {
            double acc[DNBN_MAX_GROUP][3];
            for (idx_t j = 0; j < w.nf; j++) acc[j][0] = acc[j][1] = acc[j][2] = 0;
            if (S > 1) { /* a channel's blocks span rows: short rows share a shift and a fold */
                double k[DNBN_MAX_GROUP], s1[DNBN_MAX_GROUP], s2[DNBN_MAX_GROUP];
                idx_t n[DNBN_MAX_GROUP];
                for (idx_t j = 0; j < w.nf; j++) n[j] = 0, s1[j] = s2[j] = 0;
                for (dnbn_unit_row r = dnbn_rows_before(pt, w); dnbn_next_row(pt, w, &r);) {
                    const idx_t j = r.j;
                    for (idx_t i = 0; i < r.n;) {
                        if (n[j] == 0) k[j] = ROWS(shift_of)(in[r.off + i]);
                        idx_t m = ROWS(min)(r.n - i, ROWS_MOMENT_BLOCK - n[j]);
                        ROWS(shifted_sums)(in + r.off + i, m, k[j], &s1[j], &s2[j]);
                        i += m;
                        if ((n[j] += m) == ROWS_MOMENT_BLOCK) {
                            ROWS(fold_block)(acc[j], (double)n[j], 1.0 / (double)n[j], k[j], s1[j], s2[j]);
                            n[j] = 0, s1[j] = s2[j] = 0;
                        }
                    }
                }
                for (idx_t j = 0; j < w.nf; j++)
                    if (n[j]) ROWS(fold_block)(acc[j], (double)n[j], 1.0 / (double)n[j], k[j], s1[j], s2[j]);
            } else { /* blocks of images share a shift, the block's first image */
                double s1[DNBN_MAX_GROUP], s2[DNBN_MAX_GROUP];
                float k[DNBN_MAX_GROUP];
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
        const int light = !x && !xn; /* nothing to keep: the lighter loop, the same arithmetic */
        if (S > 1) {
            for (dnbn_unit_row r = dnbn_rows_before(pt, w); dnbn_next_row(pt, w, &r);) {
                idx_t o = r.off, j = r.j;
                if (light)
                    ROWS(forward_infer)(in + o, y + o, r.n, mh[j], ml[j], inv[j], g[j], bt[j], stream);
                else
                    ROWS(forward_train)(in + o, x ? x + o : NULL, xn ? xn + o : NULL, y ? y + o : NULL, r.n, mh[j],
                                        ml[j], inv[j], g[j], bt[j], stream);
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
}

/* Backward: acc[j] = {count, sum dy, sum dy * (x - mean)} of channel f0 + j
 * over the unit's values (dy = p->in, x = the layer's x), then the input
 * delta dy * a + (x - mean) * b + c, in double, into the layer's delta (which
 * may be dy). */
static void ROWS(backward_phase)(void *arg, idx_t lo, idx_t hi)
{
    const dnbn_pass *p = arg;
    const dnbn_part *pt = p->pt;
    const idx_t F = pt->filters, S = pt->spatial;
    const float *dy = p->in, *x = p->l->x;
    float *out = p->l->delta;
    const int stream = p->trial.stream;
    for (idx_t u = lo; u < hi; u++) {
        const dnbn_unit w = dnbn_unit_at(pt, u);
        double a[DNBN_MAX_GROUP], k[DNBN_MAX_GROUP], b[DNBN_MAX_GROUP], c[DNBN_MAX_GROUP];
        dnbn_pass_means(p, w, k);
        if (p->reduce) {
            double acc[DNBN_MAX_GROUP][3], s[DNBN_MAX_GROUP], sd[DNBN_MAX_GROUP];
            for (idx_t j = 0; j < w.nf; j++) s[j] = sd[j] = 0;
            if (S > 1) {
                for (dnbn_unit_row r = dnbn_rows_before(pt, w); dnbn_next_row(pt, w, &r);)
                    ROWS(sums_dev)(dy + r.off, x + r.off, r.n, k[r.j], &s[r.j], &sd[r.j]);
            } else {
                for (idx_t im = w.j0; im < w.j1; im += ROWS_FC_BLOCK) {
                    idx_t off = im * F + w.f0;
                    ROWS_FC_BLOCKS(ROWS(fc_sums_dev), ROWS(min)(w.j1 - im, ROWS_FC_BLOCK), dy + off, x + off, F, k,
                                   w.nf, s, sd);
                }
            }
            for (idx_t j = 0; j < w.nf; j++) acc[j][0] = (double)(w.j1 - w.j0), acc[j][1] = s[j], acc[j][2] = sd[j];
            dnbn_pass_keep(p, u, w, acc);
            if (!p->map) continue;
        }
        dnbn_pass_backward_terms(p, w, a, b, c);
        if (S > 1) {
            for (dnbn_unit_row r = dnbn_rows_before(pt, w); dnbn_next_row(pt, w, &r);)
                ROWS(backward_apply)(out + r.off, dy + r.off, x + r.off, r.n, a[r.j], k[r.j], b[r.j], c[r.j], stream);
        } else {
            for (idx_t im = w.j0; im < w.j1; im += ROWS_FC_BLOCK) {
                idx_t off = im * F + w.f0;
                ROWS_FC_BLOCKS(ROWS(fc_backward), ROWS(min)(w.j1 - im, ROWS_FC_BLOCK), out + off, dy + off, x + off, F,
                               w.nf, a, k, b, c);
            }
        }
    }
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
