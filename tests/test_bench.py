"""Smoke tests of the benchmark ``python -m darknet_bn.bench``.

They run its ``main`` on the tiny shape with two repetitions and check what it
writes (the JSON schema, the PNG, the table). They never assert a speed: the
machine is shared and timings are not a test (docs/reference.md §7).
"""
import importlib.util
import json
import math

import pytest

import darknet_bn
from darknet_bn import bench

TINY = ["--shapes", "4x16x4x4", "--reps", "2", "--min-time", "0.0001", "--bandwidth-mb", "4", "--no-progress",
        "--cnn-input", "4x3x8x8"]
PASSES = ("train_step", "infer")
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_outputs(out_dir, threads, with_torch):
    report = json.loads((out_dir / "bench.json").read_text())
    assert report["schema"] == bench.SCHEMA
    for key in ("machine", "config", "agreement", "copy_bandwidth", "results", "wall_time_s"):
        assert key in report, key
    machine = report["machine"]
    for key in ("cpu_model", "cores", "usable_cores", "darknet_bn", "torch", "numpy", "date"):
        assert key in machine, key
    assert machine["darknet_bn"]["version"] == darknet_bn.__version__
    assert (machine["torch"] is not None) == with_torch
    assert report["config"]["shapes"] == [[4, 16, 4, 4]]
    assert report["config"]["threads"] == threads
    assert report["config"]["torch"] == with_torch
    assert report["agreement"]["agree"] is True
    assert report["agreement"]["check"]["max_scaled_diff"] <= report["agreement"]["check"]["tolerance"]
    assert _positive(report["wall_time_s"])

    expected = {"darknet_bn_standard", "darknet_bn_darknet", "numpy", "reference"}
    if with_torch:
        expected |= {"torch", "torch_out"}
    cells = report["results"]
    assert sorted(c["threads"] for c in cells) == sorted(threads)
    for cell in cells:
        assert cell["shape"] == [4, 16, 4, 4]
        assert cell["reps"] == 2
        assert _positive(cell["copy_bandwidth"])
        assert set(cell["peers"]) == expected
        for p in PASSES:
            assert _positive(cell["roofline"][f"{p}_s"])
        for name, peer in cell["peers"].items():
            assert peer["baseline"] in ("darknet_bn_standard", "darknet_bn_darknet")
            for p in PASSES:
                assert _positive(peer[f"{p}_s"]), (name, p)
                samples = peer[f"{p}_samples"]
                assert len(samples) == 2 and all(_positive(s) for s in samples)
                assert peer[f"{p}_s"] == pytest.approx(sorted(samples)[0] / 2 + sorted(samples)[1] / 2)
                assert _positive(peer["ratio"][p])
                assert peer["inner"][p] >= 1
        for p in PASSES:
            assert cell["peers"]["darknet_bn_standard"]["ratio"][p] == pytest.approx(1.0)

    text = (out_dir / "bench.txt").read_text()
    assert "darknet_bn standard" in text and "roofline" in text
    _check_cnn(report, text, threads, with_torch)
    png = out_dir / "bench.png"
    if HAVE_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


def _check_cnn(report, text, threads, with_torch):
    """The CNN training-step row: present with torch (two models, medians, ratio), None without."""
    cnn = report["cnn"]
    if not with_torch:
        assert cnn is None and report["config"]["cnn_input"] is None
        assert "CNN training step" not in text
        return
    assert report["config"]["cnn_input"] == [4, 3, 8, 8]
    assert cnn["input"] == [4, 3, 8, 8] and cnn["baseline"] == "darknet_bn"
    agreement = cnn["agreement"]
    assert agreement["agree"] is True and agreement["max_rel_diff"] <= agreement["tolerance"]
    assert len(agreement["losses"]["torch"]) == len(agreement["losses"]["darknet_bn"]) == bench.CNN_CHECK_STEPS
    assert [r["threads"] for r in cnn["results"]] == threads
    for res in cnn["results"]:
        assert res["reps"] == 2 and res["darknet_bn_threads"] == res["torch_threads"] == res["threads"]
        assert set(res["peers"]) == {"torch", "darknet_bn"}
        for name, peer in res["peers"].items():
            assert _positive(peer["step_s"]) and len(peer["samples"]) == 2 and peer["inner"] >= 1, name
            assert peer["step_s"] == pytest.approx(sum(peer["samples"]) / 2)
            assert peer["ratio"] == pytest.approx(peer["step_s"] / res["peers"]["darknet_bn"]["step_s"])
    assert "CNN training step" in text and "darknet_bn.torch.BatchNorm2d" in text


def test_bench_without_torch(tmp_path, capsys):
    before = darknet_bn.get_num_threads()
    assert bench.main(TINY + ["--threads", "1", "2", "--no-torch", "--out", str(tmp_path)]) == 0
    _check_outputs(tmp_path, [1, 2], with_torch=False)
    out = capsys.readouterr().out
    assert "peers agree: max |diff| =" in out
    assert "4x16x4x4" in out
    assert darknet_bn.get_num_threads() == before


def test_bench_with_torch(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    assert bench.main(TINY + ["--threads", "1", "--out", str(tmp_path / "sub")]) == 0
    _check_outputs(tmp_path / "sub", [1], with_torch=True)
    out = capsys.readouterr().out
    assert "torch native" in out and "torch out=" in out
    assert torch.get_num_threads() == before


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    assert "--shapes" in capsys.readouterr().out
    for bad in (["--shapes", "4x16x4"], ["--shapes", "1x16x1x1"], ["--shapes", "axbxcxd"], ["--cnn-input", "4x3x2x8"],
                ["--threads", "0"], ["--reps", "0"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(bad)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and bad[0] in err, err


def test_unwritable_results_end_in_one_line(tmp_path, capsys, monkeypatch):
    """--out that stops being writable during the run: exit status 1 and one line, not a traceback."""
    def fail(cells, path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(bench, "plot", fail)
    assert bench.main(TINY + ["--threads", "1", "--no-torch", "--out", str(tmp_path)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "cannot write the results" in err[0] and "Permission denied" in err[0], err


def test_parse_shape():
    assert bench.parse_shape("8x32x208x208") == (8, 32, 208, 208)
    assert bench.parse_shape("64X1024X1X1") == (64, 1024, 1, 1)
    assert bench.parse_cnn_input("16x3x64x64") == (16, 3, 64, 64)
    for bad in ("4x16x4", "0x1x2x2", "1x16x1x1", "2147483648x1x1x1", "100000x100000x1000x1000"):
        with pytest.raises(bench.argparse.ArgumentTypeError):
            bench.parse_shape(bad)
    for bad in ("4x3x3x8", "4x3x8x3", "100000x3x100000x1000"):
        with pytest.raises(bench.argparse.ArgumentTypeError):
            bench.parse_cnn_input(bad)
