"""darknet_bn inside the real Darknet: Debian's libdarknet.so, unmodified.

tests/darknet/driver.c trains a small network (4 convolutional layers and a
connected layer with batch_normalize=1, softmax; fixed synthetic data, batch
32) through Darknet's own API. It runs three ways:

- plain: Darknet's own batch norm;
- kernels: LD_PRELOAD=build/libdarknet_bn.so, so Darknet's forward/backward_batchnorm_layer
  call darknet_bn's ten kernels;
- abi: LD_PRELOAD="build/libdarknet_bn_darknet.so build/libdarknet_bn.so", so Darknet's
  layers call darknet_bn's fused layer through Darknet's own layer ABI.

Checked: the three train alike (losses, convergence), the first step's batch
statistics against a float64 oracle computed from the layer inputs Darknet kept
(l.x), the input deltas, which library each of Darknet's calls binds to, the
standalone [batchnorm] layer that crashes Darknet itself, and the ABI layer on
bad layers under AddressSanitizer. Skipped, saying so, where Debian's darknet
package is not installed (`make test-darknet` installs it).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ULPS, assert_close, float32_ulp

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
DARKNET_DIR = Path(os.environ.get("DARKNET_DIR", "/usr/lib/darknet"))
DRIVER = BUILD / "darknet_driver"
KERNELS = BUILD / "libdarknet_bn.so"
ABI = BUILD / "libdarknet_bn_darknet.so"
ROUTES = {"plain": "", "kernels": f"{KERNELS}", "abi": f"{ABI} {KERNELS}"}
KERNEL_NAMES = ["mean_cpu", "variance_cpu", "normalize_cpu", "scale_bias", "add_bias", "backward_bias",
                "backward_scale_cpu", "mean_delta_cpu", "variance_delta_cpu", "normalize_delta_cpu"]

pytestmark = pytest.mark.skipif(
    not (DARKNET_DIR / "libdarknet.so").exists() or not (DARKNET_DIR / "include" / "darknet.h").exists(),
    reason=f"Debian's darknet package is not installed ({DARKNET_DIR}); `make test-darknet` installs it")


@pytest.fixture(scope="module")
def built():
    subprocess.run(["make", "-s", "-C", str(ROOT), "build/darknet_driver", "darknet-shim"], check=True,
                   capture_output=True)


def run(route, *args, env=None, check=True):
    """The driver under one route; returns the CompletedProcess."""
    e = dict(os.environ, LD_PRELOAD=ROUTES[route], **(env or {}))
    return subprocess.run([str(DRIVER), *args], capture_output=True, text=True, env=e, timeout=300, check=check)


def losses(stdout):
    return np.array([float(v) for v in re.findall(r"^step \d+ loss (\S+)$", stdout, re.M)])


def read_dump(path):
    """{'loss': [...], 'input_delta': array, layer index: {field: array}}."""
    out = {"layers": {}}
    for line in Path(path).read_text().splitlines():
        head, *rest = line.split(" ")
        if head == "loss":
            out.setdefault("loss", []).append(float(rest[1]))
        elif head == "input_delta":
            out["input_delta"] = np.array(rest[1:], dtype=np.float64)
        else:
            field, values = rest[0], np.array(rest[2:], dtype=np.float64)
            out["layers"].setdefault(int(head[1:]), {})[field] = values
    return out


def train_routes(folder, steps):
    """`steps` training steps under each route: {route: (losses, dump)}."""
    res = {}
    for route in ROUTES:
        dump = folder / f"{route}.txt"
        p = run(route, "--steps", str(steps), "--dump", str(dump))
        res[route] = (losses(p.stdout), read_dump(dump))
    return res


@pytest.fixture(scope="module")
def trained(built, tmp_path_factory):
    """20 steps under each route: losses and dump."""
    return train_routes(tmp_path_factory.mktemp("darknet"), 20)


@pytest.fixture(scope="module")
def first_step(built, tmp_path_factory):
    """One step under each route, every layer seeing the same input (same weights, same data): the dumps."""
    return {route: dump for route, (_, dump) in train_routes(tmp_path_factory.mktemp("darknet1"), 1).items()}


def test_three_routes_train_alike(trained):
    """Same first loss (1e-4 relative), the same loss at every step to 1e-3, and the same convergence."""
    plain = trained["plain"][0]
    assert len(plain) == 20 and plain[-1] < plain[0] / 4, plain
    for route in ("kernels", "abi"):
        got = trained[route][0]
        assert len(got) == 20
        assert abs(got[0] - plain[0]) <= 1e-4 * plain[0], (route, got[0], plain[0])
        rel = np.abs(got - plain) / plain
        assert rel.max() <= 1e-3, (route, rel.max(), got)


def test_layers_agree_after_training(trained):
    """After 20 steps every batch-norm layer's statistics and scales match Darknet's run to 1e-3 of their
    largest value. (Biases and deltas are sums that nearly cancel, where Darknet's float sums lose
    digits: see test_first_step_deltas.)"""
    plain = trained["plain"][1]["layers"]
    for route in ("kernels", "abi"):
        layers = trained[route][1]["layers"]
        assert layers.keys() == plain.keys() and len(plain) == 5
        for i, fields in plain.items():
            for field in ("mean", "variance", "rolling_mean", "rolling_variance", "scales"):
                a, b = layers[i][field], fields[field]
                scale = np.abs(b).max()
                assert np.abs(a - b).max() <= 1e-3 * scale, (route, i, field, np.abs(a - b).max(), scale)


def oracle_moments(x, batch, channels, spatial):
    """Float64 mean and unbiased variance per channel of a (batch, channels, spatial) tensor."""
    t = x.reshape(batch, channels, spatial)
    mean = t.mean(axis=(0, 2))
    var = ((t - mean[None, :, None]) ** 2).sum(axis=(0, 2)) / (batch * spatial - 1)
    return mean, var


def test_first_step_statistics_against_float64(first_step):
    """Step 1's batch mean and variance are within 4 float32 ulps (the library's accuracy guarantee, tests/conftest.py ULPS) of the float64 values computed
    from the layer inputs Darknet kept in l.x, and the running statistics they moved (from 0) within
    1e-5 relative + 1e-5 absolute of 0.01 times them, under both darknet_bn routes. Darknet's own float
    sums are measured beside them and printed."""
    worst = {}
    for route, dump in first_step.items():
        for i, f in dump["layers"].items():
            b, c, s = (int(v) for v in f["shape"])
            mean, var = oracle_moments(f["x"], b, c, s)
            for field, want in (("mean", mean), ("variance", var)):
                ulps = np.abs(f[field] - want) / float32_ulp(want)
                worst[route, field] = max(worst.get((route, field), 0), float(ulps.max()))
            if route != "plain":
                assert_close(f["rolling_mean"], 0.01 * mean, what=f"{route} L{i} rolling_mean")
                assert_close(f["rolling_variance"], 0.01 * var, what=f"{route} L{i} rolling_variance")
    print("worst float32 ulps:", {f"{r}/{f}": round(v, 2) for (r, f), v in worst.items()})
    for route in ("kernels", "abi"):
        for field in ("mean", "variance"):
            assert worst[route, field] <= ULPS, (route, field, worst[route, field])


def test_first_step_deltas(first_step):
    """Step 1's input delta (the network's gradient) and every layer delta: darknet_bn's two routes
    (Darknet's sequence of darknet_bn's kernels, and the fused layer) are independent code paths of the
    same formulas and agree to 1e-5 of the largest value. Darknet's own float sums differ from both by
    more where mean_delta and variance_delta cancel; that deviation is printed, not asserted."""
    plain, kernels, abi = first_step["plain"], first_step["kernels"], first_step["abi"]
    pairs = [("input", kernels["input_delta"], abi["input_delta"], plain["input_delta"])]
    pairs += [(f"L{i}", kernels["layers"][i]["delta"], abi["layers"][i]["delta"], plain["layers"][i]["delta"])
              for i in plain["layers"]]
    darknet_dev = {}
    for name, k, a, p in pairs:
        scale = np.abs(k).max()
        assert k.size == a.size == p.size > 0 and scale > 0
        assert np.abs(a - k).max() <= 1e-5 * scale, (name, np.abs(a - k).max() / scale)
        darknet_dev[name] = float(np.abs(p - k).max() / scale)
    print("Darknet's own deltas vs darknet_bn's, max |diff| / max |delta|:",
          {n: f"{v:.1e}" for n, v in darknet_dev.items()})


def bindings(route):
    """{symbol: library basename} for the bindings of libdarknet.so's references during one step."""
    p = run(route, "--steps", "1", env={"LD_DEBUG": "bindings"})
    found = {}
    for m in re.finditer(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: normal symbol `(\w+)'", p.stderr):
        if Path(m.group(1)).name == "libdarknet.so":
            found[m.group(3)] = Path(m.group(2)).name
    return found


def test_bindings_show_which_library_runs(built):
    """LD_DEBUG=bindings: with the kernels preloaded, Darknet's layer is its own and its ten kernel calls
    go to libdarknet_bn.so; with the ABI layer preloaded, Darknet's layer calls go to it."""
    plain = bindings("plain")
    assert plain.get("forward_batchnorm_layer") == "libdarknet.so"
    kernels = bindings("kernels")
    assert kernels.get("forward_batchnorm_layer") == "libdarknet.so"
    for name in KERNEL_NAMES:
        assert kernels.get(name) == "libdarknet_bn.so", (name, kernels.get(name))
    abi = bindings("abi")
    assert abi.get("forward_batchnorm_layer") == "libdarknet_bn_darknet.so"
    assert abi.get("backward_batchnorm_layer") == "libdarknet_bn_darknet.so"
    # the layers Darknet does not route through batch norm still use the kernels, from darknet_bn
    assert abi.get("add_bias") == "libdarknet_bn.so"


def test_standalone_batchnorm_layer(built, tmp_path):
    """Darknet's own [batchnorm] layer crashes Darknet (l.x is never allocated); the ABI layer trains it."""
    crashed = run("plain", "--steps", "2", "--standalone-bn", check=False)
    assert crashed.returncode < 0 or crashed.returncode >= 128, crashed.returncode
    p = run("abi", "--steps", "20", "--standalone-bn", "--dump", str(tmp_path / "bn.txt"))
    got = losses(p.stdout)
    assert len(got) == 20 and np.all(np.isfinite(got)) and got[-1] < got[0] / 4, got
    layers = read_dump(tmp_path / "bn.txt")["layers"]
    standalone = [f for f in layers.values() if f["x"].size == 0]
    assert len(standalone) == 1
    assert np.all(standalone[0]["variance"] > 0) and np.all(standalone[0]["rolling_variance"] > 0)


@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler")
def test_abi_layer_edges_under_sanitizers(tmp_path):
    """tests/darknet/abi_edges.c: zero/negative/inconsistent sizes and NULL buffers do nothing,
    [batchnorm] without l.x, one value per channel, 1500 channels; under ASan + UBSan."""
    exe = tmp_path / "abi_edges"
    srcs = sorted(str(p) for p in (ROOT / "csrc").glob("*.c"))
    subprocess.run(["cc", "-std=c11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-pthread", "-Wall", "-Wextra", "-Wno-psabi", "-Werror", f"-I{DARKNET_DIR / 'include'}",
                    f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'darknet_abi'}", *srcs,
                    str(ROOT / "csrc" / "darknet_abi" / "darknet_abi.c"), str(ROOT / "tests" / "darknet" / "abi_edges.c"),
                    "-o", str(exe), "-lm"], check=True, capture_output=True)
    p = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"^\d+ passed, 0 failed$", p.stdout, re.M), p.stdout


@pytest.mark.skipif(not shutil.which("apt-get") or not shutil.which("cc"), reason="needs apt-get and a C compiler")
def test_static_route(built, trained):
    """Darknet's own sources (Debian's source package) with the ten kernel definitions deleted, linked with
    build/libdarknet_bn.a (tests/darknet/build_static.py): no libdarknet.so, darknet_bn's kernels defined
    in the program, and the training of the shared-library routes."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "lib"], check=True, capture_output=True)
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "darknet" / "build_static.py")], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    exe = Path(p.stdout.strip().splitlines()[-1])
    linked = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
    assert "libdarknet" not in linked, linked
    symbols = subprocess.run(["nm", str(exe)], capture_output=True, text=True, check=True).stdout
    assert re.search(r" T mean_cpu$", symbols, re.M) and re.search(r" t dnbn_rows_active$", symbols, re.M)
    out = subprocess.run([str(exe), "--steps", "20"], capture_output=True, text=True, timeout=300, check=True)
    got, plain = losses(out.stdout), trained["plain"][0]
    assert len(got) == 20 and abs(got[0] - plain[0]) <= 1e-4 * plain[0], (got[0], plain[0])
    assert (np.abs(got - plain) / plain).max() <= 1e-3
    # the same kernels as the preloaded route, in another binary: the same losses bit for bit is not
    # promised (Darknet's own code is compiled here with other flags), the same training is
    assert np.abs(got - trained["kernels"][0]).max() <= 1e-3 * plain.max()
