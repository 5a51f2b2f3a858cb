"""Whole-model sections of the benchmark: a small CNN and a ResNet-18-like network.

Each model is built from ``torch.nn`` with ``torch.nn.BatchNorm2d``; a deep
copy is converted with :func:`darknet_bn.torch.convert_model` (same weights,
same data, same thread count for torch and darknet_bn), and the two are timed
interleaved, medians reported as torch's time over the converted model's.

* CNN (:func:`bench_cnn`): a training step of three conv3x3 + BN + ReLU
  blocks (``--cnn-input``).
* ResNet (:func:`bench_resnet`): conv7x7/2 + BN + ReLU + maxpool, four stages
  of two BasicBlocks (64, 128, 256, 512 channels; 1x1 conv + BN downsample
  where the stride or width changes), global average pool, linear 1000
  (``--resnet-input``). Per thread count: (a) the training step (forward,
  cross-entropy, backward, SGD step), (b) inference (eval mode, no_grad), and
  (c) the batch-norm time inside one training step, from ``torch.profiler``
  (:func:`batch_norm_time`).

Batch-norm profiler events. An event belongs to batch norm when its name, or
the name of one of its enclosing (``cpu_parent``) events, contains
"batchnorm" once lower-cased with underscores removed (:func:`is_batch_norm_event`).
With torch 2.13 that matches, for ``torch.nn.BatchNorm2d``: ``aten::batch_norm``
(which encloses ``aten::_batch_norm_impl_index`` and
``aten::native_batch_norm``), ``autograd::engine::evaluate_function:
NativeBatchNormBackward0`` (enclosing ``NativeBatchNormBackward0`` and
``aten::native_batch_norm_backward``); for darknet_bn's module:
``_BatchNormFunction`` (the autograd Function's forward, C call included) and
``autograd::engine::evaluate_function: _BatchNormFunctionBackward`` (enclosing
``_BatchNormFunctionBackward``). The batch-norm time is the sum of the self
CPU time of those events and of every event they enclose (allocations such as
``aten::empty``), i.e. each outermost event's total, counted once. The
module-level Python before the op (the argument checks of either module) is
in no event and not counted; ``AccumulateGrad`` of the parameters is not
batch norm's.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import textwrap
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import darknet_bn
from darknet_bn._bench_common import (
    AGREE_TOL,
    SETTLE_S,
    Progress,
    Shape,
    fmt_ratio,
    fmt_time,
    interleaved,
    scaled_diff,
    set_threads,
    shape_label,
)
from darknet_bn._bench_targets import RESNET_TARGETS, fmt_target

#: (JSON key, table label) of the two model peers; ratios are the first's time over the second's.
MODEL_PEERS: Tuple[Tuple[str, str], ...] = (("torch", "torch.nn.BatchNorm2d"),
                                            ("darknet_bn", "darknet_bn.torch.BatchNorm2d"))
CNN_PEERS = MODEL_PEERS
OMP_ENV_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def omp_policy_label(env: Dict[str, Optional[str]]) -> str:
    """"default" when OMP_WAIT_POLICY is unset, else its value (upper case)."""
    value = env.get("OMP_WAIT_POLICY")
    return value.upper() if value else "default"


class ModelPeer:
    """One model with its own SGD optimizer (momentum 0.9), training on a fixed batch."""

    def __init__(self, torch: Any, model: Any, x: Any, target: Any, name: str, label: str, lr: float) -> None:
        self.torch, self.model, self.x, self.target = torch, model, x, target
        self.name, self.label = name, label
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.loss: Any = None
        self.out: Any = None

    def step(self) -> None:
        """One full training step: forward, loss, backward, optimizer step."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.target)
        loss.backward()
        self.opt.step()
        self.loss = loss

    def infer(self) -> None:
        """One forward without autograd (the caller sets eval mode)."""
        with self.torch.no_grad():
            self.out = self.model(self.x)


#: The CNN row's peer (the name it had before the ResNet section).
CnnPeer = ModelPeer


def _model_peers(torch: Any, base: Any, input_shape: Shape, classes: int, lr: float, seed: int) -> List[ModelPeer]:
    """``base`` (a deep copy) and its darknet_bn conversion (another deep copy), on the same random batch."""
    from darknet_bn.torch import convert_model

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=gen)
    target = torch.randint(0, classes, (input_shape[0],), generator=gen)
    models = [copy.deepcopy(base), convert_model(copy.deepcopy(base))]
    return [ModelPeer(torch, m, x, target, name, label, lr) for m, (name, label) in zip(models, MODEL_PEERS)]


def _median(values: Sequence[float]) -> float:
    """The median of ``values`` (the mean of the two middle ones for an even count)."""
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _check_losses(peers: Sequence[ModelPeer], steps: int) -> Dict[str, Any]:
    """Take ``steps`` training steps with each model; compare the losses (relative difference)."""
    losses: Dict[str, List[float]] = {p.name: [] for p in peers}
    for _ in range(steps):
        for p in peers:
            p.step()
            losses[p.name].append(p.loss.item())
    base, other = (losses[name] for name, _ in MODEL_PEERS)
    worst = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(base, other))
    return {"losses": losses, "max_rel_diff": worst, "agree": bool(worst <= AGREE_TOL), "tolerance": AGREE_TOL}


# --------------------------------------------------------------------------- CNN training step

#: The CNN row's default input (batch, channels, h, w), its blocks' channels and its classes.
CNN_INPUT: Shape = (16, 3, 64, 64)
CNN_CHANNELS: Tuple[int, ...] = (32, 64, 64)
CNN_CLASSES = 10
CNN_LR = 0.01
#: Training steps compared (losses) before timing.
CNN_CHECK_STEPS = 3


def cnn_description(input_shape: Sequence[int], channels: Sequence[int] = CNN_CHANNELS) -> str:
    """One line describing the CNN row's model."""
    blocks = "/".join(str(c) for c in channels)
    return (f"{shape_label(input_shape)} input, {len(channels)} conv3x3+BN+ReLU blocks ({blocks} channels, "
            f"2x2 max pool between), global avg pool, linear, cross-entropy, SGD momentum 0.9")


def make_cnn(torch: Any, in_channels: int, channels: Sequence[int] = CNN_CHANNELS,
             classes: int = CNN_CLASSES) -> Any:
    """The benchmark's small CNN with ``torch.nn.BatchNorm2d`` (random weights from torch's generator)."""
    nn = torch.nn
    layers: List[Any] = []
    c_in = in_channels
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


def _seeded_peers(torch: Any, build: Callable[[Any, int], Any], input_shape: Shape, classes: int, lr: float,
                  seed: int) -> List[ModelPeer]:
    """``build(torch, in_channels)`` with torch's generator seeded (and restored after), then its peers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = build(torch, input_shape[1])
    return _model_peers(torch, base, input_shape, classes, lr, seed)


def make_cnn_peers(torch: Any, input_shape: Shape, seed: int = 0) -> List[ModelPeer]:
    """The torch model and its darknet_bn conversion, same initial weights, same data."""
    return _seeded_peers(torch, make_cnn, input_shape, CNN_CLASSES, CNN_LR, seed)


def bench_cnn(
    torch: Any,
    input_shape: Shape,
    threads_list: Sequence[int],
    reps: Optional[int],
    min_time: float,
    budget: float,
    max_reps: int,
    progress: Progress,
) -> Dict[str, Any]:
    """Time a CNN training step with torch's batch norm and with darknet_bn's, at each thread count.

    First both models take ``CNN_CHECK_STEPS`` steps from the same weights and
    their losses are compared (relative difference <= AGREE_TOL). Then, per
    thread count: a warm-up, the inner loop count, and ``reps`` samples
    interleaved across the two models (``reps`` None: from ``budget``).
    """
    peers = make_cnn_peers(torch, input_shape)
    set_threads(max(threads_list), torch)
    agreement = _check_losses(peers, CNN_CHECK_STEPS)
    results = []
    for threads in threads_list:
        set_threads(threads, torch)
        label = f"CNN {shape_label(input_shape)} @{threads}t"
        timed, n_reps = interleaved({p.name: p.step for p in peers}, reps=reps, min_time=min_time, budget=budget,
                                    max_reps=max_reps, progress=progress, label=label)
        med = {name: t["s"] for name, t in timed.items()}
        dn = med[MODEL_PEERS[-1][0]]
        results.append({
            "threads": threads,
            "darknet_bn_threads": darknet_bn.get_num_threads(),
            "torch_threads": torch.get_num_threads(),
            "reps": n_reps,
            "peers": {
                p.name: {"label": p.label, "step_s": med[p.name], "samples": timed[p.name]["samples"],
                         "inner": timed[p.name]["inner"], "ratio": med[p.name] / dn}
                for p in peers
            },
        })
    return {
        "input": list(input_shape),
        "channels": list(CNN_CHANNELS),
        "classes": CNN_CLASSES,
        "model": cnn_description(input_shape),
        "baseline": MODEL_PEERS[-1][0],
        "openmp_env": {k: os.environ.get(k) for k in OMP_ENV_KEYS},
        "agreement": agreement,
        "results": results,
    }


def cnn_table(cnn: Dict[str, Any], passive: Optional[Dict[str, Any]] = None) -> str:
    """The CNN row's table: per thread count (and OpenMP wait policy), each model's median step time and the ratio."""
    runs = [cnn] + ([passive] if passive else [])
    lines = [f"== CNN training step ({cnn['model']}) =="]
    lines.append(f"{'threads':<8} {'OMP_WAIT_POLICY':<16} " + " ".join(f"{label:>30}" for _, label in MODEL_PEERS)
                 + f" {'ratio':>8}")
    for threads in [r["threads"] for r in cnn["results"]]:
        for run in runs:
            res = next((r for r in run["results"] if r["threads"] == threads), None)
            if res is None:
                continue
            times = " ".join(f"{fmt_time(res['peers'][name]['step_s']):>30}" for name, _ in MODEL_PEERS)
            ratio = res["peers"][MODEL_PEERS[0][0]]["ratio"]
            lines.append(f"{threads:<8} {omp_policy_label(run['openmp_env']):<16} {times} {ratio:7.2f}x")
    agr = cnn["agreement"]
    lines.append(f"Median time per step ({cnn['results'][0]['reps']} reps). ratio = torch.nn.BatchNorm2d step time")
    lines.append("/ the converted model's: above 1x the darknet_bn model trains faster. Convolutions, pooling and")
    lines.append("the optimizer are torch's in both models. darknet_bn's calls run on torch's OpenMP team (info()")
    lines.append("team; DARKNET_BN_TEAM=pool: darknet_bn's sleeping workers, which must win a core from torch's")
    lines.append("spin-waiting ones). Rows marked PASSIVE ran in a child process started with OMP_WAIT_POLICY=PASSIVE.")
    lines.append(f"Losses of the first {len(agr['losses'][MODEL_PEERS[0][0]])} steps agree to a relative "
                 f"{agr['max_rel_diff']:.1e} (tolerance {agr['tolerance']:g}).")
    return "\n".join(lines)


# --------------------------------------------------------------------------- ResNet-18-like model

RESNET_INPUT: Shape = (16, 3, 112, 112)
RESNET_QUICK_INPUT: Shape = (4, 3, 64, 64)
RESNET_WIDTHS: Tuple[int, ...] = (64, 128, 256, 512)
RESNET_BLOCKS_PER_STAGE = 2
RESNET_CLASSES = 1000
RESNET_LR = 0.01
#: Training steps whose losses are compared before timing.
RESNET_CHECK_STEPS = 2
#: Profiled training steps per model and thread count (the median is reported).
RESNET_PROFILE_STEPS = 3


def resnet_final_hw(h: int, w: int) -> Tuple[int, int]:
    """The spatial size after the stem (conv 7x7/2, maxpool 3x3/2) and the three stride-2 stages."""
    def down(n: int) -> int:
        return (n - 1) // 2 + 1
    for _ in range(5):
        h, w = down(h), down(w)
    return h, w


def resnet_description(input_shape: Sequence[int]) -> str:
    """One line describing the ResNet section's model."""
    widths = "/".join(str(c) for c in RESNET_WIDTHS)
    return (f"{shape_label(input_shape)} input, ResNet-18-like: conv7x7/2+BN+ReLU+maxpool, 4 stages x "
            f"{RESNET_BLOCKS_PER_STAGE} BasicBlocks ({widths} channels), avg pool, linear {RESNET_CLASSES}, "
            f"cross-entropy, SGD momentum 0.9")


def make_resnet(torch: Any, in_channels: int = 3, classes: int = RESNET_CLASSES) -> Any:
    """A ResNet-18-like ``torch.nn.Sequential`` built from ``torch.nn`` (torchvision's layout, no torchvision).

    The BasicBlock class is made here, as ``torch`` is passed in (the module never imports it).
    """
    nn = torch.nn

    class BasicBlock(nn.Module):
        """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (1x1 conv + BN when the stride or width changes), ReLU."""

        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                               if stride != 1 or c_in != c_out else None)

        def forward(self, x: Any) -> Any:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    stem = RESNET_WIDTHS[0]
    layers: List[Any] = [nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    c_in = RESNET_WIDTHS[0]
    for stage, width in enumerate(RESNET_WIDTHS):
        for block in range(RESNET_BLOCKS_PER_STAGE):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(c_in, width, stride))
            c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


def make_resnet_peers(torch: Any, input_shape: Shape, seed: int = 0) -> List[ModelPeer]:
    """The torch ResNet and its darknet_bn conversion, same initial weights, same data."""
    return _seeded_peers(torch, make_resnet, input_shape, RESNET_CLASSES, RESNET_LR, seed)


def is_batch_norm_event(name: str) -> bool:
    """Whether a profiler event's name is a batch norm's (module docstring)."""
    return "batchnorm" in name.lower().replace("_", "")


def batch_norm_time(events: Any) -> Tuple[float, Dict[str, float]]:
    """Seconds of batch norm in profiler ``events`` and its split by event name (seconds of self CPU time).

    Sums the self CPU time of every event that is a batch-norm event or is
    enclosed in one (``cpu_parent`` chain), so each batch norm's total is
    counted once.
    """
    total = 0.0
    by_name: Dict[str, float] = {}
    for e in events:
        node, inside = e, False
        while node is not None:
            if is_batch_norm_event(node.name):
                inside = True
                break
            node = node.cpu_parent
        if inside:
            s = e.self_cpu_time_total * 1e-6
            total += s
            by_name[e.name] = by_name.get(e.name, 0.0) + s
    return total, by_name


#: Lines the profiler prints on stderr at every start and stop (libkineto), filtered out.
_PROFILER_NOISE = ("SyncActivityProfilerHandler", "profiler_start", "profiler_stop")


@contextlib.contextmanager
def quiet_profiler_logs() -> Iterator[None]:
    """Hold back file descriptor 2 while profiling; afterwards write back every line but the profiler's chatter."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(True)
                    if not any(n in line for n in _PROFILER_NOISE)]
            if kept:
                sys.stderr.write("".join(kept))


def _profiled_step(torch: Any, peer: ModelPeer) -> Dict[str, Any]:
    """One training step under ``torch.profiler.profile`` (CPU): batch-norm seconds, its events, the wall time."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler_logs():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            peer.step()
            wall = time.perf_counter() - t0
        bn, by_name = batch_norm_time(prof.events())
    return {"bn_s": bn, "by_event": by_name, "step_wall_s": wall}


def bench_resnet(
    torch: Any,
    input_shape: Shape,
    threads_list: Sequence[int],
    reps: Optional[int],
    min_time: float,
    budget: float,
    max_reps: int,
    progress: Progress,
    profile_steps: int = RESNET_PROFILE_STEPS,
) -> Dict[str, Any]:
    """Time the ResNet-18-like model with torch's batch norm and with darknet_bn's, at each thread count.

    First the agreement: ``RESNET_CHECK_STEPS`` training steps from the same
    weights (losses within AGREE_TOL relative), then, with torch's weights and
    running statistics copied into the converted model, the eval-mode outputs
    (max |diff| scaled by max(1, max |torch's|) within AGREE_TOL). Then per
    thread count: the training step and the inference forward, each with
    interleaved repetitions, and ``profile_steps`` profiled training steps per
    model (interleaved) for the batch-norm time. Advances ``progress`` by 1 per
    thread count.
    """
    peers = make_resnet_peers(torch, input_shape)
    set_threads(max(threads_list), torch)
    agreement = _check_losses(peers, RESNET_CHECK_STEPS)
    # Eval outputs from the same weights and running statistics (torch's after those steps): after
    # training on a tiny batch the two models' own weights may differ by more than rounding.
    peers[1].model.load_state_dict(peers[0].model.state_dict())
    outs = {}
    for p in peers:
        p.model.eval()
        p.infer()
        outs[p.name] = p.out.numpy().copy()
        p.model.train()
    torch_name, dn_name = (name for name, _ in MODEL_PEERS)
    agreement["eval_max_scaled_diff"] = scaled_diff(outs[dn_name], outs[torch_name])
    agreement["agree"] = bool(agreement["agree"] and agreement["eval_max_scaled_diff"] <= AGREE_TOL)
    from darknet_bn.torch import BatchNorm2d as DarknetBN

    n_bn = {p.name: sum(isinstance(m, torch.nn.BatchNorm2d) for m in p.model.modules()) for p in peers}
    n_converted = sum(isinstance(m, DarknetBN) for m in peers[1].model.modules())
    results = []
    events: Dict[str, Dict[str, float]] = {p.name: {} for p in peers}
    for threads in threads_list:
        set_threads(threads, torch)
        label = f"ResNet {shape_label(input_shape)} @{threads}t"
        kw = dict(reps=reps, min_time=min_time, budget=budget, max_reps=max_reps, progress=progress)
        train, n_train = interleaved({p.name: p.step for p in peers}, label=f"{label} train", weight=0.45, **kw)
        for p in peers:
            p.model.eval()
        try:
            infer, n_infer = interleaved({p.name: p.infer for p in peers}, label=f"{label} infer", weight=0.3, **kw)
        finally:
            for p in peers:
                p.model.train()
        prof: Dict[str, List[Dict[str, Any]]] = {p.name: [] for p in peers}
        for k in range(profile_steps):
            for p in peers:
                time.sleep(SETTLE_S)
                prof[p.name].append(_profiled_step(torch, p))
            progress(0.25 / profile_steps, f"{label} profile {k + 1}/{profile_steps}")
        for p in peers:
            for step in prof[p.name]:
                for name, s in step["by_event"].items():
                    events[p.name][name] = events[p.name].get(name, 0.0) + s / (len(threads_list) * profile_steps)
        bn = {name: {"bn_s": _median([s["bn_s"] for s in v]), "samples": [s["bn_s"] for s in v],
                     "step_wall_s": _median([s["step_wall_s"] for s in v])} for name, v in prof.items()}
        for v in bn.values():
            v["bn_share"] = v["bn_s"] / v["step_wall_s"] if v["step_wall_s"] > 0 else None
        results.append({
            "threads": threads,
            "darknet_bn_threads": darknet_bn.get_num_threads(),
            "torch_threads": torch.get_num_threads(),
            "train_step": _section(train, n_train, "step_s"),
            "infer": _section(infer, n_infer, "infer_s"),
            "bn_time": {"steps": profile_steps, "peers": bn,
                        "ratio": bn[torch_name]["bn_s"] / bn[dn_name]["bn_s"] if bn[dn_name]["bn_s"] > 0 else None},
        })
    return {
        "input": list(input_shape),
        "model": resnet_description(input_shape),
        "widths": list(RESNET_WIDTHS),
        "classes": RESNET_CLASSES,
        "batch_norm_layers": n_bn[torch_name],
        "converted_batch_norm_layers": n_converted,
        "baseline": dn_name,
        "openmp_env": {k: os.environ.get(k) for k in OMP_ENV_KEYS},
        "agreement": agreement,
        "profiler_events": {
            name: {"matched": sorted(n for n in v if is_batch_norm_event(n)),
                   "self_s_per_step": dict(sorted(v.items(), key=lambda kv: -kv[1]))}
            for name, v in events.items()},
        "results": results,
    }


def _section(timings: Dict[str, Dict[str, Any]], n_reps: int, key: str) -> Dict[str, Any]:
    """A timed part of the ResNet section as JSON: reps, per-peer median, samples, inner; torch / darknet_bn."""
    torch_name, dn_name = (name for name, _ in MODEL_PEERS)
    labels = dict(MODEL_PEERS)
    return {
        "reps": n_reps,
        "peers": {name: {"label": labels[name], key: t["s"], "samples": t["samples"], "inner": t["inner"]}
                  for name, t in timings.items()},
        "ratio": timings[torch_name]["s"] / timings[dn_name]["s"],
    }


def resnet_table(resnet: Dict[str, Any], passive: Optional[Dict[str, Any]] = None) -> str:
    """The ResNet section's table: training step, inference and batch-norm time, per thread count and wait policy."""
    runs = [resnet] + ([passive] if passive else [])
    torch_name, dn_name = (name for name, _ in MODEL_PEERS)
    lines = [f"== ResNet-18-like model ({resnet['model']}; {resnet['batch_norm_layers']} batch norms) =="]
    lines.append(f"{'threads':<8} {'OMP_WAIT_POLICY':<16} {'measure':<22} {'torch.nn':>11} {'darknet_bn':>11} "
                 f"{'ratio':>8} {'target':>14}")
    what = (("train_step", "step_s", "training step"), ("infer", "infer_s", "inference"),
            ("bn_time", "bn_s", "BN time in train step"))
    for threads in [r["threads"] for r in resnet["results"]]:
        for run in runs:
            res = next((r for r in run["results"] if r["threads"] == threads), None)
            if res is None:
                continue
            for key, field, title in what:
                part = res[key]
                t, d = part["peers"][torch_name][field], part["peers"][dn_name][field]
                lines.append(f"{threads:<8} {omp_policy_label(run['openmp_env']):<16} {title:<22} {fmt_time(t):>11} "
                             f"{fmt_time(d):>11} {fmt_ratio(part['ratio']):>8} "
                             f"{fmt_target(part['ratio'], RESNET_TARGETS[key]):>14}")
            shares = ", ".join(f"{label} {res['bn_time']['peers'][n]['bn_share'] * 100:.0f}%"
                               for n, label in (("torch", "torch"), ("darknet_bn", "darknet_bn"))
                               if res["bn_time"]["peers"][n]["bn_share"] is not None)
            lines.append(f"{'':<8} {'':<16} (batch norm's share of the profiled step: {shares})")
    agr = resnet["agreement"]
    first = resnet["results"][0]
    lines.append(f"Medians ({first['train_step']['reps']} training-step reps, {first['infer']['reps']} inference reps, "
                 f"{first['bn_time']['steps']} profiled steps per model). ratio = torch time / darknet_bn time.")
    events = "; ".join(f"{n}: {', '.join(v['matched']) or '-'}" for n, v in resnet["profiler_events"].items())
    lines += textwrap.wrap("BN time = self CPU time of the batch-norm profiler events and of the events they enclose, "
                           f"in one training step (torch.profiler, forward and backward). Events: {events}.",
                           width=110, break_on_hyphens=False)
    lines.append(f"Agreement: losses of the first {len(agr['losses'][torch_name])} steps within a relative "
                 f"{agr['max_rel_diff']:.1e}, eval outputs within {agr['eval_max_scaled_diff']:.1e} "
                 f"(tolerance {agr['tolerance']:g}).")
    return "\n".join(lines)
