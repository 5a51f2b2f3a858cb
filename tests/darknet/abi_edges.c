/*
 * abi_edges.c - the Darknet-ABI layer (csrc/darknet_abi) on layers Darknet
 * itself would crash on: zero, negative and inconsistent sizes, NULL buffers,
 * a [batchnorm] layer without l.x, a batch of one value per channel, and
 * backward with net.train == 0. Built with AddressSanitizer + UBSan together
 * with the library's sources by tests/test_darknet.py; prints
 * "N passed, M failed" and exits nonzero on a failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "darknet_bn_darknet.h"

static int passed, failed;

static void check(int ok, const char *what)
{
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL: %s\n", what);
    }
}

/* A buffer of n floats filled with `fill`, or NULL for n == 0. */
static float *buf(size_t n, float fill)
{
    if (!n) return NULL;
    float *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++) p[i] = fill;
    return p;
}

/* A layer as Darknet's make_convolutional_layer leaves it for batch norm. */
static layer conv_layer(int batch, int c, int h, int w)
{
    layer l;
    memset(&l, 0, sizeof l);
    l.type = CONVOLUTIONAL;
    l.batch_normalize = 1;
    l.batch = batch;
    l.out_c = c, l.out_h = h, l.out_w = w;
    l.outputs = c * h * w;
    size_t n = (size_t)batch * (size_t)l.outputs;
    l.output = buf(n, 0), l.delta = buf(n, 0), l.x = buf(n, 0), l.x_norm = buf(n, 0);
    l.scales = buf((size_t)c, 1), l.biases = buf((size_t)c, 0);
    l.scale_updates = buf((size_t)c, 0), l.bias_updates = buf((size_t)c, 0);
    l.mean = buf((size_t)c, 0), l.variance = buf((size_t)c, 0);
    l.rolling_mean = buf((size_t)c, 0), l.rolling_variance = buf((size_t)c, 0);
    l.mean_delta = buf((size_t)c, 0), l.variance_delta = buf((size_t)c, 0);
    for (size_t i = 0; i < n; i++) l.output[i] = (float)((i * 7919) % 101) / 10.0f, l.delta[i] = 0.01f * (float)(i % 13);
    return l;
}

static void free_layer_bufs(layer *l)
{
    float *all[] = {l->output, l->delta, l->x, l->x_norm, l->scales, l->biases, l->scale_updates,
                    l->bias_updates, l->mean, l->variance, l->rolling_mean, l->rolling_variance,
                    l->mean_delta, l->variance_delta};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]);
}

static int all_finite(const float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(p[i])) return 0;
    return 1;
}

int main(void)
{
    network net;
    memset(&net, 0, sizeof net);
    net.train = 1;

    /* 1. a zeroed layer, and sizes that are zero, negative or inconsistent: nothing happens */
    layer zero;
    memset(&zero, 0, sizeof zero);
    forward_batchnorm_layer(zero, net);
    backward_batchnorm_layer(zero, net);
    check(1, "zeroed layer");
    int sizes[][4] = {{0, 3, 2, 2}, {2, 0, 2, 2}, {2, 3, 0, 2}, {2, 3, 2, -1}, {-4, 3, 2, 2}};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        layer l = conv_layer(2, 3, 2, 2);
        l.batch = sizes[k][0], l.out_c = sizes[k][1], l.out_h = sizes[k][2], l.out_w = sizes[k][3];
        float before = l.output[0];
        forward_batchnorm_layer(l, net);
        backward_batchnorm_layer(l, net);
        check(l.output[0] == before && l.mean[0] == 0, "bad sizes: no write");
        l.batch = 2, l.out_c = 3, l.out_h = 2, l.out_w = 2;
        free_layer_bufs(&l);
    }
    {
        layer l = conv_layer(2, 3, 2, 2);
        l.outputs = 7; /* not out_c*out_h*out_w */
        float before = l.output[5];
        forward_batchnorm_layer(l, net);
        check(l.output[5] == before, "inconsistent outputs: no write");
        free_layer_bufs(&l);
    }

    /* 2. each buffer NULL in turn: no crash, forward and backward */
    for (int which = 0; which < 14; which++) {
        layer l = conv_layer(2, 3, 2, 2);
        float **slot[] = {&l.output, &l.delta, &l.x, &l.x_norm, &l.scales, &l.biases, &l.scale_updates,
                          &l.bias_updates, &l.mean, &l.variance, &l.rolling_mean, &l.rolling_variance,
                          &l.mean_delta, &l.variance_delta};
        float *saved = *slot[which];
        *slot[which] = NULL;
        net.train = 1;
        forward_batchnorm_layer(l, net);
        backward_batchnorm_layer(l, net);
        net.train = 0;
        forward_batchnorm_layer(l, net);
        backward_batchnorm_layer(l, net);
        *slot[which] = saved;
        free_layer_bufs(&l);
        check(1, "NULL buffer");
    }
    net.train = 1;

    /* 3. a standalone [batchnorm] layer as Darknet makes it: no x, x_norm, mean_delta, variance_delta */
    {
        layer l = conv_layer(4, 3, 3, 3);
        l.type = BATCHNORM;
        free(l.x), free(l.x_norm), free(l.mean_delta), free(l.variance_delta);
        l.x = l.x_norm = l.mean_delta = l.variance_delta = NULL;
        size_t n = (size_t)l.batch * (size_t)l.outputs;
        float *in = buf(n, 0), *prev_delta = buf(n, 0);
        for (size_t i = 0; i < n; i++) in[i] = (float)(i % 17) - 3.0f;
        net.input = in;
        net.delta = prev_delta;
        forward_batchnorm_layer(l, net);
        double s = 0;
        for (int b = 0; b < l.batch; b++)
            for (int i = 0; i < 9; i++) s += l.output[(size_t)b * l.outputs + i]; /* channel 0 */
        check(fabs(s / 36) < 1e-5, "[batchnorm] forward: channel mean 0");
        check(l.rolling_variance[0] > 0, "[batchnorm] forward: running variance moves");
        backward_batchnorm_layer(l, net);
        check(all_finite(prev_delta, n) && prev_delta[1] != 0, "[batchnorm] backward: net.delta written");
        net.delta = NULL; /* layer 0: nowhere to copy */
        backward_batchnorm_layer(l, net);
        net.train = 0;
        backward_batchnorm_layer(l, net); /* Darknet's rolling-statistics backward, local partials */
        check(all_finite(l.delta, n), "[batchnorm] backward with net.train == 0");
        net.train = 1;
        net.input = NULL;
        forward_batchnorm_layer(l, net); /* no input: nothing */
        check(1, "[batchnorm] without input");
        free(in), free(prev_delta);
        free_layer_bufs(&l);
    }

    /* 4. one value per channel (batch 1, 1x1): Darknet's kernels, no crash */
    {
        layer l = conv_layer(1, 4, 1, 1);
        forward_batchnorm_layer(l, net);
        backward_batchnorm_layer(l, net);
        check(l.variance[0] == 0, "one value per channel: variance 0");
        free_layer_bufs(&l);
    }

    /* 5. more channels than the stack work space */
    {
        layer l = conv_layer(2, 1500, 1, 1);
        forward_batchnorm_layer(l, net);
        backward_batchnorm_layer(l, net);
        check(all_finite(l.output, 3000) && all_finite(l.delta, 3000), "1500 channels");
        float m = 0.5f * (l.x[0] + l.x[1500]);
        check(fabsf(l.mean[0] - m) <= 1e-6f * fabsf(m) + 1e-7f, "1500 channels: mean");
        free_layer_bufs(&l);
    }

    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
