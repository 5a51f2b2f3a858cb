"""A Darknet training step on Debian's libdarknet.so, with and without darknet_bn (make bench-darknet).

Runs build/darknet_driver (tests/darknet/driver.c: 4 batch-normalized conv
layers and a batch-normalized connected layer, 28x28x3, batch 32) under the
three routes, interleaved, and reports medians over rounds of:

- bn: Darknet's forward_batchnorm_layer + backward_batchnorm_layer summed over
  the conv layers, as Darknet calls them (the driver times each call);
- step: a whole train_network() step.

Routes: plain Darknet; LD_PRELOAD=build/libdarknet_bn.so (Darknet's layer on
darknet_bn's kernels); the Darknet-ABI layer preloaded (the fused layer).
darknet_bn's threads: DARKNET_BN_NUM_THREADS=1 and 2 (Darknet itself is single-threaded).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
ROUTES = {
    "Darknet": "",
    "darknet_bn kernels": str(BUILD / "libdarknet_bn.so"),
    "darknet_bn Darknet-ABI layer": f"{BUILD / 'libdarknet_bn_darknet.so'} {BUILD / 'libdarknet_bn.so'}",
}


def cpu_description() -> str:
    """CPU model, SIMD flags of interest and cache sizes, from /proc/cpuinfo and lscpu."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    caches = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        caches = ", ".join(f"{k} {v.strip()}" for k, v in re.findall(r"^(L[123]\w?) cache:\s*(.+)$", out, re.M))
    except (OSError, subprocess.CalledProcessError):
        pass
    simd = " ".join(f for f in ("avx2", "fma", "avx512f") if f in flags)
    return f"{model}; {os.cpu_count()} cores; {simd}; {caches}"


def run_once(preload: str, threads: int, reps: int) -> tuple[float, float]:
    """One driver run: (bn_ms, step_ms) medians over `reps` inside the run."""
    env = dict(os.environ, LD_PRELOAD=preload, DARKNET_BN_NUM_THREADS=str(threads))
    out = subprocess.run([str(BUILD / "darknet_driver"), "--steps", "2", "--bench-bn", str(reps)], env=env,
                         capture_output=True, text=True, check=True, timeout=600).stdout
    bn = float(re.search(r"^bn_ms (\S+)$", out, re.M).group(1))
    step = float(re.search(r"^step_ms (\S+)$", out, re.M).group(1))
    return bn, step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved runs of each route (default 5)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions inside each run (default 10)")
    parser.add_argument("--threads", default="1,2", help="darknet_bn thread counts (default 1,2)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.reps < 1:
        parser.error("--rounds and --reps must be >= 1")
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must be a comma-separated list of integers, got {args.threads!r}")
    if any(t < 1 or t > 256 for t in threads):
        parser.error("--threads values must be in 1..256")
    for exe in ("darknet_driver", "libdarknet_bn_darknet.so", "libdarknet_bn.so"):
        if not (BUILD / exe).exists():
            print(f"bench_darknet: build/{exe} is missing (make darknet-shim build/darknet_driver)", file=sys.stderr)
            return 2

    print(f"CPU: {cpu_description()}")
    print(f"Darknet: {os.environ.get('DARKNET_DIR', '/usr/lib/darknet')}/libdarknet.so (Debian), single-threaded")
    print(f"medians of {args.rounds} interleaved runs x {args.reps} repetitions\n")
    print("| darknet_bn threads | route | batch norm (fwd+bwd, 4 conv layers) | vs Darknet | whole step | vs Darknet |")
    print("|---|---|---|---|---|---|")
    for t in threads:
        samples: dict[str, list[tuple[float, float]]] = {r: [] for r in ROUTES}
        for i in range(args.rounds):
            for route, preload in ROUTES.items():
                samples[route].append(run_once(preload, t, args.reps))
            print(f"  threads {t}: round {i + 1}/{args.rounds}", file=sys.stderr, end="\r")
        base_bn = statistics.median(s[0] for s in samples["Darknet"])
        base_step = statistics.median(s[1] for s in samples["Darknet"])
        for route, s in samples.items():
            bn, step = statistics.median(x[0] for x in s), statistics.median(x[1] for x in s)
            print(f"| {t} | {route} | {bn:.2f} ms | {base_bn / bn:.2f}x | {step:.1f} ms | {base_step / step:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
