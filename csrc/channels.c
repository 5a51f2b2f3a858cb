/*
 * channels.c - cutting a tensor into per-channel work units (the partition
 * every layer phase and kernel runs over), and the public per-channel
 * moments of a tensor.
 */
#include <math.h>

#include "internal.h"

int dnbn_partition_grouped(int filters, int spatial, int threads) { return spatial > 1 && filters >= threads; }

dnbn_part dnbn_partition(int batch, int filters, int spatial, int reads)
{
    idx_t work = batch > 0 && filters > 0 && spatial > 0 ? (idx_t)batch * spatial * filters : 0;
    return dnbn_partition_sized(batch, filters, spatial, reads, dnbn_threads_for(work), dnbn_group_bytes());
}

dnbn_part dnbn_partition_sized(int batch, int filters, int spatial, int reads, int threads, idx_t group_bytes)
{
    dnbn_part pt = {0};
    if (batch <= 0 || filters <= 0 || spatial <= 0) return pt;
    pt.batch = batch;
    pt.filters = filters;
    pt.spatial = spatial;
    pt.m = (idx_t)batch * spatial;
    pt.threads = threads;
    pt.parts = 1;
    pt.group = 1;
    if (spatial == 1) {
        /* a tall tensor whose images are at most a tile wide (channels-last
         * activations: N*H*W images of C channels), on several threads: every
         * unit takes whole images, about four ranges of them per thread (a
         * thread that joins late finds some left), so that it reads
         * contiguous memory; otherwise tiles of channels over all the images,
         * shared among the threads in multiples of 8 */
        idx_t tall_parts = DNBN_MAX_PARTIALS / filters;
        if (tall_parts > 4 * (idx_t)pt.threads) tall_parts = 4 * (idx_t)pt.threads;
        if (tall_parts > batch / DNBN_MIN_PART_ROWS) tall_parts = batch / DNBN_MIN_PART_ROWS;
        if (filters <= DNBN_TILE && pt.threads > 1 && tall_parts > 1) {
            pt.group = filters;
            pt.parts = (int)tall_parts;
            return pt;
        }
        idx_t per_thread = ((filters + pt.threads - 1) / pt.threads + 7) / 8 * 8;
        pt.group = (int)(per_thread < DNBN_TILE ? per_thread : DNBN_TILE);
        return pt;
    }
    if (!dnbn_partition_grouped(filters, spatial, pt.threads)) { /* fewer channels than threads */
        idx_t parts = (pt.threads + filters - 1) / filters;
        pt.parts = (int)(parts < pt.m ? parts : pt.m);
        return pt;
    }
    /* the tensors a group's passes read about fill a core's L2, so that its
     * second pass finds them there, while each image's rows of the group make
     * one long contiguous stretch (measured: 192 KB groups were 10-30 % slower
     * than 1 MB ones on a 1 MB-L2 AMD machine; on a 2 MB-L2 Intel one the
     * backward, which reads two tensors twice, was 13 % faster with 256 KB
     * groups than with 2 MB ones, the forward the same) */
    idx_t group = group_bytes / (pt.m * (idx_t)sizeof(float) * (reads > 1 ? reads : 1));
    if (pt.threads > 1) { /* about eight units per thread, for threads that join late */
        idx_t balanced = filters / (8 * (idx_t)pt.threads);
        if (group > balanced) group = balanced;
    }
    if (group > 64) group = 64; /* enough to make each image's stretch long */
    pt.group = group < 1 ? 1 : (int)group;
    return pt;
}

/* An empty partition (a size <= 0) has no units. */
idx_t dnbn_units(const dnbn_part *pt)
{
    return pt->group > 0 ? (pt->filters + pt->group - 1) / pt->group * pt->parts : 0;
}

dnbn_unit dnbn_unit_at(const dnbn_part *pt, idx_t unit)
{
    idx_t p = unit % pt->parts, f0 = unit / pt->parts * pt->group, nf = pt->filters - f0;
    dnbn_unit w = {f0, nf < pt->group ? nf : pt->group, pt->m * p / pt->parts, pt->m * (p + 1) / pt->parts};
    return w;
}

/* ---- public statistics: the layer's forward phase, reduction alone ---- */

void dnbn_batchnorm_moments(const float *x, int batch, int filters, int spatial, double *mean, double *m2)
{
    if (filters <= 0 || !mean || !m2) return;
    if (batch <= 0 || spatial <= 0) { /* a shard without values: count 0, mean 0, m2 0 */
        for (idx_t f = 0; f < filters; f++) mean[f] = m2[f] = 0;
        return;
    }
    if (!x) return;
    dnbn_part pt = dnbn_partition(batch, filters, spatial, 1);
    double partial[DNBN_MAX_PARTIALS][3]; /* per channel and part, when channels are split in parts */
    dnbn_pass p = {.r = dnbn_rows_active(), .pt = &pt, .in = x, .reduce = 1, .sums = {mean, m2},
                   .partial = pt.parts > 1 ? partial : NULL, .trial = {.slot = -1}};
    dnbn_parallel_for(dnbn_units(&pt), pt.threads, p.r->forward_phase, &p);
    if (p.partial) dnbn_pass_merge(&p);
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
