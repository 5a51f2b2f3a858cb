/*
 * darknet_abi.c - Darknet's forward_batchnorm_layer / backward_batchnorm_layer
 * (Darknet's `layer` and `network` by value) on darknet_bn's fused layer.
 * Contract: darknet_bn_darknet.h.
 *
 * Each call describes Darknet's layer to darknet_bn as a caller-filled
 * dnbn_layer over Darknet's own buffers (no copy, no allocation up to
 * DNBN_DARKNET_STACK_CHANNELS channels) and runs one fused forward or backward.
 * The per-channel work space lives on the stack; backward rebuilds its two
 * per-channel inputs (the batch mean and the forward's normalizer) from
 * Darknet's l.mean and l.variance, as Darknet's own backward reads them.
 * What the fused layer does not cover runs Darknet's sequence of the ten
 * kernels, as Darknet's src/batchnorm_layer.c does.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "darknet_bn.h"
#include "darknet_bn_darknet.h"

#define EXPORT __attribute__((visibility("default")))

/* Channels whose work space (DNBN_SCRATCH_DOUBLES doubles each) goes on the
 * stack: 1024 channels are 40 KB. Wider layers allocate it per call. */
#define DNBN_DARKNET_STACK_CHANNELS 1024

/* Darknet's running-statistics weights: rolling = 0.99*rolling + 0.01*batch. */
#define DARKNET_MOMENTUM 0.01f

enum { STATE_TRAINING = 2 }; /* dnbn_batchnorm_layer_state: the last forward trained */

/* The tensor this layer normalizes: a [batchnorm] layer reads the previous
 * layer's output, a convolutional or connected layer its own. */
static float *layer_input(const layer *l, const network *net)
{
    return l->type == BATCHNORM ? net->input : l->output;
}

/* Sizes that describe a real tensor, and the buffers every call needs. */
static int usable(const layer *l, const network *net)
{
    if (l->batch <= 0 || l->out_c <= 0 || l->out_h <= 0 || l->out_w <= 0) return 0;
    if ((int64_t)l->out_c * l->out_h * l->out_w != (int64_t)l->outputs) return 0;
    return layer_input(l, net) && l->output && l->scales && l->biases && l->mean && l->variance &&
           l->rolling_mean && l->rolling_variance;
}

/* Darknet's layer as a dnbn_layer in darknet numerics over its buffers. */
static dnbn_layer describe(const layer *l, float *x, double *scratch)
{
    dnbn_layer bn = {
        .batch = l->batch,
        .out_c = l->out_c,
        .out_h = l->out_h,
        .out_w = l->out_w,
        .outputs = l->outputs,
        .output = l->output,
        .delta = l->delta,
        .x = x,
        .x_norm = l->x_norm,
        .scales = l->scales,
        .biases = l->biases,
        .scale_updates = l->scale_updates,
        .bias_updates = l->bias_updates,
        .mean = l->mean,
        .variance = l->variance,
        .rolling_mean = l->rolling_mean,
        .rolling_variance = l->rolling_variance,
        .mean_delta = l->mean_delta,
        .variance_delta = l->variance_delta,
        .numerics = DNBN_NUMERICS_DARKNET,
        .eps = 0.00001f,
        .momentum = DARKNET_MOMENTUM,
        .keep_x_norm = l->x_norm != NULL,
        .scratch = scratch,
    };
    return bn;
}

/* Per-channel work space: the caller's stack buffer, or an allocation for a
 * wider layer (NULL if that fails). */
static double *scratch_for(const layer *l, double *stack)
{
    if (l->out_c <= DNBN_DARKNET_STACK_CHANNELS) return stack;
    return malloc((size_t)l->out_c * DNBN_SCRATCH_DOUBLES * sizeof(double));
}

static void release(double *scratch, double *stack)
{
    if (scratch != stack) free(scratch);
}

/* ---- Darknet's own sequence of kernels (src/batchnorm_layer.c) ---- */

static void kernels_forward(const layer *l, const network *net, float *x)
{
    size_t n = (size_t)l->batch * (size_t)l->outputs;
    int spatial = l->out_h * l->out_w;
    if (l->type == BATCHNORM) memcpy(l->output, net->input, n * sizeof(float));
    if (x && x != l->output) memcpy(x, l->output, n * sizeof(float));
    if (net->train) {
        mean_cpu(l->output, l->batch, l->out_c, spatial, l->mean);
        variance_cpu(l->output, l->mean, l->batch, l->out_c, spatial, l->variance);
        for (int f = 0; f < l->out_c; f++) {
            l->rolling_mean[f] = l->rolling_mean[f] * (1 - DARKNET_MOMENTUM) + DARKNET_MOMENTUM * l->mean[f];
            l->rolling_variance[f] =
                l->rolling_variance[f] * (1 - DARKNET_MOMENTUM) + DARKNET_MOMENTUM * l->variance[f];
        }
        normalize_cpu(l->output, l->mean, l->variance, l->batch, l->out_c, spatial);
        if (l->x_norm) memcpy(l->x_norm, l->output, n * sizeof(float));
    } else {
        normalize_cpu(l->output, l->rolling_mean, l->rolling_variance, l->batch, l->out_c, spatial);
    }
    scale_bias(l->output, l->scales, l->batch, l->out_c, spatial);
    add_bias(l->output, l->biases, l->batch, l->out_c, spatial);
}

static void kernels_backward(const layer *l, const network *net, float *x)
{
    float *mean = net->train ? l->mean : l->rolling_mean;
    float *variance = net->train ? l->variance : l->rolling_variance;
    int spatial = l->out_h * l->out_w;
    /* a [batchnorm] layer has no buffers for the two per-channel partials: use local ones */
    float local[2 * DNBN_DARKNET_STACK_CHANNELS];
    float *partials = NULL;
    if (!l->mean_delta || !l->variance_delta) {
        partials = l->out_c <= DNBN_DARKNET_STACK_CHANNELS ? local : malloc(2 * (size_t)l->out_c * sizeof(float));
        if (!partials) return;
    }
    float *mean_delta = partials ? partials : l->mean_delta;
    float *variance_delta = partials ? partials + l->out_c : l->variance_delta;

    backward_bias(l->bias_updates, l->delta, l->batch, l->out_c, spatial);
    if (l->x_norm) backward_scale_cpu(l->x_norm, l->delta, l->batch, l->out_c, spatial, l->scale_updates);
    scale_bias(l->delta, l->scales, l->batch, l->out_c, spatial);
    mean_delta_cpu(l->delta, variance, l->batch, l->out_c, spatial, mean_delta);
    variance_delta_cpu(x, l->delta, mean, variance, l->batch, l->out_c, spatial, variance_delta);
    normalize_delta_cpu(x, mean, variance, mean_delta, variance_delta, l->batch, l->out_c, spatial, l->delta);
    if (l->type == BATCHNORM && net->delta)
        memcpy(net->delta, l->delta, (size_t)l->batch * (size_t)l->outputs * sizeof(float));
    if (partials != local) free(partials);
}

/* ---- the two functions Darknet calls ---- */

EXPORT void forward_batchnorm_layer(layer l, network net)
{
    if (!usable(&l, &net)) return;
    float *input = layer_input(&l, &net);
    /* a [batchnorm] layer has no l.x: its input stays as it is until backward, so it is x itself */
    float *x = l.x ? l.x : l.type == BATCHNORM ? input : NULL;
    if (!x) return;
    double stack[DNBN_DARKNET_STACK_CHANNELS * DNBN_SCRATCH_DOUBLES];
    double *scratch = scratch_for(&l, stack);
    int status = DNBN_ERR_NOMEM;
    if (scratch) {
        dnbn_layer bn = describe(&l, x, scratch);
        if (!net.train && x != input) /* Darknet keeps the input of an inference forward in l.x too */
            memcpy(x, input, (size_t)l.batch * (size_t)l.outputs * sizeof(float));
        dnbn_network bnet = {.input = input, .delta = NULL, .train = net.train};
        status = dnbn_forward_batchnorm_layer(&bn, bnet);
        release(scratch, stack);
    }
    if (status != DNBN_OK) kernels_forward(&l, &net, x); /* one value per channel, or no work space */
}

EXPORT void backward_batchnorm_layer(layer l, network net)
{
    if (!usable(&l, &net) || !l.delta || !l.bias_updates || !l.scale_updates) return;
    float *x = l.x ? l.x : l.type == BATCHNORM ? net.input : NULL;
    if (!x) return;
    double stack[DNBN_DARKNET_STACK_CHANNELS * DNBN_SCRATCH_DOUBLES];
    double *scratch = net.train ? scratch_for(&l, stack) : NULL;
    int status = DNBN_ERR_STATE;
    if (scratch) {
        dnbn_layer bn = describe(&l, x, scratch);
        /* what the training forward left for backward, from Darknet's float statistics */
        for (int f = 0; f < l.out_c; f++) {
            double *row = scratch + (size_t)f * DNBN_SCRATCH_DOUBLES;
            row[DNBN_SCRATCH_MEAN] = l.mean[f];
            row[DNBN_SCRATCH_INV] = 1.0 / (sqrt((double)l.variance[f]) + 0.000001);
        }
        bn.state = STATE_TRAINING;
        bn.trained = 1;
        dnbn_network bnet = {.input = NULL, .delta = l.type == BATCHNORM ? net.delta : NULL, .train = 1};
        status = dnbn_backward_batchnorm_layer(&bn, bnet);
        release(scratch, stack);
    }
    if (status != DNBN_OK) kernels_backward(&l, &net, x);
}
