"""The cffi declarations and the compiled module agree with csrc/darknet_bn.h (docs/reference.md §8)."""

import re
from pathlib import Path

import pytest

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "darknet_bn.h"

# docs/reference.md §3, as written there: Darknet's ten kernels, names and argument orders. Every
# argument that is a buffer is `float *`, every size an `int` (Darknet's types).
REFERENCE_KERNELS = {
    "mean_cpu": "x, batch, filters, spatial, mean",
    "variance_cpu": "x, mean, batch, filters, spatial, variance",
    "normalize_cpu": "x, mean, variance, batch, filters, spatial",
    "scale_bias": "output, scales, batch, n, size",
    "add_bias": "output, biases, batch, n, size",
    "backward_bias": "bias_updates, delta, batch, n, size",
    "backward_scale_cpu": "x_norm, delta, batch, n, size, scale_updates",
    "mean_delta_cpu": "delta, variance, batch, filters, spatial, mean_delta",
    "variance_delta_cpu": "x, delta, mean, variance, batch, filters, spatial, variance_delta",
    "normalize_delta_cpu": "x, mean, variance, mean_delta, variance_delta, batch, filters, spatial, delta",
}
SIZE_NAMES = {"batch", "filters", "spatial", "n", "size"}

# docs/reference.md §8: the layer API.
REFERENCE_LAYER_FUNCTIONS = ["dnbn_make_batchnorm_layer", "dnbn_forward_batchnorm_layer", "dnbn_backward_batchnorm_layer",
                        "dnbn_update_batchnorm_layer", "dnbn_free_batchnorm_layer"]
REFERENCE_LAYER_FIELDS = ["batch", "out_c", "out_h", "out_w", "outputs", "output", "delta", "x", "x_norm",
                     "scales", "biases", "scale_updates", "bias_updates", "mean", "variance",
                     "rolling_mean", "rolling_variance", "mean_delta", "variance_delta"]


# --------------------------------------------------------------------------- a small C declaration parser

def strip_comments(text):
    """Remove /* */ and // comments."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def header_cdef_region(text):
    """The header text between the `--- cdef begin ---` and `--- cdef end ---` markers, comments removed."""
    begin = text.index("--- cdef begin ---")
    begin = text.index("\n", begin)
    end = text.index("--- cdef end ---")
    end = text.rfind("\n", 0, end)
    return strip_comments(text[begin:end])


def norm_type(t):
    """Canonical spelling of a C type: single spaces, `T *` pointer form, `(void)` as no arguments."""
    t = re.sub(r"\s+", " ", t).strip()
    t = re.sub(r"\s*\*\s*", " *", t)
    t = re.sub(r"\* +\*", "**", t)
    return t.replace(" *", " *").strip()


def split_param(p):
    """'const float *x' -> ('const float *', 'x'); 'int' -> ('int', None)."""
    p = re.sub(r"\s+", " ", p).strip()
    m = re.match(r"^(.*?[\s*])([A-Za-z_]\w*)$", p)
    if m and m.group(1).strip() and m.group(1).strip() not in ("struct", "const", "unsigned", "signed"):
        return norm_type(m.group(1)), m.group(2)
    return norm_type(p), None


def parse_prototypes(text):
    """Every function prototype in C declarations: name -> (return type, [(param type, name)])."""
    text = strip_comments(text)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    # Drop braces bodies (struct definitions) so only top-level statements remain.
    while True:
        new = re.sub(r"\{[^{}]*\}", " ", text)
        if new == text:
            break
        text = new
    protos = {}
    for stmt in text.split(";"):
        stmt = re.sub(r"\s+", " ", stmt).strip()
        if not stmt or stmt.startswith("typedef"):
            continue
        m = re.match(r"^(.*?)\b([A-Za-z_]\w*)\s*\((.*)\)$", stmt)
        if not m:
            continue
        ret, name, params = m.groups()
        params = params.strip()
        plist = [] if params in ("", "void") else [split_param(p) for p in params.split(",")]
        protos[name] = (norm_type(ret), plist)
    return protos


def signature(proto):
    """(return type, (param types...)): what must agree between the header and the cdef."""
    ret, params = proto
    return ret, tuple(t for t, _ in params)


def c_function_type(proto):
    """A cffi-parsable function pointer type for a prototype, e.g. 'void(*)(float *, int)'."""
    ret, params = proto
    return f"{ret}(*)({', '.join(t for t, _ in params) or 'void'})"


@pytest.fixture(scope="module")
def header_text():
    return HEADER.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def header_protos(header_text):
    protos = parse_prototypes(header_cdef_region(header_text))
    assert len(protos) >= 30, sorted(protos)
    return protos


# --------------------------------------------------------------------------- the tests

def test_parser_reads_a_known_prototype():
    """The test's own parser gets names, types and parameters right on a sample."""
    p = parse_prototypes("/* c */ void f(float *x, const double *m2, int n);\n"
                         "const char *g(void);\ntypedef struct s { int a; } s;\nint h(s *l, s net);")
    assert p["f"] == ("void", [("float *", "x"), ("const double *", "m2"), ("int", "n")])
    assert p["g"] == ("const char *", [])
    assert p["h"] == ("int", [("s *", "l"), ("s", "net")])


def test_header_declares_spec_kernels_exactly(header_protos):
    """The header declares docs/reference.md §3's ten kernels with Darknet's names, argument order and types."""
    for name, args in REFERENCE_KERNELS.items():
        assert name in header_protos, f"{name} missing from the header"
        ret, params = header_protos[name]
        want = [("int" if a in SIZE_NAMES else "float *", a) for a in args.split(", ")]
        assert ret == "void", f"{name} returns {ret}"
        assert params == want, f"{name}: header has {params}, docs/reference.md §3 says {want}"
        ref = name + "_ref"
        assert ref in header_protos and signature(header_protos[ref]) == signature(header_protos[name]), ref


def test_header_declares_layer_api(header_protos, header_text):
    """The header has docs/reference.md §8's layer functions and a struct with Darknet's field names."""
    for name in REFERENCE_LAYER_FUNCTIONS:
        assert name in header_protos, name
    assert signature(header_protos["dnbn_make_batchnorm_layer"])[1] == ("int", "int", "int", "int")
    assert [n for _, n in header_protos["dnbn_make_batchnorm_layer"][1]] == ["batch", "w", "h", "c"]
    body = re.search(r"typedef struct dnbn_layer\s*\{(.*?)\}", strip_comments(header_text), re.S)
    assert body, "struct dnbn_layer not found"
    fields = set(re.findall(r"[\s*,]([A-Za-z_]\w*)\s*(?=[;,])", body.group(1)))
    missing = [f for f in REFERENCE_LAYER_FIELDS if f not in fields]
    assert not missing, f"fields missing from dnbn_layer: {missing}"


def test_cdef_matches_header(header_protos):
    """darknet_bn._ffi_build.CDEF declares every header function with an identical signature."""
    from darknet_bn import _ffi_build
    assert isinstance(_ffi_build.CDEF, str)
    cdef_protos = parse_prototypes(_ffi_build.CDEF)
    missing = sorted(set(header_protos) - set(cdef_protos))
    assert not missing, f"in the header but not in the cdef: {missing}"
    extra = sorted(set(cdef_protos) - set(header_protos))
    assert not extra, f"in the cdef but not in the header: {extra}"
    for name, proto in header_protos.items():
        assert signature(cdef_protos[name]) == signature(proto), \
            f"{name}: cdef {cdef_protos[name]} != header {proto}"


def test_compiled_module_matches_header(header_protos):
    """Every function of the compiled module is in the header, with the header's C type; and vice versa."""
    from darknet_bn import _darknet_bn
    ffi, lib = _darknet_bn.ffi, _darknet_bn.lib
    compiled = {n for n in dir(lib) if callable(getattr(lib, n))}
    not_in_header = sorted(compiled - set(header_protos))
    assert not not_in_header, f"compiled functions missing from the header: {not_in_header}"
    not_compiled = sorted(set(header_protos) - compiled)
    assert not not_compiled, f"header functions missing from the compiled module: {not_compiled}"
    for name in sorted(compiled):
        got = ffi.typeof(getattr(lib, name))
        want = ffi.typeof(c_function_type(header_protos[name]))
        assert got.cname == want.cname, f"{name}: compiled as {got.cname}, header says {want.cname}"


def test_compiled_constants_match_header(header_text):
    """The #define status and numerics constants have the header's values in the compiled module."""
    from darknet_bn import _darknet_bn
    region = header_text[header_text.index("--- cdef begin ---"):header_text.index("--- cdef end ---")]
    defines = dict(re.findall(r"^\s*#define\s+(DNBN_\w+)\s+(-?\d+)", region, re.M))
    assert {"DNBN_OK", "DNBN_ERR_ARG", "DNBN_NUMERICS_DARKNET", "DNBN_NUMERICS_STANDARD"} <= set(defines)
    for name, value in defines.items():
        assert getattr(_darknet_bn.lib, name) == int(value), name


def test_compiled_layer_struct_fields():
    """The compiled struct dnbn_layer has Darknet's field names with the header's types."""
    from darknet_bn import _darknet_bn
    ffi = _darknet_bn.ffi
    fields = dict(ffi.typeof("dnbn_layer").fields)
    for name in REFERENCE_LAYER_FIELDS:
        assert name in fields, name
        want = "int" if name in ("batch", "out_c", "out_h", "out_w", "outputs") else "float *"
        assert fields[name].type.cname == want, f"{name}: {fields[name].type.cname}"
