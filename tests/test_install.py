"""The installable faces: ``make install`` + pkg-config, examples/tiny_net.c, and the sdist/wheel.

- ``make install PREFIX=<tmp>`` installs lib/libdarknet_bn.{a,so}, include/darknet_bn.h and
  lib/pkgconfig/darknet_bn.pc; a C file including <darknet_bn.h> builds with
  ``pkg-config --cflags --libs darknet_bn`` (shared, with an rpath) and with
  ``pkg-config --static`` (against the archive), and runs.
- ``make build/tiny_net`` builds the example network, which trains and exits 0.
- ``python -m build`` makes an sdist and a wheel built from that sdist; the sdist carries
  csrc/, the wheel the compiled extension and py.typed, and the unpacked wheel imports and runs.

Skipped cleanly where make, a C compiler, pkg-config or the ``build`` package is missing
(``make test`` provides them).
"""
import email
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import darknet_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
MAKE = shutil.which("make")
PKG_CONFIG = shutil.which("pkg-config")

needs_make_cc = pytest.mark.skipif(not (MAKE and CC), reason="needs make and a C compiler")
needs_pkg_config = pytest.mark.skipif(not PKG_CONFIG, reason="needs pkg-config (make test installs it)")

PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include <darknet_bn.h>

int main(void)
{
    float x[2 * 2 * 3] = {1, 2, 3, 10, 20, 30, 4, 5, 6, 40, 50, 60};
    float mean[2], variance[2];
    mean_cpu(x, 2, 2, 3, mean);
    variance_cpu(x, mean, 2, 2, 3, variance);
    printf("mean %g %g variance %g %g\n", mean[0], mean[1], variance[0], variance[1]);

    dnbn_layer *l = dnbn_make_batchnorm_layer(2, 3, 1, 2);
    if (!l) return 1;
    float dx[12];
    dnbn_network net = {.input = x, .delta = dx, .train = 1};
    if (dnbn_forward_batchnorm_layer(l, net) != DNBN_OK) return 2;
    for (int i = 0; i < 12; i++) l->delta[i] = 0.1f * (float)i;
    if (dnbn_backward_batchnorm_layer(l, net) != DNBN_OK) return 3;
    if (dnbn_update_batchnorm_layer(l, 0.1f, 0.9f, 0.0f) != DNBN_OK) return 4;
    printf("rolling_mean %g %g\n", l->rolling_mean[0], l->rolling_mean[1]);
    dnbn_free_batchnorm_layer(l);
    printf("version %s simd %s threads %d\n", dnbn_version(), dnbn_simd_path(), dnbn_get_num_threads());
    return 0;
}
"""


def sh(args, **kw):
    kw.setdefault("cwd", ROOT)
    p = subprocess.run(args, capture_output=True, text=True, timeout=kw.pop("timeout", 600), **kw)
    assert p.returncode == 0, f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    """A prefix that `make install` filled (the libraries are built first if needed)."""
    if not (MAKE and CC):
        pytest.skip("needs make and a C compiler")
    root = tmp_path_factory.mktemp("prefix") / "usr"
    sh([MAKE, "install", f"PREFIX={root}"])
    return root


def pkg_config(prefix, *args):
    env = dict(os.environ, PKG_CONFIG_PATH=str(prefix / "lib" / "pkgconfig"))
    return sh([PKG_CONFIG, *args, "darknet_bn"], env=env).stdout.split()


def check_program_output(out):
    lines = out.splitlines()
    assert lines[0] == "mean 3.5 35 variance 3.5 350"
    assert lines[1] == "rolling_mean 0.035 0.35"
    assert lines[2].startswith(f"version {darknet_bn.__version__} simd ")


# ----------------------------------------------------------------------------- make install


def test_install_layout(prefix):
    for rel in ("lib/libdarknet_bn.a", "lib/libdarknet_bn.so", "include/darknet_bn.h",
                "lib/pkgconfig/darknet_bn.pc"):
        assert (prefix / rel).is_file(), rel
    with open(os.path.join(ROOT, "csrc", "darknet_bn.h"), "rb") as f:
        assert (prefix / "include" / "darknet_bn.h").read_bytes() == f.read()
    pc = (prefix / "lib" / "pkgconfig" / "darknet_bn.pc").read_text()
    assert f"prefix={prefix}\n" in pc
    assert "libdir=${prefix}/lib\n" in pc and "includedir=${prefix}/include\n" in pc
    assert f"Version: {darknet_bn.__version__}\n" in pc
    assert "Libs: -L${libdir} -ldarknet_bn\n" in pc
    assert "Libs.private: -lm -pthread\n" in pc
    assert "@" not in pc, "a template placeholder was left"
    assert oct((prefix / "lib" / "libdarknet_bn.so").stat().st_mode & 0o777) == "0o755"


@needs_pkg_config
def test_pkg_config_answers(prefix):
    assert pkg_config(prefix, "--modversion") == [darknet_bn.__version__]
    assert pkg_config(prefix, "--cflags") == [f"-I{prefix}/include"]
    assert pkg_config(prefix, "--libs") == [f"-L{prefix}/lib", "-ldarknet_bn"]
    assert pkg_config(prefix, "--static", "--libs") == [f"-L{prefix}/lib", "-ldarknet_bn", "-lm", "-pthread"]


@needs_pkg_config
def test_program_builds_with_pkg_config_shared(prefix, tmp_path):
    src = tmp_path / "prog.c"
    src.write_text(PROGRAM)
    exe = tmp_path / "prog_shared"
    flags = pkg_config(prefix, "--cflags", "--libs")
    libdir = pkg_config(prefix, "--variable=libdir")[0]
    sh([CC, "-std=c11", "-Wall", "-Wextra", "-Werror", str(src), "-o", str(exe), *flags, f"-Wl,-rpath,{libdir}"])
    run = sh([str(exe)], cwd=tmp_path, env=dict(os.environ, DARKNET_BN_NUM_THREADS="2"))
    check_program_output(run.stdout)
    assert "threads 2" in run.stdout
    readelf = shutil.which("readelf")
    if readelf:
        dyn = sh([readelf, "-d", str(exe)]).stdout
        assert "libdarknet_bn.so" in dyn, "linked against the shared library"


@needs_pkg_config
def test_program_builds_with_pkg_config_static(prefix, tmp_path):
    """`pkg-config --static` lists what the archive needs (Libs.private); link the archive itself."""
    src = tmp_path / "prog.c"
    src.write_text(PROGRAM)
    exe = tmp_path / "prog_static"
    flags = pkg_config(prefix, "--static", "--cflags", "--libs")
    archive = str(prefix / "lib" / "libdarknet_bn.a")
    flags = [archive if f == "-ldarknet_bn" else f for f in flags]
    sh([CC, "-std=c11", str(src), "-o", str(exe), *flags])
    check_program_output(sh([str(exe)], cwd=tmp_path).stdout)
    readelf = shutil.which("readelf")
    if readelf:
        assert "libdarknet_bn.so" not in sh([readelf, "-d", str(exe)]).stdout


@needs_make_cc
def test_destdir_staging_and_uninstall(tmp_path):
    stage = tmp_path / "stage"
    sh([MAKE, "install", "PREFIX=/opt/dnbn", f"DESTDIR={stage}"])
    pc = stage / "opt" / "dnbn" / "lib" / "pkgconfig" / "darknet_bn.pc"
    assert "prefix=/opt/dnbn\n" in pc.read_text(), "the .pc names the final prefix, not the staging dir"
    assert (stage / "opt/dnbn/include/darknet_bn.h").is_file()
    sh([MAKE, "uninstall", "PREFIX=/opt/dnbn", f"DESTDIR={stage}"])
    left = [p for p in stage.rglob("*") if p.is_file()]
    assert left == []


# ----------------------------------------------------------------------------- examples/tiny_net.c


@needs_make_cc
def test_tiny_net_trains():
    sh([MAKE, "build/tiny_net"])
    run = sh([os.path.join(ROOT, "build", "tiny_net")], timeout=120)
    out = run.stdout
    match = re.search(r"^final loss ([0-9.]+) \(start ([0-9.]+)\)$", out, re.M)
    assert match, out
    final, start = float(match.group(1)), float(match.group(2))
    assert 0.5 < start < 1.5, out  # about ln 2 for an untrained 2-class softmax
    assert final * 4 <= start, out
    accuracy = float(re.search(r"accuracy ([0-9.]+) %", out).group(1))
    assert accuracy >= 90, out
    assert len(re.findall(r"^step +\d+ +loss ", out, re.M)) >= 5


# ----------------------------------------------------------------------------- sdist and wheel


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """An sdist and a wheel built from that sdist, by `python -m build` in isolated environments."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("needs the 'build' package (in the test extra)")
    if not CC:
        pytest.skip("needs a C compiler")
    out = tmp_path_factory.mktemp("dist")
    sh([sys.executable, "-m", "build", "--outdir", str(out), ROOT], timeout=600)
    sdists = list(out.glob("darknet_bn-*.tar.gz"))
    wheels = list(out.glob("darknet_bn-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list(out.iterdir())
    return sdists[0], wheels[0]


def test_sdist_carries_the_sources(dists):
    sdist, _ = dists
    top = f"darknet_bn-{darknet_bn.__version__}/"
    with tarfile.open(sdist) as tar:
        names = {n[len(top):] for n in tar.getnames() if n.startswith(top)}
    csrc = {f"csrc/{f}" for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith((".c", ".h"))}
    assert csrc and csrc <= names, sorted(csrc - names)
    for rel in ("csrc/cflags.txt", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "Makefile",
                "darknet_bn.pc.in", "darknet_bn/_ffi_build.py", "darknet_bn/py.typed", "darknet_bn/__main__.py",
                "darknet_bn/weights.py", "darknet_bn/fold.py", "examples/tiny_net.c", "tests/c/test_darknet_bn.c"):
        assert rel in names, rel
    binaries = [n for n in names if n.endswith((".so", ".o", ".a", ".pyc"))]
    assert binaries == [], binaries
    assert not any(n.startswith(("build/", ".venv/")) for n in names)


def test_wheel_contents_and_metadata(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(meta_name))
    assert "darknet_bn/py.typed" in names
    assert any(re.fullmatch(r"darknet_bn/_darknet_bn\..*so", n) for n in names), sorted(names)
    for mod in ("__init__", "__main__", "layer", "weights", "fold", "kernels", "errors"):
        assert f"darknet_bn/{mod}.py" in names, mod
    assert not any(n.startswith(("csrc/", "tests/")) for n in names)
    assert set(meta.get_all("Provides-Extra")) >= {"test", "torch", "demo", "bench"}
    requires = meta.get_all("Requires-Dist")

    def extra(name):
        return {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires if f'extra == "{name}"' in r}

    assert extra("bench") >= {"matplotlib", "tqdm"}
    assert extra("demo") >= {"scikit-learn", "matplotlib", "tqdm"}
    assert extra("test") >= {"pytest", "hypothesis"}
    assert extra("torch") == {"torch"}
    base = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r}
    assert base == {"numpy", "cffi"}


def test_unpacked_wheel_imports_and_runs(dists, tmp_path):
    """The wheel alone (its own compiled extension, not the source tree's) works."""
    _, wheel = dists
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    code = ("import numpy as np, darknet_bn, io; "
            "assert darknet_bn.__file__.startswith(%r), darknet_bn.__file__; "
            "l = darknet_bn.BatchNormLayer(4, 2, 2, 3); "
            "y = l.forward(np.arange(48, dtype=np.float32).reshape(4, 3, 2, 2)); "
            "assert abs(float(y.mean())) < 1e-5; f = io.BytesIO(); l.save_weights(f); "
            "print(len(f.getvalue()), darknet_bn.info()['version'])") % str(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    run = sh([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert run.stdout.split() == ["36", darknet_bn.__version__]
    cli = sh([sys.executable, "-m", "darknet_bn", "info", "--json"], cwd=tmp_path, env=env)
    assert '"version"' in cli.stdout
