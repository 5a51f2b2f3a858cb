/*
 * count_instructions.c - a fixed workload for instruction counts under
 * valgrind --tool=callgrind (make count-instructions): one thread, a layer of
 * the given shape, `reps` training steps (forward, backward) and inference
 * forwards on fixed data. Instruction counts do not depend on the machine's
 * load, so they compare two versions of the library where timings cannot.
 *
 *   count_instructions BATCH CHANNELS H W [REPS]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "darknet_bn.h"

/* One function per call kind, so that callgrind counts each on its own. */
__attribute__((noinline)) static void train_forward(dnbn_layer *l, float *in)
{
    dnbn_forward_batchnorm_layer(l, (dnbn_network){.input = in, .delta = NULL, .train = 1});
}

__attribute__((noinline)) static void train_backward(dnbn_layer *l, float *dy) { dnbn_backward_batchnorm_layer_from(l, dy); }

__attribute__((noinline)) static void infer_forward(dnbn_layer *l, float *in)
{
    dnbn_forward_batchnorm_layer(l, (dnbn_network){.input = in, .delta = NULL, .train = 0});
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: count_instructions BATCH CHANNELS H W [REPS]\n");
        return 2;
    }
    int b = atoi(argv[1]), c = atoi(argv[2]), h = atoi(argv[3]), w = atoi(argv[4]);
    int reps = argc > 5 ? atoi(argv[5]) : 10;
    dnbn_set_num_threads(1);
    dnbn_layer *l = dnbn_make_batchnorm_layer(b, w, h, c);
    if (!l || reps < 1) {
        fprintf(stderr, "count_instructions: bad shape or reps\n");
        return 2;
    }
    dnbn_batchnorm_layer_set_numerics(l, DNBN_NUMERICS_STANDARD, 1e-5f, 0.1f);
    size_t n = (size_t)b * (size_t)l->outputs;
    float *in = malloc(n * sizeof *in), *dy = malloc(n * sizeof *dy);
    if (!in || !dy) return 2;
    unsigned s = 12345;
    for (size_t i = 0; i < n; i++) {
        s = s * 1103515245u + 12345u;
        in[i] = (float)((s >> 9) % 2001) / 1000.0f - 1.0f + (float)(i % 7);
        dy[i] = (float)((s >> 3) % 1001) / 500.0f - 1.0f;
    }
    double check = 0;
    for (int r = 0; r < reps; r++) {
        train_forward(l, in);
        train_backward(l, dy);
        infer_forward(l, in);
        check += l->output[r % n] + l->delta[(r * 7) % n];
    }
    printf("%dx%dx%dx%d, %d reps, %zu values per call (check %.6g)\n", b, c, h, w, reps, n, check);
    free(in);
    free(dy);
    dnbn_free_batchnorm_layer(l);
    return 0;
}
