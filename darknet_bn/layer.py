"""``BatchNormLayer``: the C batch-norm layer over zero-copy NumPy views.

Every call validates its arguments first (raising before anything is
written), then calls the C library, then checks its status.

Interruptions. An exception may arrive between any two Python steps of a
method, and right after a C call returns (KeyboardInterrupt, an exception
raised by a signal handler, MemoryError). So the layer keeps no Python mirror
of what the C layer did: every buffer is the C memory itself, and the one piece
of bookkeeping, whether ``x_norm`` still has to be computed from ``x``, is read
from the C layer's own fields (see ``_x_norm_stale``). Each Python step writes
one of those fields, in an order where every intermediate state means the same
thing, so no interruption point can tear the buffers apart.

Copies. ``copy.copy``, ``copy.deepcopy`` and ``pickle`` all give an
independent layer carrying the whole C state (see ``BatchNormLayer.__copy__``
and ``_layer_state``).
"""
from __future__ import annotations

import copy as _copy
import errno
import weakref
from typing import Any, BinaryIO, Dict, Optional, Tuple

import numpy as np

from . import _validate
from . import fold as _fold
from . import weights as _weights
from ._lib import check, ffi, floats, lib
from .errors import AllocationError, ArgumentError, ArgumentTypeError, LayerStateError

_NUMERICS = _validate.NUMERICS
_STATE_TRAINING = int(lib.DNBN_STATE_TRAINING)
#: dnbn_batchnorm_layer_state's codes and their names in state dicts.
_STATE_NAMES = {int(lib.DNBN_STATE_NONE): "none", int(lib.DNBN_STATE_INFERENCE): "inference",
                int(lib.DNBN_STATE_TRAINING): "training"}
_STATE_CODES = {name: code for code, name in _STATE_NAMES.items()}

# x_norm bookkeeping lives in the C layer's own fields (csrc/darknet_bn.h), set
# by the C calls themselves, so no interruption between a call and Python code
# can tear it: `keep_x_norm` (whether a training forward writes x_norm),
# `trained` and `x_norm_current` (a training forward sets it to keep_x_norm,
# dnbn_batchnorm_layer_fill_x_norm to 1). x_norm is stale exactly when
# trained and not x_norm_current.

_STATE_VERSION = 1  # of the pickled state dict, see BatchNormLayer._layer_state

_ACTIVATIONS = ("output", "delta", "x", "x_norm")
_CHANNELS = (
    "scales", "biases", "scale_updates", "bias_updates", "mean", "variance",
    "rolling_mean", "rolling_variance", "mean_delta", "variance_delta",
)
_BUFFERS = _ACTIVATIONS + _CHANNELS

# What BatchNormLayer._setup puts in an instance's __dict__ (tests/test_layer_copy.py checks
# the list); anything else is a subclass's and is copied or pickled as such.
_OWN_ATTRIBUTES = frozenset(
    ("_layer", "_numerics", "_eps", "_momentum", "_shapes", "_count", "_trainable", "_net", "_views", "_x_norm_refs")
)
_STATE_KEYS = frozenset(
    ("version", "batch", "w", "h", "c", "numerics", "eps", "momentum", "last_forward", "trained", "buffers",
     "forward_mean", "forward_normalizer")
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

    Copies: ``copy.copy(layer)``, ``copy.deepcopy(layer)`` and
    ``pickle.loads(pickle.dumps(layer))`` (every protocol) each give an
    independent layer: its own C memory holding the same sizes, numerics, eps,
    momentum, every buffer and the C layer's state (what the last forward was,
    and the batch statistics in double that backward and ``x_norm`` read), so
    ``backward``, ``update``, ``forward`` and ``x_norm`` on the copy give, bit
    for bit, what they give on the original. ``copy.copy`` is deliberately not
    a shallow copy sharing the C memory: a forward on such a copy would change
    the original. The two differ only in other instance attributes (a
    subclass's): ``copy.copy`` shares them, ``copy.deepcopy`` copies them.
    Views taken from the original keep pointing into the original. The pickle
    holds a small versioned dict of NumPy arrays and plain values.

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
        self._setup(batch, w, h, c, numerics, eps, momentum)

    def _setup(self, batch: Any, w: Any, h: Any, c: Any, numerics: Any, eps: Any, momentum: Any) -> None:
        """Validate the arguments and allocate a fresh C layer (``__init__``, copies and unpickling)."""
        batch = _validate.size(batch, "batch")
        w = _validate.size(w, "w")
        h = _validate.size(h, "h")
        c = _validate.size(c, "c")
        numerics, eps, momentum = _validate.layer_options(c, h, w, numerics, eps, momentum)

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
        # is still alive; reading the attribute fills it from x first. Whether
        # it is due is read from the C layer (_x_norm_stale), never mirrored here.
        self._layer.keep_x_norm = 0
        self._x_norm_refs: "list[weakref.ref[_CBuffer]]" = []

    def _view(self, name: str, shape: Tuple[int, ...]) -> np.ndarray:
        address = int(ffi.cast("uintptr_t", getattr(self._layer, name)))
        return np.asarray(_CBuffer(self._layer, address, shape))

    def _x_norm_stale(self) -> bool:
        """Whether a training forward ran without writing x_norm and nobody has filled it since.

        Read from the C layer's own fields, so it always describes what C last
        did, whatever interrupted the Python code.
        """
        layer = self._layer
        return bool(layer.trained) and not layer.x_norm_current

    def _make_x_norm_current(self) -> None:
        """Fill x_norm from x if it is stale (the fill marks it current in the same C call)."""
        if self._x_norm_stale():
            check(lib.dnbn_batchnorm_layer_fill_x_norm(self._layer), "x_norm")

    def _set_keep_x_norm(self, keep: bool) -> None:
        """Switch whether training forwards write x_norm, keeping every intermediate state exact."""
        if keep:
            self._make_x_norm_current()  # a forward with it set writes x_norm anyway; this keeps a read exact
        self._layer.keep_x_norm = int(keep)

    def _view_of(self, name: str) -> np.ndarray:
        if name != "x_norm":
            return self._views[name]
        self._make_x_norm_current()
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

    # ------------------------------------------------------------------ copies

    def _raw(self, name: str) -> np.ndarray:
        """Buffer ``name`` as it is in C memory: for x_norm a temporary view that neither fills nor watches it."""
        if name == "x_norm":
            return self._view("x_norm", self._shapes[0])
        return self._views[name]

    def _scratch(self) -> np.ndarray:
        """The C layer's per-channel doubles, (c, DNBN_SCRATCH_DOUBLES) float64; use only while self lives."""
        width = lib.DNBN_SCRATCH_DOUBLES
        memory = ffi.buffer(self._layer.scratch, self.c * width * np.dtype(np.float64).itemsize)
        return np.frombuffer(memory, np.float64).reshape(self.c, width)

    def _extra_attributes(self) -> Dict[str, Any]:
        """Instance attributes that are not the layer's own (a subclass's)."""
        return {k: v for k, v in self.__dict__.items() if k not in _OWN_ATTRIBUTES}

    def _clone(self) -> "BatchNormLayer":
        """A new layer with its own C memory holding this one's whole C state. Writes nothing here."""
        cls = type(self)
        new = cls.__new__(cls)
        BatchNormLayer._setup(new, self.batch, self.w, self.h, self.c, self._numerics, self._eps, self._momentum)
        stale = self._x_norm_stale()
        for name in _BUFFERS:
            if not (name == "x_norm" and stale):  # a stale x_norm is filled from x on the copy, bit for bit
                np.copyto(new._raw(name), self._raw(name))
        np.copyto(new._scratch(), self._scratch())  # the batch mean and normalizer backward reads, in double
        src, dst = self._layer, new._layer
        dst.state = src.state
        dst.trained, dst.x_norm_current = src.trained, src.x_norm_current
        return new

    def __copy__(self) -> "BatchNormLayer":
        """An independent layer with the same C state (not a shallow copy: see the class docstring).

        Other instance attributes (a subclass's) are shared with the original.
        """
        new = self._clone()
        new.__dict__.update(self._extra_attributes())
        return new

    def __deepcopy__(self, memo: Dict[int, Any]) -> "BatchNormLayer":
        """An independent layer with the same C state; other instance attributes are deep-copied."""
        new = self._clone()
        memo[id(self)] = new
        for key, value in self._extra_attributes().items():
            new.__dict__[key] = _copy.deepcopy(value, memo)
        return new

    def __reduce__(self) -> Tuple[Any, ...]:
        """Pickle as ``_restore_layer(cls, self._layer_state())`` plus any other instance attributes."""
        return (_restore_layer, (type(self), self._layer_state()), self._extra_attributes() or None)

    def _layer_state(self) -> Dict[str, Any]:
        """The pickled form: a versioned dict of plain values and NumPy arrays (copies). Writes nothing.

        Keys: ``version`` (1); ``batch``, ``w``, ``h``, ``c``, ``numerics``,
        ``eps``, ``momentum`` (the constructor's arguments); ``last_forward``
        (``"none"``, ``"inference"`` or ``"training"``: whether backward may
        run); ``trained`` (whether a training forward ever ran); ``buffers``
        (every buffer by attribute name, float32 arrays of its shape; ``x_norm``
        is None when it is still to be computed from ``x``); ``forward_mean``
        and ``forward_normalizer`` (float64 (c,): the last training forward's
        batch mean and 1/(sqrt(var) + 1e-6) or 1/sqrt(var + eps), as C keeps
        them for backward and x_norm).
        """
        layer = self._layer
        stale = self._x_norm_stale()
        buffers: Dict[str, Optional[np.ndarray]] = {name: np.array(self._raw(name), copy=True) for name in _BUFFERS}
        if stale:
            buffers["x_norm"] = None
        scratch = self._scratch()
        return {
            "version": _STATE_VERSION,
            "batch": self.batch,
            "w": self.w,
            "h": self.h,
            "c": self.c,
            "numerics": self._numerics,
            "eps": self._eps,
            "momentum": self._momentum,
            "last_forward": _STATE_NAMES[lib.dnbn_batchnorm_layer_state(layer)],
            "trained": bool(layer.trained),
            "buffers": buffers,
            "forward_mean": scratch[:, lib.DNBN_SCRATCH_MEAN].copy(),
            "forward_normalizer": scratch[:, lib.DNBN_SCRATCH_INV].copy(),
        }

    def _load_state(self, state: Any) -> None:
        """Set up this (new, uninitialized) object from a ``_layer_state`` dict, checking it all first."""
        where = "pickled BatchNormLayer state"
        if not isinstance(state, dict):
            raise ArgumentTypeError(f"{where} must be a dict, got {type(state).__name__}")
        version = state.get("version")
        if type(version) is not int or version != _STATE_VERSION:
            raise ArgumentError(
                f"{where} has version {version!r}; this darknet_bn reads version {_STATE_VERSION} only"
            )
        missing, unknown = _STATE_KEYS - state.keys(), state.keys() - _STATE_KEYS
        if missing or unknown:
            problems = ([f"missing keys {sorted(missing)}"] if missing else []) + (
                [f"unknown keys {sorted(map(str, unknown))}"] if unknown else [])
            raise ArgumentError(f"{where}: {', '.join(problems)}")
        try:
            batch, w, h, c = (_validate.size(state[k], k) for k in ("batch", "w", "h", "c"))
        except (ArgumentError, ArgumentTypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        last_forward, trained = state["last_forward"], state["trained"]
        if last_forward not in _STATE_CODES:
            raise ArgumentError(f"{where}: last_forward must be one of {tuple(_STATE_CODES)}, got {last_forward!r}")
        if not isinstance(trained, bool):
            raise ArgumentTypeError(f"{where}: trained must be a bool, got {type(trained).__name__}")
        if last_forward == "training" and not (trained and batch * h * w >= 2):
            raise ArgumentError(f"{where}: last_forward is 'training' but the layer cannot have trained")
        buffers = state["buffers"]
        if not isinstance(buffers, dict) or set(buffers) != set(_BUFFERS):
            raise ArgumentError(f"{where}: buffers must be a dict of exactly {list(_BUFFERS)}")
        sizes = f"batch={batch}, c={c}, h={h}, w={w}"
        for name in _BUFFERS:
            arr = buffers[name]
            if arr is None and name == "x_norm" and trained:
                continue
            shape = (batch, c, h, w) if name in _ACTIVATIONS else (c,)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
                raise ArgumentTypeError(f"{where}: buffers[{name!r}] must be a float32 numpy.ndarray")
            if arr.shape != shape:
                raise ArgumentError(f"{where}: buffers[{name!r}] has shape {arr.shape}, expected {shape} for {sizes}")
        for key in ("forward_mean", "forward_normalizer"):
            arr = state[key]
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float64 or arr.shape != (c,):
                raise ArgumentError(f"{where}: {key} must be a float64 numpy.ndarray of shape ({c},) for {sizes}")
        try:
            self._setup(batch, w, h, c, state["numerics"], state["eps"], state["momentum"])
        except (ArgumentError, ArgumentTypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        for name in _BUFFERS:
            if buffers[name] is not None:
                np.copyto(self._raw(name), buffers[name])
        scratch = self._scratch()
        scratch[:, lib.DNBN_SCRATCH_MEAN] = state["forward_mean"]
        scratch[:, lib.DNBN_SCRATCH_INV] = state["forward_normalizer"]
        layer = self._layer
        layer.state = _STATE_CODES[last_forward]
        layer.trained = int(trained)
        layer.x_norm_current = int(trained and buffers["x_norm"] is not None)

    def forward(self, input: np.ndarray, train: bool = True) -> np.ndarray:
        """Normalize ``input`` and return ``output`` (a view, in the input's shape).

        Args:
            input: float32 of shape (batch, c, h, w) or (batch, c*h*w); copied
                first if not C-contiguous. A training forward copies it into
                ``x`` for backward, unless it is ``x`` itself (a view of it):
                write the input into ``layer.x`` and pass ``layer.x`` to skip
                that copy, one tensor less written per step.
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
        layer = self._layer
        keep = bool(self._x_norm_refs) and self._x_norm_watched()
        if keep != bool(layer.keep_x_norm):
            self._set_keep_x_norm(keep)
        # Nothing to record after the call: whether x_norm is due is in the C
        # layer (trained, x_norm_current), set by the call itself.
        net = self._net
        net.input = pointer  # written before every call, read by nothing else
        net.train = train
        status = lib.dnbn_forward_batchnorm_layer(layer, net[0])
        net.input = ffi.NULL
        check(status, "forward")
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
    x_norm = _buffer_property("x_norm", "The normalized input of the last training forward, (batch, c, h, w).\n\n"
                              "Written by forward only while an x_norm array is alive, otherwise computed from x\n"
                              "when read: writing x after the forward (the next batch into layer.x) changes it,\n"
                              "as it changes what backward reads (docs/reference.md §3).")
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


def _restore_layer(cls: type, state: Dict[str, Any]) -> BatchNormLayer:
    """Unpickle a layer: a new ``cls`` (BatchNormLayer or a subclass) from ``BatchNormLayer._layer_state``.

    Raises:
        ArgumentTypeError, ArgumentError: the state is not one this version
            wrote (another version, missing or unknown keys, sizes that do not
            match the arrays, wrong dtypes). Nothing is allocated before the
            checks pass.
    """
    if not (isinstance(cls, type) and issubclass(cls, BatchNormLayer)):
        raise ArgumentTypeError(f"cls must be BatchNormLayer or a subclass, got {cls!r}")
    layer = cls.__new__(cls)
    BatchNormLayer._load_state(layer, state)
    return layer
