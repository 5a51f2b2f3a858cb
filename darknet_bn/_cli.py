"""Validation of command-line arguments, shared by ``python -m darknet_bn``, ``.bench`` and ``.demo``.

Every option value is checked while argparse parses it (``type=`` functions
that raise :class:`argparse.ArgumentTypeError`), so a bad value stops the
program before any work starts. :class:`ArgumentParser` reports it as one line
on stderr that names the option, with exit status 2 and no traceback::

    python -m darknet_bn.bench: error: argument --threads: must be an integer from 1 to 256, got '0' (see --help)

The type functions return the parsed value; factories (:func:`integer`,
:func:`shape`) build them for a range.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable, NoReturn, Optional, Tuple

__all__ = [
    "MAX_THREADS",
    "INT_MAX",
    "ArgumentParser",
    "integer",
    "threads",
    "positive_real",
    "shape",
    "output_dir",
    "physical_memory",
]

#: Most threads the library uses: ``DNBN_MAX_THREADS`` in csrc/internal.h (docs/reference.md §5).
MAX_THREADS = 256
#: Largest C ``int``: the limit of every size the library takes (docs/reference.md §2).
INT_MAX = 2**31 - 1


class ArgumentParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose usage errors are one line on stderr, exit status 2.

    Its subparsers are of this class too.
    """

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see PROG --help)`` on one line and exit with status 2."""
        one_line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {one_line} (see {self.prog} --help)\n")


def _range_text(low: int, high: Optional[int]) -> str:
    return f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"


def integer(low: int, high: Optional[int] = None, why: str = "") -> Callable[[str], int]:
    """A type function for integers in ``[low, high]`` (no upper limit if ``high`` is None).

    ``why`` is appended to the message, e.g. ``" (the library's thread limit)"``.
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high)}{why}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range_text(low, high)}{why}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


#: Thread counts: 1 to the library's limit.
threads = integer(1, MAX_THREADS, " (darknet_bn's thread limit)")


def positive_real(text: str) -> float:
    """A type function for a positive, finite real number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


Shape = Tuple[int, int, int, int]


def shape(min_values_per_channel: int = 2, min_hw: int = 1, why: str = "") -> Callable[[str], Shape]:
    """A type function for ``BxCxHxW`` (``x`` or ``X`` or ``×`` between four positive C ints).

    ``batch*h*w`` must be at least ``min_values_per_channel`` (training needs
    2, docs/reference.md §5) and ``h`` and ``w`` at least ``min_hw`` (``why``
    is appended to that message).
    """
    def parse(text: str) -> Shape:
        parts = text.lower().replace("×", "x").split("x")
        try:
            vals = tuple(int(p) for p in parts)
        except ValueError:
            vals = ()
        if len(vals) != 4 or min(vals) < 1:
            raise argparse.ArgumentTypeError(f"must be BxCxHxW with four positive integers, got {text!r}")
        if max(vals) > INT_MAX:
            raise argparse.ArgumentTypeError(f"every size must fit in a C int (<= {INT_MAX}), got {text!r}")
        b, _c, h, w = vals
        if b * h * w < min_values_per_channel:
            raise argparse.ArgumentTypeError(
                f"{text!r} has {b * h * w} value(s) per channel (batch*h*w); training needs at least "
                f"{min_values_per_channel}")
        if h < min_hw or w < min_hw:
            raise argparse.ArgumentTypeError(f"{text!r}: h and w must be at least {min_hw}{why}")
        return vals  # type: ignore[return-value]

    parse.__name__ = "shape"
    return parse


def output_dir(text: str) -> str:
    """A type function for an output directory that exists and is writable, or can be created.

    Nothing is created here: the nearest existing path on the way up must be a
    writable directory (and the path itself, if it exists, a directory).
    """
    if not text:
        raise argparse.ArgumentTypeError("must be a directory path, got ''")
    path = os.path.abspath(text)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: it exists and is not a directory")
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {probe!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "write into" if probe == path else "create"
        raise argparse.ArgumentTypeError(f"cannot {what} {text!r}: {probe!r} is not writable")
    return text


def physical_memory() -> Optional[int]:
    """Bytes of physical memory, or None where the platform does not say."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * size if pages > 0 and size > 0 else None
