"""The benchmark's model sections run again in a child process with ``OMP_WAIT_POLICY=PASSIVE``.

libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it, so the setting
needs a fresh interpreter: :func:`run` starts ``python -m
darknet_bn._bench_passive CONFIG OUT`` with the variable in its environment.
The child runs the CNN and ResNet sections (:mod:`darknet_bn._bench_models`)
with the parent's options and writes their JSON to ``OUT``; while it runs it
reports progress as ``PROGRESS<TAB>amount<TAB>text`` lines on stdout, which
:func:`run` forwards to the parent's progress bar (other stdout lines, and the
child's stderr, go to the parent's stderr; a failure's last stderr line ends
up in the result's "error").
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any, Deque, Dict, Optional, Sequence

from darknet_bn._bench_common import Progress

ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
_TAG = "PROGRESS\t"


def run(config: Dict[str, Any], progress: Progress, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run the model sections in a child process with ``env`` (default :data:`ENV`) added to this environment.

    ``config``: ``cnn_input`` and ``resnet_input`` (a shape, or None to skip),
    ``threads``, ``reps``, ``min_time``, ``budget``, ``max_reps``,
    ``profile_steps``. Returns {"env", "cnn", "resnet", "wall_time_s"}, plus
    "error" (and None sections) when the child fails.
    """
    extra = dict(ENV if env is None else env)
    start = time.perf_counter()
    result: Dict[str, Any] = {"env": extra, "cnn": None, "resnet": None}
    with tempfile.TemporaryDirectory(prefix="darknet_bn_bench_") as tmp:
        cfg_path, out_path = os.path.join(tmp, "config.json"), os.path.join(tmp, "out.json")
        with open(cfg_path, "w") as f:
            json.dump(config, f)
        cmd = [sys.executable, "-m", "darknet_bn._bench_passive", cfg_path, out_path]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **extra})
        assert proc.stdout is not None and proc.stderr is not None
        tail: Deque[str] = collections.deque(maxlen=1)
        relay = threading.Thread(target=_relay, args=(proc.stderr, tail), daemon=True)
        relay.start()
        try:
            for line in proc.stdout:
                if line.startswith(_TAG):
                    _, amount, text = line.rstrip("\n").split("\t", 2)
                    progress(float(amount), f"{'/'.join(extra.values())} {text}")
                else:
                    sys.stderr.write(line)
            status = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            relay.join(timeout=5)
        if status != 0:
            last = f": {tail[0].strip()}" if tail else ""
            result["error"] = f"the child process ({' '.join(cmd[1:3])}) exited with status {status}{last}"
        else:
            try:
                with open(out_path) as f:
                    result.update(json.load(f))
            except (OSError, ValueError) as exc:
                result["error"] = f"cannot read the child's results: {exc}"
    result["wall_time_s"] = time.perf_counter() - start
    return result


def _relay(stream: IO[str], tail: Deque[str]) -> None:
    """Copy the child's stderr to ours line by line, keeping the last non-empty line (the error of a traceback)."""
    for line in stream:
        sys.stderr.write(line)
        if line.strip():
            tail.append(line)


def _child(argv: Sequence[str]) -> int:
    """The child's work: the sections of the config file ``argv[0]``, JSON written to ``argv[1]``."""
    cfg_path, out_path = argv
    with open(cfg_path) as f:
        cfg = json.load(f)
    import torch

    from darknet_bn import _bench_models

    def progress(amount: float, text: str) -> None:
        print(f"{_TAG}{amount}\t{text}", flush=True)

    common = (cfg["threads"], cfg["reps"], cfg["min_time"], cfg["budget"], cfg["max_reps"], progress)
    out: Dict[str, Any] = {"cnn": None, "resnet": None}
    if cfg.get("cnn_input"):
        out["cnn"] = _bench_models.bench_cnn(torch, tuple(cfg["cnn_input"]), *common)
    if cfg.get("resnet_input"):
        steps = cfg.get("profile_steps", _bench_models.RESNET_PROFILE_STEPS)
        out["resnet"] = _bench_models.bench_resnet(torch, tuple(cfg["resnet_input"]), *common, profile_steps=steps)
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
