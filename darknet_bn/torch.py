"""PyTorch modules computing batch normalization with darknet_bn's C kernels.

>>> import torch, darknet_bn.torch as dbt
>>> bn = dbt.BatchNorm2d(16)                 # same arguments as torch.nn.BatchNorm2d
>>> y = bn(torch.randn(8, 16, 32, 32))
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
>>> model = dbt.convert_model(model)         # every BatchNorm1d/2d replaced, parameters kept

:class:`BatchNorm1d` and :class:`BatchNorm2d` subclass ``torch.nn.BatchNorm1d``
and ``torch.nn.BatchNorm2d``: same constructor arguments (``num_features, eps,
momentum, affine, track_running_stats, device, dtype``), same parameters and
buffers (``weight, bias, running_mean, running_var, num_batches_tracked``), so
their ``state_dict`` s load into each other both ways, and ``isinstance(m,
torch.nn.BatchNorm2d)`` still holds. Training and eval modes, ``momentum=None``
(cumulative moving average) and ``track_running_stats=False`` behave as in
PyTorch. :func:`batch_norm` is the matching functional, with the arguments of
``torch.nn.functional.batch_norm``.

How it computes. The C layer runs in standard numerics (docs/reference.md §4: the paper's
and PyTorch's arithmetic, exact gradients) through a ``torch.autograd.Function``
(or directly, when nothing requires a gradient or grad mode is off)
that fills a fresh ``dnbn_layer`` struct per call whose pointers are the
tensors' own memory: the input is read in place (and kept for backward without
a copy), the output and the gradients are new tensors written by C, the running
statistics are updated in place in the module's buffers, ``weight.grad`` and
``bias.grad`` come from the layer's ``scale_updates`` and ``bias_updates``.
The C calls release the GIL. Their threads: ``darknet_bn.set_num_threads``
(all cores by default) decides how many a call uses, and importing this
module hands darknet_bn the ``GOMP_parallel`` of the OpenMP runtime PyTorch
loaded (``darknet_bn._openmp_team``), so that the calls run on PyTorch's own
OpenMP team. That team spin-waits for a while after each PyTorch operation;
darknet_bn's own workers sleep between calls, and after a convolution they
would first have to win a core from a spinning OpenMP thread (a batch norm at
two threads then ran at about one thread's speed). ``DARKNET_BN_TEAM=pool``
in the environment keeps darknet_bn's own pool; ``darknet_bn.info()["team"]``
says which runs. The team is not taken when PyTorch runs one thread (as in a
DataLoader worker) or in a process forked from one that had imported
darknet_bn; after it has run, libgomp's limits apply (see
``darknet_bn._openmp_team``: forked children's multithreaded OpenMP work
hangs, as after PyTorch's own parallel ops).

* Training (and eval without running statistics): batch statistics; forward
  and backward are both the C layer's.
* Eval with running statistics: the C layer's inference forward; its backward
  (dx = dy * weight / sqrt(running_var + eps), dweight = sum dy * x_hat,
  dbias = sum dy) is computed with a few PyTorch operations, because the C
  layer's backward is the backward of a training forward.

What goes to PyTorch's own ``torch.nn.functional.batch_norm`` instead (same
results, PyTorch's speed): an input that is not a float32 CPU tensor (float64,
half, bfloat16, CUDA, meta, ...), tensor subclasses and functorch/functional
wrappers (``torch.func``), TorchScript scripting and tracing, forward-mode
AD (inside ``torch.autograd.forward_ad.dual_level()``), calls under a Python
dispatch mode (``make_fx``, ``FakeTensorMode``, ``FlopCounterMode``: the mode
sees PyTorch's batch norm op), parameters or running statistics that are not float32
CPU tensors of ``num_features`` elements (or are non-contiguous), a momentum
outside [0, 1] or an eps that is not positive in float32, sizes beyond a C
``int``, empty inputs and training with fewer than 2 values per channel (PyTorch
raises its own error for that).

Backward reads the tensors autograd saved as forward left them; a
saved-tensor hook (``save_on_cpu``, ``saved_tensors_hooks``) that hands them
back in another layout, dtype or as an expanded view gets them copied to the
forward's layout first (``darknet_bn._saved_tensors``). Every tensor the C
layer writes is allocated as float32 (float64 scratch) on the CPU explicitly,
whatever ``torch.set_default_dtype`` or a ``with torch.device(...)`` block says.

Memory formats: a contiguous input is used in place, and so is a
``channels_last`` one: in memory it is an (N*H*W) x C matrix, which the C
layer computes as its spatial == 1 case, writing a ``channels_last`` output
(and input gradient), like PyTorch's. Any other input (a transposed or sliced
view) is first copied to a contiguous tensor; a gradient in another layout
than its input's is copied to that layout.

Higher-order gradients. A backward that builds a graph of the gradient
(``torch.autograd.grad(..., create_graph=True)``, ``backward(create_graph=True)``:
grad mode is on inside backward) is computed by PyTorch's
``native_batch_norm_backward`` (the op PyTorch's own batch norm differentiates
with) from the statistics the C forward used, so the gradient of the gradient
(double backward, Hessian-vector products, gradient penalties) is PyTorch's.
An ordinary backward (grad mode off inside it) stays in the C layer.

Tools that take a model apart:

* ``copy.deepcopy``, pickling and ``torch.save``/``torch.load`` (whole module
  with ``weights_only=False``, or its ``state_dict``): the module holds only
  PyTorch's own parameters, buffers and hyperparameters; the C layer's struct
  is built per call on the call's tensors and never stored in the module, so
  a copy shares nothing with its original.
* ``torch.jit.script``: the scripted ``forward`` is PyTorch's
  (``torch.nn.functional.batch_norm``, same results; the C layer cannot run
  in TorchScript). ``torch.jit.trace`` records PyTorch's batch norm too.
* ``torch.compile``: :func:`batch_norm` is a graph break
  (``torch.compiler.disable``, applied when a compiled graph first reaches it,
  so that importing this module does not import ``torch._dynamo``): it runs
  eagerly with the C kernels, the rest of the model is compiled (so
  ``fullgraph=True`` cannot be used).
* ``torch.fx.symbolic_trace``: the modules are leaves, as ``torch.nn``'s are
  (a ``call_module`` node; the traced ``GraphModule`` runs the C layer).
  Tracing a batch norm as the root module fails, as for ``torch.nn``'s.
* ``torch.ao.quantization.fuse_modules`` / ``fuse_modules_qat``: importing this
  module registers fuser methods for every PyTorch pattern with a
  ``BatchNorm1d``/``BatchNorm2d`` (conv-bn, conv-bn-relu, linear-bn,
  convtranspose-bn, bn-relu) with darknet_bn's classes in its place; they hand
  PyTorch's fuser a ``torch.nn`` batch norm sharing the module's parameters
  and buffers, so the fused modules are PyTorch's (the same mapping is
  :data:`FUSER_METHOD_MAPPING`, for ``additional_fuser_method_mapping``).
  ``torch.nn.utils.fusion.fuse_conv_bn_eval`` and ``fuse_linear_bn_eval``
  take the modules directly. FX graph-mode fusion (``fuse_fx``) matches
  ``torch.nn``'s exact classes and leaves darknet_bn's modules unfused.

Importing this module needs PyTorch; ``import darknet_bn`` never imports it.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import struct
from typing import Any, Callable, Dict, List, Optional, Tuple

try:
    import torch
    import torch.fx
    import torch.nn.functional as F
    import torch.utils._python_dispatch
    from torch.autograd import forward_ad as _forward_ad
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "darknet_bn.torch needs PyTorch, which is not installed: "
        "pip install 'darknet_bn[torch]' (or pip install torch)"
    ) from exc

import numpy as np

from . import fold as _fold
from ._graph_break import graph_break
from ._lib import check, ffi, lib
from ._openmp_team import use_openmp_team
from ._saved_tensors import PLAIN_TYPES as _PLAIN_TYPES, as_saved

# the calls run on PyTorch's OpenMP team when it has more than one thread (DARKNET_BN_TEAM=pool: darknet_bn's
# own pool); not in a forked child (darknet_bn._openmp_team)
use_openmp_team(prefer=os.path.dirname(torch.__file__), threads=torch.get_num_threads())

__all__ = ["BatchNorm1d", "BatchNorm2d", "FUSER_METHOD_MAPPING", "SyncBatchNorm", "batch_norm", "convert_model"]

_INT_MAX = 2**31 - 1
_SCRATCH = int(lib.DNBN_SCRATCH_DOUBLES)
_SC_MEAN = int(lib.DNBN_SCRATCH_MEAN)  # scratch row: [mean, normalizer, backward's] (csrc/darknet_bn.h)
_SC_INV = int(lib.DNBN_SCRATCH_INV)
_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
_is_functional = getattr(torch, "_is_functional_tensor", None)
_dispatch_mode = getattr(torch.utils._python_dispatch, "_get_current_dispatch_mode", None)


def _fp(t: torch.Tensor) -> Any:
    """A ``float *`` onto a contiguous float32 tensor's memory (the caller keeps ``t`` alive)."""
    return ffi.cast("float *", t.data_ptr())


def _dp(t: torch.Tensor) -> Any:
    """A ``double *`` onto a contiguous float64 tensor's memory."""
    return ffi.cast("double *", t.data_ptr())


def _plain_cpu_f32(t: torch.Tensor) -> bool:
    """A real tensor (not a subclass or wrapper) of float32 values in CPU memory, strided."""
    if type(t) not in _PLAIN_TYPES or t.dtype is not torch.float32 or not t.is_cpu or t.layout is not torch.strided:
        return False
    if _is_wrapped is not None and _is_wrapped(t):
        return False
    if _is_functional is not None and _is_functional(t):
        return False
    return True


def _per_channel_ok(t: Optional[torch.Tensor], c: int) -> bool:
    return t is None or (_plain_cpu_f32(t) and t.dim() == 1 and t.numel() == c and t.is_contiguous())


def _channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-d tensor is laid out channels-last (NHWC) and not also plainly contiguous."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _same_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` laid out as ``like`` (contiguous, or channels-last), copied only if it is not already."""
    return t.contiguous(memory_format=torch.channels_last) if _channels_last(like) else t.contiguous()


def _dims(x: torch.Tensor) -> Tuple[int, int, int, int]:
    """(batch, channels, h, w) of an (N, C), (N, C, L) or (N, C, H, W, ...) input as the C layer sees it.

    A channels-last (N, C, H, W) tensor is an (N*H*W) x C matrix in memory: the
    C layer's spatial == 1 case, with N*H*W rows (docs/reference.md §2).
    """
    shape = x.shape
    n, c, dims = shape[0], shape[1], len(shape)
    if dims == 2:
        return n, c, 1, 1
    if dims == 3:
        return n, c, 1, shape[2]
    if _channels_last(x):
        return n * shape[2] * shape[3], c, 1, 1
    return n, c, shape[2], math.prod(shape[3:])


@functools.lru_cache(maxsize=64)
def _eps_ok(eps: float) -> bool:
    """Whether eps is positive and finite in float32 (as the C layer stores it); a model has few distinct ones."""
    return bool(0.0 < np.float32(eps) < np.inf)


def _servable(input: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, training: bool,
              momentum: Any, eps: Any) -> bool:
    """Whether the C layer can compute this call (see the module docstring for what cannot)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or getattr(_forward_ad, "_current_level", -1) >= 0:
        return False
    if _dispatch_mode is not None and _dispatch_mode() is not None:
        return False  # make_fx, FakeTensorMode, FlopCounterMode...: the mode must see a batch norm op
    if not isinstance(input, torch.Tensor) or not _plain_cpu_f32(input) or input.dim() < 2 or input.numel() == 0:
        return False
    n, c, h, w = _dims(input)
    if n > _INT_MAX or c * h > _INT_MAX or c * h * w > _INT_MAX:
        return False
    for t in (weight, bias, running_mean, running_var):
        if not _per_channel_ok(t, c):
            return False
    if (running_mean is None) != (running_var is None):
        return False
    if not training and running_mean is None:
        return False  # PyTorch raises its own error
    if training and n * h * w < 2:
        return False  # PyTorch raises "Expected more than 1 value per channel when training"
    if not isinstance(eps, (int, float)) or not _eps_ok(eps):
        return False
    if training and running_mean is not None:
        if not isinstance(momentum, (int, float)) or not (0.0 <= momentum <= 1.0):
            return False
    return True


# The dnbn_layer fields _new_layer writes, in the struct's order; the others stay zero: delta,
# scale_updates and bias_updates (set in backward), x_norm (never touched with keep_x_norm = 0),
# keep_x_norm, state, trained, x_norm_current and memory.
_LAYER_FIELDS = ("batch", "out_c", "out_h", "out_w", "outputs", "output", "x", "scales", "biases", "mean",
                 "variance", "rolling_mean", "rolling_variance", "mean_delta", "variance_delta", "numerics", "eps",
                 "momentum", "scratch")


def _layer_packer(names: Tuple[str, ...] = _LAYER_FIELDS) -> struct.Struct:
    """A ``struct.Struct`` writing ``names`` of a ``dnbn_layer`` at the C struct's offsets (pointers as addresses).

    Built from cffi's description of the struct, so it follows
    ``csrc/darknet_bn.h``. One ``pack_into`` costs about what two field
    assignments through cffi do.
    """
    fields = dict(ffi.typeof("dnbn_layer").fields)
    fmt, pos = "=", 0
    for name in names:
        field = fields[name]
        code = "Q" if field.type.kind == "pointer" else {"int": "i", "float": "f"}[field.type.cname]
        if field.offset < pos or struct.calcsize("=" + code) != ffi.sizeof(field.type):
            raise RuntimeError(f"dnbn_layer.{name}: not where darknet_bn.torch expects it")
        fmt += "x" * (field.offset - pos) + code
        pos = field.offset + ffi.sizeof(field.type)
    return struct.Struct(fmt)


_LAYER_PACK = _layer_packer()
_LAYER_SIZE = ffi.sizeof("dnbn_layer")
_STANDARD = int(lib.DNBN_NUMERICS_STANDARD)


def _new_layer(x: torch.Tensor, out: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
               rolling_mean: torch.Tensor, rolling_var: torch.Tensor, work: torch.Tensor, eps: float,
               momentum: float) -> Any:
    """A caller-filled ``dnbn_layer`` in standard numerics over the given tensors' memory.

    ``work`` (float64, (DNBN_SCRATCH_DOUBLES + 2)*C) holds the scratch, then
    mean, variance, mean_delta and variance_delta as rows of C floats. The
    numerics, eps and momentum are set as fields:
    ``dnbn_batchnorm_layer_set_numerics`` would reset the running statistics,
    which here are the module's buffers. The struct lives in a bytearray that
    the returned cdata keeps alive.
    """
    n, c, h, w = _dims(x)
    scratch = work.data_ptr()
    row = scratch + 8 * _SCRATCH * c  # the statistics' rows, 4c bytes apart
    memory = bytearray(_LAYER_SIZE)
    _LAYER_PACK.pack_into(memory, 0, n, c, h, w, c * h * w, out.data_ptr(),
                          x.data_ptr(),  # the input itself: forward does not copy it
                          scales.data_ptr(), biases.data_ptr(), row, row + 4 * c, rolling_mean.data_ptr(),
                          rolling_var.data_ptr(), row + 8 * c, row + 12 * c, _STANDARD, eps, momentum, scratch)
    return ffi.from_buffer("dnbn_layer *", memory)


def _filled(c: int, value: float) -> torch.Tensor:
    """A float32 CPU tensor of ``c`` values ``value`` (explicit dtype and device: see :func:`_forward`)."""
    return torch.full((c,), value, dtype=torch.float32, device="cpu")


def _forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
             momentum: float, eps: float) -> Tuple[torch.Tensor, Any, Tuple[torch.Tensor, ...]]:
    """The C layer's forward: (output, the layer struct, the tensors its pointers need alive)."""
    c = x.shape[1]
    scales = weight if weight is not None else _filled(c, 1.0)
    biases = bias if bias is not None else _filled(c, 0.0)
    tracked = running_mean is not None and running_var is not None
    rolling_mean = running_mean if tracked else _filled(c, 0.0)
    rolling_var = running_var if tracked else _filled(c, 1.0)
    out = torch.empty_like(x, memory_format=torch.preserve_format)  # x's layout, contiguous or NHWC
    # Every tensor C reads or writes gets its dtype and device here, not from
    # torch.set_default_dtype or a `with torch.device(...)` block around the call.
    work = torch.empty((_SCRATCH + 2) * c, dtype=torch.float64, device="cpu")  # scratch, then 4 rows of statistics
    layer = _new_layer(x, out, scales, biases, rolling_mean, rolling_var, work, float(eps),
                       float(momentum) if training and tracked else 0.0)
    net = ffi.new("dnbn_network *", {"input": _fp(x), "delta": ffi.NULL, "train": 1 if training else 0})
    check(lib.dnbn_forward_batchnorm_layer(layer, net[0]), "darknet_bn.torch batch_norm forward")
    return out, layer, (scales, work)


def _channel_shape(x: torch.Tensor) -> List[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


class _BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x) by the C layer; backward by the C layer (training) or torch ops (eval).

    ``x`` is contiguous float32 on the CPU; the other tensors passed the checks
    of :func:`_servable`. A backward run with grad mode on (``create_graph=True``)
    goes to :func:`_graph_backward`, whose result is differentiable again.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
                momentum: float, eps: float) -> torch.Tensor:
        out, layer, keep = _forward(x, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.training = bool(training)
        ctx.eps = float(eps)
        ctx.shape, ctx.layout = x.shape, torch.channels_last if _channels_last(x) else torch.contiguous_format
        ctx.save_for_backward(x, weight)
        if training:
            # Backward reads x, scales and the scratch (batch mean and normalizer)
            # through the struct; it writes mean_delta and variance_delta.
            ctx.layer, ctx.keep = layer, keep
        else:
            # Eval with running statistics (both given: _servable): the
            # statistics this forward used, as PyTorch keeps them for its backward.
            assert running_mean is not None and running_var is not None
            ctx.mean = running_mean.clone()
            ctx.var = running_var.clone()
            ctx.invstd = torch.from_numpy(_fold.normalizer(running_var.detach().double().cpu().numpy(), "standard",
                                                            float(eps))).float()
        return out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        if not (need_x or need_w or need_b):
            return (None,) * 8
        if torch.is_grad_enabled():
            # create_graph=True: the gradient must itself be differentiable.
            dx, dw, db = _graph_backward(ctx, x, weight, dy, need_x, need_w, need_b)
        elif ctx.training:
            x = as_saved(x, ctx.shape, ctx.layout, "input")
            weight = None if weight is None else as_saved(weight, ctx.shape[1:2], torch.contiguous_format, "weight")
            dx, dw, db = _train_backward(ctx, x, weight, _same_layout(dy, x), need_x)
        else:
            dx, dw, db = _eval_backward(ctx, x, weight, _same_layout(dy, x), need_x, need_w, need_b)
        return (dx if need_x else None, dw if need_w else None, db if need_b else None,
                None, None, None, None, None)


def _graph_backward(ctx: Any, x: torch.Tensor, weight: Optional[torch.Tensor], dy: torch.Tensor, need_x: bool,
                    need_w: bool, need_b: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """The backward as a differentiable PyTorch op, for ``create_graph=True``: (dx, dweight, dbias).

    ``aten::native_batch_norm_backward`` is the op PyTorch's own batch norm
    differentiates with; its derivative (``batchnorm_double_backward``) treats
    the batch statistics as functions of ``x`` in training. It gets the
    statistics the C forward normalized with: the batch mean and
    1/sqrt(biased variance + eps) from the layer's scratch (training), or
    copies of the running statistics (eval). ``x`` and ``weight`` come from
    ``ctx.saved_tensors``, so the result is connected to them in the graph.
    """
    if ctx.training:
        c = x.shape[1]
        sc = ctx.keep[1][:_SCRATCH * c].view(c, _SCRATCH)
        save_mean, save_invstd = sc[:, _SC_MEAN].float(), sc[:, _SC_INV].float()
        running_mean = running_var = None
    else:
        save_mean = save_invstd = None
        running_mean, running_var = ctx.mean, ctx.var
    dx, dw, db = torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, running_mean, running_var, save_mean, save_invstd, ctx.training, ctx.eps,
        [need_x, need_w, need_b])
    return dx, dw, db


def _train_backward(ctx: Any, x: torch.Tensor, weight: Optional[torch.Tensor], dy: torch.Tensor,
                    need_x: bool) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The C layer's exact backward of its training forward: (dx or None, dweight, dbias)."""
    layer = ctx.layer
    scales, work = ctx.keep
    c = x.shape[1]
    # The saved tensors are the ones forward pointed at (autograd checked their versions).
    layer.x = _fp(x)
    layer.scales = _fp(weight if weight is not None else scales)
    if need_x:
        dx = torch.empty_like(x, memory_format=torch.preserve_format)
        # backward accumulates (+=) into the updates: they start at zero. Two
        # tensors, not views of one, as they become weight.grad and bias.grad.
        dw, db = _filled(c, 0.0), _filled(c, 0.0)
        layer.delta = _fp(dx)
        layer.scale_updates, layer.bias_updates = _fp(dw), _fp(db)
        try:
            check(lib.dnbn_backward_batchnorm_layer_from(layer, _fp(dy)), "darknet_bn.torch batch_norm backward")
        finally:
            layer.delta = layer.scale_updates = layer.bias_updates = ffi.NULL
        return dx, dw, db
    # Only the parameters' gradients: the sums phase alone (no pass writing dx).
    sums = torch.empty(2, c, dtype=torch.float64, device="cpu")
    check(lib.dnbn_batchnorm_layer_backward_sums(layer, _fp(dy), _dp(sums[0]), _dp(sums[1])),
          "darknet_bn.torch batch_norm backward")
    inv = work[:_SCRATCH * c].view(c, _SCRATCH)[:, _SC_INV]
    return None, (sums[1] * inv).float(), sums[0].float()


def _eval_backward(ctx: Any, x: torch.Tensor, weight: Optional[torch.Tensor], dy: torch.Tensor, need_x: bool,
                   need_w: bool, need_b: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """The exact backward of the running-statistics forward, with torch operations."""
    shape = _channel_shape(x)
    dims = [0] + list(range(2, x.dim()))
    invstd = ctx.invstd
    dx = dw = db = None
    if need_x:
        a = invstd * weight if weight is not None else invstd
        dx = dy * a.view(shape)
    if need_w:
        dw = torch.sum(dy * (x - ctx.mean.view(shape)), dims, dtype=torch.float64).float() * invstd
    if need_b:
        db = torch.sum(dy, dims, dtype=torch.float64).float()
    return dx, dw, db


@graph_break
def batch_norm(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` computed by darknet_bn's C layer (same arguments, same results).

    In training the running statistics (when given) are updated in place with
    ``momentum``; without training they normalize. Calls the C layer cannot
    serve go to ``torch.nn.functional.batch_norm`` (module docstring).
    """
    if not _servable(input, running_mean, running_var, weight, bias, training, momentum, eps):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if not (input.is_contiguous() or _channels_last(input)):
        input = input.contiguous()  # a transposed or sliced view
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))):
        # nothing to differentiate (inference, torch.no_grad()): no autograd node, nothing kept for backward
        return _forward(input, weight, bias, running_mean, running_var, training, momentum, eps)[0]
    return _BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training, momentum, eps)


def _fx_leaf(module: torch.nn.Module, input: torch.fx.Proxy) -> Optional[torch.fx.Proxy]:
    """Under ``torch.fx`` symbolic tracing, the ``call_module`` node a leaf module gets, or None for the root.

    ``torch.fx.Tracer.is_leaf_module`` makes only modules defined in
    ``torch.nn`` leaves; for darknet_bn's the tracer calls ``forward`` with a
    ``Proxy``, and this emits what the tracer emits for a leaf, so the traced
    graph calls the module itself (and runs the C layer). The root module has
    no call site to record: it is traced like ``torch.nn``'s (which fails).
    """
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if not path:
        return None
    return tracer.create_proxy("call_module", path, (input,), {})


class _DarknetBatchNorm:
    """The forward of ``torch.nn.modules.batchnorm._BatchNorm``, with :func:`batch_norm` in place of PyTorch's.

    TorchScript compiles only the branches of ``torch.jit.is_scripting()`` it
    takes: the scripted forward is ``torch.nn.BatchNorm*d``'s, with
    ``torch.nn.functional.batch_norm``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if isinstance(input, torch.fx.Proxy):
                leaf = _fx_leaf(self, input)  # type: ignore[arg-type]
                if leaf is not None:
                    return leaf
        self._check_input_dim(input)  # type: ignore[attr-defined]
        if self.momentum is None:  # type: ignore[attr-defined]
            factor = 0.0
        else:
            factor = self.momentum  # type: ignore[attr-defined]
        if self.training and self.track_running_stats:  # type: ignore[attr-defined]
            if self.num_batches_tracked is not None:  # type: ignore[attr-defined]
                self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
                if self.momentum is None:  # type: ignore[attr-defined]
                    factor = 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
                else:
                    factor = self.momentum  # type: ignore[attr-defined]
        # buffers and parameters read once each (a Module attribute lookup costs about half a microsecond)
        running_mean, running_var = self.running_mean, self.running_var  # type: ignore[attr-defined]
        if self.training:
            bn_training = True
        else:
            bn_training = running_mean is None and running_var is None
        if self.training and not self.track_running_stats:  # type: ignore[attr-defined]
            running_mean = running_var = None
        if torch.jit.is_scripting():
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,  # type: ignore
                                bn_training, factor, self.eps)  # type: ignore[attr-defined]
        return batch_norm(input, running_mean, running_var, self.weight, self.bias,  # type: ignore[attr-defined]
                          bn_training, factor, self.eps)  # type: ignore[attr-defined]


class BatchNorm1d(_DarknetBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` over (N, C) or (N, C, L) inputs, computed by darknet_bn's C layer.

    Same arguments, parameters, buffers and results as ``torch.nn.BatchNorm1d``;
    see :mod:`darknet_bn.torch` for how it computes and what falls back to PyTorch.
    """


class BatchNorm2d(_DarknetBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` over (N, C, H, W) inputs, computed by darknet_bn's C layer.

    Same arguments, parameters, buffers and results as ``torch.nn.BatchNorm2d``;
    see :mod:`darknet_bn.torch` for how it computes and what falls back to PyTorch.
    """


_REPLACEMENTS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d}


def _rebuild(bn: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A ``cls`` batch norm holding ``bn``'s very Parameter and buffer objects, hyperparameters and mode."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    # The very same Parameter and buffer tensors: optimizers built before the
    # conversion keep working, and nothing is copied.
    new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    for name in ("qconfig",):
        if hasattr(bn, name):
            setattr(new, name, getattr(bn, name))
    return new


def _convert_one(bn: torch.nn.Module) -> torch.nn.Module:
    """darknet_bn's module in place of a ``torch.nn.BatchNorm1d``/``2d``, sharing its tensors."""
    return _rebuild(bn, _REPLACEMENTS[type(bn)])


def convert_model(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``torch.nn.BatchNorm1d`` and ``torch.nn.BatchNorm2d`` in ``module`` by darknet_bn's.

    Works in place on ``module``'s children and returns the module (a new one
    when ``module`` itself is a batch norm), like
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``. The new modules hold the
    same ``Parameter`` and buffer objects (so an optimizer created earlier still
    updates them), the same hyperparameters and training mode. Only those two
    exact classes are replaced: subclasses (``SyncBatchNorm``, lazy or custom
    batch norms) and darknet_bn's own modules are left as they are. Hooks
    registered on a replaced module are not carried over.
    """
    if type(module) in _REPLACEMENTS:
        return _convert_one(module)
    for name, child in module.named_children():
        new = convert_model(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _to_torch(module: torch.nn.Module) -> torch.nn.Module:
    """A ``torch.nn.BatchNorm1d``/``2d`` holding the same Parameter and buffer tensors as a darknet_bn module.

    (Any other module is returned as it is.) The inverse of :func:`_convert_one`,
    for PyTorch's fusers, which check for ``torch.nn``'s exact classes.
    """
    for stock, mine in _REPLACEMENTS.items():
        if type(module) is mine:
            return _rebuild(module, stock)
    return module


def _via_torch(fuser: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    """A fuser method that gives ``fuser`` (PyTorch's) ``torch.nn`` batch norms in place of darknet_bn's."""

    def fuser_method(is_qat: bool, *modules: torch.nn.Module) -> torch.nn.Module:
        return fuser(is_qat, *(_to_torch(m) for m in modules))

    fuser_method.__name__ = fuser_method.__qualname__ = f"darknet_bn_{getattr(fuser, '__name__', 'fuser')}"
    fuser_method.__doc__ = f"{getattr(fuser, '__name__', 'fuser')} with darknet_bn's batch norms (darknet_bn.torch)."
    return fuser_method


def _fuser_method_mapping() -> Dict[Tuple[type, ...], Callable[..., torch.nn.Module]]:
    """PyTorch's eager-mode fuser patterns containing a BatchNorm1d/2d, with darknet_bn's class in its place.

    Every combination (several batch norms in one pattern are each either
    class) other than the all-``torch.nn`` one; empty where PyTorch has no
    such table.
    """
    try:
        from torch.ao.quantization import fuser_method_mappings as fmm
        default = dict(fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD)
    except (ImportError, AttributeError):  # pragma: no cover - other PyTorch versions
        return {}
    mapping: Dict[Tuple[type, ...], Callable[..., torch.nn.Module]] = {}
    for ops, fuser in default.items():
        if not isinstance(ops, tuple) or not callable(fuser) or not any(op in _REPLACEMENTS for op in ops):
            continue
        choices = [(op, _REPLACEMENTS[op]) if op in _REPLACEMENTS else (op,) for op in ops]
        for combo in itertools.product(*choices):
            if combo != ops:
                mapping[combo] = _via_torch(fuser)
    return mapping


FUSER_METHOD_MAPPING: Dict[Tuple[type, ...], Callable[..., torch.nn.Module]] = _fuser_method_mapping()
"""Fuser methods for ``torch.ao.quantization.fuse_modules`` with darknet_bn's modules.

Keys are PyTorch's patterns (``(torch.nn.Conv2d, BatchNorm2d, torch.nn.ReLU)``,
...) with :class:`BatchNorm1d`/:class:`BatchNorm2d`; each method converts the
batch norm to a ``torch.nn`` one sharing its tensors and calls PyTorch's
fuser. Importing this module adds them to PyTorch's default table (only these
keys; ``torch.nn``'s own are untouched), so ``fuse_modules(model, ...)`` works
on converted models without arguments; the dict is also accepted as
``fuse_custom_config_dict={"additional_fuser_method_mapping": FUSER_METHOD_MAPPING}``.
"""


def _register_fuser_methods() -> None:
    """Add :data:`FUSER_METHOD_MAPPING` to PyTorch's default eager fuser table (existing keys are kept)."""
    try:
        from torch.ao.quantization import fuser_method_mappings as fmm
        table = fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD
    except (ImportError, AttributeError):  # pragma: no cover - other PyTorch versions
        return
    for ops, method in FUSER_METHOD_MAPPING.items():
        table.setdefault(ops, method)


_register_fuser_methods()


from ._sync_torch import SyncBatchNorm  # noqa: E402  (re-export; _sync_torch imports this module lazily)
