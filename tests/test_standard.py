"""Standard numerics (docs/reference.md §4): float64 oracle, finite differences, and PyTorch."""

import numpy as np
import pytest

import darknet_bn
import oracle
from conftest import ATOL, RTOL, activations, assert_close, assert_ulps, f32, snapshot, assert_unchanged
from test_layer import make_pair, run_steps

# Slack for a central difference's own error (float64, h = 1e-5): it is ~1e-9 here, and
# the oracle's exact gradient is checked against it far tighter than this first.
FD_SLACK = 1e-6


# --------------------------------------------------------------------------- against the float64 oracle

def test_initial_state_standard():
    """Standard numerics start with running variance 1 and running mean 0, scales 1, biases 0."""
    layer = darknet_bn.BatchNormLayer(2, 3, 4, 5, numerics="standard")
    assert layer.numerics == "standard"
    assert np.all(layer.rolling_variance == 1) and np.all(layer.rolling_mean == 0)
    assert np.all(layer.scales == 1) and np.all(layer.biases == 0)
    assert np.all(layer.scale_updates == 0) and np.all(layer.bias_updates == 0)


@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (1, 3, 5, 7), (8, 6, 1, 1), (3, 1, 4, 9),
                                   (2, 32, 52, 52), (2, 1, 52, 52)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("eps,momentum", [(None, None), (1e-3, 0.3)], ids=["defaults", "eps1e-3_mom0.3"])
def test_standard_training_steps_then_inference(threads, rng, shape, eps, momentum):
    """Standard numerics through three training steps and inference match the float64 oracle."""
    kw = {}
    if eps is not None:
        kw = dict(eps=eps, momentum=momentum)
    layer, st = make_pair(shape, rng, numerics="standard", **kw)
    run_steps(layer, st, rng, shape, steps=3, darknet=False)
    x = activations(rng, shape)
    before = snapshot(layer)
    ret = layer.forward(x, train=False)
    st.forward(x, train=False)
    assert_close(ret, st.output, what="inference output")
    del before["output"]
    assert_unchanged(layer, before)


def test_standard_statistics_definitions(rng):
    """variance holds the biased batch variance; running_var uses the m/(m-1) (unbiased) one."""
    b, c, h, w = 3, 2, 2, 2   # m = 12, so m/(m-1) is a visible 9% correction
    layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics="standard", momentum=0.5)
    x = activations(rng, (b, c, h, w))
    layer.forward(x)
    xd = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
    assert_ulps(layer.mean, xd.mean(axis=1), what="mean")
    assert_ulps(layer.variance, xd.var(axis=1), what="variance (biased)")
    assert_close(layer.rolling_mean, 0.5 * xd.mean(axis=1), what="running_mean")
    assert_close(layer.rolling_variance, 0.5 * 1.0 + 0.5 * xd.var(axis=1, ddof=1), what="running_var")
    xhat = (x - xd.mean(axis=1)[None, :, None, None]) / np.sqrt(xd.var(axis=1) + 1e-5)[None, :, None, None]
    assert_close(layer.x_norm, xhat, what="x_norm")
    assert_close(layer.output, xhat, what="output")


def test_standard_inference_with_single_value(rng):
    """Inference needs no batch statistics: batch 1 of 1x1 works with the running statistics."""
    c = 5
    layer = darknet_bn.BatchNormLayer(1, 1, 1, c, numerics="standard", eps=1e-3)
    layer.rolling_mean = f32(rng.normal(size=c))
    layer.rolling_variance = f32(rng.uniform(0.5, 2, c))
    layer.scales = f32(rng.uniform(0.5, 2, c))
    layer.biases = f32(rng.normal(size=c))
    x = f32(rng.normal(size=(1, c, 1, 1)))
    y = layer.forward(x, train=False)
    want = (x.reshape(c) - layer.rolling_mean.astype(np.float64)) \
        / np.sqrt(layer.rolling_variance.astype(np.float64) + 1e-3) \
        * layer.scales.astype(np.float64) + layer.biases.astype(np.float64)
    assert_close(y, want.reshape(1, c, 1, 1), what="output")


@pytest.mark.parametrize("offset_std", [30.0, 100.0])
def test_standard_large_offsets(rng, offset_std):
    """Standard numerics meet docs/reference.md §6 for channel means up to 100 std from zero."""
    shape = (4, 5, 6, 7)
    layer, st = make_pair(shape, rng, numerics="standard")
    run_steps(layer, st, rng, shape, steps=2, offset_std=offset_std, darknet=False)


# --------------------------------------------------------------------------- finite differences

def _central_difference(f, a, h=1e-5):
    """∂f/∂a by central differences, elementwise over the float64 array a."""
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        ap, am = a.copy(), a.copy()
        ap[idx] += h
        am[idx] -= h
        g[idx] = (f(ap) - f(am)) / (2 * h)
    return g


@pytest.mark.parametrize("shape,eps,offset", [((2, 3, 2, 3), 1e-5, 0.0), ((3, 2, 1, 4), 1e-2, 0.0),
                                              ((2, 2, 3, 3), 1e-5, 20.0), ((5, 3, 1, 1), 0.1, 1.0)],
                         ids=["small", "eps1e-2", "offset20", "fc_eps0.1"])
def test_gradients_match_finite_differences(rng, shape, eps, offset):
    """dL/dx, dL/dγ, dL/dβ of L = Σ w·y: oracle and implementation match central differences."""
    b, c, h, w = shape
    x = activations(rng, shape, offset_std=offset) if offset else f32(rng.standard_normal(shape))
    gamma = f32(rng.uniform(0.5, 2.0, c))
    beta = f32(rng.normal(size=c))
    wgt = f32(rng.standard_normal(shape))          # dL/dy
    xd, gd, bd, wd = (a.astype(np.float64) for a in (x, gamma, beta, wgt))

    def loss(xx=xd, gg=gd, bb=bd):
        return float(np.sum(wd * oracle.standard_forward_pure(xx, gg, bb, eps)))

    fd_x = _central_difference(lambda a: loss(xx=a), xd)
    fd_g = _central_difference(lambda a: loss(gg=a), gd)
    fd_b = _central_difference(lambda a: loss(bb=a), bd)

    # The float64 oracle's exact gradient agrees with the finite differences.
    st = oracle.LayerState(b, w, h, c, numerics="standard", eps=eps)
    st.scales, st.biases = gd.copy(), bd.copy()
    st.forward(x)
    st.backward(wgt)
    assert_close(st.delta, fd_x, rtol=1e-6, atol=1e-7, what="oracle dL/dx")
    assert_close(st.scale_updates, fd_g, rtol=1e-6, atol=1e-7, what="oracle dL/dgamma")
    assert_close(st.bias_updates, fd_b, rtol=1e-6, atol=1e-7, what="oracle dL/dbeta")

    # The implementation's float32 gradients (passing +dL/dy gives +dL/dx, +dL/dγ, +dL/dβ).
    layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics="standard", eps=eps)
    layer.scales, layer.biases = gamma, beta
    layer.forward(x)
    dx = layer.backward(wgt)
    assert_close(dx, fd_x, rtol=RTOL, atol=ATOL + FD_SLACK, what="dL/dx")
    assert_close(layer.scale_updates, fd_g, rtol=RTOL, atol=ATOL + FD_SLACK, what="dL/dgamma")
    assert_close(layer.bias_updates, fd_b, rtol=RTOL, atol=ATOL + FD_SLACK, what="dL/dbeta")


# --------------------------------------------------------------------------- PyTorch

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("eps,momentum", [(1e-5, 0.1), (1e-3, 0.25)], ids=["defaults", "eps1e-3_mom0.25"])
def test_against_torch_batch_norm(rng, dtype, eps, momentum):
    """Outputs, input/γ/β gradients, running stats over steps and inference match torch autograd."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    tdt = getattr(torch, dtype)
    # A float32 torch is itself within docs/reference.md §6 of exact, so two such results differ by at most twice that.
    k = 2.0 if dtype == "float32" else 1.0
    rtol, atol = k * RTOL, k * ATOL
    b, c, h, w = 4, 3, 5, 6
    lr, sgd_momentum = 0.1, 0.9
    gamma0 = f32(rng.uniform(0.5, 2.0, c))
    beta0 = f32(rng.normal(size=c))
    layer = darknet_bn.BatchNormLayer(b, w, h, c, numerics="standard", eps=eps, momentum=momentum)
    layer.scales, layer.biases = gamma0, beta0
    gamma = torch.tensor(gamma0, dtype=tdt, requires_grad=True)
    beta = torch.tensor(beta0, dtype=tdt, requires_grad=True)
    run_mean = torch.zeros(c, dtype=tdt)
    run_var = torch.ones(c, dtype=tdt)
    buf_g = torch.zeros(c, dtype=tdt)   # Darknet's scale_updates / bias_updates, emulated
    buf_b = torch.zeros(c, dtype=tdt)
    for step in range(3):
        x = activations(rng, (b, c, h, w))
        wgt = f32(rng.standard_normal((b, c, h, w)))   # L = Σ wgt·y, so dL/dy = wgt
        xt = torch.tensor(x, dtype=tdt, requires_grad=True)
        y = F.batch_norm(xt, run_mean, run_var, gamma, beta, training=True, momentum=momentum, eps=eps)
        (y * torch.tensor(wgt, dtype=tdt)).sum().backward()

        out = layer.forward(x)
        assert_close(out, y.detach().double().numpy(), rtol=rtol, atol=atol, what=f"step {step} output")
        assert_close(layer.rolling_mean, run_mean.double().numpy(), rtol=rtol, atol=atol,
                     what=f"step {step} running_mean")
        assert_close(layer.rolling_variance, run_var.double().numpy(), rtol=rtol, atol=atol,
                     what=f"step {step} running_var")
        # Darknet's convention: delta = -dL/dy in, -dL/dx out, -dL/dγ, -dL/dβ accumulated.
        dx = layer.backward(-wgt)
        assert_close(-dx.astype(np.float64), xt.grad.double().numpy(), rtol=rtol, atol=atol,
                     what=f"step {step} dL/dx")
        with torch.no_grad():
            buf_g += -gamma.grad
            buf_b += -beta.grad
        assert_close(layer.scale_updates, buf_g.double().numpy(), rtol=rtol, atol=atol,
                     what=f"step {step} scale_updates")
        assert_close(layer.bias_updates, buf_b.double().numpy(), rtol=rtol, atol=atol,
                     what=f"step {step} bias_updates")
        # Darknet's update: γ += lr/batch · updates; updates *= momentum (gradient descent on L).
        layer.update(lr, sgd_momentum)
        with torch.no_grad():
            gamma += lr / b * buf_g
            beta += lr / b * buf_b
            buf_g *= sgd_momentum
            buf_b *= sgd_momentum
            gamma.grad = None
            beta.grad = None
        assert_close(layer.scales, gamma.detach().double().numpy(), rtol=rtol, atol=atol, what="scales")
        assert_close(layer.biases, beta.detach().double().numpy(), rtol=rtol, atol=atol, what="biases")

    x = activations(rng, (b, c, h, w))
    with torch.no_grad():
        y = F.batch_norm(torch.tensor(x, dtype=tdt), run_mean, run_var, gamma, beta,
                         training=False, momentum=momentum, eps=eps)
    out = layer.forward(x, train=False)
    assert_close(out, y.double().numpy(), rtol=rtol, atol=atol, what="inference output")
