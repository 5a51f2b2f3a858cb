"""``SyncBatchNorm``: ``torch.nn.SyncBatchNorm`` for CPU tensors, synchronized by darknet_bn's protocol.

Re-exported as ``darknet_bn.torch.SyncBatchNorm``::

    import torch, torch.distributed as dist, darknet_bn.torch as dbt

    dist.init_process_group("gloo", ...)
    model = dbt.SyncBatchNorm.convert_sync_batchnorm(model)
    model = torch.nn.parallel.DistributedDataParallel(model)

Same constructor (``num_features, eps, momentum, affine, track_running_stats,
process_group, device, dtype``, keyword ``bias``), parameters, buffers and
``state_dict`` keys as ``torch.nn.SyncBatchNorm`` (its state dicts load both
ways), and the same decisions in ``forward``:

* **Training with a process group of more than one rank** (``torch.distributed``
  initialized, or ``process_group`` another communicator, see below): on CPU,
  where PyTorch's own raises ("SyncBatchNorm expected input tensor to be on
  GPU"), it computes: the batch statistics of the whole batch over the ranks
  by darknet_bn's protocol (:mod:`darknet_bn.distributed`: one allgather of
  (count, mean, M2) in float64 merged by Chan's formula in rank order in
  forward, one allreduce of (Σdy, Σdy·(x − μ)) in float64 in backward), the
  C layer's elementwise passes, running statistics with the same bits on every
  rank. Ranks may hold unequal shards, or none (a (0, C, ...) input); every
  rank joins both collectives. Weight and bias gradients are local, as
  PyTorch's (``DistributedDataParallel`` averages them). Input on another
  device goes to PyTorch's own implementation.
* **Eval, training without an initialized process group, or a group of one
  rank**: no synchronization; the local batch norm of ``darknet_bn.torch``
  (the C layer, same results as PyTorch's ``F.batch_norm``, which PyTorch
  falls back to in these cases).

Differences from PyTorch's class:

* It subclasses ``torch.nn.modules.batchnorm._BatchNorm`` (as PyTorch's does),
  not ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel`` rejects every
  ``isinstance(m, torch.nn.SyncBatchNorm)`` module of a CPU model ("SyncBatchNorm
  layers only work with GPU modules").
* The synchronized path computes float32 input (the C layer's type); another
  dtype raises. The check "more than 1 value per channel" is on the whole
  batch over all ranks, raised on every rank.
* A rank that fails its checks in a synchronized forward (wrong number of
  channels, dtype, ...) still joins the collective: it raises its own error
  and every other rank raises ``darknet_bn.distributed.PeerError``, with the
  module unchanged everywhere, so no rank waits for it. A rank that dies or
  never calls in makes the others raise after the process group's timeout.
* At a module's first synchronized forward over a group the ranks check, with
  one more collective, that their modules agree on ``num_features``, eps,
  momentum, affine and track_running_stats (every rank raises the same
  ``ArgumentError`` otherwise); PyTorch's does not check.
* ``process_group`` may also be an mpi4py communicator or any
  ``darknet_bn.distributed.Communicator``; the module then synchronizes over it
  in training whenever it has more than one rank.
* The backward is not differentiable again (``create_graph=True`` raises),
  like PyTorch's.

``convert_sync_batchnorm(module, process_group=None)`` converts every batch
norm (``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``,
``darknet_bn.torch.BatchNorm1d/2d``: every ``_BatchNorm``), sharing its
parameters and buffers, as PyTorch's classmethod does.
"""
from __future__ import annotations

import math
import os
import weakref
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from ._graph_break import graph_break
from ._lib import check, ffi, lib
from ._saved_tensors import as_saved
from .distributed import (Communicator, TorchCommunicator, _agree_settings, as_communicator, sync_backward_sums,
                          sync_moments)
from .errors import ArgumentError, ArgumentTypeError

__all__ = ["SyncBatchNorm"]

_INT_MAX = 2**31 - 1
_SCRATCH = int(lib.DNBN_SCRATCH_DOUBLES)
_SC_INV = int(lib.DNBN_SCRATCH_INV)


def _fp(t: torch.Tensor) -> Any:
    """A ``float *`` onto a contiguous float32 tensor (the caller keeps it alive)."""
    return ffi.cast("float *", t.data_ptr())


def _dp(a: np.ndarray) -> Any:
    """A ``double *`` onto a contiguous float64 array (the caller keeps it alive)."""
    return ffi.from_buffer("double[]", a)


def _f32_channel_vector(t: Optional[torch.Tensor], name: str, c: int) -> None:
    """Check a per-channel tensor the C layer reads or writes in place."""
    if t is None:
        return
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.layout != torch.strided:
        raise ArgumentTypeError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    if t.dim() != 1 or t.numel() != c or not t.is_contiguous():
        raise ArgumentError(
            f"{name} must be a contiguous tensor of num_features={c} values, got shape {tuple(t.shape)}"
        )


def _check_sync_input(input: Any, c: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor]) -> None:
    """What the synchronized CPU path needs; raises naming the argument."""
    if not isinstance(input, torch.Tensor):
        raise ArgumentTypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    if input.size(1) == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    if input.dtype != torch.float32 or input.layout != torch.strided:
        raise ArgumentTypeError(
            f"input must be a float32 tensor for darknet_bn's synchronized batch norm on the CPU, got {input.dtype}"
        )
    if input.size(1) != c:
        raise ArgumentError(f"input has {input.size(1)} channels (dimension 1), expected num_features={c}")
    n, h, w = input.size(0), input.size(2) if input.dim() > 2 else 1, math.prod(input.shape[3:])
    if n > _INT_MAX or c * h > _INT_MAX or c * h * w > _INT_MAX:
        raise ArgumentError(f"input of shape {tuple(input.shape)} is too large for the C layer's int sizes")
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        _f32_channel_vector(t, name, c)


def _layer_dims(x: torch.Tensor) -> Tuple[int, int, int, int]:
    """(batch, c, h, w) as the C layer sees x; an empty shard is (0, c, 1, 1)."""
    n, c = x.shape[0], x.shape[1]
    h = x.shape[2] if x.dim() > 2 else 1
    w = math.prod(x.shape[3:])
    if n * h * w == 0:
        return 0, c, 1, 1
    return n, c, h, w


class _Struct:
    """A caller-filled ``dnbn_layer`` in standard numerics, and the tensors it points at (kept alive here).

    After the forward, :meth:`keep_for_backward` drops every reference to the
    forward's tensors (input, output, running statistics): backward re-points
    ``x`` at the saved input, and holding the output here would make a
    reference cycle through autograd's graph.
    """

    def __init__(self, x: torch.Tensor, out: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                 rolling_mean: torch.Tensor, rolling_var: torch.Tensor, eps: float, momentum: float) -> None:
        n, c, h, w = _layer_dims(x)
        self.c = c
        self.values = n * h * w
        self.stats = torch.zeros(4, c, dtype=torch.float32)  # mean, variance, mean_delta, variance_delta
        self.scratch = torch.zeros(c * _SCRATCH, dtype=torch.float64)
        self.placeholder = torch.zeros(1, dtype=torch.float32)  # what pointers without a tensor point at
        self.scales = scales
        self.tensors: List[torch.Tensor] = [x, out, biases, rolling_mean, rolling_var]
        layer = ffi.new("dnbn_layer *")
        layer.batch, layer.out_c, layer.out_h, layer.out_w, layer.outputs = n, c, h, w, c * h * w
        layer.x = self.pointer(x)  # the input itself: the elementwise pass does not copy it
        layer.output = self.pointer(out)
        layer.x_norm = ffi.NULL  # keep_x_norm = 0: never written
        layer.delta = ffi.NULL  # set in backward
        layer.scales, layer.biases = _fp(scales), _fp(biases)
        layer.rolling_mean, layer.rolling_variance = _fp(rolling_mean), _fp(rolling_var)
        layer.mean, layer.variance = _fp(self.stats[0]), _fp(self.stats[1])
        layer.mean_delta, layer.variance_delta = _fp(self.stats[2]), _fp(self.stats[3])
        layer.scale_updates = layer.bias_updates = ffi.NULL  # set in backward
        layer.numerics = lib.DNBN_NUMERICS_STANDARD
        layer.eps = eps
        layer.momentum = momentum
        layer.keep_x_norm = 0
        layer.scratch = ffi.cast("double *", self.scratch.data_ptr())
        layer.memory = ffi.NULL
        self.layer = layer

    def pointer(self, t: torch.Tensor) -> Any:
        """An activation pointer for this shard (the placeholder when it is empty)."""
        return _fp(t) if self.values else _fp(self.placeholder)

    def keep_for_backward(self) -> None:
        """Forget the forward's tensors; what backward reads (scales, stats, scratch) stays."""
        here = _fp(self.placeholder)
        layer = self.layer
        layer.x = layer.output = layer.biases = layer.rolling_mean = layer.rolling_variance = here
        self.tensors = []

    def inv(self) -> torch.Tensor:
        """The normalizer 1/sqrt(var + eps) of the forward, float64 (c,)."""
        return self.scratch.view(self.c, _SCRATCH)[:, _SC_INV]


class _SyncBatchNormFunction(torch.autograd.Function):
    """The synchronized training batch norm on CPU float32: forward and backward, one collective each."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float,
                momentum: float, comm: Communicator, num_features: int) -> torch.Tensor:
        step = "SyncBatchNorm.forward"
        c = num_features
        mean, m2 = np.zeros(c, np.float64), np.zeros(c, np.float64)
        values = 0
        failure: Optional[BaseException] = None
        x = input
        try:
            _check_sync_input(input, c, weight, bias, running_mean, running_var)
            x = input.contiguous()
            n, _, h, w = _layer_dims(x)
            values = n * h * w
            if values:
                lib.dnbn_batchnorm_moments(_fp(x), n, c, h * w, _dp(mean), _dp(m2))
        except Exception as exc:  # joins the collective, then re-raised
            failure = exc
        count, g_mean, g_m2 = sync_moments(comm, float(values), mean, m2, failure, step)
        if not count >= 2:
            raise ArgumentError(
                f"Expected more than 1 value per channel when training, got {count:g} values per channel "
                f"over the {comm.size} ranks (this rank's input size {tuple(input.shape)})"
            )
        tracked = running_mean is not None and running_var is not None
        out = torch.empty(x.shape, dtype=torch.float32)
        s = _Struct(
            x, out,
            weight if weight is not None else torch.ones(c, dtype=torch.float32),
            bias if bias is not None else torch.zeros(c, dtype=torch.float32),
            running_mean if tracked else torch.zeros(c, dtype=torch.float32),
            running_var if tracked else torch.ones(c, dtype=torch.float32),
            float(eps), float(momentum) if tracked else 0.0,
        )
        check(lib.dnbn_batchnorm_layer_forward_moments(s.layer, s.pointer(x), count, _dp(g_mean), _dp(g_m2)), step)
        s.keep_for_backward()
        ctx.struct, ctx.comm, ctx.count, ctx.shape = s, comm, count, x.shape
        ctx.save_for_backward(x, weight)
        if input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
            return out.contiguous(memory_format=torch.channels_last)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        step = "SyncBatchNorm.backward"
        s: _Struct = ctx.struct
        c = s.c
        sum_dy, sum_dy_dev = np.zeros(c, np.float64), np.zeros(c, np.float64)
        failure: Optional[BaseException] = None
        dy = grad_output
        try:  # everything that can fail before the collective, so that a failure here reaches the peers
            x, weight = ctx.saved_tensors  # forward saved x contiguous (NCHW)
            x = as_saved(x, ctx.shape, torch.contiguous_format, "input")
            weight = None if weight is None else as_saved(weight, (c,), torch.contiguous_format, "weight")
            dy = grad_output.to(torch.float32).contiguous()
            if s.values:
                layer = s.layer
                layer.x = _fp(x)
                layer.scales = _fp(weight) if weight is not None else _fp(s.scales)
                check(lib.dnbn_batchnorm_layer_backward_sums(layer, _fp(dy), _dp(sum_dy), _dp(sum_dy_dev)), step)
        except Exception as exc:  # joins the collective, then re-raised
            failure = exc
        # Every rank joins, whatever its own gradients need (a rank without an input
        # gradient still contributes its sums to the others').
        total_dy, total_dy_dev = sync_backward_sums(ctx.comm, sum_dy, sum_dy_dev, failure, step)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # Local parameter gradients, as PyTorch's: sum dy and sum dy*x_hat over this shard.
        grad_w = (torch.from_numpy(sum_dy_dev) * s.inv()).float() if need_w and weight is not None else None
        grad_b = torch.from_numpy(sum_dy).float() if need_b else None
        grad_x = None
        if need_x:
            grad_x = torch.empty(x.shape, dtype=torch.float32)
            if s.values:
                layer = s.layer
                updates = torch.zeros(2, c, dtype=torch.float32)  # the global updates C writes; not used
                layer.delta = _fp(grad_x)
                layer.scale_updates, layer.bias_updates = _fp(updates[0]), _fp(updates[1])
                try:
                    check(lib.dnbn_batchnorm_layer_backward_apply(layer, _fp(dy), ctx.count, _dp(total_dy),
                                                                  _dp(total_dy_dev)), step)
                finally:
                    layer.delta = layer.scale_updates = layer.bias_updates = ffi.NULL
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


# module -> (pid, id(process_group)) of its ranks' agreement on its settings (_agree_once)
_AGREED: "weakref.WeakKeyDictionary[torch.nn.Module, Tuple[int, int]]" = weakref.WeakKeyDictionary()


def _agree_once(module: "SyncBatchNorm", comm: Communicator) -> None:
    """At a module's first synchronized forward (in this process, over this group), check with one collective
    that every rank's module has the same settings.

    Without it, ranks with different ``num_features`` would exchange payloads of
    different sizes (gloo aborts the process, MPI truncates) and different eps
    or momentum would give each rank its own results. Later changes on one rank
    alone are not checked (that would take a collective per step).
    """
    key = (os.getpid(), id(module.process_group))
    if _AGREED.get(module) == key:
        return
    _agree_settings(comm, {"num_features": module.num_features, "eps": module.eps,
                           "momentum": -1.0 if module.momentum is None else module.momentum,
                           "affine": float(module.affine), "track_running_stats": float(module.track_running_stats)},
                    "SyncBatchNorm.forward")
    _AGREED[module] = key


@graph_break
def _sync_batch_norm(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float,
                     momentum: float, comm: Communicator, module: "SyncBatchNorm") -> torch.Tensor:
    _agree_once(module, comm)
    return _SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, eps, momentum, comm,
                                        module.num_features)


def _is_torch_group(group: Any) -> bool:
    return group is None or (dist.is_available() and isinstance(group, dist.ProcessGroup))


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.SyncBatchNorm`` that also trains on CPU tensors (see :mod:`darknet_bn._sync_torch`).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device,
            dtype, bias: as ``torch.nn.SyncBatchNorm``.
        process_group: the ``torch.distributed`` process group to synchronize
            over (None: the default group), or an mpi4py communicator or
            ``darknet_bn.distributed.Communicator``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        extra = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         **extra)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: torch.Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _communicator(self) -> Optional[Communicator]:
        """The communicator a training forward synchronizes over, or None when there is nothing to synchronize."""
        group = self.process_group
        if _is_torch_group(group):
            if not (dist.is_available() and dist.is_initialized()):
                return None
            group = group if group else None  # PyTorch: `if self.process_group:` else WORLD
            if dist.get_world_size(group) <= 1:
                return None
            return TorchCommunicator(group)
        comm = as_communicator(group)
        return comm if comm.size > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Batch norm of ``input``, synchronized over the process group in training (module docstring)."""
        comm = self._communicator() if self.training else None
        if comm is not None and isinstance(input, torch.Tensor) and input.device.type != "cpu":
            if isinstance(comm, TorchCommunicator):
                return torch.nn.SyncBatchNorm.forward(self, input)  # PyTorch's own, for its devices
            raise ArgumentTypeError(
                f"input must be a CPU tensor to synchronize over {type(comm).__name__}, got one on {input.device}"
            )
        if comm is None:
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
        if self.momentum is None:
            factor = 0.0
        else:
            factor = self.momentum
        advance = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if advance and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)  # cumulative moving average
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        if comm is None:
            # The local C batch norm; imported here because darknet_bn.torch imports this module.
            from .torch import batch_norm

            if advance:
                self.num_batches_tracked.add_(1)
            return batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                              self.eps)
        out = _sync_batch_norm(input, self.weight, self.bias, running_mean, running_var, self.eps, factor, comm,
                               self)
        if advance:
            self.num_batches_tracked.add_(1)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
        """Replace every batch norm in ``module`` by a ``cls`` sharing its parameters and buffers.

        As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: every
        ``_BatchNorm`` (``torch.nn.BatchNorm1d/2d/3d``,
        ``torch.nn.SyncBatchNorm``, ``darknet_bn.torch.BatchNorm1d/2d``) becomes
        a ``cls`` with its hyperparameters, the very same weight and bias
        Parameters, running statistics and ``num_batches_tracked``, its
        training mode and ``qconfig``. Returns ``module`` with its children
        converted, or the new module when ``module`` is itself a batch norm.
        """
        module_output = module
        if isinstance(module, _BatchNorm):
            extra = {} if module.bias is not None or not module.affine else {"bias": False}
            module_output = cls(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group, **extra)
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return module_output
