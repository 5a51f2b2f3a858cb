"""``BatchNormLayer``: the C batch-norm layer over zero-copy NumPy views.

Every call validates its arguments first (raising before anything is
written), then calls the C library, then checks its status.
"""
from __future__ import annotations

import errno
import weakref
from typing import Any, BinaryIO, Optional, Tuple

import numpy as np

from . import _validate
from . import fold as _fold
from . import weights as _weights
from ._lib import check, ffi, floats, lib
from .errors import AllocationError, ArgumentError, ArgumentTypeError, LayerStateError

_NUMERICS = {"darknet": 0, "standard": 1}
_DEFAULT_MOMENTUM = {"darknet": 0.01, "standard": 0.1}
_DARKNET_EPS = 1e-5
_STATE_TRAINING = 2

_ACTIVATIONS = ("output", "delta", "x", "x_norm")
_CHANNELS = (
    "scales", "biases", "scale_updates", "bias_updates", "mean", "variance",
    "rolling_mean", "rolling_variance", "mean_delta", "variance_delta",
)


class _CBuffer:
    """Exposes C memory to NumPy and keeps the layer that owns it alive.

    ``np.asarray`` of this object is an array whose ``base`` is this object, so
    no view can outlive the C layer it points into.
    """

    __slots__ = ("__array_interface__", "_owner", "__weakref__")

    def __init__(self, owner: Any, address: int, shape: Tuple[int, ...]) -> None:
        self._owner = owner
        self.__array_interface__ = {"shape": shape, "typestr": "<f4", "data": (address, False), "version": 3}


def _buffer_property(name: str, doc: str) -> property:
    def get(self: "BatchNormLayer") -> np.ndarray:
        return self._view_of(name)

    def set(self: "BatchNormLayer", value: Any) -> None:
        view = self._view_of(name)
        arr = np.asarray(value)
        if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ArgumentTypeError(f"{name} must be an array of real numbers, got {type(value).__name__}")
        if arr.shape != view.shape:
            raise ArgumentError(f"{name} must have shape {view.shape}, got {arr.shape}")
        np.copyto(view, arr, casting="unsafe")

    return property(get, set, doc=doc)


class BatchNormLayer:
    """A batch-normalization layer for ``batch`` images of ``c`` channels of ``h`` x ``w``.

    Args:
        batch, w, h, c: sizes, each >= 1 (Darknet's argument order).
        numerics: ``"darknet"`` (Darknet's arithmetic, the default) or
            ``"standard"`` (the paper's / PyTorch's: biased variance in
            normalization, epsilon inside the root, exact gradients).
        eps: the epsilon of standard numerics (> 0). Darknet numerics use
            Darknet's constants (1e-6 outside the root in forward, 1e-5 inside
            it in backward) and accept only the default.
        momentum: the weight of the batch statistic in the running ones, in
            [0, 1]; None means 0.01 for darknet (Darknet's 0.99/0.01) and 0.1
            for standard (PyTorch's default).

    Buffers (``output``, ``delta``, ``x``, ``x_norm`` of shape (batch, c, h, w);
    ``scales``, ``biases``, ``scale_updates``, ``bias_updates``, ``mean``,
    ``variance``, ``rolling_mean``, ``rolling_variance``, ``mean_delta``,
    ``variance_delta`` of shape (c,)) are writable float32 views of the C
    layer's memory. Assigning to one copies values in.

    Raises:
        ArgumentTypeError: a size is not an integer, ``numerics`` not a str.
        ArgumentError: a size < 1 or too large, unknown numerics, eps or momentum out of range.
        AllocationError: the buffers could not be allocated.
    """

    def __init__(
        self,
        batch: int,
        w: int,
        h: int,
        c: int,
        numerics: str = "darknet",
        eps: float = 1e-5,
        momentum: Optional[float] = None,
    ) -> None:
        batch = _validate.size(batch, "batch")
        w = _validate.size(w, "w")
        h = _validate.size(h, "h")
        c = _validate.size(c, "c")
        if c * h * w > _validate.INT_MAX:
            raise ArgumentError(f"c*h*w must fit in a C int (<= {_validate.INT_MAX}), got {c * h * w}")
        if not isinstance(numerics, str):
            raise ArgumentTypeError(f"numerics must be a str, got {type(numerics).__name__}")
        if numerics not in _NUMERICS:
            raise ArgumentError(f"numerics must be 'darknet' or 'standard', got {numerics!r}")
        eps = _validate.real(eps, "eps")
        if numerics == "darknet" and eps != _DARKNET_EPS:
            raise ArgumentError("eps applies to numerics='standard'; darknet numerics use Darknet's constants")
        if not np.float32(eps) > 0:
            raise ArgumentError(f"eps must be > 0 in float32, got {eps}")
        momentum = _DEFAULT_MOMENTUM[numerics] if momentum is None else _validate.real(momentum, "momentum", 0, 1)

        raw = lib.dnbn_make_batchnorm_layer(batch, w, h, c)
        if raw == ffi.NULL:
            if ffi.errno == errno.EINVAL:
                raise ArgumentError(f"batch*c*h*w = {batch * c * h * w} values is too large to address")
            raise AllocationError(f"cannot allocate a batch-norm layer of {batch}x{c}x{h}x{w} float32 values")
        self._layer = ffi.gc(raw, lib.dnbn_free_batchnorm_layer)
        check(lib.dnbn_batchnorm_layer_set_numerics(self._layer, _NUMERICS[numerics], eps, momentum), "numerics")

        self._numerics, self._eps, self._momentum = numerics, eps, momentum
        # Fixed for the layer's life, kept at hand for the per-call checks.
        self._shapes = ((batch, c, h, w), (batch, c * h * w))
        self._count = batch * c * h * w
        self._trainable = batch * h * w >= 2
        self._net = ffi.new("dnbn_network *")
        self._views = {}
        for name in _ACTIVATIONS:
            if name != "x_norm":  # x_norm is handed out fresh by _view_of, see below
                self._views[name] = self._view(name, (batch, c, h, w))
        for name in _CHANNELS:
            self._views[name] = self._view(name, (c,))
        # x_norm is written only when somebody may look at it: forward skips it
        # (one stream of memory less) unless an x_norm array handed out earlier
        # is still alive; reading the attribute fills it from x first.
        self._layer.keep_x_norm = 0
        self._x_norm_stale = False
        self._x_norm_refs: "list[weakref.ref[_CBuffer]]" = []

    def _view(self, name: str, shape: Tuple[int, ...]) -> np.ndarray:
        address = int(ffi.cast("uintptr_t", getattr(self._layer, name)))
        return np.asarray(_CBuffer(self._layer, address, shape))

    def _view_of(self, name: str) -> np.ndarray:
        if name != "x_norm":
            return self._views[name]
        if self._x_norm_stale:
            check(lib.dnbn_batchnorm_layer_fill_x_norm(self._layer), "x_norm")
            self._x_norm_stale = False
        # A fresh exporter per access: every array derived from this one (slices,
        # reshapes: NumPy makes the exporter their base) keeps it alive, so the
        # weak reference tells whether any of them may still be read.
        address = int(ffi.cast("uintptr_t", self._layer.x_norm))
        exporter = _CBuffer(self._layer, address, (self.batch, self.c, self.h, self.w))
        self._x_norm_refs = [r for r in self._x_norm_refs if r() is not None] + [weakref.ref(exporter)]
        return np.asarray(exporter)

    def _x_norm_watched(self) -> bool:
        """Whether an array handed out as x_norm (or derived from one) is still alive."""
        self._x_norm_refs = [r for r in self._x_norm_refs if r() is not None]
        return bool(self._x_norm_refs)

    # Sizes and settings live in the C layer and cannot be reassigned.
    batch = property(lambda self: int(self._layer.batch), doc="Images per batch.")
    w = property(lambda self: int(self._layer.out_w), doc="Width.")
    h = property(lambda self: int(self._layer.out_h), doc="Height.")
    c = property(lambda self: int(self._layer.out_c), doc="Channels.")
    outputs = property(lambda self: int(self._layer.outputs), doc="c*h*w, values per image.")
    numerics = property(lambda self: self._numerics, doc="'darknet' or 'standard'.")
    eps = property(lambda self: self._eps, doc="Epsilon of standard numerics.")
    momentum = property(lambda self: self._momentum, doc="Weight of the batch statistic in the running ones.")

    def __repr__(self) -> str:
        return (
            f"BatchNormLayer(batch={self.batch}, w={self.w}, h={self.h}, c={self.c}, "
            f"numerics={self.numerics!r}, eps={self.eps}, momentum={self.momentum})"
        )

    def forward(self, input: np.ndarray, train: bool = True) -> np.ndarray:
        """Normalize ``input`` and return ``output`` (a view, in the input's shape).

        Args:
            input: float32 of shape (batch, c, h, w) or (batch, c*h*w); copied
                first if not C-contiguous.
            train: True for batch statistics (updates the running statistics
                and keeps x and x_norm for backward; needs batch*h*w >= 2),
                False for the running statistics (writes only output).

        Raises:
            ArgumentTypeError: input is not a float32 array, or train not a bool.
            ArgumentError: input has the wrong shape; batch*h*w < 2 in training.
        """
        train = _validate.flag(train, "train")
        arr = _validate.readable(input, "input", self._count, self._shapes)
        if train and not self._trainable:
            raise ArgumentError(
                "training needs at least 2 values per channel (batch*h*w >= 2), "
                f"got batch={self.batch}, h*w={self.h * self.w}"
            )
        pointer = floats(arr)
        net = self._net
        net.input = pointer
        net.train = train
        keep = bool(self._x_norm_refs) and self._x_norm_watched()
        self._layer.keep_x_norm = keep
        status = lib.dnbn_forward_batchnorm_layer(self._layer, net[0])
        net.input = ffi.NULL
        check(status, "forward")
        if train:
            self._x_norm_stale = not keep
        return self._views["output"].reshape(arr.shape)

    def backward(self, delta: np.ndarray) -> np.ndarray:
        """Back-propagate ``delta`` through the last training forward; return the input's delta.

        ``delta`` is -dLoss/doutput in Darknet's convention (backward is
        linear, so +dLoss/doutput gives +dLoss/dinput). ``bias_updates`` and
        ``scale_updates`` accumulate. ``delta`` may be ``layer.delta`` itself.
        Returns a view of ``layer.delta`` in delta's shape.

        Raises:
            LayerStateError: the last forward was not a training forward.
            ArgumentTypeError: delta is not a float32 array.
            ArgumentError: delta has the wrong shape.
        """
        if lib.dnbn_batchnorm_layer_state(self._layer) != _STATE_TRAINING:
            raise LayerStateError("backward needs a training forward(input, train=True) first")
        arr = _validate.readable(delta, "delta", self._count, self._shapes)
        check(lib.dnbn_backward_batchnorm_layer_from(self._layer, floats(arr)), "backward")
        return self._views["delta"].reshape(arr.shape)

    def update(self, learning_rate: float, momentum: float = 0.9, decay: float = 0.0) -> None:
        """Darknet's SGD step: biases += (learning_rate/batch)*bias_updates; bias_updates *= momentum.

        The same for scales. ``decay`` is accepted for Darknet's signature and
        ignored: Darknet applies no weight decay to batch-norm parameters.
        """
        lr = _validate.real(learning_rate, "learning_rate")
        mom = _validate.real(momentum, "momentum")
        dec = _validate.real(decay, "decay")
        check(lib.dnbn_update_batchnorm_layer(self._layer, lr, mom, dec), "update")

    def load_weights(self, f: BinaryIO, layout: str = "batchnorm") -> None:
        """Read this layer's block of a Darknet ``.weights`` file from ``f`` at its current position.

        Args:
            f: a binary file object (``readinto`` or ``read``), e.g.
                ``open(path, "rb")`` or ``io.BytesIO``; left just after the block.
            layout: ``"batchnorm"`` (a standalone ``[batchnorm]`` layer: scales,
                rolling_mean, rolling_variance) or ``"convolutional"`` (the
                batch-norm part of a ``[convolutional]`` layer: biases, scales,
                rolling_mean, rolling_variance). Each array is c little-endian
                float32 values (see :mod:`darknet_bn.weights`).

        Raises:
            ArgumentTypeError: f is not a binary file object; layout is not a str.
            ArgumentError: unknown layout.
            WeightsError: the file ended inside the block (the message names the
                short array). The layer is unchanged, and a seekable file is put
                back at the position it had.
        """
        arrays = _weights.read_block(f, self.c, layout)  # everything read before anything is assigned
        for name, values in arrays.items():
            np.copyto(self._views[name], values)

    def save_weights(self, f: BinaryIO, layout: str = "batchnorm") -> None:
        """Write this layer's block of a Darknet ``.weights`` file to ``f`` at its current position.

        The inverse of :meth:`load_weights` (same ``layout`` values), byte for
        byte: a block loaded and saved again is identical.

        Raises:
            ArgumentTypeError: f is not a binary file object; layout is not a str.
            ArgumentError: unknown layout.
            OSError: the file refused the write.
        """
        names = _weights.fields(layout)
        _weights.write_block(f, {name: self._views[name] for name in names}, layout)

    def fold_into(self, weights: np.ndarray, biases: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Fold this layer's inference into the preceding layer: return ``(weights', biases')``.

        For the convolution or fully connected layer in front of this one,
        with ``weights`` of shape (c, ...) (output channels first: (c, c_in,
        kh, kw) or (c, n_in)) and ``biases`` of shape (c,) (None: no biases),
        the returned float32 arrays make that layer alone compute what it
        followed by ``forward(..., train=False)`` computes, in this layer's
        numerics: ``weights'[o] = s[o]*weights[o]``, ``biases'[o] =
        s[o]*(biases[o] - rolling_mean[o]) + self.biases[o]``, ``s = scales /
        (sqrt(rolling_variance) + 1e-6)`` (darknet) or ``scales /
        sqrt(rolling_variance + eps)`` (standard). Computed in float64,
        rounded once; the inputs and the layer are not modified.

        Raises:
            ArgumentTypeError: weights or biases is not an array of real numbers.
            ArgumentError: weights.shape[0] or biases.shape is not the layer's c.
        """
        return _fold.fold_batchnorm(
            weights,
            biases,
            scales=self._views["scales"],
            bn_biases=self._views["biases"],
            rolling_mean=self._views["rolling_mean"],
            rolling_variance=self._views["rolling_variance"],
            numerics=self._numerics,
            eps=float(self._layer.eps),  # the float32 value inference uses
        )

    output = _buffer_property("output", "y of the last forward, (batch, c, h, w).")
    delta = _buffer_property("delta", "-dLoss/dy before backward, -dLoss/dx after it, (batch, c, h, w).")
    x = _buffer_property("x", "The input of the last training forward, (batch, c, h, w).")
    x_norm = _buffer_property("x_norm", "The normalized input of the last training forward, (batch, c, h, w).")
    scales = _buffer_property("scales", "gamma, (c,); starts at 1.")
    biases = _buffer_property("biases", "beta, (c,); starts at 0.")
    scale_updates = _buffer_property("scale_updates", "Accumulated sum of delta*x_norm, (c,).")
    bias_updates = _buffer_property("bias_updates", "Accumulated sum of delta, (c,).")
    mean = _buffer_property("mean", "Batch mean of the last training forward, (c,).")
    variance = _buffer_property(
        "variance", "Variance that normalized the last training forward: unbiased (darknet), biased (standard)."
    )
    rolling_mean = _buffer_property("rolling_mean", "Running mean, (c,); starts at 0.")
    rolling_variance = _buffer_property(
        "rolling_variance", "Running (unbiased) variance, (c,); starts at 0 (darknet) or 1 (standard)."
    )
    mean_delta = _buffer_property("mean_delta", "dLoss/dmean of the last backward, (c,).")
    variance_delta = _buffer_property("variance_delta", "dLoss/dvariance of the last backward, (c,).")
