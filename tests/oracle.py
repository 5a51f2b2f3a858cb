"""Float64 oracle for darknet_bn: docs/reference.md §3 (Darknet numerics) and §4 (standard).

Independent of the package under test (it never imports darknet_bn): plain
NumPy over float64 arrays, written to be read next to the formulas of docs/reference.md.

Layout (docs/reference.md §2): an activation tensor of `batch` images, `filters` channels
and `spatial` positions is viewed as a (batch, filters, spatial) array; per-
channel vectors are (filters,) arrays; m = batch * spatial. Every function takes
arrays of any shape holding the right number of values, converts them to
float64, and returns new float64 arrays: nothing is modified in place.

Sign convention (docs/reference.md §3, §5): `delta` is -dLoss/doutput; backward is linear in
delta, so feeding +dLoss/dy gives +dLoss/dx and +dLoss/dgamma, +dLoss/dbeta.
"""

import numpy as np

# Darknet's constants (docs/reference.md §3): epsilon outside the root in forward, inside in backward.
DARKNET_FORWARD_EPS = 1e-6
DARKNET_BACKWARD_EPS = 1e-5
DARKNET_MOMENTUM = 0.01  # rolling = 0.99*rolling + 0.01*batch statistic
STANDARD_MOMENTUM = 0.1
STANDARD_EPS = 1e-5


def _act(a, batch, filters, spatial):
    """An activation buffer as a float64 (batch, filters, spatial) array."""
    a = np.asarray(a, dtype=np.float64)
    assert a.size == batch * filters * spatial, (a.shape, batch, filters, spatial)
    return a.reshape(batch, filters, spatial)


def _chan(v, filters):
    """A per-channel vector as float64 (filters,), broadcastable as (1, filters, 1) via _bc."""
    v = np.asarray(v, dtype=np.float64)
    assert v.size == filters, (v.shape, filters)
    return v.reshape(filters)


def _bc(v):
    """Per-channel (filters,) -> (1, filters, 1) for broadcasting over (batch, filters, spatial)."""
    return v.reshape(1, -1, 1)


def _chan_sum(a):
    """Sum over batch and spatial of a (batch, filters, spatial) array, per channel, float64."""
    return a.sum(axis=(0, 2))


# ============================================================================
# docs/reference.md §3: the ten Darknet kernels
# ============================================================================

def mean_cpu(x, batch, filters, spatial):
    """§3 mean_cpu: mean[f] = (1/m) Σ_{b,i} x[b,f,i]."""
    x = _act(x, batch, filters, spatial)
    m = batch * spatial
    return _chan_sum(x) / m


def variance_cpu(x, mean, batch, filters, spatial):
    """§3 variance_cpu: variance[f] = (1/(m-1)) Σ (x - mean[f])², with the mean given."""
    x = _act(x, batch, filters, spatial)
    mean = _chan(mean, filters)
    m = batch * spatial
    return _chan_sum((x - _bc(mean)) ** 2) / (m - 1)


def normalize_cpu(x, mean, variance, batch, filters, spatial):
    """§3 normalize_cpu: x <- (x - mean[f]) / (sqrt(variance[f]) + 1e-6), eps outside the root."""
    x = _act(x, batch, filters, spatial)
    mean = _chan(mean, filters)
    variance = _chan(variance, filters)
    return (x - _bc(mean)) / (np.sqrt(_bc(variance)) + DARKNET_FORWARD_EPS)


def scale_bias(output, scales, batch, n, size):
    """§3 scale_bias: output <- output * scales[f]."""
    return _act(output, batch, n, size) * _bc(_chan(scales, n))


def add_bias(output, biases, batch, n, size):
    """§3 add_bias: output <- output + biases[f]."""
    return _act(output, batch, n, size) + _bc(_chan(biases, n))


def backward_bias(bias_updates, delta, batch, n, size):
    """§3 backward_bias: bias_updates[f] += Σ delta (accumulates)."""
    return _chan(bias_updates, n) + _chan_sum(_act(delta, batch, n, size))


def backward_scale_cpu(x_norm, delta, batch, n, size, scale_updates):
    """§3 backward_scale_cpu: scale_updates[f] += Σ delta * x_norm (accumulates)."""
    prod = _act(delta, batch, n, size) * _act(x_norm, batch, n, size)
    return _chan(scale_updates, n) + _chan_sum(prod)


def mean_delta_cpu(delta, variance, batch, filters, spatial):
    """§3 mean_delta_cpu: mean_delta[f] = (Σ delta) * (-1 / sqrt(variance[f] + 1e-5)) (overwrites)."""
    delta = _act(delta, batch, filters, spatial)
    variance = _chan(variance, filters)
    return _chan_sum(delta) * (-1.0 / np.sqrt(variance + DARKNET_BACKWARD_EPS))


def variance_delta_cpu(x, delta, mean, variance, batch, filters, spatial):
    """§3 variance_delta_cpu: (Σ delta (x - mean[f])) * (-1/2) (variance[f] + 1e-5)^(-3/2) (overwrites)."""
    x = _act(x, batch, filters, spatial)
    delta = _act(delta, batch, filters, spatial)
    mean = _chan(mean, filters)
    variance = _chan(variance, filters)
    s = _chan_sum(delta * (x - _bc(mean)))
    return s * (-0.5 * (variance + DARKNET_BACKWARD_EPS) ** -1.5)


def normalize_delta_cpu(x, mean, variance, mean_delta, variance_delta, batch, filters, spatial, delta):
    """§3 normalize_delta_cpu:
    delta <- delta / sqrt(variance[f] + 1e-5) + variance_delta[f] * 2 (x - mean[f]) / m + mean_delta[f] / m.
    """
    x = _act(x, batch, filters, spatial)
    delta = _act(delta, batch, filters, spatial)
    mean = _bc(_chan(mean, filters))
    variance = _bc(_chan(variance, filters))
    mean_delta = _bc(_chan(mean_delta, filters))
    variance_delta = _bc(_chan(variance_delta, filters))
    m = batch * spatial
    return (delta / np.sqrt(variance + DARKNET_BACKWARD_EPS)
            + variance_delta * 2.0 * (x - mean) / m
            + mean_delta / m)


# ============================================================================
# Layer state, shared by both numerics
# ============================================================================

class LayerState:
    """Every buffer of a batch-norm layer, in float64, named as in docs/reference.md §8.

    Activation buffers are (batch, c, h, w); per-channel buffers are (c,).
    """

    ACTIVATIONS = ("output", "delta", "x", "x_norm")
    CHANNELS = ("scales", "biases", "scale_updates", "bias_updates", "mean", "variance",
                "rolling_mean", "rolling_variance", "mean_delta", "variance_delta")
    BUFFERS = ACTIVATIONS + CHANNELS

    def __init__(self, batch, w, h, c, numerics="darknet", eps=None, momentum=None):
        if numerics not in ("darknet", "standard"):
            raise ValueError(numerics)
        self.batch, self.w, self.h, self.c = batch, w, h, c
        self.numerics = numerics
        if numerics == "darknet":
            self.eps = None  # Darknet's fixed constants are used instead
            self.momentum = DARKNET_MOMENTUM if momentum is None else momentum
        else:
            self.eps = STANDARD_EPS if eps is None else eps
            self.momentum = STANDARD_MOMENTUM if momentum is None else momentum
        act = (batch, c, h, w)
        # docs/reference.md §3 initial state: scales 1, biases 0, rolling 0, every update/delta 0;
        # docs/reference.md §4: standard numerics' running variance starts at 1.
        for name in self.ACTIVATIONS:
            setattr(self, name, np.zeros(act))
        for name in self.CHANNELS:
            setattr(self, name, np.zeros(c))
        self.scales = np.ones(c)
        if numerics == "standard":
            self.rolling_variance = np.ones(c)
        self.trained = False  # whether the last forward was a training forward

    @property
    def dims(self):
        """(batch, filters, spatial) as the kernels take them."""
        return self.batch, self.c, self.h * self.w

    @property
    def m(self):
        return self.batch * self.h * self.w

    def copy(self):
        other = LayerState.__new__(LayerState)
        other.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v)
                               for k, v in self.__dict__.items()})
        return other

    def forward(self, inp, train=True):
        """Forward pass by the layer's numerics (darknet_forward / standard_forward); returns output."""
        if self.numerics == "darknet":
            darknet_forward(self, inp, train)
        else:
            standard_forward(self, inp, train)
        return self.output.copy()

    def backward(self, delta):
        """Backward pass by the layer's numerics; returns the delta for the previous layer."""
        if self.numerics == "darknet":
            darknet_backward(self, delta)
        else:
            standard_backward(self, delta)
        return self.delta.copy()

    def update(self, learning_rate, momentum=0.9, decay=0.0):
        """docs/reference.md §3 update (both numerics)."""
        update(self, learning_rate, momentum, decay)


def _shape_act(st, a):
    return np.asarray(a, dtype=np.float64).reshape(st.batch, st.c, st.h, st.w).copy()


# ============================================================================
# docs/reference.md §3: Darknet numerics layer
# ============================================================================

def darknet_forward(st, inp, train=True):
    """docs/reference.md §3 layer forward, in its order of effect. Mutates the LayerState `st`."""
    batch, filters, spatial = st.dims
    inp = _shape_act(st, inp)
    shape = inp.shape
    if train:
        if st.m < 2:
            raise ValueError("training needs m >= 2")
        # 1. output <- input; x <- input.
        st.x = inp.copy()
        # 2. mean, variance <- batch statistics (unbiased variance).
        st.mean = mean_cpu(inp, batch, filters, spatial)
        st.variance = variance_cpu(inp, st.mean, batch, filters, spatial)
        # 3. rolling <- (1 - momentum) rolling + momentum * batch statistic (0.99 / 0.01).
        mom = st.momentum
        st.rolling_mean = (1.0 - mom) * st.rolling_mean + mom * st.mean
        st.rolling_variance = (1.0 - mom) * st.rolling_variance + mom * st.variance
        # 4. output <- normalize(output); x_norm <- output.
        out = normalize_cpu(inp, st.mean, st.variance, batch, filters, spatial)
        st.x_norm = out.reshape(shape).copy()
        st.trained = True
    else:
        # Inference: normalize with the rolling statistics; nothing else changes.
        out = normalize_cpu(inp, st.rolling_mean, st.rolling_variance, batch, filters, spatial)
        st.trained = False
    # 5. output <- output * scales[f] + biases[f].
    out = scale_bias(out, st.scales, batch, filters, spatial)
    out = add_bias(out, st.biases, batch, filters, spatial)
    st.output = out.reshape(shape)
    return st.output.copy()


def darknet_backward(st, delta):
    """docs/reference.md §3 layer backward; `delta` is -dLoss/doutput. Returns -dLoss/dinput."""
    if not st.trained:
        raise ValueError("backward needs a training forward")
    batch, filters, spatial = st.dims
    delta = _shape_act(st, delta)
    shape = delta.shape
    # 1. bias_updates += Σ delta; scale_updates += Σ delta * x_norm.
    st.bias_updates = backward_bias(st.bias_updates, delta, batch, filters, spatial)
    st.scale_updates = backward_scale_cpu(st.x_norm, delta, batch, filters, spatial, st.scale_updates)
    # 2. delta <- delta * scales[f].
    delta = scale_bias(delta, st.scales, batch, filters, spatial)
    # 3. mean_delta, variance_delta from the batch statistics of the training forward.
    st.mean_delta = mean_delta_cpu(delta, st.variance, batch, filters, spatial)
    st.variance_delta = variance_delta_cpu(st.x, delta, st.mean, st.variance, batch, filters, spatial)
    # 4. delta <- normalize_delta(delta).
    delta = normalize_delta_cpu(st.x, st.mean, st.variance, st.mean_delta, st.variance_delta,
                                batch, filters, spatial, delta)
    st.delta = delta.reshape(shape)
    return st.delta.copy()


def update(st, learning_rate, momentum=0.9, decay=0.0):
    """docs/reference.md §3 update: biases += (lr/batch) bias_updates; bias_updates *= momentum; same for scales.

    Weight decay does not apply to scales or biases (`decay` is ignored).
    """
    step = learning_rate / st.batch
    st.biases = st.biases + step * st.bias_updates
    st.bias_updates = momentum * st.bias_updates
    st.scales = st.scales + step * st.scale_updates
    st.scale_updates = momentum * st.scale_updates


# ============================================================================
# docs/reference.md §4: standard numerics (Ioffe & Szegedy Algorithms 1 and 2; PyTorch's batch_norm)
# ============================================================================

def batch_moments(x, batch, filters, spatial):
    """Per-channel mean μ and biased variance σ²_B = (1/m) Σ (x - μ)², exact in float64."""
    x = _act(x, batch, filters, spatial)
    m = batch * spatial
    mu = _chan_sum(x) / m
    var_b = _chan_sum((x - _bc(mu)) ** 2) / m
    return mu, var_b


def standard_normalize(x, mean, var, eps, batch, filters, spatial):
    """§4: x̂ = (x - mean) / sqrt(var + eps), eps inside the root."""
    x = _act(x, batch, filters, spatial)
    return (x - _bc(_chan(mean, filters))) / np.sqrt(_bc(_chan(var, filters)) + eps)


def standard_forward(st, inp, train=True):
    """docs/reference.md §4 forward. Training: batch statistics, running stats with the m/(m-1) correction."""
    batch, filters, spatial = st.dims
    inp = _shape_act(st, inp)
    shape = inp.shape
    if train:
        m = st.m
        if m < 2:
            raise ValueError("training needs m >= 2")
        st.x = inp.copy()
        mu, var_b = batch_moments(inp, batch, filters, spatial)
        st.mean, st.variance = mu, var_b  # `variance` holds the biased one used to normalize
        mom = st.momentum
        # running_mean <- (1-momentum) running_mean + momentum μ
        st.rolling_mean = (1.0 - mom) * st.rolling_mean + mom * mu
        # running_var <- (1-momentum) running_var + momentum σ²_B m/(m-1)   (Algorithm 2)
        st.rolling_variance = (1.0 - mom) * st.rolling_variance + mom * var_b * m / (m - 1)
        xhat = standard_normalize(inp, mu, var_b, st.eps, batch, filters, spatial)
        st.x_norm = xhat.reshape(shape).copy()
        st.trained = True
    else:
        xhat = standard_normalize(inp, st.rolling_mean, st.rolling_variance, st.eps,
                                  batch, filters, spatial)
        st.trained = False
    # y = γ x̂ + β
    out = xhat * _bc(st.scales) + _bc(st.biases)
    st.output = out.reshape(shape)
    return st.output.copy()


def standard_backward(st, delta):
    """docs/reference.md §4 exact gradient of the training forward (linear in delta).

    With g = delta, x̂ the normalized input, σ² the biased batch variance:
      Σg -> bias_updates, Σ g x̂ -> scale_updates (accumulated),
      dx = γ / sqrt(σ² + eps) · (g - mean(g) - x̂ · mean(g x̂)).
    """
    if not st.trained:
        raise ValueError("backward needs a training forward")
    batch, filters, spatial = st.dims
    g = _act(delta, batch, filters, spatial)
    xhat = _act(st.x_norm, batch, filters, spatial)
    sum_g = _chan_sum(g)
    sum_gx = _chan_sum(g * xhat)
    st.bias_updates = st.bias_updates + sum_g
    st.scale_updates = st.scale_updates + sum_gx
    m = st.m
    inv_std = 1.0 / np.sqrt(st.variance + st.eps)
    dx = _bc(st.scales * inv_std) * (g - _bc(sum_g / m) - xhat * _bc(sum_gx / m))
    st.delta = dx.reshape(st.batch, st.c, st.h, st.w)
    return st.delta.copy()


def standard_forward_pure(x, gamma, beta, eps):
    """§4 training-forward output y = γ (x - μ)/sqrt(σ²_B + eps) + β of a (batch, c, h, w) array.

    A stateless function for finite differences.
    """
    x = np.asarray(x, dtype=np.float64)
    batch, c = x.shape[0], x.shape[1]
    spatial = x[0, 0].size
    mu, var_b = batch_moments(x, batch, c, spatial)
    xhat = standard_normalize(x, mu, var_b, eps, batch, c, spatial)
    y = xhat * _bc(np.asarray(gamma, np.float64)) + _bc(np.asarray(beta, np.float64))
    return y.reshape(x.shape)
