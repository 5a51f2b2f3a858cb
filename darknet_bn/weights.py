"""Darknet weight blocks: a batch-norm layer's parameters in a ``.weights`` file.

Darknet stores a network's parameters as one flat binary file of float32
values, layer after layer, in the order of the ``.cfg`` file
(pjreddie/darknet ``src/parser.c``). A batch-norm layer's part of it, its
*block*, has one of two layouts, each array ``c`` little-endian float32 values:

``"batchnorm"``
    a standalone ``[batchnorm]`` layer (``load_batchnorm_weights``):
    scales, rolling_mean, rolling_variance. The biases are not stored.
``"convolutional"``
    the batch-norm part of a ``[convolutional]`` (or ``[connected]``) layer
    with ``batch_normalize=1`` (``load_convolutional_weights``): biases,
    scales, rolling_mean, rolling_variance. In a Darknet file the layer's
    convolution weights follow; this block stops before them. (AlexeyAB's
    fork also writes a standalone ``[batchnorm]`` layer this way.)

:func:`read_block` reads everything before it returns, so a caller that
assigns only after it returned never sees half a block; :func:`write_block`
writes a block with one ``write`` call (looping only over partial writes).
Values are copied bit for bit in both directions (NaN payloads included), so a
block read and written back is byte for byte the same.
"""
from __future__ import annotations

import io
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from . import _validate
from .errors import ArgumentError, ArgumentTypeError, WeightsError

__all__ = ["LAYOUTS", "fields", "block_nbytes", "read_block", "write_block"]

#: The arrays of each layout, in file order.
LAYOUTS: Dict[str, Tuple[str, ...]] = {
    "batchnorm": ("scales", "rolling_mean", "rolling_variance"),
    "convolutional": ("biases", "scales", "rolling_mean", "rolling_variance"),
}

_FILE_DTYPE = np.dtype("<f4")


def fields(layout: str) -> Tuple[str, ...]:
    """Return the names of the arrays a ``layout`` stores, in file order.

    Raises:
        ArgumentTypeError: layout is not a str.
        ArgumentError: layout is neither ``"batchnorm"`` nor ``"convolutional"``.
    """
    if not isinstance(layout, str):
        raise ArgumentTypeError(f"layout must be a str, got {type(layout).__name__}")
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ArgumentError(f"layout must be 'batchnorm' or 'convolutional', got {layout!r}") from None


def block_nbytes(c: int, layout: str = "batchnorm") -> int:
    """Return the size in bytes of the block of a layer with ``c`` channels."""
    return len(fields(layout)) * _validate.size(c, "c") * _FILE_DTYPE.itemsize


def _describe(f: Any) -> str:
    return type(f).__name__


def _check_readable(f: Any) -> None:
    if isinstance(f, io.TextIOBase):
        raise ArgumentTypeError("f must be a file opened in binary mode ('rb'), got a text file")
    if not (callable(getattr(f, "readinto", None)) or callable(getattr(f, "read", None))):
        raise ArgumentTypeError(f"f must be a binary file object with readinto() or read(), got {_describe(f)}")


def _check_writable(f: Any) -> None:
    if isinstance(f, io.TextIOBase):
        raise ArgumentTypeError("f must be a file opened in binary mode ('wb'), got a text file")
    if not callable(getattr(f, "write", None)):
        raise ArgumentTypeError(f"f must be a binary file object with write(), got {_describe(f)}")


def _tell(f: Any) -> Any:
    """The file position, or None when the file cannot tell it."""
    try:
        return f.tell()
    except (AttributeError, OSError, ValueError):
        return None


def _read_into(f: Any, buf: memoryview) -> int:
    """Fill ``buf`` from ``f``; return how many bytes arrived before end of file."""
    got = 0
    use_readinto = callable(getattr(f, "readinto", None))
    while got < len(buf):
        if use_readinto:
            n = f.readinto(buf[got:])
        else:
            chunk = f.read(len(buf) - got)
            if chunk is not None and not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise ArgumentTypeError(
                    f"f must be a binary file: its read() returned {type(chunk).__name__}, not bytes"
                )
            if chunk is not None:
                n = len(chunk)
                if n > len(buf) - got:
                    raise OSError(f"f.read({len(buf) - got}) returned {n} bytes, more than asked")
                buf[got:got + n] = chunk
            else:
                n = None
        if n is None:
            raise WeightsError("f is a non-blocking file with no data ready; weights need a blocking file")
        if not isinstance(n, int) or not 0 <= n <= len(buf) - got:
            raise OSError(f"f.readinto() of {len(buf) - got} bytes returned {n!r}")
        if n == 0:
            break
        got += n
    return got


def read_block(f: Any, c: int, layout: str = "batchnorm") -> Dict[str, np.ndarray]:
    """Read one block of ``c`` channels from binary file ``f`` at its current position.

    Returns a dict from array name (``fields(layout)``) to a new float32 array
    of shape (c,). On success the file position is just after the block.

    Raises:
        ArgumentTypeError: ``f`` is not a binary file object (a text file, a path, ...).
        ArgumentError, ArgumentTypeError: bad ``c`` or ``layout``.
        WeightsError: the file ended inside the block; the message names the
            array that was short. Nothing is returned, and the file position
            is put back where it was when the file is seekable.
    """
    names = fields(layout)
    c = _validate.size(c, "c")
    _check_readable(f)
    per_array = c * _FILE_DTYPE.itemsize
    raw = bytearray(per_array * len(names))
    start = _tell(f)
    try:
        got = _read_into(f, memoryview(raw))
    except WeightsError:
        _seek_back(f, start)
        raise
    if got < len(raw):
        short = names[got // per_array]
        where = f" at file offset {start}" if start is not None else ""
        _seek_back(f, start)
        raise WeightsError(
            f"short read: the {layout!r} block of {c} channels ({' '.join(names)}, {per_array} bytes each, "
            f"{len(raw)} bytes{where}) ended after {got} bytes, inside {short} "
            f"({got - names.index(short) * per_array} of its {per_array} bytes)"
        )
    values = np.frombuffer(bytes(raw), dtype=_FILE_DTYPE)
    return {name: values[i * c:(i + 1) * c].astype(np.float32) for i, name in enumerate(names)}


def _seek_back(f: Any, start: Any) -> None:
    if start is None:
        return
    try:
        if f.seekable():
            f.seek(start)
    except (AttributeError, OSError, ValueError):
        pass


def write_block(f: Any, arrays: Mapping[str, np.ndarray], layout: str = "batchnorm") -> None:
    """Write one block to binary file ``f`` at its current position.

    ``arrays`` maps every name of ``fields(layout)`` to a float32 array of one
    common length c (the per-channel buffers of a layer); they are written in
    file order as little-endian float32, bit for bit.

    Raises:
        ArgumentTypeError: ``f`` is not a binary file object; an array is not float32.
        ArgumentError: an array is missing or the lengths differ; bad layout.
        OSError: the file refused the write.
    """
    names = fields(layout)
    _check_writable(f)
    parts = []
    c = None
    for name in names:
        if name not in arrays:
            raise ArgumentError(f"arrays must hold {name!r} for layout {layout!r}")
        arr = _validate.float32_array(arrays[name], name)
        if arr.ndim != 1 or (c is not None and arr.shape[0] != c):
            raise ArgumentError(f"{name} must have shape ({c if c is not None else 'c'},), got {arr.shape}")
        c = arr.shape[0]
        parts.append(arr.astype(_FILE_DTYPE, copy=False).tobytes())
    data = memoryview(b"".join(parts))
    done = 0
    while done < len(data):
        n = f.write(data[done:])
        if n is None:
            if isinstance(f, io.RawIOBase):
                raise OSError("f is a non-blocking file that accepted no data; weights need a blocking file")
            n = len(data) - done  # a file object whose write() returns nothing took it all
        if n == 0:
            raise OSError(f"f.write() wrote nothing after {done} of {len(data)} bytes")
        if not isinstance(n, int) or not 0 < n <= len(data) - done:
            raise OSError(f"f.write() of {len(data) - done} bytes returned {n!r}")
        done += n
