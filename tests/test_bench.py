"""Smoke tests of the benchmark ``python -m darknet_bn.bench``.

They run its ``main`` on the tiny shape with two repetitions and check what it
writes (the JSON schema, the PNGs, the table), and run its sections (channels-last,
ResNet, the machine description, the targets) at tiny sizes. They never assert a
speed: the machine is shared and timings are not a test (docs/reference.md §7).
"""
import importlib.util
import json
import math
import os
import re

import pytest

import darknet_bn
from darknet_bn import _bench_machine, _bench_models, _bench_targets, bench
from darknet_bn._bench_common import no_progress

TINY = ["--shapes", "4x16x4x4", "--reps", "2", "--min-time", "0.0001", "--bandwidth-mb", "4", "--no-progress",
        "--cnn-input", "4x3x8x8", "--resnet-input", "4x3x16x16", "--channels-last-shape", "2x4x4x4"]
#: What the tiny section runs take (seconds): timing arguments of the section functions.
TINY_TIMING = dict(reps=2, min_time=0.0001, budget=0.05, max_reps=2, progress=no_progress)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
PASSES = ("train_step", "infer")
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_outputs(out_dir, threads, with_torch, passive=False):
    report = json.loads((out_dir / "bench.json").read_text())
    assert report["schema"] == bench.SCHEMA
    for key in ("machine", "config", "agreement", "copy_bandwidth", "results", "wall_time_s", "in_torch",
                "channels_last", "cnn", "resnet", "omp_passive", "targets", "figures"):
        assert key in report, key
    machine = report["machine"]
    for key in ("cpu_model", "cpu_vendor", "isa_flags", "caches", "cores", "usable_cores", "kernel", "hypervisor",
                "darknet_bn", "darknet_bn_end", "torch", "numpy", "date", "slug"):
        assert key in machine, key
    assert set(machine["isa_flags"]) <= set(_bench_machine.ISA_FLAGS)
    assert SLUG.match(machine["slug"])
    for key in ("in_torch_op", "channels_last_shape", "resnet_input", "omp_passive"):
        assert key in report["config"], key
    assert machine["darknet_bn"]["version"] == darknet_bn.__version__
    assert (machine["torch"] is not None) == with_torch
    assert report["config"]["shapes"] == [[4, 16, 4, 4]]
    assert report["config"]["threads"] == threads
    assert report["config"]["torch"] == with_torch
    assert report["agreement"]["agree"] is True
    assert report["agreement"]["check"]["max_scaled_diff"] <= report["agreement"]["check"]["tolerance"]
    assert _positive(report["wall_time_s"])

    expected = {"darknet_bn_standard", "darknet_bn_standard_copy", "darknet_bn_darknet", "numpy", "reference"}
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
    assert text.startswith("machine ") and "ISA " in text and "caches " in text
    _check_cnn(report, text, threads, with_torch)
    _check_torch_sections(report, text, threads, with_torch)
    _check_passive(report, text, threads, passive)
    for entry in report["targets"]:
        assert set(entry) == {"section", "what", "shape", "threads", "ratio", "target", "met"}
        assert entry["met"] is None or entry["met"] == (entry["ratio"] >= entry["target"])
    assert ("targets met:" in text) == with_torch
    if HAVE_MATPLOTLIB:
        assert report["figures"] == ["bench.png", "bench_threads.png"]
        for name in report["figures"]:
            assert (out_dir / name).read_bytes()[:8] == PNG_MAGIC, name
    return report


def _check_torch_sections(report, text, threads, with_torch):
    """The in-torch, channels-last and ResNet sections: present with torch, None without."""
    if not with_torch:
        for key in ("in_torch", "channels_last", "resnet"):
            assert report[key] is None, key
        assert report["targets"] == []
        return
    in_torch = report["in_torch"]
    assert [r["threads"] for r in in_torch["results"]] == threads
    for res in in_torch["results"]:
        assert res["torch_peer"] in ("torch", "torch_out") and res["reps"] == 2
        assert set(res["peers"]) == {"darknet_bn_standard", res["torch_peer"]}
        assert _positive(res["ratio"]) and _positive(res["alone_ratio"])
        for peer in res["peers"].values():
            assert _positive(peer["train_step_s"]) and len(peer["samples"]) == 2
    assert "inside a PyTorch process" in text
    cl = report["channels_last"]
    assert cl["shape"] == [2, 4, 4, 4] and cl["agreement"]["agree"] is True
    assert [r["threads"] for r in cl["results"]] == threads
    assert "channels-last input" in text
    resnet = report["resnet"]
    assert resnet["input"] == [4, 3, 16, 16] and resnet["agreement"]["agree"] is True
    assert [r["threads"] for r in resnet["results"]] == threads
    for res in resnet["results"]:
        for part in ("train_step", "infer", "bn_time"):
            assert _positive(res[part]["ratio"]), part
    assert "ResNet-18-like model" in text
    sections = {e["section"] for e in report["targets"]}
    assert {"layer", "in_torch", "channels_last", "resnet"} <= sections


def _check_passive(report, text, threads, passive):
    """--omp-passive: the CNN and ResNet sections again, from a child process with OMP_WAIT_POLICY=PASSIVE."""
    if not passive:
        assert report["omp_passive"] is None and report["config"]["omp_passive"] is False
        assert "PASSIVE " not in text
        return
    run = report["omp_passive"]
    assert report["config"]["omp_passive"] is True and "error" not in run, run.get("error")
    assert run["env"] == {"OMP_WAIT_POLICY": "PASSIVE"}
    for key in ("cnn", "resnet"):
        assert run[key]["openmp_env"]["OMP_WAIT_POLICY"] == "PASSIVE", key
        assert run[key]["agreement"]["agree"] is True, key
        assert [r["threads"] for r in run[key]["results"]] == threads
    assert re.search(r"^1 +PASSIVE ", text, re.MULTILINE)
    assert any(e["section"] == "resnet (PASSIVE)" for e in report["targets"])


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
    """Default thread counts (1, 2, all usable cores); --omp-passive has nothing to rerun without torch."""
    before = darknet_bn.get_num_threads()
    assert bench.main(TINY + ["--no-torch", "--omp-passive", "--out", str(tmp_path)]) == 0
    _check_outputs(tmp_path, bench.default_threads(), with_torch=False)
    captured = capsys.readouterr()
    assert "peers agree: max |diff| =" in captured.out
    assert "4x16x4x4" in captured.out
    assert "--omp-passive: nothing to rerun" in captured.err
    assert darknet_bn.get_num_threads() == before


def test_bench_with_torch(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    assert bench.main(TINY + ["--threads", "1", "--omp-passive", "--out", str(tmp_path / "sub")]) == 0
    _check_outputs(tmp_path / "sub", [1], with_torch=True, passive=True)
    out = capsys.readouterr().out
    assert "torch native" in out and "torch out=" in out
    assert torch.get_num_threads() == before


def test_default_threads():
    assert bench.default_threads(1) == [1]
    assert bench.default_threads(2) == [1, 2]
    assert bench.default_threads(3) == [1, 2, 3]
    assert bench.default_threads(64) == [1, 2, 64]
    assert bench.default_threads(1000) == [1, 2, darknet_bn._cli.MAX_THREADS]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert bench.default_threads() == sorted({1, 2, usable} & set(range(1, usable + 1)))
    assert bench.build_parser().parse_args([]).threads is None  # main() then uses default_threads()


def test_machine_slug_and_default_out():
    slug = bench.machine_slug()
    assert SLUG.match(slug) and len(slug) <= 60, slug
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert slug.endswith(f"-{usable}c")
    examples = [
        (("Intel(R) Xeon(R) Processor", "GenuineIntel", ["avx2", "avx512f"], 2), "intel-xeon-avx512-2c"),
        (("AMD EPYC 9R14 96-Core Processor", "AuthenticAMD", ["avx2", "avx512f"], 2), "amd-epyc-9xx4-avx512-2c"),
        (("Intel(R) Core(TM) i7-12700K", "GenuineIntel", ["avx2"], 20), "intel-core-i7-12700k-avx2-20c"),
        (("AMD EPYC 7763 64-Core Processor", "AuthenticAMD", ["avx2"], 4), "amd-epyc-7xx3-avx2-4c"),
    ]
    for args, want in examples:
        assert bench.machine_slug(*args) == want
    assert SLUG.match(bench.machine_slug("Weird/CPU: model   9 (beta)", "", [], 1))
    assert bench.build_parser().parse_args([]).out == os.path.join("docs", "bench", slug)


def test_machine_info_and_text(monkeypatch):
    """The machine's fields, and darknet_bn.info() printed whatever its keys (nested dicts flattened)."""
    info = {"version": "9.9", "simd": "avx2", "threads": 2, "tuning": {"group_bytes": 123, "source": "L2"}}
    monkeypatch.setattr(_bench_machine.darknet_bn, "info", lambda: info)
    machine = bench.machine_info(None)
    for cache in machine["caches"]:
        assert cache["name"] in ("L1d", "L2", "L3", "L4")
        assert cache["total_bytes"] is None or cache["total_bytes"] >= cache["size_bytes"] > 0
    assert isinstance(machine["kernel"], str) and machine["usable_cores"] >= 1
    text = bench.machine_text(machine)
    assert "tuning.group_bytes=123" in text and "tuning.source=L2" in text and "version=9.9" in text
    assert text.splitlines()[0].startswith("machine ")
    assert _bench_machine.parse_size("48K") == 48 * 1024 and _bench_machine.parse_size("1 MiB") == 2**20


def test_channels_last_section():
    torch = pytest.importorskip("torch")
    cl = bench.bench_channels_last(torch, (2, 4, 4, 4), [1], **TINY_TIMING)
    agr = cl["agreement"]
    assert agr["agree"] is True and agr["max_scaled_diff"] <= bench.AGREE_TOL
    assert set(agr["per_array"]) == {"y", "dx", "dgamma", "dbeta"}
    for name in ("torch", "darknet_bn"):  # both keep the channels-last layout
        assert agr["layouts"][name] == {"y_channels_last": True, "dx_channels_last": True}
    (res,) = cl["results"]
    assert res["threads"] == 1 and res["reps"] == 2
    assert res["ratio"] == pytest.approx(res["peers"]["torch"]["train_step_s"]
                                         / res["peers"]["darknet_bn"]["train_step_s"])
    text = bench.channels_last_table(cl)
    assert "channels-last input" in text and ">=2.5x" in text


def test_resnet_section():
    torch = pytest.importorskip("torch")
    model = bench.make_resnet(torch)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 20  # 1 + 16 + 3 downsample
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 1000)
    resnet = bench.bench_resnet(torch, (4, 3, 16, 16), [1], **TINY_TIMING, profile_steps=1)
    assert resnet["batch_norm_layers"] == resnet["converted_batch_norm_layers"] == 20
    agr = resnet["agreement"]
    assert agr["agree"] is True and len(agr["losses"]["torch"]) == bench.RESNET_CHECK_STEPS
    assert agr["eval_max_scaled_diff"] <= agr["tolerance"]
    events = resnet["profiler_events"]
    assert "aten::native_batch_norm" in events["torch"]["matched"]
    assert "_BatchNormFunction" in events["darknet_bn"]["matched"]
    (res,) = resnet["results"]
    for part, key in (("train_step", "step_s"), ("infer", "infer_s")):
        peers = res[part]["peers"]
        assert res[part]["ratio"] == pytest.approx(peers["torch"][key] / peers["darknet_bn"][key])
        assert res[part]["reps"] == 2
    bn = res["bn_time"]
    assert bn["steps"] == 1 and all(_positive(p["bn_s"]) and 0 < p["bn_share"] < 1 for p in bn["peers"].values())
    text = bench.resnet_table(resnet)
    assert "BN time in train step" in text and "_BatchNormFunction" in text


def test_batch_norm_event_names():
    for name in ("aten::batch_norm", "aten::native_batch_norm_backward", "NativeBatchNormBackward0",
                 "_BatchNormFunction", "autograd::engine::evaluate_function: _BatchNormFunctionBackward"):
        assert _bench_models.is_batch_norm_event(name), name
    for name in ("aten::convolution", "aten::add_", "torch::autograd::AccumulateGrad", "aten::empty"):
        assert not _bench_models.is_batch_norm_event(name), name


def test_targets():
    assert _bench_targets.layer_train_target((8, 32, 208, 208), 1) == 3.5
    assert _bench_targets.layer_train_target((32, 64, 112, 112), 2) == 3.0
    assert _bench_targets.layer_train_target((4, 16, 4, 4), 4) == 2.5
    assert _bench_targets.layer_train_target((3, 3, 3, 3), 1) is None
    assert _bench_targets.layer_infer_target((8, 32, 208, 208)) == 1.0
    assert _bench_targets.layer_infer_target((64, 1024, 1, 1)) == 1.2
    assert _bench_targets.fmt_target(3.0, 2.5).endswith("met")
    assert _bench_targets.fmt_target(2.0, 2.5).endswith("MISS")
    assert _bench_targets.fmt_target(2.0, None) == "-"


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0
    assert "--shapes" in capsys.readouterr().out
    for bad in (["--shapes", "4x16x4"], ["--shapes", "1x16x1x1"], ["--shapes", "axbxcxd"], ["--cnn-input", "4x3x2x8"],
                ["--threads", "0"], ["--reps", "0"], ["--resnet-input", "2x3x32x32"], ["--resnet-input", "2x3x8"],
                ["--channels-last-shape", "1x4x1x1"]):
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
    assert bench.parse_resnet_input("16x3x112x112") == (16, 3, 112, 112)
    assert bench.parse_resnet_input("1x3x64x33") == (1, 3, 64, 33)  # 2x2 at the last stage: 4 values
    for bad in ("1x3x32x32", "2x3x32x32", "3x3x1x1", "100000x3x10000x1000"):
        with pytest.raises(bench.argparse.ArgumentTypeError):
            bench.parse_resnet_input(bad)
