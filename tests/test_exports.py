"""What the built libraries export: the public header's functions and nothing else.

A program that links darknet_bn next to Darknet (or preloads it) binds every
exported name; so the shared library must export exactly the functions
``csrc/darknet_bn.h`` declares, and of those only Darknet's ten kernels may
carry a name that Darknet's own library defines (with Darknet's signature,
checked in test_cdef.py). The Python extension exports only its init function.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_cdef import REFERENCE_KERNELS, header_cdef_region, parse_prototypes

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "darknet_bn.h"
DEBIAN_DARKNET = Path("/usr/lib/darknet/libdarknet.so")

# Darknet's own batch-norm functions (pjreddie's src/batchnorm_layer.h and AlexeyAB's),
# which a library loaded before Darknet must never define with another signature.
DARKNET_LAYER_FUNCTIONS = {"make_batchnorm_layer", "forward_batchnorm_layer", "backward_batchnorm_layer",
                           "resize_batchnorm_layer", "update_batchnorm_layer", "pull_batchnorm_layer",
                           "push_batchnorm_layer", "forward_batchnorm_layer_gpu", "backward_batchnorm_layer_gpu"}

needs_nm = pytest.mark.skipif(not (shutil.which("nm") and shutil.which("make")), reason="needs nm and make")


def exported_functions(path):
    """The defined dynamic function symbols of a shared object (nm -D --defined-only)."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return {parts[2] for parts in (line.split() for line in out.splitlines()) if len(parts) == 3
            and parts[1] in "TtWi"}


@pytest.fixture(scope="module")
def header_functions():
    return set(parse_prototypes(header_cdef_region(HEADER.read_text(encoding="utf-8"))))


@pytest.fixture(scope="module")
def shared_library():
    subprocess.run(["make", "-s", "-C", str(ROOT), "build/libdarknet_bn.so"], check=True, capture_output=True)
    return ROOT / "build" / "libdarknet_bn.so"


@needs_nm
def test_shared_library_exports_exactly_the_header(shared_library, header_functions):
    """build/libdarknet_bn.so exports every header function and no other function."""
    exports = exported_functions(shared_library)
    extra = sorted(exports - header_functions)
    assert not extra, f"exported but not in the public header: {extra}"
    missing = sorted(header_functions - exports)
    assert not missing, f"declared in the header but not exported: {missing}"


def test_only_the_kernels_carry_darknet_names(header_functions):
    """The library's own functions are prefixed dnbn_; Darknet's names are the ten kernels (and _ref twins)."""
    for name in header_functions:
        assert (name in REFERENCE_KERNELS or name.endswith("_ref") and name[:-4] in REFERENCE_KERNELS
                or name.startswith("dnbn_")), f"{name}: neither a Darknet kernel nor dnbn_-prefixed"
    assert not header_functions & DARKNET_LAYER_FUNCTIONS


@needs_nm
@pytest.mark.skipif(not DEBIAN_DARKNET.exists(), reason="Debian's darknet package is not installed")
def test_shared_names_with_debian_darknet_are_the_ten_kernels(shared_library):
    """Against the real libdarknet.so: the names both libraries define are exactly the ten kernels."""
    common = exported_functions(shared_library) & exported_functions(DEBIAN_DARKNET)
    assert common == set(REFERENCE_KERNELS), sorted(common ^ set(REFERENCE_KERNELS))


@needs_nm
def test_python_extension_exports_only_its_init():
    """The cffi extension compiled from the same sources exports PyInit__darknet_bn alone."""
    from darknet_bn import _darknet_bn
    exports = exported_functions(_darknet_bn.__file__)
    assert exports == {"PyInit__darknet_bn"}, sorted(exports)


def test_parser_sees_the_header_functions(header_functions):
    """The header parser above finds the layer API and the ten kernels (so the tests compare real sets)."""
    assert set(REFERENCE_KERNELS) <= header_functions
    assert {"dnbn_make_batchnorm_layer", "dnbn_forward_batchnorm_layer"} <= header_functions
    assert all(re.fullmatch(r"[a-z_0-9]+", n) for n in header_functions)
