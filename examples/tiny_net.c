/*
 * tiny_net.c - a tiny Darknet-style network trained with darknet_bn's layer API.
 *
 *   input (2) -> connected 2x32, no bias -> batchnorm (darknet_bn) -> leaky
 *             -> connected 32x2 -> softmax + cross-entropy
 *
 * The task: points of the plane around the four corners (+-1, +-1) with
 * Gaussian noise, class 0 where x*y > 0 and class 1 where x*y < 0 (XOR, which
 * no linear model separates). Everything follows Darknet: a layer's `delta`
 * holds -dLoss/dOutput, gradients accumulate in *_updates buffers, and the
 * update is Darknet's SGD with momentum and weight decay (connected_layer.c):
 *     weight_updates += -decay*batch * weights
 *     weights        += (learning_rate/batch) * weight_updates
 *     weight_updates *= momentum                       (and the same for biases, without decay)
 * The batch-norm layer is darknet_bn's: make / forward / backward / update / free.
 *
 * It prints the training loss every REPORT steps, the test accuracy in
 * inference mode (rolling statistics), then "final loss X (start Y)": X is the
 * mean loss of the last REPORT training batches, Y the loss of the first batch
 * before any update. Exit status 0 only if the loss fell at least FACTOR-fold
 * and the test accuracy is at least 90 %.
 *
 *   make build/tiny_net && build/tiny_net
 *   (or: cc -std=c11 -Icsrc examples/tiny_net.c build/libdarknet_bn.a -lm -pthread)
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "darknet_bn.h"

enum { INPUTS = 2, HIDDEN = 32, CLASSES = 2, BATCH = 32, STEPS = 2000, REPORT = 200, TEST_BATCHES = 32 };

static const float LEARNING_RATE = 0.1f;
static const float MOMENTUM = 0.9f;
static const float DECAY = 0.0005f;
static const double NOISE = 0.35;    /* standard deviation of the points around their corner */
static const double FACTOR = 4.0;     /* the loss must fall at least this much */
static const double TWO_PI = 6.283185307179586;

/* ----- a seeded random generator (splitmix64), the same on every platform ----- */

static uint64_t rng_state = 20150211u;

static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in (0, 1). */
static double rng_uniform(void)
{
    return ((double)(rng_next() >> 11) + 0.5) / 9007199254740992.0;
}

/* Standard normal (Box-Muller). */
static double rng_normal(void)
{
    return sqrt(-2.0 * log(rng_uniform())) * cos(TWO_PI * rng_uniform());
}

/* A batch of the XOR task: BATCH points (BATCH x INPUTS) and their classes. */
static void make_batch(float *x, int *label)
{
    for (int b = 0; b < BATCH; b++) {
        uint64_t corner = rng_next() >> 62;   /* two random bits */
        double cx = (corner & 1) ? 1.0 : -1.0, cy = (corner & 2) ? 1.0 : -1.0;
        x[b * INPUTS + 0] = (float)(cx + NOISE * rng_normal());
        x[b * INPUTS + 1] = (float)(cy + NOISE * rng_normal());
        label[b] = cx * cy > 0 ? 0 : 1;
    }
}

/* ----- a fully connected layer, as Darknet's connected_layer.c ----- */

typedef struct {
    int batch, inputs, outputs, has_bias;
    float *weights;        /* outputs x inputs */
    float *weight_updates;
    float *biases;         /* outputs (unused without bias) */
    float *bias_updates;
    float *output;         /* batch x outputs */
    float *delta;          /* batch x outputs: -dLoss/dOutput */
} connected_layer;

static int make_connected_layer(connected_layer *l, int batch, int inputs, int outputs, int has_bias)
{
    l->batch = batch;
    l->inputs = inputs;
    l->outputs = outputs;
    l->has_bias = has_bias;
    l->weights = calloc((size_t)inputs * (size_t)outputs, sizeof(float));
    l->weight_updates = calloc((size_t)inputs * (size_t)outputs, sizeof(float));
    l->biases = calloc((size_t)outputs, sizeof(float));
    l->bias_updates = calloc((size_t)outputs, sizeof(float));
    l->output = calloc((size_t)batch * (size_t)outputs, sizeof(float));
    l->delta = calloc((size_t)batch * (size_t)outputs, sizeof(float));
    if (!l->weights || !l->weight_updates || !l->biases || !l->bias_updates || !l->output || !l->delta) return -1;
    double scale = sqrt(2.0 / inputs);   /* Darknet's initialization: scale * uniform(-1, 1) */
    for (int i = 0; i < inputs * outputs; i++) l->weights[i] = (float)(scale * (2.0 * rng_uniform() - 1.0));
    return 0;
}

static void free_connected_layer(connected_layer *l)
{
    free(l->weights);
    free(l->weight_updates);
    free(l->biases);
    free(l->bias_updates);
    free(l->output);
    free(l->delta);
}

/* output = input * weights^T (+ biases). */
static void forward_connected_layer(connected_layer *l, const float *input)
{
    for (int b = 0; b < l->batch; b++) {
        for (int o = 0; o < l->outputs; o++) {
            float sum = l->has_bias ? l->biases[o] : 0.0f;
            for (int i = 0; i < l->inputs; i++) sum += input[b * l->inputs + i] * l->weights[o * l->inputs + i];
            l->output[b * l->outputs + o] = sum;
        }
    }
}

/* Updates from l->delta; adds -dLoss/dInput into input_delta when it is not NULL. */
static void backward_connected_layer(connected_layer *l, const float *input, float *input_delta)
{
    for (int b = 0; b < l->batch; b++) {
        for (int o = 0; o < l->outputs; o++) {
            float d = l->delta[b * l->outputs + o];
            if (l->has_bias) l->bias_updates[o] += d;
            for (int i = 0; i < l->inputs; i++) {
                l->weight_updates[o * l->inputs + i] += d * input[b * l->inputs + i];
                if (input_delta) input_delta[b * l->inputs + i] += d * l->weights[o * l->inputs + i];
            }
        }
    }
}

static void update_connected_layer(connected_layer *l, float learning_rate, float momentum, float decay)
{
    float step = learning_rate / (float)l->batch;
    if (l->has_bias) {
        for (int o = 0; o < l->outputs; o++) {
            l->biases[o] += step * l->bias_updates[o];
            l->bias_updates[o] *= momentum;
        }
    }
    for (int i = 0; i < l->inputs * l->outputs; i++) {
        l->weight_updates[i] += -decay * (float)l->batch * l->weights[i];
        l->weights[i] += step * l->weight_updates[i];
        l->weight_updates[i] *= momentum;
    }
}

/* ----- leaky activation and softmax + cross-entropy, as Darknet's ----- */

static float leaky(float x) { return x > 0 ? x : 0.1f * x; }
static float leaky_gradient(float x) { return x > 0 ? 1.0f : 0.1f; }

/* Softmax of the logits; writes -dLoss/dLogits = truth - p into delta; returns
 * the summed cross-entropy and counts the correct predictions into *correct. */
static double softmax_cross_entropy(const float *logits, const int *label, float *delta, int *correct)
{
    double loss = 0.0;
    for (int b = 0; b < BATCH; b++) {
        const float *z = logits + b * CLASSES;
        float top = z[0];
        int arg = 0;
        for (int k = 1; k < CLASSES; k++) {
            if (z[k] > top) {
                top = z[k];
                arg = k;
            }
        }
        double sum = 0.0, p[CLASSES];
        for (int k = 0; k < CLASSES; k++) sum += p[k] = exp((double)z[k] - (double)top);
        for (int k = 0; k < CLASSES; k++) {
            p[k] /= sum;
            if (delta) delta[b * CLASSES + k] = (float)((k == label[b] ? 1.0 : 0.0) - p[k]);
        }
        loss -= log(p[label[b]] > 1e-300 ? p[label[b]] : 1e-300);
        if (correct) *correct += arg == label[b];
    }
    return loss;
}

/* ----- the network ----- */

typedef struct {
    connected_layer fc1;     /* 2 -> HIDDEN, no bias: the batch norm's beta is the bias */
    dnbn_layer *bn;     /* HIDDEN channels of 1x1 */
    float act[BATCH * HIDDEN];        /* leaky(bn output) */
    float fc1_delta[BATCH * HIDDEN];  /* -dLoss/d(fc1 output), written by the batch norm's backward */
    connected_layer fc2;     /* HIDDEN -> CLASSES */
} network;

/* Forward through the whole network; returns the summed loss. With train set,
 * also backward and update. */
static double run_batch(network *n, const float *x, const int *label, int train, int *correct)
{
    dnbn_network bnet = {.input = n->fc1.output, .delta = n->fc1_delta, .train = train};

    forward_connected_layer(&n->fc1, x);
    if (dnbn_forward_batchnorm_layer(n->bn, bnet) != DNBN_OK) {
        fprintf(stderr, "dnbn_forward_batchnorm_layer failed\n");
        exit(1);
    }
    for (int i = 0; i < BATCH * HIDDEN; i++) n->act[i] = leaky(n->bn->output[i]);
    forward_connected_layer(&n->fc2, n->act);
    double loss = softmax_cross_entropy(n->fc2.output, label, train ? n->fc2.delta : NULL, correct);
    if (!train) return loss;

    /* Backward: fc2 hands -dLoss/dact to the activation, which hands it to the batch norm. */
    float act_delta[BATCH * HIDDEN] = {0};
    backward_connected_layer(&n->fc2, n->act, act_delta);
    for (int i = 0; i < BATCH * HIDDEN; i++) n->bn->delta[i] = act_delta[i] * leaky_gradient(n->bn->output[i]);
    if (dnbn_backward_batchnorm_layer(n->bn, bnet) != DNBN_OK) {   /* -dLoss/d(fc1 output) into fc1_delta */
        fprintf(stderr, "dnbn_backward_batchnorm_layer failed\n");
        exit(1);
    }
    for (int i = 0; i < BATCH * HIDDEN; i++) n->fc1.delta[i] = n->fc1_delta[i];
    backward_connected_layer(&n->fc1, x, NULL);

    update_connected_layer(&n->fc1, LEARNING_RATE, MOMENTUM, DECAY);
    dnbn_update_batchnorm_layer(n->bn, LEARNING_RATE, MOMENTUM, DECAY);
    update_connected_layer(&n->fc2, LEARNING_RATE, MOMENTUM, DECAY);
    return loss;
}

int main(void)
{
    static network n;
    if (make_connected_layer(&n.fc1, BATCH, INPUTS, HIDDEN, 0) != 0 ||
        make_connected_layer(&n.fc2, BATCH, HIDDEN, CLASSES, 1) != 0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    n.bn = dnbn_make_batchnorm_layer(BATCH, 1, 1, HIDDEN);
    if (!n.bn) {
        perror("dnbn_make_batchnorm_layer");
        return 1;
    }
    printf("tiny_net: %d -> connected %d -> batchnorm -> leaky -> connected %d -> softmax, XOR of 4 clusters, "
           "batch %d, lr %g, momentum %g, decay %g; darknet_bn %s (%s, %d threads)\n",
           INPUTS, HIDDEN, CLASSES, BATCH, (double)LEARNING_RATE, (double)MOMENTUM, (double)DECAY, dnbn_version(),
           dnbn_simd_path(), dnbn_get_num_threads());

    float x[BATCH * INPUTS];
    int label[BATCH];
    double start = 0.0, window = 0.0, last_window = 0.0;
    for (int step = 1; step <= STEPS; step++) {
        make_batch(x, label);
        double loss = run_batch(&n, x, label, 1, NULL) / BATCH;
        if (step == 1) {   /* computed before the first update */
            start = loss;
            printf("step %5d  loss %.4f (the first batch, before any update)\n", step, start);
        }
        window += loss;
        if (step % REPORT == 0) {
            last_window = window / REPORT;
            printf("step %5d  loss %.4f\n", step, last_window);
            window = 0.0;
        }
    }

    /* Inference on fresh points: the batch norm uses its rolling statistics. */
    int correct = 0;
    double test_loss = 0.0;
    for (int t = 0; t < TEST_BATCHES; t++) {
        make_batch(x, label);
        test_loss += run_batch(&n, x, label, 0, &correct);
    }
    double accuracy = (double)correct / (TEST_BATCHES * BATCH);
    printf("test (inference, rolling statistics): loss %.4f, accuracy %.1f %% of %d points\n",
           test_loss / (TEST_BATCHES * BATCH), 100.0 * accuracy, TEST_BATCHES * BATCH);
    printf("final loss %.4f (start %.4f)\n", last_window, start);

    dnbn_free_batchnorm_layer(n.bn);
    free_connected_layer(&n.fc1);
    free_connected_layer(&n.fc2);
    if (!(last_window * FACTOR <= start) || accuracy < 0.9) {
        fprintf(stderr, "tiny_net: the loss did not fall %.0f-fold (or accuracy < 90 %%)\n", FACTOR);
        return 1;
    }
    return 0;
}
