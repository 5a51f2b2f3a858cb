"""Tensors from ``ctx.saved_tensors``, made what the C layer read in forward.

A C backward reads its saved tensors through the forward's struct, with the
forward's sizes and memory layout. A saved-tensor hook
(``torch.autograd.graph.saved_tensors_hooks``, ``save_on_cpu``) may hand back
the same values in another layout, as a stride-0 expansion, or in another
dtype (measured before this check: wrong gradients for a channels-last input
under ``save_on_cpu``, and a crash for a constant input saved as one
expanded value). Autograd does not check what a hook returns.
"""
from __future__ import annotations

from typing import Sequence

import torch

PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # not subclasses or wrappers


def as_saved(t: torch.Tensor, shape: Sequence[int], layout: torch.memory_format, what: str) -> torch.Tensor:
    """``t`` as float32 CPU memory of ``shape`` in ``layout`` (``t`` itself when it already is).

    Raises:
        RuntimeError: ``t`` does not have ``shape``.
    """
    if tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"darknet_bn.torch backward: the saved {what} came back from a saved-tensor hook with "
                           f"shape {tuple(t.shape)}, expected {tuple(shape)}")
    if type(t) not in PLAIN_TYPES:
        t = t.as_subclass(torch.Tensor)
    if t.layout is not torch.strided:
        t = t.to_dense()
    if t.dtype is not torch.float32 or not t.is_cpu:
        t = t.to(dtype=torch.float32, device="cpu")
    t = t.contiguous(memory_format=layout)
    if t.numel() and t.data_ptr() == 0:
        raise RuntimeError(f"darknet_bn.torch backward: the saved {what} has no memory of its own")
    return t
