"""The speed targets the benchmark reports next to its ratios, and whether each is met.

Every ratio is the other implementation's time over darknet_bn's (above 1x
darknet_bn is faster). The targets (the issue's):

* layer training step (forward + backward) against the faster of PyTorch's
  two variants (``native_batch_norm`` allocating, or ``out=``): >= 3.5x on 1
  thread and >= 3x on 2+ threads for 8x32x208x208 and 32x64x112x112, >= 2.5x
  for 8x128x52x52, 16x512x13x13, 64x1024x1x1 and 4x16x4x4 (the same targets
  apply to the "inside a PyTorch process" section);
* layer inference against ``torch out=``: >= 1.0x for the two big shapes,
  >= 1.2x for the others;
* channels-last module training step (``torch.nn.BatchNorm2d`` vs
  ``darknet_bn.torch.BatchNorm2d``): >= 2.5x;
* ResNet-18-like model: training step and inference >= 1.0x, batch-norm time
  inside the training step (profiler) >= 2x.

Shapes outside those lists (``--shapes``) have no target. Nothing here
changes a measurement: it only compares.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from darknet_bn._bench_common import fmt_ratio, shape_label

#: The two out-of-cache shapes of docs/reference.md §7.
BIG_SHAPES = ((8, 32, 208, 208), (32, 64, 112, 112))
#: The other four shapes of docs/reference.md §7.
OTHER_SHAPES = ((8, 128, 52, 52), (16, 512, 13, 13), (64, 1024, 1, 1), (4, 16, 4, 4))
CHANNELS_LAST_TARGET = 2.5
RESNET_TARGETS: Dict[str, float] = {"train_step": 1.0, "infer": 1.0, "bn_time": 2.0}


def layer_train_target(shape: Sequence[int], threads: int) -> Optional[float]:
    """The training-step target against the faster PyTorch variant, or None for a shape without one."""
    key = tuple(shape)
    if key in BIG_SHAPES:
        return 3.5 if threads == 1 else 3.0
    if key in OTHER_SHAPES:
        return 2.5
    return None


def layer_infer_target(shape: Sequence[int]) -> Optional[float]:
    """The inference target against ``torch out=``, or None for a shape without one."""
    key = tuple(shape)
    if key in BIG_SHAPES:
        return 1.0
    if key in OTHER_SHAPES:
        return 1.2
    return None


def met(ratio: Optional[float], target: Optional[float]) -> Optional[bool]:
    """Whether ``ratio`` reaches ``target`` (None when either is missing)."""
    if ratio is None or target is None:
        return None
    return bool(ratio >= target)


def fmt_target(ratio: Optional[float], target: Optional[float]) -> str:
    """The compact target column: ">=3.5x met", ">=3.5x MISS" or "-"."""
    if target is None:
        return "-"
    ok = met(ratio, target)
    return f">={target:g}x {'met' if ok else 'MISS'}"


def entry(section: str, what: str, shape: Optional[Sequence[int]], threads: int, ratio: Optional[float],
          target: Optional[float]) -> Dict[str, Any]:
    """One JSON record of a ratio and its target."""
    return {"section": section, "what": what, "shape": list(shape) if shape is not None else None,
            "threads": threads, "ratio": ratio, "target": target, "met": met(ratio, target)}


def faster_torch(peers: Dict[str, Any], which: str) -> Optional[str]:
    """The name of the faster PyTorch peer (``torch`` or ``torch_out``) in a layer cell for pass ``which``."""
    names = [n for n in ("torch", "torch_out") if n in peers]
    return min(names, key=lambda n: peers[n][f"{which}_s"]) if names else None


def layer_ratios(cell: Dict[str, Any]) -> Dict[str, Any]:
    """A layer cell's targeted ratios: training step vs the faster torch variant, inference vs ``torch out=``."""
    peers = cell["peers"]
    dn = peers["darknet_bn_standard"]
    fast = faster_torch(peers, "train_step")
    return {
        "train_torch": fast,
        "train": peers[fast]["train_step_s"] / dn["train_step_s"] if fast else None,
        "infer": peers["torch_out"]["infer_s"] / dn["infer_s"] if "torch_out" in peers else None,
    }


def collect(cells: Sequence[Dict[str, Any]], in_torch: Optional[Dict[str, Any]],
            channels_last: Optional[Dict[str, Any]], resnets: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every targeted ratio of a run, as :func:`entry` records (only the sections that ran)."""
    out: List[Dict[str, Any]] = []
    for c in cells:
        r = layer_ratios(c)
        if r["train"] is None:
            continue
        out.append(entry("layer", f"train step vs {r['train_torch']}", c["shape"], c["threads"], r["train"],
                         layer_train_target(c["shape"], c["threads"])))
        out.append(entry("layer", "inference vs torch_out", c["shape"], c["threads"], r["infer"],
                         layer_infer_target(c["shape"])))
    for res in (in_torch or {}).get("results", []):
        out.append(entry("in_torch", f"train step vs {res['torch_peer']}", res["shape"], res["threads"],
                         res["ratio"], layer_train_target(res["shape"], res["threads"])))
    for res in (channels_last or {}).get("results", []):
        out.append(entry("channels_last", "train step", channels_last["shape"], res["threads"], res["ratio"],
                         CHANNELS_LAST_TARGET))
    for resnet in resnets:
        policy = (resnet.get("openmp_env") or {}).get("OMP_WAIT_POLICY")
        section = "resnet" + (f" ({policy})" if policy else "")
        for res in resnet["results"]:
            for key, target in RESNET_TARGETS.items():
                out.append(entry(section, key, resnet["input"], res["threads"], res[key]["ratio"], target))
    return out


def layer_table(cells: Sequence[Dict[str, Any]]) -> str:
    """The compact targets table of the layer section (needs torch's peers in the cells)."""
    lines = ["== targets: layer alone (ratio = PyTorch time / darknet_bn standard time) =="]
    lines.append(f"{'shape':<16} {'threads':>7} {'train vs':>10} {'ratio':>8} {'target':>14} "
                 f"{'infer vs':>10} {'ratio':>8} {'target':>14}")
    for c in sorted(cells, key=lambda c: c["threads"]):
        r = layer_ratios(c)
        if r["train"] is None:
            continue
        train_target = layer_train_target(c["shape"], c["threads"])
        lines.append(f"{shape_label(c['shape']):<16} {c['threads']:>7} {r['train_torch']:>10} "
                     f"{fmt_ratio(r['train']):>8} {fmt_target(r['train'], train_target):>14} "
                     f"{'torch_out':>10} {fmt_ratio(r['infer']):>8} "
                     f"{fmt_target(r['infer'], layer_infer_target(c['shape'])):>14}")
    lines.append("train vs = the faster of torch native / torch out= for the training step (the stricter target).")
    return "\n".join(lines)


def summary(entries: Sequence[Dict[str, Any]]) -> str:
    """How many targets are met, then one line per missed target."""
    judged = [e for e in entries if e["met"] is not None]
    if not judged:
        return "targets: none apply to this run"
    missed = [e for e in judged if not e["met"]]
    lines = [f"targets met: {len(judged) - len(missed)} of {len(judged)}" + (", missed:" if missed else "")]
    for e in missed:
        where = shape_label(e["shape"]) if e["shape"] else ""
        lines.append(f"  {e['section']:<24} {e['what']:<26} {where:<16} @{e['threads']}t "
                     f"{e['ratio']:6.2f}x < {e['target']:g}x")
    return "\n".join(lines)
