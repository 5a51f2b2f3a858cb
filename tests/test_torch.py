"""darknet_bn.torch against torch.nn.BatchNorm1d/2d with identical parameters.

Tensors are compared with |got - want| <= 2e-5*|want| + 2e-5 (float32 on both
sides: docs/reference.md §6's 1e-5 + 1e-5 doubled, since PyTorch's own float32 result is
the reference here, not an exact one); the CNN's losses with rtol 1e-4.
torch.autograd.gradcheck is not usable (it needs float64, the kernels are
float32): gradients are compared with PyTorch's autograd instead.
"""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import darknet_bn.torch as dbt  # noqa: E402
from conftest import assert_close  # noqa: E402

RTOL = ATOL = 2e-5
nn = torch.nn
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def close(got, want, what="value", rtol=RTOL, atol=ATOL):
    """Elementwise |got - want| <= rtol*|want| + atol on two tensors (or None and None)."""
    if want is None:
        assert got is None, f"{what}: expected None"
        return
    assert got is not None, f"{what}: got None"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert_close(got.detach().double().numpy(), want.detach().double().numpy(), rtol, atol, what)


def pair(cls, num_features, seed=0, **kwargs):
    """(torch module, darknet_bn module) with the same random parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    ref = getattr(nn, cls)(num_features, **kwargs)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.copy_(0.5 + torch.rand(num_features, generator=g))
        if ref.bias is not None:
            ref.bias.copy_(torch.randn(num_features, generator=g))
        if ref.running_mean is not None:
            ref.running_mean.copy_(torch.randn(num_features, generator=g))
            ref.running_var.copy_(0.5 + torch.rand(num_features, generator=g))
    mine = getattr(dbt, cls)(num_features, **kwargs)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def data(shape, seed, offset=2.0):
    """float32 activations with a per-channel offset and scale."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    bshape = [1, c] + [1] * (len(shape) - 2)
    scale = (0.5 + 1.5 * torch.rand(c, generator=g)).view(bshape)
    off = (offset * torch.randn(c, generator=g)).view(bshape)
    return off + scale * torch.randn(shape, generator=g)


def step(module, x, dy):
    """Forward and backward of dy; returns (y, dx, dweight, dbias) and clears the parameter grads."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    grads = [p.grad.clone() if p is not None and p.grad is not None else None for p in (module.weight, module.bias)]
    module.zero_grad(set_to_none=True)
    return (y.detach(), x.grad, *grads)


def compare_steps(ref, mine, shape, steps=3, seed=0):
    """Run both modules on the same inputs and gradients; compare everything after each step."""
    for i in range(steps):
        x = data(shape, seed + 10 * i)
        dy = data(shape, seed + 10 * i + 1, offset=0.3)
        got, want = step(mine, x, dy), step(ref, x, dy)
        for name, g, w in zip(("y", "dx", "dweight", "dbias"), got, want):
            close(g, w, f"step {i} {name}")
        compare_buffers(ref, mine, f"step {i}")


def compare_buffers(ref, mine, what):
    if ref.running_mean is None:
        assert mine.running_mean is None and mine.running_var is None and mine.num_batches_tracked is None
        return
    close(mine.running_mean, ref.running_mean, f"{what} running_mean")
    close(mine.running_var, ref.running_var, f"{what} running_var")
    assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked), what


SHAPES = [("BatchNorm2d", (6, 5, 7, 9)), ("BatchNorm1d", (32, 12)), ("BatchNorm1d", (5, 6, 11))]
SHAPE_IDS = ["2d", "1d-NC", "1d-NCL"]


@pytest.fixture
def c_calls(monkeypatch):
    """Counts the forwards that reach the C layer (darknet_bn.torch._forward), each as its `training` flag."""
    calls = []
    original = dbt._forward

    def counting(*args):
        calls.append(args[5])
        return original(*args)

    monkeypatch.setattr(dbt, "_forward", counting)
    return calls


@pytest.mark.parametrize("cls,shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_training_matches_torch(cls, shape, momentum, c_calls):
    """Training: outputs, input/weight/bias gradients and running statistics equal PyTorch's over several steps."""
    ref, mine = pair(cls, shape[1], momentum=momentum)
    compare_steps(ref, mine, shape, steps=4)
    assert c_calls == [True] * 4


def test_training_at_each_thread_count(threads):
    """Training agrees with PyTorch at 1 and 2 darknet_bn threads, on a shape split inside channels."""
    ref, mine = pair("BatchNorm2d", 3)
    compare_steps(ref, mine, (16, 3, 32, 32), steps=2)


@pytest.mark.parametrize("cls,shape", SHAPES, ids=SHAPE_IDS)
def test_eval_matches_torch(cls, shape, c_calls):
    """Eval mode: outputs and input/weight/bias gradients with the running statistics equal PyTorch's."""
    ref, mine = pair(cls, shape[1])
    ref.eval()
    mine.eval()
    compare_steps(ref, mine, shape, steps=2)
    assert c_calls == [False, False]
    assert int(mine.num_batches_tracked) == 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_affine_false(training, c_calls):
    """affine=False (no weight or bias): outputs, input gradients and running statistics equal PyTorch's."""
    ref, mine = pair("BatchNorm2d", 4, affine=False)
    assert mine.weight is None and mine.bias is None
    ref.train(training)
    mine.train(training)
    compare_steps(ref, mine, (3, 4, 5, 6), steps=2)
    assert len(c_calls) == 2


def test_weight_without_bias():
    """affine=True with bias=False: the weight's gradient and the outputs equal PyTorch's."""
    ref, mine = pair("BatchNorm2d", 4, bias=False)
    assert mine.bias is None and mine.weight is not None
    compare_steps(ref, mine, (3, 4, 5, 6), steps=2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls,shape", SHAPES[:2], ids=SHAPE_IDS[:2])
def test_no_running_stats(cls, shape, training, c_calls):
    """track_running_stats=False: batch statistics in train and eval mode, as PyTorch, no buffers."""
    ref, mine = pair(cls, shape[1], track_running_stats=False)
    ref.train(training)
    mine.train(training)
    compare_steps(ref, mine, shape, steps=2)
    assert c_calls == [True, True]  # batch statistics even in eval mode


def test_channels_last(c_calls):
    """A channels_last input gives a channels_last output; values and gradients equal PyTorch's."""
    ref, mine = pair("BatchNorm2d", 6)
    x = data((4, 6, 5, 7), 3).contiguous(memory_format=torch.channels_last)
    dy = data((4, 6, 5, 7), 4).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    for mode in (True, False):
        ref.train(mode)
        mine.train(mode)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ref(x1), mine(x2)
        assert y2.is_contiguous(memory_format=torch.channels_last) and not y2.is_contiguous()
        y1.backward(dy)
        y2.backward(dy)
        close(y2, y1, "y")
        close(x2.grad, x1.grad, "dx")
        close(mine.weight.grad, ref.weight.grad, "dweight")
        close(mine.bias.grad, ref.bias.grad, "dbias")
        compare_buffers(ref, mine, "channels_last")
    assert c_calls == [True, False]


@pytest.mark.parametrize("dy_layout", ["channels_last", "contiguous"])
def test_channels_last_computed_in_place(monkeypatch, dy_layout):
    """A channels_last input reaches the C layer itself (no copy: an (N*H*W) x C matrix, spatial == 1), and its
    output and input gradient are channels_last; a gradient in the other layout gives the same results."""
    seen = []
    original = dbt._BatchNormFunction.apply

    def recording(*args):
        seen.append(args[0])
        return original(*args)

    monkeypatch.setattr(dbt._BatchNormFunction, "apply", recording)
    ref, mine = pair("BatchNorm2d", 12)
    x = data((3, 12, 5, 4), 8).contiguous(memory_format=torch.channels_last)
    dy = data((3, 12, 5, 4), 9)
    dy = dy.contiguous(memory_format=torch.channels_last) if dy_layout == "channels_last" else dy.contiguous()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), mine(x2)
    assert len(seen) == 1 and seen[0].data_ptr() == x2.data_ptr(), "the input was copied"
    assert y2.is_contiguous(memory_format=torch.channels_last) and not y2.is_contiguous()
    y1.backward(dy)
    y2.backward(dy)
    assert x2.grad.is_contiguous(memory_format=torch.channels_last)
    close(y2, y1, "y")
    close(x2.grad, x1.grad, "dx")
    close(mine.weight.grad, ref.weight.grad, "dweight")
    close(mine.bias.grad, ref.bias.grad, "dbias")
    compare_buffers(ref, mine, "channels_last in place")


def test_non_contiguous_input_and_grad():
    """A strided input and a non-contiguous (transposed, expanded) grad_output give PyTorch's results."""
    ref, mine = pair("BatchNorm1d", 8)
    base = data((8, 10, 6), 5)
    x = base.transpose(0, 2)[:, :8, :]  # (6, 8, 8), non-contiguous
    dys = [data((6, 8, 8), 6).transpose(1, 2), torch.tensor(0.7).expand(6, 8, 8)]
    for dy in dys:
        assert not dy.is_contiguous()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        assert not x2.is_contiguous()
        y1, y2 = ref(x1), mine(x2)
        y1.backward(dy)
        y2.backward(dy)
        close(y2, y1, "y")
        close(x2.grad, x1.grad, "dx")
        close(mine.weight.grad, ref.weight.grad, "dweight")
        close(mine.bias.grad, ref.bias.grad, "dbias")
        ref.zero_grad()
        mine.zero_grad()
    compare_buffers(ref, mine, "strided")


def test_grad_of_parameters_only(c_calls):
    """When the input needs no gradient, the weight and bias gradients (sums phase only) equal PyTorch's."""
    ref, mine = pair("BatchNorm2d", 5)
    x = data((4, 5, 6, 6), 7)
    dy = data((4, 5, 6, 6), 8)
    ref(x).backward(dy)
    mine(x).backward(dy)
    close(mine.weight.grad, ref.weight.grad, "dweight")
    close(mine.bias.grad, ref.bias.grad, "dbias")


def test_input_grad_only():
    """With frozen weight and bias only the input gradient is computed, equal to PyTorch's."""
    ref, mine = pair("BatchNorm2d", 5)
    for m in (ref, mine):
        m.requires_grad_(False)
    got = step(mine, data((4, 5, 3, 3), 9), data((4, 5, 3, 3), 10))[:2]
    want = step(ref, data((4, 5, 3, 3), 9), data((4, 5, 3, 3), 10))[:2]
    close(got[0], want[0], "y")
    close(got[1], want[1], "dx")
    assert mine.weight.grad is None and mine.bias.grad is None


def test_retain_graph_backward_twice():
    """A second backward through the same graph (retain_graph) gives the same gradients again."""
    _, mine = pair("BatchNorm2d", 4)
    x = data((3, 4, 5, 5), 11).requires_grad_()
    dy = data((3, 4, 5, 5), 12)
    y = mine(x)
    y.backward(dy, retain_graph=True)
    first = (x.grad.clone(), mine.weight.grad.clone(), mine.bias.grad.clone())
    y.backward(dy)
    for a, b in zip(first, (x.grad, mine.weight.grad, mine.bias.grad)):
        close(b, 2 * a, "accumulated twice")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtype_falls_back(dtype, c_calls):
    """float64 and bfloat16 go to PyTorch's implementation and still equal torch.nn.BatchNorm2d."""
    ref, mine = pair("BatchNorm2d", 4)
    ref.to(dtype)
    mine.to(dtype)
    x = data((3, 4, 5, 5), 14).to(dtype)
    dy = data((3, 4, 5, 5), 15).to(dtype)
    got, want = step(mine, x, dy), step(ref, x, dy)
    for name, g, w in zip(("y", "dx", "dweight", "dbias"), got, want):
        close(g, w, name, rtol=0, atol=0)  # the very same computation
    assert c_calls == []


def test_meta_device_falls_back(c_calls):
    """A meta-device module and input go to PyTorch (shapes only, no data)."""
    mine = dbt.BatchNorm2d(4, device="meta")
    y = mine(torch.empty(2, 4, 3, 3, device="meta"))
    assert y.shape == (2, 4, 3, 3) and y.device.type == "meta"
    assert c_calls == []


def test_functorch_vmap_falls_back(c_calls):
    """torch.func.vmap (wrapped tensors, no memory of their own) goes to PyTorch and gives its results."""
    ref, mine = pair("BatchNorm2d", 4)
    ref.eval()
    mine.eval()
    x = data((2, 3, 4, 5, 5), 17)
    close(torch.func.vmap(mine)(x), torch.func.vmap(ref)(x), "vmap eval")
    assert c_calls == []


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own jvp
def test_forward_ad_falls_back(c_calls):
    """Forward-mode AD (a dual level is active) goes to PyTorch: the JVP equals torch.nn.BatchNorm2d's."""
    import torch.autograd.forward_ad as fwAD

    ref, mine = pair("BatchNorm2d", 3)
    x, t = data((4, 3, 5, 5), 20), data((4, 3, 5, 5), 21)
    outs = []
    for m in (mine, ref):
        with fwAD.dual_level():
            outs.append([v.detach() for v in fwAD.unpack_dual(m(fwAD.make_dual(x, t)))[:2]])
    close(outs[0][0], outs[1][0], "y")
    close(outs[0][1], outs[1][1], "jvp")
    assert c_calls == []


def test_torch_compile_runs_the_c_layer(c_calls):
    """Under torch.compile the layer is a graph break running the C kernels; results equal PyTorch's."""
    ref, mine = pair("BatchNorm2d", 4)
    x = data((3, 4, 5, 5), 18)
    compiled = torch.compile(mine, backend="eager")
    close(compiled(x), ref(x), "compiled y")
    assert c_calls == [True]
    compare_buffers(ref, mine, "compiled")


def test_inference_mode_eval(c_calls):
    """Eval under torch.inference_mode() uses the C layer and equals PyTorch."""
    ref, mine = pair("BatchNorm1d", 6)
    ref.eval()
    mine.eval()
    x = data((7, 6, 3), 19)
    with torch.inference_mode():
        close(mine(x), ref(x), "y")
    assert c_calls == [False]


def test_no_autograd_node_without_gradients(c_calls):
    """Grad mode off, or nothing requiring a gradient: the C forward runs without an autograd node (eval and
    training, running statistics updated as PyTorch's); a parameter that requires a gradient gets the node."""
    ref, mine = pair("BatchNorm2d", 5)
    x = data((3, 5, 4, 4), 21)
    with torch.no_grad():
        y1, y2 = ref(x), mine(x)  # training: batch statistics, running statistics move
    assert y2.grad_fn is None
    close(y2, y1, "no_grad training y")
    compare_buffers(ref, mine, "no_grad training")
    ref.eval()
    mine.eval()
    for m in (ref, mine):
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
    y1, y2 = ref(x), mine(x)  # grad mode on, but nothing requires a gradient
    assert y2.grad_fn is None
    close(y2, y1, "eval y")
    mine.weight.requires_grad_(True)
    y3 = mine(x)
    assert y3.grad_fn is not None and type(y3.grad_fn).__name__.startswith("_BatchNormFunction")
    close(y3, y1, "eval y with a trainable weight")
    assert c_calls == [True, False, False]


def test_momentum_outside_unit_interval_falls_back(c_calls):
    """A momentum the C layer rejects (> 1) is served by PyTorch, with PyTorch's running statistics."""
    ref, mine = pair("BatchNorm1d", 6, momentum=1.5)
    compare_steps(ref, mine, (10, 6), steps=2)
    assert c_calls == []


def test_errors_match_torch():
    """Wrong input dimensions and a single value per channel in training raise PyTorch's errors."""
    mine, ref = dbt.BatchNorm2d(3), nn.BatchNorm2d(3)
    for m in (mine, ref):
        with pytest.raises(ValueError, match="4D"):
            m(torch.randn(3, 3))
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            m(torch.randn(1, 3, 1, 1))
    with pytest.raises(RuntimeError):
        mine(torch.randn(2, 5, 4, 4))  # wrong channel count: PyTorch's own message


def test_state_dict_round_trip():
    """state_dicts load both ways between torch and darknet_bn modules, every key and value kept."""
    for cls, kwargs in [("BatchNorm2d", {}), ("BatchNorm1d", {"affine": False}),
                        ("BatchNorm2d", {"track_running_stats": False})]:
        ref, _ = pair(cls, 7, **kwargs)
        mine = getattr(dbt, cls)(7, **kwargs)
        mine.load_state_dict(ref.state_dict())
        back = getattr(nn, cls)(7, **kwargs)
        back.load_state_dict(mine.state_dict())
        for sd in (mine.state_dict(), back.state_dict()):
            assert list(sd) == list(ref.state_dict())
            for k, v in ref.state_dict().items():
                assert torch.equal(sd[k], v), k
        assert isinstance(mine, getattr(nn, cls))


def test_functional_matches_torch(c_calls):
    """darknet_bn.torch.batch_norm equals torch.nn.functional.batch_norm, running statistics included."""
    x = data((4, 3, 6, 6), 16)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm1, rv1 = torch.randn(3), torch.rand(3) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    for training in (True, False):
        got = dbt.batch_norm(x, rm1, rv1, w, b, training, 0.2, 1e-3)
        want = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training, 0.2, 1e-3)
        close(got, want, f"training={training}")
        close(rm1, rm2, "running_mean")
        close(rv1, rv2, "running_var")
    close(dbt.batch_norm(x, None, None, training=True), torch.nn.functional.batch_norm(x, None, None, training=True))
    assert len(c_calls) == 3


class SmallCNN(nn.Module):
    """conv-bn-relu x2, then linear + BatchNorm1d + relu + linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16, momentum=None),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(16 * 6 * 6, 32)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        x = self.features(x).flatten(1)
        return self.out(torch.relu(self.bn(self.fc(x))))


def test_convert_model_trains_like_torch(c_calls):
    """convert_model on a small CNN: same losses over 20 SGD steps, same parameters, eval outputs after."""
    torch.manual_seed(0)
    ref = SmallCNN()
    ref.features[1].weight.requires_grad_(False)  # a frozen BN weight must stay frozen
    mine = copy.deepcopy(ref)
    opt_mine = torch.optim.SGD(mine.parameters(), lr=0.05, momentum=0.9)  # created before converting
    params_before = [id(p) for p in mine.parameters()]
    assert dbt.convert_model(mine) is mine
    assert [id(p) for p in mine.parameters()] == params_before
    assert type(mine.features[1]) is dbt.BatchNorm2d and type(mine.features[4]) is dbt.BatchNorm2d
    assert type(mine.bn) is dbt.BatchNorm1d and mine.features[4].momentum is None
    assert not mine.features[1].weight.requires_grad and mine.training
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 12, 12, generator=g) * 2 + 1
    target = torch.randint(0, 5, (16,), generator=g)
    losses = {"ref": [], "mine": []}
    for _ in range(20):
        for name, model, opt in (("ref", ref, opt_ref), ("mine", mine, opt_mine)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    np.testing.assert_allclose(losses["mine"], losses["ref"], rtol=1e-4)
    assert losses["ref"][-1] < 0.5 * losses["ref"][0]  # it did learn
    assert len(c_calls) == 60
    for (name, p), q in zip(ref.state_dict().items(), mine.state_dict().values()):
        close(q, p, name, rtol=1e-3, atol=1e-4)  # 20 steps of float32 differences, amplified by SGD
    ref.eval()
    mine.eval()
    with torch.no_grad():
        close(mine(x), ref(x), "eval logits", rtol=1e-3, atol=1e-4)


def test_convert_model_details():
    """convert_model: a bare BN is returned converted; eval mode, shared tensors, other norms untouched."""
    bn = nn.BatchNorm1d(4).eval()
    new = dbt.convert_model(bn)
    assert type(new) is dbt.BatchNorm1d and not new.training
    assert new.weight is bn.weight and new.running_var is bn.running_var
    assert new.num_batches_tracked is bn.num_batches_tracked
    assert new.weight.device.type == "cpu"
    model = nn.Sequential(nn.BatchNorm2d(3, affine=False, track_running_stats=False), nn.SyncBatchNorm(3),
                          nn.LayerNorm(3), dbt.BatchNorm2d(3))
    kept = list(model)
    dbt.convert_model(model)
    assert type(model[0]) is dbt.BatchNorm2d and model[0].weight is None and model[0].running_mean is None
    assert model[1] is kept[1] and model[2] is kept[2] and model[3] is kept[3]
    assert repr(model[0]) == repr(kept[0])


def test_import_without_torch_and_lazy_import():
    """import darknet_bn never imports torch; darknet_bn.torch without torch raises a clear ImportError."""
    code = ("import sys, darknet_bn; assert 'torch' not in sys.modules; sys.modules['torch'] = None\n"
            "try:\n    import darknet_bn.torch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "darknet_bn.torch needs PyTorch" in out.stdout


def test_import_leaves_torch_dynamo_alone():
    """Importing darknet_bn.torch does not import torch._dynamo (the graph break is made when first compiled)."""
    code = ("import sys, torch; assert 'torch._dynamo' not in sys.modules\n"
            "import darknet_bn.torch as dbt\n"
            "y = dbt.BatchNorm2d(3)(torch.randn(4, 3, 2, 2))\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:3])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
