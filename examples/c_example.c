/*
 * c_example.c - darknet_bn from C: Darknet's kernels by their Darknet names,
 * then one training step and an inference pass of the layer.
 *
 *   make build/c_example && build/c_example
 *   (or: cc -Icsrc examples/c_example.c build/libdarknet_bn.a -lm -pthread)
 */
#include <stdio.h>

#include "darknet_bn.h"

int main(void)
{
    enum { BATCH = 2, FILTERS = 2, SPATIAL = 3 };
    /* NCHW: element (b, f, i) at (b*FILTERS + f)*SPATIAL + i */
    float x[BATCH * FILTERS * SPATIAL] = {1, 2, 3, 10, 20, 30, 4, 5, 6, 40, 50, 60};
    float mean[FILTERS], variance[FILTERS];

    mean_cpu(x, BATCH, FILTERS, SPATIAL, mean);                 /* 3.5, 35 */
    variance_cpu(x, mean, BATCH, FILTERS, SPATIAL, variance);   /* unbiased: 3.5, 350 */
    normalize_cpu(x, mean, variance, BATCH, FILTERS, SPATIAL);  /* in place */
    printf("mean     %g %g\nvariance %g %g\nx_norm  ", mean[0], mean[1], variance[0], variance[1]);
    for (int i = 0; i < BATCH * FILTERS * SPATIAL; i++) printf(" %.4f", x[i]);
    printf("\n");

    /* The layer: one training step, then inference with the running statistics. */
    dnbn_layer *l = dnbn_make_batchnorm_layer(BATCH, SPATIAL, 1, FILTERS);
    if (!l) return 1;
    float input[BATCH * FILTERS * SPATIAL] = {1, 2, 3, 10, 20, 30, 4, 5, 6, 40, 50, 60};
    float input_delta[BATCH * FILTERS * SPATIAL];
    dnbn_network net = {.input = input, .delta = input_delta, .train = 1};
    if (dnbn_forward_batchnorm_layer(l, net) != DNBN_OK) return 1;
    for (int i = 0; i < BATCH * FILTERS * SPATIAL; i++) l->delta[i] = 0.05f * (float)(i % 4); /* -dLoss/dy from the next layer */
    if (dnbn_backward_batchnorm_layer(l, net) != DNBN_OK) return 1;
    dnbn_update_batchnorm_layer(l, 0.1f, 0.9f, 0.0f);
    printf("bias_updates %g %g (after momentum), biases %g %g\n", l->bias_updates[0], l->bias_updates[1],
           l->biases[0], l->biases[1]);
    printf("rolling_mean %g %g, rolling_variance %g %g\n", l->rolling_mean[0], l->rolling_mean[1],
           l->rolling_variance[0], l->rolling_variance[1]);
    net.train = 0;
    if (dnbn_forward_batchnorm_layer(l, net) != DNBN_OK) return 1;
    printf("inference output[0] %g, path %s, threads %d\n", l->output[0], dnbn_simd_path(), dnbn_get_num_threads());
    dnbn_free_batchnorm_layer(l);
    return 0;
}
