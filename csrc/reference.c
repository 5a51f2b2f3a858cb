/*
 * reference.c - Darknet's batch-norm loops as Darknet writes them (src/blas.c):
 * one scalar loop nest per kernel, no threads, no vectors; only the
 * accumulators are double, as docs/reference.md §6 requires. The baseline of the
 * benchmarks and a second oracle in the tests.
 */
#include <math.h>

#include "internal.h"

#define AT(b, f, i) (((idx_t)(b) * filters + (f)) * spatial + (i))

/* The divisor of normalize_cpu and the factor of normalize_delta_cpu, as each
 * fork writes them (see the flavor in internal.h). */
#ifdef DNBN_FLAVOR_ALEXEYAB
#define REF_NORMALIZE_DIVISOR(v) sqrtf((v) + .00001f)
#define REF_DELTA_FACTOR(v) (1. / (sqrt((double)(v)) + DARKNET_EPS_BACKWARD))
#else
#define REF_NORMALIZE_DIVISOR(v) (sqrtf(v) + .000001f)
#define REF_DELTA_FACTOR(v) (1. / sqrt((double)(v) + DARKNET_EPS_BACKWARD))
#endif

/* Like the main kernels, a call with a size <= 0 does nothing. */
#define RETURN_IF_EMPTY(batch, filters, spatial)                                                            \
    if ((batch) <= 0 || (filters) <= 0 || (spatial) <= 0) return

void mean_cpu_ref(float *x, int batch, int filters, int spatial, float *mean)
{
    RETURN_IF_EMPTY(batch, filters, spatial);
    double scale = 1.0 / ((double)batch * spatial);
    for (int f = 0; f < filters; ++f) {
        double sum = 0;
        for (int b = 0; b < batch; ++b)
            for (int i = 0; i < spatial; ++i) sum += x[AT(b, f, i)];
        mean[f] = (float)(sum * scale);
    }
}

void variance_cpu_ref(float *x, float *mean, int batch, int filters, int spatial, float *variance)
{
    RETURN_IF_EMPTY(batch, filters, spatial);
    idx_t m = (idx_t)batch * spatial;
    for (int f = 0; f < filters; ++f) {
        double sum = 0;
        for (int b = 0; b < batch; ++b)
            for (int i = 0; i < spatial; ++i) {
                double d = (double)x[AT(b, f, i)] - mean[f];
                sum += d * d;
            }
        variance[f] = m < 2 ? 0.0f : (float)(sum / (double)(m - 1));
    }
}

void normalize_cpu_ref(float *x, float *mean, float *variance, int batch, int filters, int spatial)
{
    RETURN_IF_EMPTY(batch, filters, spatial);
    for (int b = 0; b < batch; ++b)
        for (int f = 0; f < filters; ++f)
            for (int i = 0; i < spatial; ++i) {
                idx_t index = AT(b, f, i);
                x[index] = (float)(((double)x[index] - mean[f]) / REF_NORMALIZE_DIVISOR(variance[f])); /* no overflow of x - mean */
            }
}

void scale_bias_ref(float *output, float *scales, int batch, int n, int size)
{
    RETURN_IF_EMPTY(batch, n, size);
    int filters = n, spatial = size;
    for (int b = 0; b < batch; ++b)
        for (int f = 0; f < filters; ++f)
            for (int i = 0; i < spatial; ++i) output[AT(b, f, i)] *= scales[f];
}

void add_bias_ref(float *output, float *biases, int batch, int n, int size)
{
    RETURN_IF_EMPTY(batch, n, size);
    int filters = n, spatial = size;
    for (int b = 0; b < batch; ++b)
        for (int f = 0; f < filters; ++f)
            for (int i = 0; i < spatial; ++i) output[AT(b, f, i)] += biases[f];
}

void backward_bias_ref(float *bias_updates, float *delta, int batch, int n, int size)
{
    RETURN_IF_EMPTY(batch, n, size);
    int filters = n, spatial = size;
    for (int f = 0; f < filters; ++f) {
        double sum = 0;
        for (int b = 0; b < batch; ++b)
            for (int i = 0; i < spatial; ++i) sum += delta[AT(b, f, i)];
        bias_updates[f] = (float)((double)bias_updates[f] + sum);
    }
}

void backward_scale_cpu_ref(float *x_norm, float *delta, int batch, int n, int size, float *scale_updates)
{
    RETURN_IF_EMPTY(batch, n, size);
    int filters = n, spatial = size;
    for (int f = 0; f < filters; ++f) {
        double sum = 0;
        for (int b = 0; b < batch; ++b)
            for (int i = 0; i < spatial; ++i) sum += (double)delta[AT(b, f, i)] * x_norm[AT(b, f, i)];
        scale_updates[f] = (float)((double)scale_updates[f] + sum);
    }
}

void mean_delta_cpu_ref(float *delta, float *variance, int batch, int filters, int spatial, float *mean_delta)
{
    RETURN_IF_EMPTY(batch, filters, spatial);
    for (int f = 0; f < filters; ++f) {
        double sum = 0;
        for (int b = 0; b < batch; ++b)
            for (int i = 0; i < spatial; ++i) sum += delta[AT(b, f, i)];
        mean_delta[f] = (float)(sum * (-1. / sqrt((double)variance[f] + DARKNET_EPS_BACKWARD)));
    }
}

void variance_delta_cpu_ref(float *x, float *delta, float *mean, float *variance, int batch, int filters,
                            int spatial, float *variance_delta)
{
    RETURN_IF_EMPTY(batch, filters, spatial);
    for (int f = 0; f < filters; ++f) {
        double sum = 0;
        for (int b = 0; b < batch; ++b)
            for (int i = 0; i < spatial; ++i)
                sum += (double)delta[AT(b, f, i)] * ((double)x[AT(b, f, i)] - mean[f]);
        variance_delta[f] = (float)(sum * -.5 * pow((double)variance[f] + DARKNET_EPS_BACKWARD, -1.5));
    }
}

void normalize_delta_cpu_ref(float *x, float *mean, float *variance, float *mean_delta, float *variance_delta,
                             int batch, int filters, int spatial, float *delta)
{
    RETURN_IF_EMPTY(batch, filters, spatial);
    double m = (double)batch * spatial;
    for (int b = 0; b < batch; ++b)
        for (int f = 0; f < filters; ++f)
            for (int i = 0; i < spatial; ++i) {
                idx_t index = AT(b, f, i);
                delta[index] = (float)(delta[index] * REF_DELTA_FACTOR(variance[f]) +
                                       variance_delta[f] * 2. * ((double)x[index] - mean[f]) / m +
                                       mean_delta[f] / m);
            }
}
