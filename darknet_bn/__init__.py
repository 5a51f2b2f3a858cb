"""darknet_bn: CPU batch normalization in the Darknet style.

>>> import numpy as np, darknet_bn
>>> layer = darknet_bn.BatchNormLayer(batch=8, w=4, h=4, c=3)
>>> y = layer.forward(np.random.rand(8, 3, 4, 4).astype(np.float32))
>>> dx = layer.backward(np.ones_like(y))
>>> layer.update(learning_rate=0.01)

``BatchNormLayer`` wraps the C layer; ``kernels`` has Darknet's ten kernels;
``set_num_threads``, ``get_num_threads`` and ``info`` are the settings.
"""
from __future__ import annotations

from . import kernels
from ._threads import get_num_threads, info, set_num_threads
from .errors import (
    AllocationError,
    ArgumentError,
    ArgumentTypeError,
    DarknetBNError,
    LayerStateError,
    WeightsError,
)
from .layer import BatchNormLayer

__version__ = "0.1.0"

__all__ = [
    "BatchNormLayer",
    "kernels",
    "set_num_threads",
    "get_num_threads",
    "info",
    "DarknetBNError",
    "ArgumentError",
    "ArgumentTypeError",
    "LayerStateError",
    "AllocationError",
    "WeightsError",
    "__version__",
]
