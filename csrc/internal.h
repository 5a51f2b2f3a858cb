/*
 * internal.h - what the library's own sources share; not installed.
 *
 * Five pieces:
 *   - the machine-dependent choices (tuning.c);
 *   - the channel partition: how a (batch, filters, spatial) tensor is cut into
 *     work units (groups of channels, or parts of a channel when there are
 *     fewer channels than threads; tiles of channels when spatial == 1);
 *   - row primitives: the inner loops over one contiguous run of floats of one
 *     channel, their channel-vector twins for spatial == 1, and the layer's
 *     two phases that walk a work unit's rows through them; compiled twice
 *     from rows.inc.h and phases.inc.h (portable and AVX2+FMA) and chosen
 *     once at run time;
 *   - parallel_for: runs work units on the library's threads;
 *   - the merge of per-channel moments.
 * Every layer call and kernel is: validate, describe the pass, then
 * dnbn_parallel_for over the partition's units with one phase function whose
 * loop calls the loops over values (phases.inc.h for the layer, blas.c for
 * the kernels).
 */
#ifndef DARKNET_BN_INTERNAL_H
#define DARKNET_BN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "darknet_bn.h"

typedef int64_t idx_t;

/* Darknet's constants (src/blas.c): epsilon outside the root in normalize_cpu,
 * inside the root in the backward kernels. */
#define DARKNET_EPS_FORWARD 0.000001
#define DARKNET_EPS_BACKWARD 0.00001

/* The normalizers of Darknet's two forks, as functions of a channel's
 * variance (in double). pjreddie's Darknet, and darknet_bn's darknet numerics:
 * 1/(sqrt(var) + 1e-6) in normalize_cpu, 1/sqrt(var + 1e-5) in
 * normalize_delta_cpu. AlexeyAB's fork swaps where the epsilon goes:
 * 1/sqrt(var + 1e-5) in normalize_cpu, 1/(sqrt(var) + 1e-5) in
 * normalize_delta_cpu (its mean_delta_cpu and variance_delta_cpu are
 * pjreddie's). */
#include <math.h>
static inline double dnbn_pjreddie_forward_inv(double var) { return 1.0 / (sqrt(var) + DARKNET_EPS_FORWARD); }
static inline double dnbn_pjreddie_delta_inv(double var) { return 1.0 / sqrt(var + DARKNET_EPS_BACKWARD); }
static inline double dnbn_alexeyab_forward_inv(double var) { return 1.0 / sqrt(var + DARKNET_EPS_BACKWARD); }
static inline double dnbn_alexeyab_delta_inv(double var) { return 1.0 / (sqrt(var) + DARKNET_EPS_BACKWARD); }

/* The flavor of the ten kernels: which fork's normalize_cpu and
 * normalize_delta_cpu a build reproduces. pjreddie's by default; AlexeyAB's
 * with -DDNBN_FLAVOR_ALEXEYAB (make FLAVOR=alexeyab builds
 * build/libdarknet_bn_alexeyab.{a,so}). The layer is not affected: it takes
 * its numerics at run time. */
#ifdef DNBN_FLAVOR_ALEXEYAB
#define DNBN_FLAVOR "alexeyab"
#define dnbn_kernel_forward_inv dnbn_alexeyab_forward_inv
#define dnbn_kernel_delta_inv dnbn_alexeyab_delta_inv
#else
#define DNBN_FLAVOR "pjreddie"
#define dnbn_kernel_forward_inv dnbn_pjreddie_forward_inv
#define dnbn_kernel_delta_inv dnbn_pjreddie_delta_inv
#endif

/* ---- tuning (tuning.c) ----------------------------------------------------
 * The machine-dependent choices, made at run time on the machine that runs. */

/* Input bytes of a channel group: one core's L2 (or DARKNET_BN_GROUP_KB). */
idx_t dnbn_group_bytes(void);

/* The least work (element operations) worth one more thread; calibrated at
 * the first call that could use `threads` > 1 (or DARKNET_BN_MIN_WORK). */
idx_t dnbn_min_work_per_thread(int threads);

/* The timed choices of a pass (streaming stores, then the channel-group
 * size): begin returns whether to use streaming (non-temporal) stores and
 * sets trial->group_bytes, the group size of this call's partition; while a
 * choice for this kind of pass, size and thread count is still being timed it
 * starts the clock, and end stops it. Only passes whose units are channel
 * groups (`grouped`) time group sizes (the cache-derived one and its halves). */
enum { DNBN_PASS_FORWARD_TRAIN, DNBN_PASS_FORWARD_INFER, DNBN_PASS_BACKWARD, DNBN_PASS_FILL,
       DNBN_PASS_FORWARD_APPLY, DNBN_PASS_BACKWARD_APPLY, DNBN_PASSES };
enum { DNBN_STREAM_AUTO, DNBN_STREAM_ALWAYS, DNBN_STREAM_NEVER };
enum { DNBN_TIMING_NONE, DNBN_TIMING_STREAM, DNBN_TIMING_GROUP };
typedef struct dnbn_trial {
    int slot, stream;
    int timing, choice;  /* what this call times (DNBN_TIMING_*), and which group size */
    idx_t group_bytes;   /* the channel-group size this call's partition uses */
    double start;
} dnbn_trial;
int dnbn_trial_begin(dnbn_trial *trial, int pass, idx_t bytes, int threads, int layout_ok, int grouped);
void dnbn_trial_end(const dnbn_trial *trial);

/* For tests and benchmarks: fix a choice for the rest of the process. */
void dnbn_tuning_set_min_work(idx_t work);
void dnbn_tuning_set_stream(int mode);

/* Upper bound of the thread count, and so of work units per channel split. */
#define DNBN_MAX_THREADS 256

/* ---- partition -----------------------------------------------------------
 * A tensor's channels are cut into work units. Normally a unit is a group of
 * `group` consecutive channels, visited image by image: for each b the group's
 * rows lie side by side in memory, so a unit reads long contiguous stretches
 * (hardware prefetchers follow them) and a group's values fit in L2, where
 * a second pass over the unit finds them. When there are fewer channels than
 * threads, group == 1 and each channel is cut into `parts` equal pieces of
 * its m values. When spatial == 1 (a fully connected layer) a unit is a tile
 * of up to DNBN_TILE channels over the whole batch, vectorized across
 * channels, or, for a tall tensor with few channels (channels-last
 * activations), all the channels over a range of images. Unit u is piece
 * u % parts of channel group u / parts. */
#define DNBN_TILE 256
#define DNBN_MAX_GROUP DNBN_TILE
/* Split channels keep a partial per channel and part: at most this many
 * (filters * parts <= DNBN_MAX_PARTIALS whenever parts > 1), and a part of a
 * spatial == 1 tensor has at least DNBN_MIN_PART_ROWS images. */
#define DNBN_MAX_PARTIALS 1024
#define DNBN_MIN_PART_ROWS 64

typedef struct dnbn_part {
    idx_t batch, filters, spatial, m;
    int parts;   /* pieces per channel (> 1 only when group == 1, or spatial == 1 and group == filters) */
    int group;   /* channels per unit */
    int threads;
} dnbn_part;

/* A work unit: channels [f0, f0 + nf), and of each the values [j0, j1) of
 * its m = batch * spatial (value j is image j / spatial, position j % spatial). */
typedef struct dnbn_unit {
    idx_t f0, nf, j0, j1;
} dnbn_unit;

/* The partition of a pass whose units are read `reads` tensors at a time
 * (forward 1: the input; backward 2: delta and x). */
dnbn_part dnbn_partition(int batch, int filters, int spatial, int reads);
/* Whether the units of such a partition at `threads` threads are channel groups (what the group size sizes). */
int dnbn_partition_grouped(int filters, int spatial, int threads);
/* The same for `threads` threads (dnbn_threads_for of the tensor's size, which the caller has already
 * asked for) and channel groups of `group_bytes` input bytes instead of dnbn_group_bytes(). */
dnbn_part dnbn_partition_sized(int batch, int filters, int spatial, int reads, int threads, idx_t group_bytes);
dnbn_unit dnbn_unit_at(const dnbn_part *pt, idx_t unit);

/* The walk over a unit's rows when spatial > 1, in memory order: image by
 * image, channel by channel. Row (b, j) is the values [off, off + n) of image
 * b's row of channel w.f0 + j that belong to the unit (a unit of a split
 * channel starts and ends inside images):
 *   for (dnbn_unit_row r = dnbn_rows_before(pt, w); dnbn_next_row(pt, w, &r);) ...
 * Within an image only the offset moves (by spatial); the image's range of
 * positions is worked out once per image. */
typedef struct dnbn_unit_row {
    idx_t b, j, off, n;
} dnbn_unit_row;

static inline dnbn_unit_row dnbn_rows_before(const dnbn_part *pt, dnbn_unit w)
{
    dnbn_unit_row r = {w.j0 / pt->spatial - 1, w.nf - 1, 0, 0};
    return r;
}

static inline int dnbn_next_row(const dnbn_part *pt, dnbn_unit w, dnbn_unit_row *r)
{
    const idx_t S = pt->spatial;
    if (++r->j < w.nf) {
        r->off += S;
        return 1;
    }
    r->j = 0;
    if (++r->b * S >= w.j1) return 0;
    idx_t lo = w.j0 - r->b * S, hi = w.j1 - r->b * S, i0 = lo > 0 ? lo : 0, i1 = hi < S ? hi : S;
    r->off = (r->b * pt->filters + w.f0) * S + i0;
    r->n = i1 - i0;
    return 1;
}

/* ---- row primitives ----------------------------------------------------
 * Each works on n contiguous floats of one channel with scalar per-channel
 * parameters. Sums are returned in double. Both implementations evaluate the
 * same operations in the same order (no FMA contraction), so they agree bit
 * for bit; the wide one is just faster. `stream` asks for non-temporal stores
 * (see rows.inc.h): same values, less memory traffic for large tensors; the
 * caller fences once after its last row (the phases do). */
typedef struct dnbn_rows {
    const char *name;
    double (*sum)(const float *x, idx_t n);                                /* sum x */
    double (*sum_sq_dev)(const float *x, idx_t n, float c);                /* sum (x-c)^2 */
    double (*dot)(const float *a, const float *b, idx_t n);                /* sum a*b */
    double (*dot_dev)(const float *d, const float *x, idx_t n, float c);   /* sum d*(x-c) */
    void (*sums_dev)(const float *d, const float *x, idx_t n, double k, double *s,
                     double *sd); /* s += sum d, sd += sum d*(x-k) */
    void (*shifted_sums)(const float *x, idx_t n, double k, double *s1, double *s2);  /* s1 += sum(x-k), s2 += sum(x-k)^2 */
    void (*scale)(float *y, idx_t n, float s);                             /* y *= s */
    void (*shift)(float *y, idx_t n, float b);                             /* y += b */
    void (*normalize)(float *y, idx_t n, float mean, float inv);           /* y = (y-mean)*inv */
    /* xn = ((in-mh)-ml)*inv; y = xn*gamma + beta; x = in; each stored when not NULL. */
    void (*forward_train)(const float *in, float *x, float *xn, float *y, idx_t n, float mh, float ml, float inv,
                          float gamma, float beta, int stream);
    /* y = (((in-mh)-ml)*inv)*gamma + beta */
    void (*forward_infer)(const float *in, float *y, idx_t n, float mh, float ml, float inv, float gamma,
                          float beta, int stream);
    /* out = dy*a + (x-k)*b + c, evaluated in double (out may be dy) */
    void (*backward_apply)(float *out, const float *dy, const float *x, idx_t n, double a, double k, double b,
                           double c, int stream);

    /* Channel-vector twins for spatial == 1: n consecutive channels of one
     * image, per-channel parameters in arrays, per-channel double sums. */
    void (*v_shifted_acc)(const float *x, const float *k, idx_t n, double *s1, double *s2); /* s1+=x-k, s2+=(x-k)^2 */
    void (*v_sum_dot_dev)(const float *d, const float *x, const float *k, idx_t n, double *s,
                          double *sd); /* s += d, sd += d*(x-k) */
    void (*v_forward_infer)(const float *in, float *y, idx_t n, const float *mh, const float *ml, const float *inv,
                            const float *g, const float *b);
    void (*v_backward_apply)(float *out, const float *dy, const float *x, idx_t n, const double *a, const double *k,
                             const double *b, const double *c);

    /* The layer's phases (phases.inc.h), run by dnbn_parallel_for over the
     * units [lo, hi) of a pass (a dnbn_pass *). */
    void (*forward_phase)(void *pass, idx_t lo, idx_t hi);
    void (*backward_phase)(void *pass, idx_t lo, idx_t hi);
} dnbn_rows;

extern const dnbn_rows dnbn_rows_generic;
extern const dnbn_rows dnbn_rows_avx2;

/* The table for this CPU (AVX2+FMA when present, unless DARKNET_BN_SIMD=generic). */
const dnbn_rows *dnbn_rows_active(void);

/* Number of units of a partition. */
idx_t dnbn_units(const dnbn_part *pt);

/* ---- the layer's passes ----------------------------------------------
 * One layer call's description, built by batchnorm_layer.c (channels.c for
 * the public statistics) and read by the phases. A phase does, per unit, the
 * reduction when `reduce` (forward: the moments of `in`; backward: the sums
 * of dy = `in` against the layer's x) and the elementwise pass when `map`;
 * with both, the reduction is finished into the channel's numbers in between
 * (fused: one unit, both halves, while it is in cache). Fused needs whole
 * channels per unit (parts == 1); with split channels a pass first reduces
 * alone into `partial`, merges (dnbn_pass_merge), then maps alone. */
typedef struct dnbn_pass {
    dnbn_layer *l;          /* NULL only for the public statistics (reduce alone) */
    const dnbn_rows *r;
    const dnbn_part *pt;
    const float *in;        /* forward: the input (fill: x); backward: dy */
    float *x, *xn, *y;      /* forward outputs, each NULL when not written */
    int backward;           /* which phase: dnbn_pass_keep finishes moments or backward sums */
    int reduce, map;
    int infer;              /* forward map with the running statistics */
    double count;           /* values per channel in the whole (maybe sharded) batch */
    double (*partial)[3];   /* reduce alone: per channel and part [f * parts + part], channels split in parts */
    double *sums[2];        /* reduce alone, whole channels: the caller's per-channel arrays */
    dnbn_trial trial;       /* the timed choices: trial.stream, non-temporal stores */
} dnbn_pass;

/* What the phases ask of the layer (batchnorm_layer.c), once per unit w:
 * keep the unit's reduction acc[j] for channel w.f0 + j ({count, mean, m2};
 * backward {count, sum dy, sum dy*(x - mean)}) in p->partial, p->sums or,
 * when the pass maps too, the layer's statistics or gradient coefficients;
 * the numbers of the elementwise forward (the mean as a sum of two floats,
 * and the normalizer); the batch means, the shift of the backward; the
 * coefficients of the input delta. */
void dnbn_pass_keep(const dnbn_pass *p, idx_t u, dnbn_unit w, double (*acc)[3]);
/* After a reduction into p->partial: merges each channel's parts in part
 * order (moments by Chan's rule, sums by addition) and keeps the result like
 * dnbn_pass_keep does a whole channel's. */
void dnbn_pass_merge(const dnbn_pass *p);
void dnbn_pass_forward_terms(const dnbn_pass *p, dnbn_unit w, float *mh, float *ml, float *inv);
void dnbn_pass_means(const dnbn_pass *p, dnbn_unit w, double *k);
void dnbn_pass_backward_terms(const dnbn_pass *p, dnbn_unit w, double *a, double *b, double *c);

/* ---- threads -------------------------------------------------------------
 * Runs fn(ctx, lo, hi) over [0, n) in chunks, on the calling thread and on up
 * to `threads` - 1 of the pool's persistent workers (threads.c): chunks are
 * claimed from a shared counter, so a worker that wakes late does less and the
 * call never waits for a worker to wake. It returns when all chunks are done.
 * Which thread runs which chunk is not fixed. Reentrant from several caller
 * threads (a call that finds the pool busy uses threads of its own) and
 * fork-safe. If a thread cannot be created, fewer threads. When another
 * library's team is given (dnbn_set_team), the chunks run on `threads` of its
 * threads instead, and the call ends at its barrier. */
typedef void (*dnbn_range_fn)(void *ctx, idx_t lo, idx_t hi);
void dnbn_parallel_for(idx_t n, int threads, dnbn_range_fn fn, void *ctx);

/* Threads worth using for `work` element operations (at least 1). */
int dnbn_threads_for(idx_t work);

/* ---- per-channel moments -------------------------------------------------
 * acc = {n, mean, m2}: count, mean and sum of squared deviations. */

/* Merges b into a (Chan, Golub & LeVeque); the merge of dnbn_reduce. */
static inline void dnbn_moments_merge(double a[3], const double b[3])
{
    if (b[0] == 0) return;
    if (a[0] == 0) {
        a[0] = b[0], a[1] = b[1], a[2] = b[2];
        return;
    }
    double n = a[0] + b[0], d = b[1] - a[1];
    a[1] += d * (b[0] / n);
    a[2] += b[2] + d * d * (a[0] * b[0] / n);
    a[0] = n;
}

#endif /* DARKNET_BN_INTERNAL_H */
