"""``graph_break``: a function that ``torch.compile`` runs outside its graph, called directly otherwise.

``torch.compiler.disable`` would do it as a decorator, but applying it
imports ``torch._dynamo``, which doubled the time ``import darknet_bn.torch``
took (0.9 s on top of PyTorch's own), and its wrapper cost every eager call
about 1.5 us. Here the disabled wrapper is made the first time a compiled
graph reaches the function; eager calls only ask
``torch.compiler.is_compiling()``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def graph_break(fn: F) -> F:
    """``fn`` as a graph break under ``torch.compile`` (``torch.compiler.disable``), a plain call otherwise."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            disabled = _DISABLED.get(fn)
            if disabled is None:
                disabled = _DISABLED[fn] = torch.compiler.disable(fn)
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call  # type: ignore[return-value]


# fn -> torch.compiler.disable(fn), made the first time a compiled graph calls fn
_DISABLED: Dict[Callable[..., Any], Callable[..., Any]] = {}
