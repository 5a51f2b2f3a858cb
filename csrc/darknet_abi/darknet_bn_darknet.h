/*
 * darknet_bn_darknet.h - darknet_bn's fused batch-norm layer behind Darknet's
 * own layer ABI (build/libdarknet_bn_darknet.so, `make darknet-shim`).
 *
 * Darknet (pjreddie's, as Debian packages it) calls its batch-norm layer
 * functions through the PLT, from its convolutional and connected layers and
 * from the standalone [batchnorm] layer. This library defines the same two
 * functions with Darknet's own types, so that
 *
 *     LD_PRELOAD="build/libdarknet_bn_darknet.so build/libdarknet_bn.so" ./darknet_program
 *
 * (or linking it before libdarknet) runs them on darknet_bn: one fused pass
 * per phase on Darknet's own buffers instead of Darknet's eight loops. It is
 * compiled against a Darknet header (DARKNET_INCLUDE, default
 * /usr/lib/darknet/include) and must see the `layer` and `network` structs
 * exactly as the libdarknet in use was built (no -DGPU for a CPU build).
 *
 * What they compute is Darknet's darknet numerics (unbiased variance, epsilon
 * 1e-6 outside the root in forward, 1e-5 inside it in backward, running
 * statistics 0.99/0.01) with sums in double; the buffers read and written are
 * Darknet's: l.x, l.x_norm, l.mean, l.variance, l.rolling_mean,
 * l.rolling_variance, l.output, l.delta, l.scale_updates, l.bias_updates,
 * l.mean_delta, l.variance_delta, and net.delta for a [batchnorm] layer.
 *
 * Differences from Darknet's code, all where Darknet would crash:
 *   - a standalone [batchnorm] layer (l.type == BATCHNORM), whose l.x,
 *     l.x_norm, l.mean_delta and l.variance_delta Darknet never allocates,
 *     works: its input (net.input, the previous layer's output, unchanged until
 *     backward) stands in for l.x, and the NULL buffers are not written. Its
 *     scales and biases still never learn, as in Darknet (it has no update).
 *   - a layer with a size <= 0, inconsistent sizes (outputs != out_c*out_h*out_w),
 *     or a NULL buffer that the call needs: the call does nothing and returns.
 *   - backward into a NULL net.delta from a [batchnorm] layer skips the copy.
 * A training forward over a single value per channel, and backward with
 * net.train == 0 (rolling statistics), run Darknet's own sequence of the ten
 * kernels (darknet_bn's), as do layers of more than DNBN_DARKNET_STACK_CHANNELS
 * channels when their per-channel work space cannot be allocated.
 *
 * Threads: darknet_bn's setting (DARKNET_BN_NUM_THREADS, default all cores).
 */
#ifndef DARKNET_BN_DARKNET_H
#define DARKNET_BN_DARKNET_H

#include "darknet.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Darknet's forward of a batch-norm layer: a [batchnorm] layer normalizes
 * net.input into l.output; a convolutional or connected layer normalizes
 * l.output in place (its pre-activation output). Training (net.train) uses
 * the batch statistics and updates the running ones. */
void forward_batchnorm_layer(layer l, network net);

/* Darknet's backward: bias_updates += sum l.delta, scale_updates += sum
 * l.delta*x_norm, then l.delta becomes the input delta (copied to net.delta
 * for a [batchnorm] layer). */
void backward_batchnorm_layer(layer l, network net);

#ifdef __cplusplus
}
#endif

#endif /* DARKNET_BN_DARKNET_H */
