"""darknet_bn.torch at the edges: copies and checkpoints, double backward, TorchScript, tracing,
torch.compile, torch.fx and quantization fusion, saved-tensor hooks, the default dtype, device
contexts and dispatch modes, each against torch.nn.BatchNorm1d/2d.

Tolerances. Float32 tensors are compared elementwise with
|got - want| <= 2e-5*|want| + 2e-5 (``RTOL``/``ATOL``, as tests/test_torch.py:
docs/reference.md §6's 1e-5 + 1e-5 doubled, since PyTorch's own float32 result is
the reference, not an exact one). A few SGD steps of a small CNN (lr 0.05, no
momentum) stay far inside that bound (measured: differences exceed 2e-5*|want|
by at most 1e-8), and its losses agree to rel 1e-5 (measured ~1e-7).

Second derivatives get an absolute term scaled by the tensor's largest magnitude,
2e-5*max(1, max|want|) (``close_scaled``): every element of a batch-norm
gradient is a combination of per-channel sums over batch*spatial products,
whose float32 rounding is proportional to the largest terms of the sum, not to
the element. PyTorch's own float32 double backward differs from its float64 one
by up to ~2e-6 of the largest value in these tests, so the bound leaves about 10x;
both darknet_bn's and PyTorch's float32 results are compared with the float64 one.

Paths that are the very same computation on both sides (a copy against its
original, a loaded module against the saved one, scripted against scripted,
fused weights) are compared exactly.

"The C path" is counted by wrapping darknet_bn.torch's autograd Function
(forward) and its three backward routes (``_train_backward``, ``_eval_backward``:
C layer or plain first-order torch ops; ``_graph_backward``: the differentiable
one for create_graph=True).
"""
import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")

import darknet_bn.torch as dbt  # noqa: E402
from conftest import assert_close  # noqa: E402

nn = torch.nn
# TorchScript is deprecated in this PyTorch; scripting and tracing are still tested, quietly.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
RTOL = ATOL = 2e-5  # see the module docstring
SCALED = 2e-5  # second derivatives: times max(1, max|want|), see the module docstring


# --------------------------------------------------------------------------- helpers

def close(got, want, what="value", rtol=RTOL, atol=ATOL):
    """Elementwise |got - want| <= rtol*|want| + atol, same dtype and shape (None matches None only)."""
    if want is None:
        assert got is None, f"{what}: expected None"
        return
    assert got is not None, f"{what}: got None"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert_close(got.detach().double().numpy(), want.detach().double().numpy(), rtol, atol, what)


def close_scaled(got, want, what="value"):
    """``close`` with the absolute term SCALED * max(1, max|want|) (second derivatives, module docstring)."""
    scale = max(1.0, float(want.detach().abs().max())) if want is not None and want.numel() else 1.0
    close(got.to(want.dtype) if got is not None and want is not None else got, want, what, SCALED, SCALED * scale)


def equal(got, want, what="value"):
    """Bit-for-bit equality of two tensors (or None and None)."""
    if want is None:
        assert got is None, f"{what}: expected None"
        return
    assert got is not None and got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(got.detach(), want.detach()), f"{what}: not identical"


def data(shape, seed, offset=2.0):
    """float32 activations with a per-channel offset and scale."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    bshape = [1, c] + [1] * (len(shape) - 2)
    scale = (0.5 + 1.5 * torch.rand(c, generator=g)).view(bshape)
    off = (offset * torch.randn(c, generator=g)).view(bshape)
    return off + scale * torch.randn(shape, generator=g)


def pair(cls, num_features, seed=0, **kwargs):
    """(torch module, darknet_bn module) with the same random parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    ref = getattr(nn, cls)(num_features, **kwargs)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.copy_(0.5 + torch.rand(num_features, generator=g))
            ref.bias.copy_(torch.randn(num_features, generator=g))
        if ref.running_mean is not None:
            ref.running_mean.copy_(torch.randn(num_features, generator=g))
            ref.running_var.copy_(0.5 + torch.rand(num_features, generator=g))
    mine = getattr(dbt, cls)(num_features, **kwargs)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


class CNN(nn.Module):
    """A small CNN of torch.nn parts: conv1-bn1-relu, pool, fc-bn2-relu, out."""

    def __init__(self, momentum=0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, momentum=momentum)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 6 * 6, 16)
        self.bn2 = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.relu(self.bn1(self.conv1(x))), 2).flatten(1)
        return self.out(torch.relu(self.bn2(self.fc(x))))


def cnn_pair(seed=0, momentum=0.1):
    """(stock CNN, converted deep copy of it): same parameters and buffers."""
    torch.manual_seed(seed)
    ref = CNN(momentum)
    with torch.no_grad():  # non-trivial batch-norm parameters and running statistics
        for bn in (ref.bn1, ref.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
    mine = dbt.convert_model(copy.deepcopy(ref))
    assert type(mine.bn1) is dbt.BatchNorm2d and type(mine.bn2) is dbt.BatchNorm1d
    return ref, mine


def batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g) * 2 + 1, torch.randint(0, 5, (n,), generator=g)


def train_step(model, x, target, lr=0.05):
    """One SGD step (no momentum) on cross entropy; returns the loss."""
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    return loss.item()


def snapshot(module):
    """Copies of every parameter, gradient and buffer, by name."""
    snap = {k: v.detach().clone() for k, v in module.state_dict().items()}
    snap.update({k + ".grad": p.grad.clone() for k, p in module.named_parameters() if p.grad is not None})
    return snap


def assert_snapshot(module, snap, what):
    now = snapshot(module)
    assert list(now) == list(snap), f"{what}: parameters, gradients or buffers appeared or vanished"
    for k, v in snap.items():
        equal(now[k], v, f"{what}: {k} changed")


def compare_models(got_model, want_model, what, rtol=RTOL, atol=ATOL):
    """Every parameter and buffer (running statistics, num_batches_tracked) of two models agree."""
    got, want = got_model.state_dict(), want_model.state_dict()
    assert list(got) == list(want), what
    for k in want:
        if k.endswith("num_batches_tracked"):
            equal(got[k], want[k], f"{what}: {k}")
        else:
            close(got[k], want[k], f"{what}: {k}", rtol, atol)


def storages(module):
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


@pytest.fixture
def paths(monkeypatch):
    """Counts the C layer's forward (by training flag) and each backward route of darknet_bn.torch."""
    calls = {"forward": [], "train_backward": 0, "eval_backward": 0, "graph_backward": 0}
    forward = dbt._forward

    def counting_forward(*args):
        calls["forward"].append(args[5])
        return forward(*args)

    monkeypatch.setattr(dbt, "_forward", counting_forward)
    for name in ("train_backward", "eval_backward", "graph_backward"):
        original = getattr(dbt, "_" + name)

        def counting(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(dbt, "_" + name, counting)
    return calls


def cdata_in(obj, seen=None):
    """Paths to cffi objects reachable through a module's attributes, containers and submodules."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, dbt.ffi.CData):
        return ["<cdata>"]
    found = []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple, set)):
        items = enumerate(obj)
    elif isinstance(obj, nn.Module):
        items = vars(obj).items()
    else:
        return []
    for k, v in items:
        found += [f"{k}.{p}" for p in cdata_in(v, seen)]
    return found


# --------------------------------------------------------------------------- 1. copies and checkpoints

@pytest.mark.parametrize("cls,shape", [("BatchNorm2d", (6, 5, 7, 9)), ("BatchNorm1d", (16, 12))], ids=["2d", "1d"])
def test_deepcopy_module_is_independent(cls, shape, paths):
    """deepcopy of a trained module: nothing shared; same outputs; training the copy leaves the original alone."""
    ref, mine = pair(cls, shape[1])
    x, dy = data(shape, 1), data(shape, 2, 0.3)
    mine(x.requires_grad_()).backward(dy)  # state before the copy: a step taken, gradients present
    ref(x).backward(dy)
    twin = copy.deepcopy(mine)
    assert type(twin) is type(mine) and twin is not mine
    assert not storages(twin) & storages(mine), "the copy shares memory with the original"
    assert not cdata_in(twin) and not cdata_in(mine), "a C-layer object is stored in the module"
    before = snapshot(mine)

    x2, dy2 = data(shape, 3), data(shape, 4, 0.3)
    with torch.no_grad():  # eval: same input, same output as the original (same computation)
        twin.eval()
        mine.eval()
        equal(twin(x2), mine(x2), "eval output of the copy")
        twin.train()
        mine.train()
    assert_snapshot(mine, before, "eval on the copy")
    twin.zero_grad()
    y = twin(x2.clone().requires_grad_())  # training forward/backward/step on the copy only
    y.backward(dy2)
    with torch.no_grad():
        for p in twin.parameters():
            p -= 0.1 * p.grad
    assert_snapshot(mine, before, "training the copy")
    assert int(twin.num_batches_tracked) == int(mine.num_batches_tracked) + 1

    # The copy computes as torch.nn does (the stock module took the same two steps).
    ref.zero_grad()
    y_ref = ref(x2.clone().requires_grad_())
    y_ref.backward(dy2)
    close(y, y_ref, "copy's training output")
    close(twin.bias.grad, ref.bias.grad, "copy's bias gradient")
    close(twin.running_mean, ref.running_mean, "copy's running_mean")
    assert paths["forward"] == [True, False, False, True] and paths["train_backward"] == 2


def test_deepcopy_converted_model(paths):
    """deepcopy of a converted CNN: working, independent; its training equals the stock model's."""
    ref, mine = cnn_pair()
    x, target = batch()
    train_step(ref, x, target)
    train_step(mine, x, target)
    twin = copy.deepcopy(mine)
    assert type(twin.bn1) is dbt.BatchNorm2d and type(twin.bn2) is dbt.BatchNorm1d
    assert not storages(twin) & storages(mine)
    before = snapshot(mine)
    twin.eval()
    mine.eval()
    with torch.no_grad():
        equal(twin(x), mine(x), "eval logits of the copy")
    twin.train()
    mine.train()
    losses_twin = [train_step(twin, x, target) for _ in range(3)]
    assert_snapshot(mine, before, "training the copy")
    losses_ref = [train_step(ref, x, target) for _ in range(3)]
    assert losses_twin == pytest.approx(losses_ref, rel=1e-5)
    compare_models(twin, ref, "copy after 4 steps")
    assert paths["forward"].count(True) == 2 * 4 and paths["train_backward"] == 2 * 4


def test_module_state_has_no_c_objects_and_pickles():
    """After training and eval forward/backward no cffi object is stored in a module, and it pickles."""
    _, mine = cnn_pair()
    x, target = batch()
    train_step(mine, x, target)
    mine.eval()
    xe = x.clone().requires_grad_()
    mine(xe).sum().backward()
    assert not cdata_in(mine)
    clone = pickle.loads(pickle.dumps(mine))
    with torch.no_grad():
        equal(clone(x), mine(x), "unpickled eval logits")


def test_torch_save_load_whole_model(paths):
    """torch.save/torch.load(weights_only=False) of a trained converted CNN: same classes, state and results."""
    ref, mine = cnn_pair(momentum=None)  # num_batches_tracked matters for the cumulative average
    x, target = batch()
    for _ in range(2):
        train_step(ref, x, target)
        train_step(mine, x, target)
    buf = io.BytesIO()
    torch.save(mine, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.bn1) is dbt.BatchNorm2d and type(loaded.bn2) is dbt.BatchNorm1d and loaded.training
    assert loaded.bn1.momentum is None
    assert not storages(loaded) & storages(mine)
    for k, v in mine.state_dict().items():
        equal(loaded.state_dict()[k], v, f"loaded {k}")
    assert int(loaded.bn1.num_batches_tracked) == 2
    paths["forward"].clear()
    # Training continues identically (the cumulative average uses num_batches_tracked = 3).
    assert train_step(loaded, x, target) == train_step(mine, x, target)
    for k, v in mine.state_dict().items():
        equal(loaded.state_dict()[k], v, f"after a step {k}")
    assert paths["forward"] == [True, True] * 2  # the loaded model runs the C layer
    train_step(ref, x, target)
    compare_models(loaded, ref, "loaded vs torch.nn after 3 steps")


def test_state_dict_checkpoint_into_fresh_and_stock_models():
    """A saved state_dict (weights_only load) restores a fresh converted CNN and a stock one exactly."""
    ref, mine = cnn_pair(momentum=None)
    x, target = batch()
    for _ in range(3):
        train_step(mine, x, target)
    buf = io.BytesIO()
    torch.save(mine.state_dict(), buf)
    fresh_mine = dbt.convert_model(CNN(momentum=None))
    fresh_stock = CNN(momentum=None)
    for model in (fresh_mine, fresh_stock):
        buf.seek(0)
        model.load_state_dict(torch.load(buf, weights_only=True))
        for k, v in mine.state_dict().items():
            equal(model.state_dict()[k], v, f"{type(model.bn1).__module__} {k}")
        assert int(model.bn2.num_batches_tracked) == 3
    for model in (mine, fresh_mine, fresh_stock):
        model.eval()
    with torch.no_grad():
        equal(fresh_mine(x), mine(x), "fresh converted model, eval")
        close(fresh_stock(x), mine(x), "stock model, eval")
    for model in (mine, fresh_mine, fresh_stock):
        model.train()
    # One more training step: same losses and running statistics (cumulative average at step 4).
    losses = [train_step(m, x, target) for m in (mine, fresh_mine, fresh_stock)]
    assert losses[0] == losses[1] and losses[2] == pytest.approx(losses[0], rel=1e-5)
    compare_models(fresh_stock, mine, "stock after a step")


# --------------------------------------------------------------------------- 2. double backward

def second_order(module, x, seed=5):
    """First-order gradients of L = sum(v * tanh(y)) with create_graph, then the gradient of
    S = <u, dL/dx> + <a, dL/dweight> + <b, dL/dbias> with respect to x, weight and bias."""
    g = torch.Generator().manual_seed(seed)
    c = x.shape[1]
    v, u = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    a, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    v, u, a, b = (t.to(x.dtype) for t in (v, u, a, b))
    x = x.detach().clone().requires_grad_()
    loss = (v * torch.tanh(module(x))).sum()
    params = [p for p in (module.weight, module.bias) if p is not None]
    first = torch.autograd.grad(loss, [x] + params, create_graph=True)
    s = (u * first[0]).sum()
    for t, w in zip(first[1:], (a, b)):
        s = s + (w * t).sum()
    second = torch.autograd.grad(s, [x] + params)
    return [t.detach() for t in first], list(second)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls,shape,kwargs", [("BatchNorm2d", (6, 5, 7, 9), {}), ("BatchNorm1d", (32, 12), {}),
                                              ("BatchNorm1d", (5, 6, 11), {}),
                                              ("BatchNorm2d", (4, 3, 5, 5), {"affine": False})],
                         ids=["2d", "1d-NC", "1d-NCL", "2d-affine-false"])
def test_double_backward_matches_torch(cls, shape, kwargs, training, paths):
    """Gradient of the gradient w.r.t. input, weight and bias equals torch.nn's (float32 and float64 exact)."""
    ref, mine = pair(cls, shape[1], **kwargs)
    exact = copy.deepcopy(ref).double()
    for m in (ref, mine, exact):
        m.train(training)
    x = data(shape, 1)
    got_first, got = second_order(mine, x)
    want_first, want = second_order(ref, x)
    _, exact_second = second_order(exact, x.double())
    names = ["x", "weight", "bias"][:len(want)]
    for name, g1, w1 in zip(names, got_first, want_first):
        close(g1, w1, f"first-order d/d{name}")
    for name, g2, w2, e2 in zip(names, got, want, exact_second):
        close_scaled(g2, w2, f"second-order d/d{name} vs torch float32")
        close_scaled(g2, e2, f"second-order d/d{name} vs torch float64")
    assert paths["forward"] == [training]
    # create_graph=True took the differentiable route once; the second backward (no graph of
    # a graph) went through the C layer's / first-order backward again.
    assert paths["graph_backward"] == 1
    assert paths["train_backward" if training else "eval_backward"] == 1


def test_double_backward_of_functional_and_allow_unused():
    """dbt.batch_norm with create_graph: no None and no 'not used in the graph' error, torch's values."""
    x = data((4, 3, 6, 6), 7)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    results = []
    for fn in (dbt.batch_norm, nn.functional.batch_norm):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, None, None, ww, b, True, 0.1, 1e-5)
        (gx,) = torch.autograd.grad(y.pow(3).sum(), xx, create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum(), [xx, ww], allow_unused=True))
    for name, got, want in zip(("x", "weight"), *results):
        assert got is not None, name
        close_scaled(got, want, f"d/d{name}")


def test_gradient_penalty_training_matches_torch(paths):
    """A gradient-penalty loss (|d loss/d x|^2, backward through create_graph) on a converted CNN:
    the parameter gradients equal the stock model's."""
    ref, mine = cnn_pair()
    x, target = batch()
    grads = []
    for model in (mine, ref):
        xx = x.clone().requires_grad_()
        loss = nn.functional.cross_entropy(model(xx), target)
        (gx,) = torch.autograd.grad(loss, xx, create_graph=True)
        total = loss + 10.0 * gx.pow(2).sum()
        model.zero_grad()
        total.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k, want in grads[1].items():
        close_scaled(grads[0][k], want, f"grad of {k}")
    compare_models(mine, ref, "running statistics")
    assert paths["forward"] == [True, True] and paths["graph_backward"] == 2 and paths["train_backward"] == 2


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck_float64(training, paths):
    """float64 goes to PyTorch's batch_norm (docs of darknet_bn.torch): gradcheck and gradgradcheck pass."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def f(x, w, b):
        return dbt.batch_norm(x, None if training else rm, None if training else rv, w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    assert paths["forward"] == []


# --------------------------------------------------------------------------- 3. script, trace, compile, fx, fusion

@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}],
                         ids=["default", "momentum-none", "no-running-stats", "affine-false"])
def test_jit_script_module_matches_torch(kwargs, paths):
    """torch.jit.script of a BatchNorm2d: PyTorch's batch norm in script; outputs and buffers equal torch.nn's."""
    ref, mine = pair("BatchNorm2d", 4, **kwargs)
    scripted = torch.jit.script(mine)
    ref_scripted = torch.jit.script(copy.deepcopy(ref))
    for step in range(3):
        for training in (True, False):
            x = data((3, 4, 5, 5), 10 * step + training)
            for m in (scripted, ref, ref_scripted):
                m.train(training)
            got = scripted(x)
            equal(got, ref_scripted(x), f"step {step} training={training} vs scripted torch.nn")
            close(got, ref(x), f"step {step} training={training} vs torch.nn")
    for name, want in ref.state_dict().items():
        equal(scripted.state_dict()[name], want, name)
    assert paths["forward"] == [] and type(mine) is dbt.BatchNorm2d


def test_jit_script_converted_model_save_load(paths):
    """torch.jit.script of a converted CNN, saved and loaded: torch.nn's results; the model itself still runs C."""
    ref, mine = cnn_pair()
    x, target = batch()
    scripted = torch.jit.script(mine)
    assert type(mine.bn1) is dbt.BatchNorm2d and type(mine.bn2) is dbt.BatchNorm1d  # not replaced
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    for model in (scripted, loaded):
        model.eval()
    ref.eval()
    with torch.no_grad():
        close(scripted(x), ref(x), "scripted eval logits")
        equal(loaded(x), scripted(x), "loaded scripted eval logits")
    loaded.train()
    ref.train()
    y = loaded(x)
    y_ref = ref(x)
    close(y, y_ref, "loaded scripted training logits")
    y.sum().backward()
    y_ref.sum().backward()
    close(loaded.bn1.weight.grad, ref.bn1.weight.grad, "bn1 weight gradient through the script")
    close(loaded.bn2.running_var, ref.bn2.running_var, "bn2 running_var")
    assert paths["forward"] == []
    mine.eval()
    with torch.no_grad():
        mine(x)
    assert paths["forward"] == [False, False]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # F.batch_norm's own batch-size check
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_trace_matches_torch(training, paths):
    """torch.jit.trace of a converted CNN records PyTorch's batch norm; outputs and buffers equal torch.nn's."""
    ref, mine = cnn_pair()
    x, _ = batch()
    x2, _ = batch(seed=2)
    ref.train(training)
    mine.train(training)
    # check_trace=False: torch's check would run the eager module once more (updating running statistics).
    traced = torch.jit.trace(mine, x, check_trace=False)
    traced_ref = torch.jit.trace(ref, x, check_trace=False)
    assert paths["forward"] == []
    out = traced(x2)
    equal(out, traced_ref(x2), "traced output vs traced torch.nn")
    close(traced.bn1.running_mean, traced_ref.bn1.running_mean, "bn1 running_mean")
    if training:
        assert int(traced.bn2.num_batches_tracked) == int(traced_ref.bn2.num_batches_tracked) == 2
    _, mine2 = cnn_pair()  # the converted model run eagerly (the C layer) on the same two inputs
    mine2.train(training)
    with torch.no_grad():
        for xx in (x, x2):
            want = mine2(xx)
    close(out, want, "traced output vs the eager converted model")
    assert paths["forward"] == [training] * 4


def test_torch_compile_default_backend_matches_torch(paths):
    """torch.compile (inductor) of a converted CNN: training and eval outputs, gradients and running statistics
    equal torch.nn's; the batch norms run the C layer eagerly (graph breaks)."""
    ref, mine = cnn_pair()
    x, target = batch()
    compiled = torch.compile(mine)
    for step in range(2):
        for model in (compiled, ref):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
        for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
            close(p.grad, q.grad, f"step {step} grad {name}")
        compare_models(mine, ref, f"step {step}")
    mine.eval()
    ref.eval()
    with torch.no_grad():
        close(compiled(x), ref(x), "eval logits")
    assert paths["forward"] == [True, True] * 2 + [False, False]
    assert paths["train_backward"] == 4


def test_fx_symbolic_trace_converted_model(paths):
    """torch.fx.symbolic_trace of a converted CNN: the batch norms are call_module leaves like torch.nn's,
    and the GraphModule (running the C layer) equals the original in training and eval."""
    ref, mine = cnn_pair()
    traced = torch.fx.symbolic_trace(mine)
    traced_ref = torch.fx.symbolic_trace(ref)
    shape = [(n.op, str(n.target)) for n in traced.graph.nodes]
    assert shape == [(n.op, str(n.target)) for n in traced_ref.graph.nodes]
    assert ("call_module", "bn1") in shape and ("call_module", "bn2") in shape
    assert type(traced.bn1) is dbt.BatchNorm2d and traced.bn1.weight is mine.bn1.weight
    assert paths["forward"] == []
    twin = copy.deepcopy(mine)  # the same module, run eagerly
    x, target = batch()
    for step in range(2):
        losses = [train_step(m, x, target) for m in (traced, twin)]
        assert losses[0] == losses[1], f"step {step}"
    for k, v in twin.state_dict().items():
        equal(traced.state_dict()[k], v, k)
    assert paths["forward"] == [True] * 8 and paths["train_backward"] == 8
    for _ in range(2):
        train_step(ref, x, target)
    for m in (traced, twin, ref):
        m.eval()
    with torch.no_grad():
        equal(traced(x), twin(x), "eval")
        close(traced(x), ref(x), "eval after training, vs torch.nn")


def test_fx_trace_root_batchnorm_fails_like_torch():
    """Tracing a batch norm itself as the root fails for darknet_bn's modules as for torch.nn's."""
    for m in (nn.BatchNorm2d(3), dbt.BatchNorm2d(3)):
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(m)


def test_fuse_modules_eval_matches_torch(paths):
    """torch.ao.quantization.fuse_modules on a converted CNN in eval mode: the same fused modules, weights and
    outputs as fusing the stock CNN (the same arithmetic on the same values: exactly); the converted model
    itself is not modified unless inplace=True."""
    ref, mine = cnn_pair()
    x, _ = batch()
    ref.eval()
    mine.eval()
    spec = [["conv1", "bn1", "relu"], ["fc", "bn2"]]
    fused = torch.ao.quantization.fuse_modules(mine, spec)
    fused_ref = torch.ao.quantization.fuse_modules(ref, spec)
    assert type(mine.bn1) is dbt.BatchNorm2d and type(mine.bn2) is dbt.BatchNorm1d  # inplace=False
    for name in ("conv1", "bn1", "relu", "fc", "bn2"):
        assert type(getattr(fused, name)) is type(getattr(fused_ref, name)), name
    assert isinstance(fused.conv1, torch.ao.nn.intrinsic.ConvReLU2d) and isinstance(fused.bn1, nn.Identity)
    assert list(fused.state_dict()) == list(fused_ref.state_dict())
    for k, v in fused_ref.state_dict().items():
        equal(fused.state_dict()[k], v, f"fused {k}")
    with torch.no_grad():
        equal(fused(x), fused_ref(x), "fused logits")
        close(fused(x), mine(x), "fused vs unfused converted model")  # folding rounds differently
    assert paths["forward"] == [False, False]  # only the unfused model ran a batch norm
    torch.ao.quantization.fuse_modules(mine, [["conv1", "bn1"]], inplace=True)
    assert type(mine.conv1) is nn.Conv2d and type(mine.bn1) is nn.Identity


def test_fuse_modules_qat_matches_torch():
    """fuse_modules_qat in training mode gives torch's intrinsic ConvBnReLU2d/LinearBn1d over torch.nn batch
    norms sharing the converted model's parameters; outputs and running statistics equal the stock fusion's."""
    ref, mine = cnn_pair()
    spec = [["conv1", "bn1", "relu"], ["fc", "bn2"]]
    fused = torch.ao.quantization.fuse_modules_qat(mine, spec, inplace=True)
    fused_ref = torch.ao.quantization.fuse_modules_qat(ref, spec)
    assert isinstance(fused.conv1, torch.ao.nn.intrinsic.ConvBnReLU2d)
    assert isinstance(fused.fc, torch.ao.nn.intrinsic.LinearBn1d)
    assert type(fused.conv1[1]) is nn.BatchNorm2d
    x, target = batch()
    for model in (fused, fused_ref):
        train_step(model, x, target)
    compare_models(fused, fused_ref, "after a training step")


def test_fuser_methods_explicit_mapping(monkeypatch):
    """Without the registration in torch's default table, fuse_modules fails as before; passing
    FUSER_METHOD_MAPPING as additional_fuser_method_mapping works."""
    from torch.ao.quantization import fuser_method_mappings as fmm

    stock_only = {k: v for k, v in fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD.items() if k not in dbt.FUSER_METHOD_MAPPING}
    assert len(stock_only) < len(fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD)  # the import registered ours
    monkeypatch.setattr(fmm, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", stock_only)
    _, mine = cnn_pair()
    mine.eval()
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(mine, [["conv1", "bn1", "relu"]])
    fused = torch.ao.quantization.fuse_modules(
        mine, [["conv1", "bn1", "relu"]],
        fuse_custom_config_dict={"additional_fuser_method_mapping": dbt.FUSER_METHOD_MAPPING})
    assert isinstance(fused.conv1, torch.ao.nn.intrinsic.ConvReLU2d)
    x, _ = batch()
    with torch.no_grad():
        close(fused(x), mine(x), "fused vs unfused")


def test_fuse_bn_relu_pattern():
    """The (BatchNorm2d, ReLU) pattern gives torch's BNReLU2d around a torch.nn batch norm with the same tensors."""
    _, mine = cnn_pair()
    mine.eval()
    fused = torch.ao.quantization.fuse_modules(mine, [["bn1", "relu"]])
    assert isinstance(fused.bn1, torch.ao.nn.intrinsic.BNReLU2d) and type(fused.bn1[0]) is nn.BatchNorm2d
    x, _ = batch()
    with torch.no_grad():
        close(fused(x), mine(x), "bn-relu fused vs unfused")


def test_fuse_conv_bn_eval_and_linear_bn_eval_match_torch():
    """torch.nn.utils.fusion.fuse_conv_bn_eval/fuse_linear_bn_eval on darknet_bn modules give exactly the
    weights they give for torch.nn's (the same tensors are read)."""
    ref, mine = cnn_pair()
    ref.eval()
    mine.eval()
    conv = nn.utils.fusion.fuse_conv_bn_eval(mine.conv1, mine.bn1)
    conv_ref = nn.utils.fusion.fuse_conv_bn_eval(ref.conv1, ref.bn1)
    lin = nn.utils.fusion.fuse_linear_bn_eval(mine.fc, mine.bn2)
    lin_ref = nn.utils.fusion.fuse_linear_bn_eval(ref.fc, ref.bn2)
    for got, want in ((conv, conv_ref), (lin, lin_ref)):
        equal(got.weight, want.weight, "fused weight")
        equal(got.bias, want.bias, "fused bias")
    x = data((4, 3, 6, 6), 3)
    with torch.no_grad():
        close(conv(x), mine.bn1(mine.conv1(x)), "fused conv vs conv + darknet_bn BatchNorm2d")


# --------------------------------------------------------------------------- 4. the fast path stays fast

def test_fast_path_taken_only_where_it_can(paths):
    """The C layer serves float32 contiguous first-order training and eval; PyTorch only where needed."""
    _, mine = pair("BatchNorm2d", 4)
    x, dy = data((3, 4, 5, 5), 1), data((3, 4, 5, 5), 2)
    mine(x.clone().requires_grad_()).backward(dy)  # training, first order
    assert paths == {"forward": [True], "train_backward": 1, "eval_backward": 0, "graph_backward": 0}
    mine.eval()
    mine(x.clone().requires_grad_()).backward(dy)  # eval, first order
    assert paths == {"forward": [True, False], "train_backward": 1, "eval_backward": 1, "graph_backward": 0}
    with torch.no_grad():
        mine(x)
    mine.train()
    xx = x.clone().requires_grad_()
    torch.autograd.grad(mine(xx).sum(), xx, create_graph=True)  # graph of the gradient: torch's op
    assert paths == {"forward": [True, False, False, True], "train_backward": 1, "eval_backward": 1,
                     "graph_backward": 1}
    mine.double()(x.double())  # other dtype: PyTorch throughout
    assert len(paths["forward"]) == 4


def test_first_order_backward_returns_c_results(monkeypatch):
    """The first-order training backward is the C layer's (not the differentiable torch op): with the
    C layer's backward stubbed to fail, a plain backward fails and create_graph=True does not."""
    _, mine = pair("BatchNorm2d", 4)
    x = data((3, 4, 5, 5), 1)

    def broken(*args):
        raise RuntimeError("C backward reached")

    monkeypatch.setattr(dbt, "_train_backward", broken)
    with pytest.raises(RuntimeError, match="C backward reached"):
        mine(x.clone().requires_grad_()).sum().backward()
    xx = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(mine(xx).pow(2).sum(), xx, create_graph=True)
    assert gx.requires_grad


# --------------------------------------------------------------------------- 5. what hooks and modes hand back

def _expand_constant_pack(t):
    """A saved-tensor pack that keeps a tensor of one repeated value as that value (unpacked as a stride-0 view)."""
    if t.numel() > 1 and bool((t == t.flatten()[0]).all()):
        return ("const", t.flatten()[:1].clone(), t.shape)
    return ("full", t)


SAVED_HOOKS = {
    "save_on_cpu": lambda: torch.autograd.graph.save_on_cpu(),
    "to_channels_last": lambda: torch.autograd.graph.saved_tensors_hooks(
        lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t, lambda t: t),
    "to_contiguous": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t),
    "expand_constant": lambda: torch.autograd.graph.saved_tensors_hooks(
        _expand_constant_pack, lambda p: p[1].expand(p[2]) if p[0] == "const" else p[1]),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("hook", sorted(SAVED_HOOKS))
def test_saved_tensor_hooks_other_layout_match_torch(hook, layout, paths):
    """Saved tensors handed back in another layout, or as a stride-0 view, give PyTorch's gradients (C path)."""
    shape = (5, 6, 7, 9)
    x = data(shape, seed=11)
    if hook == "expand_constant":
        x = torch.full(shape, 0.75)  # every channel constant: the whole input saved as one value
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = data(shape, seed=12, offset=0.5)
    results = []
    for module in pair("BatchNorm2d", 6, seed=3):
        xx = x.clone().requires_grad_()
        with SAVED_HOOKS[hook]():
            y = module(xx)
        y.backward(dy)
        results.append((y, xx.grad, module.weight.grad, module.bias.grad))
    for name, got, want in zip(("y", "dx", "dweight", "dbias"), results[1], results[0]):
        close(got, want, f"{hook}, {layout}: {name}")
    assert paths["train_backward"] == 1


def test_saved_tensor_hook_of_another_shape_is_an_error():
    """A hook that hands back a tensor of another shape gets an error naming it, not a read past its end."""
    x = data((4, 3, 5, 5), seed=2).requires_grad_()
    bn = dbt.BatchNorm2d(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t[:2] if t.dim() == 4 else t):
        y = bn(x)
    with pytest.raises(RuntimeError, match=r"saved input came back from a saved-tensor hook with shape \(2, 3, 5"):
        y.sum().backward()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_sync_batchnorm_saved_tensor_hooks_match_torch(layout):
    """SyncBatchNorm on 2 thread ranks under a hook that changes the saved input's layout: PyTorch's gradients."""
    from _dist_threads import run_ranks

    c, full, dy = 5, data((6, 5, 4, 3), seed=21), data((6, 5, 4, 3), seed=22, offset=0.5)
    ref = pair("BatchNorm2d", c, seed=4)[0]
    ref.running_mean.zero_(), ref.running_var.fill_(1.0)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    xr = full.clone().requires_grad_()
    ref(xr).backward(dy)

    def rank(comm):
        m = dbt.SyncBatchNorm(c, process_group=comm)
        m.load_state_dict(state)
        x = full[3 * comm.rank:3 * comm.rank + 3].clone()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        with SAVED_HOOKS["to_contiguous" if layout == "channels_last" else "to_channels_last"]():
            y = m(x)
        y.backward(dy[3 * comm.rank:3 * comm.rank + 3])
        return x.grad, m.weight.grad, m.bias.grad

    got = run_ranks(2, rank)
    assert not any(isinstance(r, BaseException) for r in got), got
    close(torch.cat([r[0] for r in got]), xr.grad, "dx")
    close(got[0][1] + got[1][1], ref.weight.grad, "dweight (sum of the ranks')")
    close(got[0][2] + got[1][2], ref.bias.grad, "dbias (sum of the ranks')")


@pytest.mark.parametrize("kwargs", [{"affine": False, "track_running_stats": False}, {"dtype": torch.float32}],
                         ids=["no_params", "params"])
def test_float64_default_dtype_matches_torch(kwargs):
    """torch.set_default_dtype(torch.float64) around float32 modules and inputs changes nothing."""
    x, dy = data((4, 3, 5, 5), seed=5), data((4, 3, 5, 5), seed=6)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref, mine = nn.BatchNorm2d(3, **kwargs), dbt.BatchNorm2d(3, **kwargs)
        results = []
        for module in (ref, mine):
            xx = x.clone().requires_grad_()
            y = module(xx)
            y.backward(dy)
            results.append((y, xx.grad) + ((module.weight.grad, module.bias.grad) if module.affine else ()))
    finally:
        torch.set_default_dtype(previous)
    for k, (got, want) in enumerate(zip(results[1], results[0])):
        close(got, want, f"result {k}")


def test_device_context_around_a_cpu_module_matches_torch():
    """A CPU module called on a CPU input inside `with torch.device("meta")` computes on the CPU, as PyTorch's."""
    ref, mine = pair("BatchNorm2d", 4, seed=7)
    x = data((3, 4, 5, 5), seed=8)
    want = ref(x)
    with torch.device("meta"):
        got = mine(x)
    close(got, want, "y")


def test_dispatch_modes_see_a_batch_norm():
    """Under a TorchDispatchMode (make_fx, FakeTensorMode, op counters) the call is PyTorch's, which the mode sees."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    ref, mine = pair("BatchNorm2d", 4, seed=9)
    ref.eval(), mine.eval()
    traced = make_fx(mine)(data((2, 4, 3, 3), seed=10))
    x = data((2, 4, 3, 3), seed=11)
    close(traced(x), ref(x), "make_fx graph output")
    with Ops() as ops:
        mine(x)
    assert any("batch_norm" in name for name in ops.names), ops.names


@pytest.mark.parametrize("cast", [torch.float64, torch.float16], ids=["float64", "float16"])
def test_saved_tensor_hook_of_another_dtype(cast):
    """A hook that stores the saved tensors in another dtype (to save memory, say) gets them cast back:
    float64 exactly PyTorch's gradients without the hook, float16 within its own rounding."""
    x, dy = data((4, 3, 5, 5), seed=13), data((4, 3, 5, 5), seed=14, offset=0.5)
    ref, mine = pair("BatchNorm2d", 3, seed=5)
    xr = x.clone().requires_grad_()
    ref(xr).backward(dy)
    xm = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.to(cast), lambda t: t):
        y = mine(xm)
    y.backward(dy)
    tol = dict(rtol=RTOL, atol=ATOL) if cast is torch.float64 else dict(rtol=2e-2, atol=2e-2)
    close(xm.grad, xr.grad, "dx", **tol)
    close(mine.weight.grad, ref.weight.grad, "dweight", **tol)


def test_sync_batchnorm_backward_failure_reaches_the_peers():
    """A rank whose backward fails before the collective (its saved-tensor hook raises) raises its error, and
    the other rank a PeerError, instead of waiting in the collective."""
    from _dist_threads import run_ranks
    from darknet_bn.distributed import PeerError

    def unpack(t):
        raise RuntimeError("unpack failed on purpose")

    def rank(comm):
        m = dbt.SyncBatchNorm(3, process_group=comm)
        x = data((4, 3, 2, 2), seed=30 + comm.rank).requires_grad_()
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack if comm.rank == 1 else (lambda t: t))
        with hooks:
            y = m(x)
        y.sum().backward()

    got = run_ranks(2, rank, timeout=30)
    assert isinstance(got[1], RuntimeError) and "unpack failed on purpose" in str(got[1]), got
    assert isinstance(got[0], PeerError), got
