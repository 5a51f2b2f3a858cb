"""Darknet weight blocks: BatchNormLayer.load_weights / save_weights and darknet_bn.weights.

Numerics do not matter here: blocks are bytes, and they must round-trip byte
for byte (any bit pattern, NaN payloads included), at any file position, and a
short read must raise a WeightsError naming the short array and leave the layer
unchanged.
"""
import io
import os
import struct

import numpy as np
import pytest

import darknet_bn
from conftest import ALL_BUFFERS, assert_unchanged, snapshot
from darknet_bn import weights
from darknet_bn.errors import ArgumentError, ArgumentTypeError, DarknetBNError, WeightsError

C = 5
PREFIX = b"darknet header and earlier layers\x00\xff" * 3
SUFFIX = b"\x01\x02\x03 the next layer's weights"
LAYOUTS = {
    "batchnorm": ("scales", "rolling_mean", "rolling_variance"),
    "convolutional": ("biases", "scales", "rolling_mean", "rolling_variance"),
}


def random_layer(rng, c=C, numerics="darknet"):
    layer = darknet_bn.BatchNormLayer(2, 3, 2, c, numerics=numerics)
    for name in ALL_BUFFERS[4:]:  # every per-channel buffer
        setattr(layer, name, rng.standard_normal(c).astype(np.float32))
    layer.rolling_variance = rng.uniform(0.1, 3.0, c).astype(np.float32)
    return layer


def expected_block(layer, layout):
    return b"".join(np.asarray(getattr(layer, n), dtype="<f4").tobytes() for n in LAYOUTS[layout])


def bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture(params=["batchnorm", "convolutional"])
def layout(request):
    return request.param


# ----------------------------------------------------------------------------- layouts


def test_fields_and_sizes():
    assert weights.fields("batchnorm") == LAYOUTS["batchnorm"]
    assert weights.fields("convolutional") == LAYOUTS["convolutional"]
    assert weights.block_nbytes(7) == 3 * 7 * 4
    assert weights.block_nbytes(7, "convolutional") == 4 * 7 * 4


def test_save_writes_darknet_order_little_endian(rng, layout):
    layer = random_layer(rng)
    f = io.BytesIO()
    layer.save_weights(f, layout=layout)
    data = f.getvalue()
    assert len(data) == weights.block_nbytes(C, layout)
    values = struct.unpack(f"<{len(data) // 4}f", data)  # explicit little-endian, whatever the host
    for i, name in enumerate(LAYOUTS[layout]):
        assert np.array_equal(np.float32(values[i * C:(i + 1) * C]), getattr(layer, name)), name


def test_default_layout_is_standalone_batchnorm(rng):
    layer = random_layer(rng)
    f = io.BytesIO()
    layer.save_weights(f)
    assert f.getvalue() == expected_block(layer, "batchnorm")


def test_load_reads_darknet_order_and_leaves_other_buffers(rng, layout):
    layer = random_layer(rng)
    before = snapshot(layer)
    arrays = {n: rng.standard_normal(C).astype(np.float32) for n in LAYOUTS[layout]}
    block = b"".join(arrays[n].astype("<f4").tobytes() for n in LAYOUTS[layout])
    layer.load_weights(io.BytesIO(block), layout=layout)
    for name in ALL_BUFFERS:
        want = arrays[name] if name in arrays else before[name]
        assert np.array_equal(bits(getattr(layer, name)), bits(want)), name
    if layout == "batchnorm":  # Darknet's [batchnorm] block has no biases
        assert np.array_equal(bits(layer.biases), bits(before["biases"]))


# ----------------------------------------------------------------------------- round trips


def test_round_trip_bytesio_at_nonzero_position(rng, layout):
    src = random_layer(rng)
    f = io.BytesIO()
    f.write(PREFIX)
    src.save_weights(f, layout=layout)
    assert f.tell() == len(PREFIX) + weights.block_nbytes(C, layout)
    f.write(SUFFIX)
    block = expected_block(src, layout)
    assert f.getvalue() == PREFIX + block + SUFFIX

    dst = darknet_bn.BatchNormLayer(1, 1, 2, C)
    f.seek(len(PREFIX))
    dst.load_weights(f, layout=layout)
    assert f.tell() == len(PREFIX) + len(block)
    assert f.read() == SUFFIX
    for name in LAYOUTS[layout]:
        assert np.array_equal(bits(getattr(dst, name)), bits(getattr(src, name))), name

    g = io.BytesIO()
    g.write(b"xyz")
    dst.save_weights(g, layout=layout)
    assert g.getvalue() == b"xyz" + block


@pytest.mark.parametrize("buffering", [-1, 0], ids=["buffered", "raw"])
def test_round_trip_real_file(rng, layout, tmp_path, buffering):
    src = random_layer(rng, numerics="standard")
    path = tmp_path / "net.weights"
    with open(path, "wb", buffering=buffering) as f:
        f.write(PREFIX)
        src.save_weights(f, layout)
        f.write(SUFFIX)
    block = expected_block(src, layout)
    assert path.read_bytes() == PREFIX + block + SUFFIX

    dst = darknet_bn.BatchNormLayer(3, 1, 1, C, numerics="standard")
    with open(path, "rb", buffering=buffering) as f:
        f.seek(len(PREFIX))
        dst.load_weights(f, layout)
        assert f.tell() == len(PREFIX) + len(block)
        assert f.read() == SUFFIX
    out = tmp_path / "again.weights"
    with open(out, "wb") as f:
        dst.save_weights(f, layout)
    assert out.read_bytes() == block


def test_any_bit_pattern_round_trips(rng, layout):
    """NaNs with payloads (quiet and signalling), infinities, -0.0, subnormals: bytes in == bytes out."""
    n = len(LAYOUTS[layout]) * C
    special = np.array([0x7FC00001, 0x7F800001, 0xFFBFFFFF, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001,
                        0x807FFFFF, 0x3F800000], dtype=np.uint32)
    words = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    words[:len(special)] = special[:n]
    block = words.astype("<u4").tobytes()
    layer = darknet_bn.BatchNormLayer(2, 1, 1, C)
    layer.load_weights(io.BytesIO(block), layout)
    f = io.BytesIO()
    layer.save_weights(f, layout)
    assert f.getvalue() == block


def test_a_darknet_file_layer_by_layer(rng):
    """A file as Darknet writes it: header, a convolutional layer with batch_normalize (its
    batch-norm block, then its weights), then a standalone [batchnorm] layer."""
    conv_bn = random_layer(rng, c=4)
    bn = random_layer(rng, c=4)
    conv_weights = rng.standard_normal((4, 3, 3, 3)).astype("<f4")
    f = io.BytesIO()
    f.write(struct.pack("<iiiq", 0, 2, 5, 32013312))  # major, minor, revision, images seen
    conv_bn.save_weights(f, "convolutional")
    f.write(conv_weights.tobytes())
    bn.save_weights(f, "batchnorm")
    data = f.getvalue()
    assert len(data) == 20 + 16 * 4 + conv_weights.nbytes + 12 * 4

    r = io.BytesIO(data)
    assert struct.unpack("<iiiq", r.read(20))[:3] == (0, 2, 5)
    a = darknet_bn.BatchNormLayer(1, 2, 2, 4)
    b = darknet_bn.BatchNormLayer(1, 2, 2, 4)
    a.load_weights(r, "convolutional")
    assert np.array_equal(np.frombuffer(r.read(conv_weights.nbytes), "<f4").reshape(4, 3, 3, 3), conv_weights)
    b.load_weights(r, "batchnorm")
    assert r.read() == b""
    for name in LAYOUTS["convolutional"]:
        assert np.array_equal(getattr(a, name), getattr(conv_bn, name)), name
    for name in LAYOUTS["batchnorm"]:
        assert np.array_equal(getattr(b, name), getattr(bn, name)), name


# ----------------------------------------------------------------------------- file objects


class TrickleReader:
    """A non-seekable binary stream that hands out at most `step` bytes per read()."""

    def __init__(self, data, step):
        self.data, self.pos, self.step = data, 0, step

    def read(self, n=-1):
        n = self.step if n is None or n < 0 else min(n, self.step)
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk


class TrickleRaw(io.RawIOBase):
    """A raw stream whose readinto/write move one byte (read) or at most 3 bytes (write) per call."""

    def __init__(self, data=b""):
        self.data, self.pos, self.written = data, 0, bytearray()

    def readable(self):
        return True

    def writable(self):
        return True

    def readinto(self, buf):
        if self.pos >= len(self.data):
            return 0
        buf[0] = self.data[self.pos]
        self.pos += 1
        return 1

    def write(self, b):
        b = bytes(b[:3])
        self.written += b
        return len(b)


class WriteReturnsNone:
    def __init__(self):
        self.data = bytearray()

    def write(self, b):
        self.data += bytes(b)


def test_partial_reads_and_writes(rng, layout):
    src = random_layer(rng)
    block = expected_block(src, layout)
    for f in (TrickleReader(block + SUFFIX, 7), TrickleRaw(block + SUFFIX)):
        dst = darknet_bn.BatchNormLayer(1, 1, 2, C)
        dst.load_weights(f, layout)
        for name in LAYOUTS[layout]:
            assert np.array_equal(bits(getattr(dst, name)), bits(getattr(src, name))), (type(f), name)
    raw = TrickleRaw()
    src.save_weights(raw, layout)
    assert bytes(raw.written) == block
    plain = WriteReturnsNone()
    src.save_weights(plain, layout)
    assert bytes(plain.data) == block


def test_load_from_a_pipe(rng, layout):
    src = random_layer(rng)
    block = expected_block(src, layout)
    r, w = os.pipe()
    with open(w, "wb") as fw:
        fw.write(block[:10])
        fw.flush()
        fw.write(block[10:])
    with open(r, "rb") as fr:
        dst = darknet_bn.BatchNormLayer(1, 1, 2, C)
        dst.load_weights(fr, layout)
    for name in LAYOUTS[layout]:
        assert np.array_equal(bits(getattr(dst, name)), bits(getattr(src, name)))


class BadCounts:
    """A binary file object whose readinto/write report `count` bytes (nonsense: -1, more than asked, a float)
    once, and raise if called again, so that a loop that does not stop at the nonsense fails instead of hanging."""

    def __init__(self, count):
        self.count, self.calls = count, 0

    def _once(self):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("called again after reporting a nonsense count")

    def readinto(self, buf):
        self._once()
        return self.count(len(buf)) if callable(self.count) else self.count

    def write(self, b):
        self._once()
        return self.count(len(b)) if callable(self.count) else self.count


@pytest.mark.parametrize("count", [-1, lambda n: n + 4, 2.0], ids=["negative", "more_than_asked", "float"])
def test_nonsense_byte_counts_are_errors(rng, count):
    """readinto or write reporting a count outside 0..len: OSError, the layer unchanged (no endless loop)."""
    layer = random_layer(rng)
    before = snapshot(layer)
    with pytest.raises(OSError, match=r"f.readinto\(\) of \d+ bytes returned"):
        layer.load_weights(BadCounts(count))
    assert_unchanged(layer, before)
    with pytest.raises(OSError, match=r"f.write\(\) of \d+ bytes returned"):
        layer.save_weights(BadCounts(count))


# ----------------------------------------------------------------------------- short reads


def test_short_read_at_every_byte_leaves_the_layer_unchanged(rng, layout):
    names = LAYOUTS[layout]
    c = 3
    layer = random_layer(rng, c=c)
    layer.forward(rng.standard_normal((2, c, 2, 3)).astype(np.float32))
    before = snapshot(layer)
    full = rng.standard_normal(len(names) * c).astype("<f4").tobytes()
    for cut in range(len(full)):
        f = io.BytesIO(PREFIX + full[:cut])
        f.seek(len(PREFIX))
        with pytest.raises(WeightsError) as info:
            layer.load_weights(f, layout)
        message = str(info.value)
        short = names[cut // (4 * c)]
        assert f"inside {short} " in message, (cut, message)
        assert "short read" in message and f"after {cut} bytes" in message and repr(layout) in message
        assert f.tell() == len(PREFIX), "a seekable file is put back where it was"
        assert_unchanged(layer, before)
    # the whole block, nothing more, is enough
    layer.load_weights(io.BytesIO(full), layout)
    assert np.array_equal(layer.rolling_variance, np.frombuffer(full, "<f4")[-c:])


def test_short_read_error_types(rng):
    layer = random_layer(rng)
    with pytest.raises(ValueError):
        layer.load_weights(io.BytesIO(b""))
    with pytest.raises(DarknetBNError, match="inside scales"):
        layer.load_weights(io.BytesIO(b""))
    assert issubclass(WeightsError, darknet_bn.errors.DarknetBNError)


def test_short_read_on_non_seekable_stream(rng):
    layer = random_layer(rng)
    before = snapshot(layer)
    f = TrickleReader(b"\x00" * (4 * C * 2 + 3), 5)
    with pytest.raises(WeightsError, match="inside rolling_variance"):
        layer.load_weights(f)
    assert_unchanged(layer, before)


def test_short_read_of_a_real_file(rng, tmp_path, layout):
    layer = random_layer(rng)
    before = snapshot(layer)
    path = tmp_path / "truncated.weights"
    path.write_bytes(PREFIX + b"\x00" * (weights.block_nbytes(C, layout) - 1))
    with open(path, "rb") as f:
        f.seek(len(PREFIX))
        with pytest.raises(WeightsError, match="inside rolling_variance"):
            layer.load_weights(f, layout)
        assert f.tell() == len(PREFIX)
    assert_unchanged(layer, before)


# ----------------------------------------------------------------------------- wrong arguments


@pytest.mark.parametrize("bad", [
    io.StringIO("1234" * 40), "net.weights", b"\x00" * 80, None, 3, bytearray(80),
], ids=["StringIO", "path", "bytes", "None", "int", "bytearray"])
def test_wrong_file_types_raise_type_error(rng, bad):
    layer = random_layer(rng)
    before = snapshot(layer)
    with pytest.raises(TypeError) as info:
        layer.load_weights(bad)
    assert isinstance(info.value, ArgumentTypeError) and "f must be" in str(info.value)
    with pytest.raises(TypeError):
        layer.save_weights(bad)
    assert_unchanged(layer, before)


def test_text_files_raise_type_error(rng, tmp_path):
    layer = random_layer(rng)
    path = tmp_path / "w.txt"
    path.write_text("0" * 200)
    with open(path, "r") as f, pytest.raises(TypeError, match="binary mode"):
        layer.load_weights(f)
    with open(path, "w") as f, pytest.raises(TypeError, match="binary mode"):
        layer.save_weights(f)


def test_read_returning_str_raises_type_error(rng):
    class StrReader:
        def read(self, n=-1):
            return "abcd"

    layer = random_layer(rng)
    before = snapshot(layer)
    with pytest.raises(TypeError, match="binary file"):
        layer.load_weights(StrReader())
    assert_unchanged(layer, before)


def test_bad_layout(rng):
    layer = random_layer(rng)
    before = snapshot(layer)
    with pytest.raises(ArgumentError, match="layout"):
        layer.load_weights(io.BytesIO(b"\x00" * 100), layout="conv")
    with pytest.raises(ArgumentTypeError, match="layout"):
        layer.save_weights(io.BytesIO(), layout=1)
    f = io.BytesIO()
    with pytest.raises(ValueError):
        layer.save_weights(f, layout="connected")
    assert f.getvalue() == b""
    assert_unchanged(layer, before)


def test_write_block_checks_its_arrays():
    f = io.BytesIO()
    good = {n: np.zeros(3, np.float32) for n in LAYOUTS["convolutional"]}
    with pytest.raises(ArgumentError, match="biases"):
        weights.write_block(f, {k: v for k, v in good.items() if k != "biases"}, "convolutional")
    with pytest.raises(ArgumentError, match="rolling_mean"):
        weights.write_block(f, dict(good, rolling_mean=np.zeros(4, np.float32)), "convolutional")
    with pytest.raises(ArgumentTypeError, match="scales"):
        weights.write_block(f, dict(good, scales=np.zeros(3)), "convolutional")
    assert f.getvalue() == b""
    weights.write_block(f, good, "convolutional")
    assert f.getvalue() == b"\x00" * 48
    assert {k: v.tolist() for k, v in weights.read_block(io.BytesIO(f.getvalue()), 3, "convolutional").items()} \
        == {k: [0.0] * 3 for k in LAYOUTS["convolutional"]}
