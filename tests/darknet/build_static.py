"""The static route into Darknet, built for real: Darknet's sources minus the ten kernels + libdarknet_bn.a.

1. Darknet's sources come from Debian's source package (`apt-get source --download-only darknet`,
   the same Darknet as Debian's libdarknet.so), fetched with a private apt configuration under
   build/darknet-static/apt whose deb-src entries are the machine's own deb entries: the system's
   apt setup is not changed. `--source DIR` uses an unpacked Darknet tree instead.
2. The ten kernel definitions (mean_cpu, variance_cpu, normalize_cpu, scale_bias, add_bias,
   backward_bias, backward_scale_cpu, mean_delta_cpu, variance_delta_cpu, normalize_delta_cpu) are
   deleted from the copied sources: exactly ten, or the build stops.
3. Darknet's library sources are compiled (CPU, no OpenCV) and linked with tests/darknet/driver.c and
   build/libdarknet_bn.a into build/darknet-static/driver.

Usage: python tests/darknet/build_static.py [--source DIR]   (prints the driver's path)
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "darknet-static"
KERNELS = ("mean_cpu", "variance_cpu", "normalize_cpu", "scale_bias", "add_bias", "backward_bias",
           "backward_scale_cpu", "mean_delta_cpu", "variance_delta_cpu", "normalize_delta_cpu")
NOT_LIBRARY = {"compare.c"}  # Darknet's Makefile leaves it out of libdarknet


def fetch_source() -> Path:
    """Debian's darknet source package, unpacked; returns the tree's root."""
    apt = OUT / "apt"
    parts = apt / "sources.list.d"
    lists = apt / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    # the machine's deb entries, as deb-src (deb822 .sources files and one-line .list files)
    for src in glob.glob("/etc/apt/sources.list.d/*.sources"):
        text = Path(src).read_text()
        (parts / Path(src).name).write_text(re.sub(r"^Types:\s*deb\s*$", "Types: deb-src", text, flags=re.M))
    for src in ["/etc/apt/sources.list", *glob.glob("/etc/apt/sources.list.d/*.list")]:
        if os.path.exists(src):
            text = Path(src).read_text()
            lines = [re.sub(r"^deb\s", "deb-src ", ln) for ln in text.splitlines() if re.match(r"^deb\s", ln)]
            (parts / (Path(src).name.replace(".list", "") + "-src.list")).write_text("\n".join(lines) + "\n")
    opts = ["-o", f"Dir::Etc::SourceParts={parts}", "-o", "Dir::Etc::SourceList=/dev/null",
            "-o", f"Dir::State::Lists={lists}", "-o", "APT::Sandbox::User=root", "-qq"]
    subprocess.run(["apt-get", *opts, "update"], check=True)
    dl = OUT / "download"
    dl.mkdir(exist_ok=True)
    subprocess.run(["apt-get", *opts, "source", "--download-only", "darknet"], check=True, cwd=dl)
    orig = sorted(dl.glob("darknet_*.orig.tar.*"))
    if not orig:
        raise SystemExit("build_static: no darknet orig tarball downloaded")
    tree = OUT / "source"
    shutil.rmtree(tree, ignore_errors=True)
    with tarfile.open(orig[-1]) as tar:
        tar.extractall(tree, filter="data")
    return next(p.parent.parent for p in tree.rglob("src/blas.c"))


def strip_definition(text: str, name: str) -> tuple[str, int]:
    """Delete the definition `void name(...) { ... }` (brace-matched); returns (text, count)."""
    count = 0
    while True:
        m = re.search(r"^void\s+" + name + r"\s*\([^;{]*\)\s*\{", text, re.M)
        if not m:
            return text, count
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        text = text[:m.start()] + f"/* {name}: darknet_bn's (libdarknet_bn.a) */" + text[i:]
        count += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build Darknet's sources without the ten kernels "
                                                 "+ libdarknet_bn.a into a training driver.")
    parser.add_argument("--source", type=Path, help="an unpacked Darknet tree (default: Debian's source package)")
    args = parser.parse_args(argv)
    archive = ROOT / "build" / "libdarknet_bn.a"
    if not archive.exists():
        print("build_static: build/libdarknet_bn.a is missing (make lib)", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    tree = args.source if args.source else fetch_source()
    if not (tree / "src" / "blas.c").exists():
        print(f"build_static: {tree} is not a Darknet tree (no src/blas.c)", file=sys.stderr)
        return 2

    src = OUT / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(tree / "src", src)
    removed = {}
    for c in sorted(src.glob("*.c")):
        text = c.read_text(errors="replace")
        for name in KERNELS:
            text, n = strip_definition(text, name)
            removed[name] = removed.get(name, 0) + n
        c.write_text(text)
    if any(removed[k] != 1 for k in KERNELS):
        print(f"build_static: expected each kernel defined once, found {removed}", file=sys.stderr)
        return 1

    objs = OUT / "obj"
    shutil.rmtree(objs, ignore_errors=True)
    objs.mkdir()
    sources = [c for c in sorted(src.glob("*.c")) if c.name not in NOT_LIBRARY]
    procs = []
    for c in sources:  # two at a time
        procs.append(subprocess.Popen(["cc", "-std=gnu11", "-O2", "-fcommon", "-w", f"-I{tree / 'include'}",
                                       f"-I{src}", "-c", str(c), "-o", str(objs / (c.stem + ".o"))]))
        if len(procs) >= 2:
            if procs.pop(0).wait():
                return 1
    if any(p.wait() for p in procs):
        return 1
    exe = OUT / "driver"
    subprocess.run(["cc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{tree / 'include'}",
                    str(ROOT / "tests" / "darknet" / "driver.c"), *sorted(str(o) for o in objs.glob("*.o")),
                    str(archive), "-o", str(exe), "-lm", "-pthread"], check=True)
    print(exe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
