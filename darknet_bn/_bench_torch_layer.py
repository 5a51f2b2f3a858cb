"""Batch-norm sections of the benchmark that put the layer where PyTorch code calls it.

* Channels-last row (:func:`bench_channels_last`): forward (training) +
  backward of a fixed gradient through ``darknet_bn.torch.BatchNorm2d`` and
  ``torch.nn.BatchNorm2d`` on a ``torch.channels_last`` input (requires_grad;
  the gradient is channels-last too). darknet_bn reads such a tensor in place
  as an (N*H*W) x C matrix and writes channels-last output and input gradient
  (darknet_bn/torch.py). Outputs and gradients are compared first.
* "Inside a PyTorch process" (:func:`in_torch_cell`): the layer section's
  training step of ``darknet_bn standard`` against the faster PyTorch variant
  of the same cell, but every timed call right after a short PyTorch
  parallel op (:data:`TORCH_OP`, a small conv2d at the same thread count), so
  PyTorch's OpenMP workers have just been active, as inside a model. Only the
  batch-norm call is timed.

Ratios are torch's time over darknet_bn's, medians of interleaved samples.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

import darknet_bn
from darknet_bn._bench_common import (
    AGREE_TOL,
    Progress,
    Shape,
    fmt_ratio,
    fmt_time,
    interleaved,
    make_data,
    scaled_diff,
    set_threads,
    shape_label,
)
from darknet_bn._bench_targets import CHANNELS_LAST_TARGET, faster_torch, fmt_target, layer_train_target

CHANNELS_LAST_SHAPE: Shape = (8, 128, 52, 52)
CHANNELS_LAST_QUICK_SHAPE: Shape = (4, 16, 8, 8)
#: (JSON key, table label) of the channels-last peers; the ratio is the first's time over the second's.
MODULE_PEERS = (("torch", "torch.nn.BatchNorm2d"), ("darknet_bn", "darknet_bn.torch.BatchNorm2d"))
#: The PyTorch op run (untimed) before every timed call of the "inside a PyTorch process" section:
#: conv2d of a (batch, channels, h, w) input with ``channels`` 3x3 filters, padding 1.
TORCH_OP = {"op": "conv2d", "input": (1, 32, 32, 32), "kernel": 3}


def torch_op_description() -> str:
    """One line describing :data:`TORCH_OP`."""
    b, c, h, w = TORCH_OP["input"]  # type: ignore[misc]
    k = TORCH_OP["kernel"]
    return f"conv2d {b}x{c}x{h}x{w} * {c} filters {k}x{k} (torch, same thread count)"


def make_torch_op(torch: Any) -> Callable[[], None]:
    """The short PyTorch parallel op of :data:`TORCH_OP` on fixed random tensors."""
    gen = torch.Generator().manual_seed(7)
    shape = TORCH_OP["input"]
    k = int(TORCH_OP["kernel"])  # type: ignore[arg-type]
    x = torch.randn(shape, generator=gen)
    w = torch.randn(shape[1], shape[1], k, k, generator=gen) * 0.1
    conv = torch.nn.functional.conv2d

    def op() -> None:
        conv(x, w, padding=k // 2)

    return op


# --------------------------------------------------------------------------- channels-last row


class ModulePeer:
    """A BatchNorm2d module in training mode with its own channels-last input (requires_grad) and gradient."""

    def __init__(self, torch: Any, module: Any, x: np.ndarray, dy: np.ndarray, name: str, label: str) -> None:
        cl = torch.channels_last
        self.torch, self.module, self.name, self.label = torch, module.train(), name, label
        self.x = torch.from_numpy(x).contiguous(memory_format=cl).requires_grad_(True)
        self.dy = torch.from_numpy(dy).contiguous(memory_format=cl)
        self.y: Any = None

    def step(self) -> None:
        """Forward with batch statistics, then backward of the fixed gradient (fresh .grad each time)."""
        self.x.grad = None
        self.module.weight.grad = None
        self.module.bias.grad = None
        self.y = self.module(self.x)
        self.y.backward(self.dy)

    def results(self) -> Dict[str, Any]:
        """y, dx, dgamma, dbeta of one step, as NumPy arrays in NCHW index order, and the layouts."""
        self.step()
        cl = self.torch.channels_last
        return {
            "y": self.y.detach().numpy().copy(), "dx": self.x.grad.numpy().copy(),
            "dgamma": self.module.weight.grad.numpy().copy(), "dbeta": self.module.bias.grad.numpy().copy(),
            "y_channels_last": bool(self.y.is_contiguous(memory_format=cl)),
            "dx_channels_last": bool(self.x.grad.is_contiguous(memory_format=cl)),
        }


def make_module_peers(torch: Any, shape: Shape, seed: int = 0) -> List[ModulePeer]:
    """torch's and darknet_bn's BatchNorm2d with the same gamma and beta, each with a copy of the same data."""
    from darknet_bn.torch import BatchNorm2d

    x, dy, gamma, beta = make_data(shape, seed)
    peers = []
    for (name, label), cls in zip(MODULE_PEERS, (torch.nn.BatchNorm2d, BatchNorm2d)):
        m = cls(shape[1])
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(gamma))
            m.bias.copy_(torch.from_numpy(beta))
        peers.append(ModulePeer(torch, m, x, dy, name, label))
    return peers


def bench_channels_last(
    torch: Any,
    shape: Shape,
    threads_list: Sequence[int],
    reps: Optional[int],
    min_time: float,
    budget: float,
    max_reps: int,
    progress: Progress,
) -> Dict[str, Any]:
    """Time the channels-last training step of both modules at each thread count (agreement checked first).

    Advances ``progress`` by 1 per thread count.
    """
    peers = make_module_peers(torch, shape)
    set_threads(max(threads_list), torch)
    res = {p.name: p.results() for p in peers}
    base, other = (name for name, _ in MODULE_PEERS)
    diffs = {k: scaled_diff(res[other][k], res[base][k]) for k in ("y", "dx", "dgamma", "dbeta")}
    layouts = {p.name: {k: res[p.name][k] for k in ("y_channels_last", "dx_channels_last")} for p in peers}
    worst = max(diffs.values())
    agreement = {"max_scaled_diff": worst, "per_array": diffs, "layouts": layouts, "tolerance": AGREE_TOL,
                 "agree": bool(worst <= AGREE_TOL)}
    results = []
    for threads in threads_list:
        set_threads(threads, torch)
        timings, n_reps = interleaved({p.name: p.step for p in peers}, reps=reps, min_time=min_time, budget=budget,
                                      max_reps=max_reps, progress=progress,
                                      label=f"channels-last {shape_label(shape)} @{threads}t")
        results.append({
            "threads": threads,
            "darknet_bn_threads": darknet_bn.get_num_threads(),
            "torch_threads": torch.get_num_threads(),
            "reps": n_reps,
            "peers": {p.name: {"label": p.label, "train_step_s": timings[p.name]["s"],
                               "samples": timings[p.name]["samples"], "inner": timings[p.name]["inner"]}
                      for p in peers},
            "ratio": timings[base]["s"] / timings[other]["s"],
        })
    return {"shape": list(shape), "memory_format": "channels_last", "baseline": other, "agreement": agreement,
            "results": results}


def channels_last_table(cl: Dict[str, Any]) -> str:
    """The channels-last row's table: per thread count, both modules' median step and the ratio."""
    shape = shape_label(cl["shape"])
    lines = [f"== channels-last input: BatchNorm2d module forward (train) + backward, {shape} =="]
    lines.append(f"{'threads':<8} {'torch.nn.BatchNorm2d':>22} {'darknet_bn.torch':>18} {'ratio':>8} {'target':>14}")
    for res in cl["results"]:
        t, d = (res["peers"][name]["train_step_s"] for name, _ in MODULE_PEERS)
        lines.append(f"{res['threads']:<8} {fmt_time(t):>22} {fmt_time(d):>18} {fmt_ratio(res['ratio']):>8} "
                     f"{fmt_target(res['ratio'], CHANNELS_LAST_TARGET):>14}")
    agr = cl["agreement"]
    dn_layout = agr["layouts"]["darknet_bn"]
    lines.append(f"Medians ({cl['results'][0]['reps']} reps) of y = bn(x); y.backward(dy), x and dy channels_last, "
                 f"x.requires_grad. ratio = torch / darknet_bn.")
    lines.append(f"y, dx, dgamma, dbeta agree: max scaled |diff| {agr['max_scaled_diff']:.1e} (tolerance "
                 f"{agr['tolerance']:g}); darknet_bn's y and dx channels-last: {dn_layout['y_channels_last']}, "
                 f"{dn_layout['dx_channels_last']}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- inside a PyTorch process


def in_torch_cell(
    peers: Sequence[Any],
    alone: Dict[str, Any],
    threads: int,
    op: Callable[[], None],
    reps: Optional[int],
    min_time: float,
    budget: float,
    max_reps: int,
    progress: Progress,
) -> Optional[Dict[str, Any]]:
    """Time the training step of ``darknet_bn standard`` and of the faster PyTorch peer of cell ``alone``,
    each call right after ``op()`` (untimed), at the thread count already set.

    ``peers`` are the layer section's peers of this shape (``name``,
    ``train_step``); ``alone`` is their cell at this thread count. Returns
    None when the cell has no PyTorch peer. Advances ``progress`` by 1.
    """
    fast = faster_torch(alone["peers"], "train_step")
    if fast is None:
        return None
    by_name = {p.name: p for p in peers}
    chosen = ("darknet_bn_standard", fast)
    b, c, h, w = alone["shape"]
    timings, n_reps = interleaved({n: by_name[n].train_step for n in chosen}, reps=reps, min_time=min_time,
                                  budget=budget, max_reps=max_reps, progress=progress, before=op,
                                  label=f"in-torch {b}x{c}x{h}x{w} @{threads}t")
    dn_alone = alone["peers"]["darknet_bn_standard"]["train_step_s"]
    return {
        "shape": list(alone["shape"]),
        "threads": threads,
        "torch_peer": fast,
        "reps": n_reps,
        "peers": {n: {"label": alone["peers"][n]["label"], "train_step_s": timings[n]["s"],
                      "samples": timings[n]["samples"], "inner": timings[n]["inner"],
                      "alone_train_step_s": alone["peers"][n]["train_step_s"]} for n in chosen},
        "ratio": timings[fast]["s"] / timings["darknet_bn_standard"]["s"],
        "alone_ratio": alone["peers"][fast]["train_step_s"] / dn_alone,
    }


def in_torch_table(in_torch: Dict[str, Any]) -> str:
    """The "inside a PyTorch process" table: per thread count and shape, both times, the ratio and the alone ratio."""
    lines = [f"== inside a PyTorch process: training step right after a PyTorch op ({in_torch['op']}) =="]
    lines.append(f"{'shape':<16} {'threads':>7} {'torch peer':>12} {'darknet_bn':>11} {'torch':>11} {'ratio':>8} "
                 f"{'alone':>8} {'target':>14}")
    for res in sorted(in_torch["results"], key=lambda r: r["threads"]):
        dn, t = res["peers"]["darknet_bn_standard"], res["peers"][res["torch_peer"]]
        lines.append(f"{shape_label(res['shape']):<16} {res['threads']:>7} {t['label']:>12} "
                     f"{fmt_time(dn['train_step_s']):>11} {fmt_time(t['train_step_s']):>11} "
                     f"{fmt_ratio(res['ratio']):>8} "
                     f"{fmt_ratio(res['alone_ratio']):>8} "
                     f"{fmt_target(res['ratio'], layer_train_target(res['shape'], res['threads'])):>14}")
    lines.append("Medians of the batch-norm call alone (forward + backward of the layer section); each call follows")
    lines.append("the PyTorch op, untimed, so PyTorch's OpenMP workers have just run. torch peer = the faster PyTorch")
    lines.append("variant of the layer section's cell; alone = that cell's ratio (no op before the call).")
    return "\n".join(lines)
