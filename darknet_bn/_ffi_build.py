"""cffi build script (API mode) for ``darknet_bn._darknet_bn``.

The declarations are cut from the public header between its ``cdef begin`` and
``cdef end`` markers, so the bindings cannot drift from ``csrc/darknet_bn.h``.
The C sources are the library's own (every ``csrc/*.c``), compiled with the
flags in ``csrc/cflags.txt`` (the Makefile uses the same file).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
HEADER = CSRC / "darknet_bn.h"


def read_cdef(header: Path = HEADER) -> str:
    """Return the header's declarations between the cdef markers, comments removed."""
    text = header.read_text(encoding="utf-8")
    match = re.search(r"--- cdef begin ---.*?\*/(.*?)/\* --- cdef end ---", text, re.S)
    if match is None:
        raise RuntimeError(f"cdef markers not found in {header}")
    body = re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.S)
    return "\n".join(line.rstrip() for line in body.splitlines() if line.strip())


def compile_flags() -> list[str]:
    """Return the library's compiler flags (csrc/cflags.txt)."""
    return (CSRC / "cflags.txt").read_text(encoding="utf-8").split()


CDEF = read_cdef()

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source(
    "darknet_bn._darknet_bn",
    '#include "darknet_bn.h"',
    sources=[os.path.relpath(p, ROOT) for p in sorted(CSRC.glob("*.c"))],
    include_dirs=[os.path.relpath(CSRC, ROOT)],
    extra_compile_args=compile_flags(),
    define_macros=[("DNBN_HIDDEN_API", "1")],  # the extension exports only PyInit (tests/test_exports.py)
    libraries=["m"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
