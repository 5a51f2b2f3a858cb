"""Exceptions raised by darknet_bn, and the mapping from C status codes.

Every exception derives from :class:`DarknetBNError` and from the builtin that
fits it, so ``except ValueError`` and ``except darknet_bn.DarknetBNError`` both
work.
"""
from __future__ import annotations


class DarknetBNError(Exception):
    """Base class of every error darknet_bn raises."""


class ArgumentError(DarknetBNError, ValueError):
    """An argument has the right type but a wrong value, shape or size."""


class ArgumentTypeError(DarknetBNError, TypeError):
    """An argument has the wrong type (not a float32 NumPy array, not an int, ...)."""


class LayerStateError(DarknetBNError, ValueError):
    """The call does not fit the layer's state (e.g. backward before a training forward)."""


class AllocationError(DarknetBNError, MemoryError):
    """The C library could not allocate memory."""


class WeightsError(DarknetBNError, ValueError):
    """A Darknet weights block could not be read: the file ended before the block did."""


# C status codes (csrc/darknet_bn.h).
OK = 0
ERR_ARG = 1
ERR_NOMEM = 2
ERR_STATE = 3

_BY_STATUS = {ERR_ARG: ArgumentError, ERR_NOMEM: AllocationError, ERR_STATE: LayerStateError}


def raise_for_status(status: int, message: str, c_message: str) -> None:
    """Raise the exception for a nonzero C status, with ``message`` and the C library's text."""
    if status != OK:
        raise _BY_STATUS.get(status, DarknetBNError)(f"{message} ({c_message})")

