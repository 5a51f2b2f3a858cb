/*
 * darknet_bn.h - batch normalization on the CPU, in the Darknet style.
 *
 * The one public header of darknet_bn. It declares:
 *
 *   1. Darknet's ten batch-norm kernels, under Darknet's own names, argument
 *      orders and types, so a Darknet-style network can link them in place of
 *      its own (src/blas.c, src/batchnorm_layer.c, src/convolutional_layer.c).
 *   2. The same kernels' straightforward reference loops (suffix _ref).
 *   3. A batch-norm layer over a struct with Darknet's field names:
 *      make / forward / backward / update / free.
 *   4. The statistics phase on its own, so per-channel partial moments from
 *      several processes can be combined before normalizing.
 *   5. Library settings: thread count, instruction-set path, version, errors.
 *
 * Names. Only the ten kernels carry Darknet's names, with Darknet's signatures
 * and meaning; everything else the library exports is prefixed dnbn_ (the
 * layer mirrors Darknet's function names: dnbn_forward_batchnorm_layer for
 * Darknet's forward_batchnorm_layer, over dnbn_layer and dnbn_network), so
 * linking or preloading darknet_bn next to Darknet never binds one of
 * Darknet's calls to another signature. Darknet's own layer ABI is a separate
 * library: csrc/darknet_abi/darknet_bn_darknet.h.
 *
 * Memory layout. Every activation buffer is float32, NCHW, contiguous: element
 * (b, f, i) of a tensor with `batch` images, `filters` channels and `spatial`
 * (= h*w) positions is at index (b*filters + f)*spatial + i. A fully connected
 * layer is spatial == 1. Per-channel vectors hold `filters` floats. m denotes
 * batch*spatial, the number of values per channel. Index arithmetic inside the
 * library is 64-bit, so a tensor may hold more than 2^31 elements.
 *
 * Sign convention (Darknet's): `delta` holds -dLoss/dOutput, and the *_updates
 * buffers accumulate (+=) sums of it. Backward is linear in delta.
 *
 * Accuracy. Sums over a channel are accumulated in double precision (Darknet's
 * float accumulators lose everything on data with a large offset).
 *
 * Threads. Work is split over channels, and inside channels when there are
 * fewer channels than threads; for a given thread count results are
 * deterministic. Kernels are reentrant and never allocate, print or exit.
 *
 * Worked example, a training step of a layer (error checks omitted):
 *
 *     dnbn_layer *l = dnbn_make_batchnorm_layer(8, 52, 52, 128);
 *     dnbn_network net = { .input = x, .delta = dx, .train = 1 };
 *     dnbn_forward_batchnorm_layer(l, net);        // l->output is y
 *     // ... the next layer writes -dLoss/dy into l->delta ...
 *     dnbn_backward_batchnorm_layer(l, net);       // dx = -dLoss/dx
 *     dnbn_update_batchnorm_layer(l, 0.01f, 0.9f, 0.0005f);
 *     dnbn_free_batchnorm_layer(l);
 */
#ifndef DARKNET_BN_H
#define DARKNET_BN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is compiled with -fvisibility=hidden: what this header declares
 * is its whole exported API, and nothing internal can clash with a symbol of
 * the program (such as Darknet's own) that links it. The Python extension,
 * built with DNBN_HIDDEN_API, exports none of it (only its init function). */
#if defined(__GNUC__) && !defined(DNBN_HIDDEN_API)
#pragma GCC visibility push(default)
#define DNBN_VISIBILITY_PUSHED
#endif

/* --- cdef begin --- (darknet_bn/_ffi_build.py reads from here to "cdef end") */

/* Status codes returned by the functions that can fail. */
#define DNBN_OK 0            /* success */
#define DNBN_ERR_ARG 1       /* an argument is out of range (size, count, NULL) */
#define DNBN_ERR_NOMEM 2     /* memory could not be allocated */
#define DNBN_ERR_STATE 3     /* the call does not fit the layer's state */

/* Numerics of a layer (see README): Darknet's quirks, or the paper's/PyTorch's. */
#define DNBN_NUMERICS_DARKNET 0
#define DNBN_NUMERICS_STANDARD 1

/* Doubles of per-channel work space a layer needs (times out_c). Row f of
 * l->scratch starts with the last training forward's batch mean (in double)
 * and its normalizer (1/(sqrt(var) + 1e-6), or 1/sqrt(var + eps) in standard
 * numerics); the rest is backward's. */
#define DNBN_SCRATCH_DOUBLES 5
#define DNBN_SCRATCH_MEAN 0
#define DNBN_SCRATCH_INV 1


/* ===== 1. Darknet's kernels ==============================================
 * Sizes: a kernel called with batch, filters/n, or spatial/size <= 0 does
 * nothing. Pointers must be valid for the sizes given; an output must not
 * overlap an input except where the kernel works in place. */

/* mean[f] = (1/m) * sum over b, i of x[b, f, i].  Overwrites mean. */
void mean_cpu(float *x, int batch, int filters, int spatial, float *mean);

/* variance[f] = (1/(m-1)) * sum (x - mean[f])^2, the unbiased estimate (a
 * Darknet quirk). Overwrites variance; m == 1 gives variance 0. */
void variance_cpu(float *x, float *mean, int batch, int filters, int spatial, float *variance);

/* In place: x = (x - mean[f]) / (sqrt(variance[f]) + 1e-6).
 * Darknet quirk: epsilon outside the square root. (AlexeyAB flavor:
 * x = (x - mean[f]) / sqrt(variance[f] + 1e-5); see dnbn_kernel_flavor.) */
void normalize_cpu(float *x, float *mean, float *variance, int batch, int filters, int spatial);

/* In place: output[b, f, i] *= scales[f]. */
void scale_bias(float *output, float *scales, int batch, int n, int size);

/* In place: output[b, f, i] += biases[f]. */
void add_bias(float *output, float *biases, int batch, int n, int size);

/* Accumulates: bias_updates[f] += sum over b, i of delta[b, f, i]. */
void backward_bias(float *bias_updates, float *delta, int batch, int n, int size);

/* Accumulates: scale_updates[f] += sum delta * x_norm. */
void backward_scale_cpu(float *x_norm, float *delta, int batch, int n, int size, float *scale_updates);

/* Overwrites: mean_delta[f] = (sum delta) * (-1 / sqrt(variance[f] + 1e-5)). */
void mean_delta_cpu(float *delta, float *variance, int batch, int filters, int spatial, float *mean_delta);

/* Overwrites: variance_delta[f] =
 *   (sum delta * (x - mean[f])) * (-1/2) * (variance[f] + 1e-5)^(-3/2). */
void variance_delta_cpu(float *x, float *delta, float *mean, float *variance, int batch, int filters,
                        int spatial, float *variance_delta);

/* In place: delta = delta / sqrt(variance[f] + 1e-5)
 *                 + variance_delta[f] * 2 * (x - mean[f]) / m + mean_delta[f] / m.
 * Darknet quirk: epsilon inside the square root here, outside in forward.
 * (AlexeyAB flavor: delta / (sqrt(variance[f]) + 1e-5) in the first term.) */
void normalize_delta_cpu(float *x, float *mean, float *variance, float *mean_delta, float *variance_delta,
                         int batch, int filters, int spatial, float *delta);

/* ===== 2. Reference kernels ================================================
 * The same ten kernels written as Darknet writes its loops (one scalar loop
 * nest, no threads, no vectors) but with double accumulators. The baseline of
 * the benchmarks and a second oracle in the tests. Same contracts as above. */

void mean_cpu_ref(float *x, int batch, int filters, int spatial, float *mean);
void variance_cpu_ref(float *x, float *mean, int batch, int filters, int spatial, float *variance);
void normalize_cpu_ref(float *x, float *mean, float *variance, int batch, int filters, int spatial);
void scale_bias_ref(float *output, float *scales, int batch, int n, int size);
void add_bias_ref(float *output, float *biases, int batch, int n, int size);
void backward_bias_ref(float *bias_updates, float *delta, int batch, int n, int size);
void backward_scale_cpu_ref(float *x_norm, float *delta, int batch, int n, int size, float *scale_updates);
void mean_delta_cpu_ref(float *delta, float *variance, int batch, int filters, int spatial, float *mean_delta);
void variance_delta_cpu_ref(float *x, float *delta, float *mean, float *variance, int batch, int filters,
                            int spatial, float *variance_delta);
void normalize_delta_cpu_ref(float *x, float *mean, float *variance, float *mean_delta, float *variance_delta,
                             int batch, int filters, int spatial, float *delta);

/* ===== 3. The layer ======================================================== */

/* The layer. Field names are Darknet's. Activation buffers hold
 * batch*outputs floats, per-channel ones out_c. dnbn_make_batchnorm_layer allocates
 * them all; a caller may instead fill in a zeroed struct itself with its own
 * buffers (memory = NULL, scratch = DNBN_SCRATCH_DOUBLES * out_c doubles,
 * then dnbn_batchnorm_layer_set_numerics) and never call dnbn_free_batchnorm_layer on
 * it. x may point at the input itself: forward then does not copy it. In such
 * a layer x_norm may be NULL when keep_x_norm is zero, and mean_delta and
 * variance_delta may be NULL (they are then not written); batch may be 0 (a
 * shard without values, for the phases of section 4). Every layer function
 * returns DNBN_ERR_ARG and writes nothing for a layer whose sizes are not
 * batch >= 0, out_c, out_h, out_w >= 1 and outputs == out_c*out_h*out_w, or
 * whose buffers the call needs are NULL. */
typedef struct dnbn_layer {
    int batch;              /* images per batch */
    int out_c, out_h, out_w; /* channels, height, width (input shape = output shape) */
    int outputs;            /* out_c*out_h*out_w, values per image */

    float *output;          /* y, written by forward */
    float *delta;           /* -dLoss/dy, written by the next layer; backward turns it into -dLoss/dx */
    float *x;               /* copy of the input of the last training forward */
    float *x_norm;          /* normalized input of the last training forward */
    float *scales;          /* gamma, starts at 1 */
    float *biases;          /* beta, starts at 0 */
    float *scale_updates;   /* accumulated sum delta * x_norm */
    float *bias_updates;    /* accumulated sum delta */
    float *mean;            /* batch mean of the last training forward */
    float *variance;        /* variance used to normalize in the last training forward:
                               unbiased (darknet numerics) or biased (standard) */
    float *rolling_mean;    /* running mean, starts at 0 */
    float *rolling_variance; /* running variance, starts at 0 (darknet) or 1 (standard) */
    float *mean_delta;      /* dLoss/dmean of the last backward (darknet numerics) */
    float *variance_delta;  /* dLoss/dvariance of the last backward (darknet numerics) */

    int numerics;           /* DNBN_NUMERICS_DARKNET or DNBN_NUMERICS_STANDARD */
    float eps;              /* standard numerics: the epsilon inside the root */
    float momentum;         /* weight of the batch statistic in the running ones */
    int keep_x_norm;        /* nonzero (default): training forward writes x_norm, as Darknet does;
                               zero: it does not (one stream less), see dnbn_batchnorm_layer_fill_x_norm */
    int state;              /* internal: what the last forward was (see dnbn_batchnorm_layer_state) */
    int trained;            /* internal: a training forward has run since make or set_numerics */
    int x_norm_current;     /* nonzero when x_norm holds the last training forward's normalized input:
                               set by a training forward with keep_x_norm and by
                               dnbn_batchnorm_layer_fill_x_norm, cleared by one without */
    double *scratch;        /* internal: per-channel double work space */
    void *memory;           /* internal: the one allocation every buffer above is carved from */
} dnbn_layer;

/* What forward and backward read from the network, as Darknet's `network`
 * carries them. */
typedef struct dnbn_network {
    float *input;           /* forward: batch*outputs floats (may be l->output itself) */
    float *delta;           /* backward: where -dLoss/dx also goes; NULL to keep it in l->delta only */
    int train;              /* nonzero: training (batch statistics); zero: inference */
} dnbn_network;

/* Allocates a layer for `batch` images of c channels of h x w, with Darknet's
 * initial state and darknet numerics. Returns NULL with errno = EINVAL for a
 * size <= 0 or one whose element count does not fit, ENOMEM when memory runs
 * out. Every buffer forward and backward touch is allocated here. */
dnbn_layer *dnbn_make_batchnorm_layer(int batch, int w, int h, int c);

/* Frees the layer and all its buffers. NULL is allowed. */
void dnbn_free_batchnorm_layer(dnbn_layer *l);

/* Chooses the numerics with their epsilon (> 0, standard numerics only; darknet
 * numerics use Darknet's constants) and momentum (in [0, 1]; the weight of the
 * batch statistic: 0.01 for Darknet's 0.99/0.01, 0.1 for PyTorch's default).
 * Resets the running statistics to the numerics' initial values. */
int dnbn_batchnorm_layer_set_numerics(dnbn_layer *l, int numerics, float eps, float momentum);

/* Forward. Training: batch statistics, running statistics updated, x and
 * x_norm kept for backward; needs m = batch*h*w >= 2 (DNBN_ERR_ARG otherwise,
 * nothing written). Inference: running statistics; only output is written. */
int dnbn_forward_batchnorm_layer(dnbn_layer *l, dnbn_network net);

/* Backward of the last training forward: bias_updates += sum delta,
 * scale_updates += sum delta*x_norm, then l->delta becomes -dLoss/dx (and is
 * copied to net.delta when that is not NULL). DNBN_ERR_STATE if the last
 * forward was not a training forward or net.train is zero. */
int dnbn_backward_batchnorm_layer(dnbn_layer *l, dnbn_network net);

/* Like dnbn_backward_batchnorm_layer, with -dLoss/dy read from `delta_in` instead of
 * l->delta (delta_in may be l->delta); -dLoss/dx is written to l->delta. */
int dnbn_backward_batchnorm_layer_from(dnbn_layer *l, float *delta_in);

/* Darknet's SGD step for scales and biases: biases += (learning_rate/batch) *
 * bias_updates; bias_updates *= momentum; the same for scales. `decay` is
 * accepted for Darknet's signature and ignored (no decay on these). */
int dnbn_update_batchnorm_layer(dnbn_layer *l, float learning_rate, float momentum, float decay);

/* What the last forward was: DNBN_STATE_NONE (no forward yet),
 * DNBN_STATE_INFERENCE or DNBN_STATE_TRAINING. */
#define DNBN_STATE_NONE 0
#define DNBN_STATE_INFERENCE 1
#define DNBN_STATE_TRAINING 2
int dnbn_batchnorm_layer_state(const dnbn_layer *l);

/* Writes x_norm of the last training forward from x, bit for bit what that
 * forward writes with keep_x_norm set. DNBN_ERR_STATE before any training
 * forward. */
int dnbn_batchnorm_layer_fill_x_norm(dnbn_layer *l);

/* ===== 4. Phases, for a batch split across processes =====================
 * dnbn_forward_batchnorm_layer and dnbn_backward_batchnorm_layer_from are each a local
 * reduction, then an elementwise pass. The same phases are public, so that a
 * batch sharded over several processes (synchronized batch norm) can combine
 * its statistics in between:
 *
 *   forward:  dnbn_batchnorm_moments(local input)          -> mean, m2 (count = batch*h*w)
 *             dnbn_batchnorm_moments_combine over shards    -> global count, mean, m2
 *             dnbn_batchnorm_layer_forward_moments(l, input, count, mean, m2)
 *   backward: dnbn_batchnorm_layer_backward_sums(l, delta, sum_dy, sum_dy_dev)
 *             add sum_dy and sum_dy_dev over shards
 *             dnbn_batchnorm_layer_backward_apply(l, delta, count, sum_dy, sum_dy_dev)
 *
 * With one shard this is exactly the fused forward and backward. Moments are
 * in double: count n, mean, and m2 = sum (x - mean)^2, accurate for any offset. */

/* Overwrites mean[f] and m2[f] (filters doubles each). A shard without values
 * (batch or spatial <= 0) gives mean = m2 = 0, its count being 0. */
void dnbn_batchnorm_moments(const float *x, int batch, int filters, int spatial, double *mean, double *m2);

/* Merges shard b into shard a (Chan et al.): n_a values with mean_a, m2_a and
 * n_b values with mean_b, m2_b; mean_a and m2_a are overwritten. */
void dnbn_batchnorm_moments_combine(int filters, double n_a, double *mean_a, double *m2_a, double n_b,
                               const double *mean_b, const double *m2_b);

/* A training forward with the given (global) statistics: count values per
 * channel with mean and m2 (filters doubles each). Sets mean, variance, the
 * running statistics, x, x_norm (if kept) and output, as a training forward.
 * DNBN_ERR_ARG if count < 2. */
int dnbn_batchnorm_layer_forward_moments(dnbn_layer *l, float *input, double count, const double *mean,
                                    const double *m2);

/* Backward phase 1: overwrites sum_dy[f] = sum delta_in and
 * sum_dy_dev[f] = sum delta_in*(x - mean) over the local batch (filters doubles
 * each). Writes nothing in the layer, and reads only x and the scratch (its
 * delta and update buffers may be NULL). DNBN_ERR_STATE as backward. */
int dnbn_batchnorm_layer_backward_sums(dnbn_layer *l, float *delta_in, double *sum_dy, double *sum_dy_dev);

/* Backward phase 2: with the sums over all count values per channel, does what
 * dnbn_backward_batchnorm_layer_from does after its sums: updates, mean_delta,
 * variance_delta, and -dLoss/dx of the local batch into l->delta. */
int dnbn_batchnorm_layer_backward_apply(dnbn_layer *l, float *delta_in, double count, const double *sum_dy,
                                   const double *sum_dy_dev);

/* The inference normalizer of n channels with the given (running) variances,
 * as the layer's inference forward computes it (in double, from its float
 * running variance): darknet numerics 1/(sqrt(variance) + 1e-6) (eps unused),
 * standard 1/sqrt(variance + eps) (eps >= 0 and finite). inv[f] = that;
 * DNBN_ERR_ARG for other numerics, a bad eps, n < 0 or NULL arrays when n > 0.
 * The Python folding (darknet_bn.fold) and the PyTorch modules read it here,
 * so the formula lives in one place. */
int dnbn_batchnorm_normalizer(int numerics, double eps, const double *variance, int n, double *inv);

/* ===== 5. Settings ========================================================= */

/* Threads used by every kernel and layer call. Default: the cores this process
 * may run on, or the environment variable DARKNET_BN_NUM_THREADS when set.
 * DNBN_ERR_ARG for n < 1; n above 256 is clamped. */
int dnbn_set_num_threads(int n);
int dnbn_get_num_threads(void);

/* Another library's thread team for the parallel calls, in place of the
 * library's own pool of sleeping workers: run(body, arg, threads, 0) must call
 * body(arg) on `threads` threads at once, the calling thread among them, and
 * return when all have returned. That is GOMP_parallel's contract, so the
 * GOMP_parallel of the OpenMP runtime already in the process (libgomp, or
 * LLVM's libomp) can be passed as it is. In a process where another library
 * keeps an OpenMP team spinning between its calls (PyTorch), that team is
 * awake and on the cores, where the pool's workers would first have to win a
 * core from it; darknet_bn.torch passes PyTorch's. NULL returns to the pool,
 * and a forked child starts with the pool. */
typedef void (*dnbn_team_run)(void (*body)(void *), void *arg, unsigned threads, unsigned flags);
void dnbn_set_team(dnbn_team_run run);
/* The team given (NULL: the pool). */
dnbn_team_run dnbn_get_team(void);

/* The instruction-set path chosen at run time: "avx2" or "generic".
 * DARKNET_BN_SIMD=generic forces the portable path. */
const char *dnbn_simd_path(void);

/* The choices the library made for this machine, as a JSON object written
 * into buf (at most size bytes, NUL-terminated; like snprintf, returns the
 * length the whole text needs): instruction-set path, cache sizes, channel
 * group bytes, the least work per extra thread with the measured wake-up time
 * it comes from, and the streaming-store decisions taken so far. Each choice
 * has an environment override: DARKNET_BN_SIMD=generic,
 * DARKNET_BN_GROUP_KB=<KiB>, DARKNET_BN_MIN_WORK=<values>,
 * DARKNET_BN_STREAM=auto|always|never (docs/reference.md §5). */
int dnbn_tuning_report(char *buf, int size);

/* The library version, "MAJOR.MINOR.PATCH". */
const char *dnbn_version(void);

/* Whose arithmetic normalize_cpu and normalize_delta_cpu (and their _ref
 * twins) follow: "pjreddie" (the default build: 1/(sqrt(var) + 1e-6) and
 * 1/sqrt(var + 1e-5)) or "alexeyab" (build/libdarknet_bn_alexeyab.*, make
 * FLAVOR=alexeyab: 1/sqrt(var + 1e-5) and 1/(sqrt(var) + 1e-5)). The other
 * eight kernels and the layer are the same in every build. */
const char *dnbn_kernel_flavor(void);

/* A static message for a status code. */
const char *dnbn_strerror(int status);

/* --- cdef end --- */

#ifdef DNBN_VISIBILITY_PUSHED
#pragma GCC visibility pop
#undef DNBN_VISIBILITY_PUSHED
#endif

#ifdef __cplusplus
}
#endif

#endif /* DARKNET_BN_H */
