"""The command line ``python -m darknet_bn info | bench | demo``: subprocess and in-process."""
import json
import os
import subprocess
import sys

import pytest

import darknet_bn
from darknet_bn import __main__ as cli
from darknet_bn import _cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None, timeout=120):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "darknet_bn", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- subprocess


def test_help_lists_the_commands():
    p = run("--help")
    assert p.returncode == 0, p.stderr
    assert "usage: python -m darknet_bn" in p.stdout
    for command in ("info", "bench", "demo"):
        assert command in p.stdout


def test_version():
    p = run("--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"darknet_bn {darknet_bn.__version__}"


def test_info_text():
    p = run("info")
    assert p.returncode == 0, p.stderr
    info = darknet_bn.info()
    assert f"darknet_bn {info['version']}" in p.stdout
    assert f"simd:         {info['simd']}" in p.stdout
    assert "threads:" in p.stdout and "DARKNET_BN_NUM_THREADS" in p.stdout


def test_info_json_follows_the_environment():
    p = run("info", "--json", env={"DARKNET_BN_NUM_THREADS": "1", "DARKNET_BN_SIMD": "generic"})
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["version"] == report["package_version"] == darknet_bn.__version__
    assert report["threads"] == 1
    assert report["simd"] == "generic"
    inherited = {k: os.environ.get(k) for k in ("DARKNET_BN_GROUP_KB", "DARKNET_BN_MIN_WORK", "DARKNET_BN_STREAM",
                                              "DARKNET_BN_TEAM")}
    assert report["env"] == {"DARKNET_BN_NUM_THREADS": "1", "DARKNET_BN_SIMD": "generic", **inherited}
    assert report["tuning"]["simd"] == "generic"
    assert report["usable_cores"] >= 1


@pytest.mark.parametrize("command,own_option", [("info", "--json"), ("bench", "--shapes"), ("demo", "--steps")])
def test_help_of_each_command(command, own_option):
    p = run(command, "--help")
    assert p.returncode == 0, p.stderr
    assert "usage:" in p.stdout and own_option in p.stdout


def test_usage_errors_exit_2():
    p = run()
    assert p.returncode == 2 and "required" in p.stderr
    p = run("frobnicate")
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = run("info", "--no-such-option")
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr
    p = run("bench", "--shapes", "0x1x1x1")
    assert p.returncode == 2 and "shape" in p.stderr


def test_bench_runs_through_the_cli(tmp_path):
    p = run("bench", "--shapes", "4x16x4x4", "--threads", "1", "--reps", "2", "--min-time", "0.0001",
            "--bandwidth-mb", "4", "--no-progress", "--no-torch", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "bench.json").is_file()
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["shapes"] == [[4, 16, 4, 4]]


# ----------------------------------------------------------------------------- in process


def test_main_info_in_process(capsys):
    assert cli.main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    info = darknet_bn.info()
    assert {k: report[k] for k in ("version", "simd", "threads")} == {k: info[k] for k in ("version", "simd", "threads")}
    assert report["tuning"]["group_bytes"] == info["tuning"]["group_bytes"]
    assert cli.main(["info"]) == 0
    assert darknet_bn.info()["simd"] in capsys.readouterr().out


def test_main_help_and_errors_return_status(capsys):
    assert cli.main(["--help"]) == 0
    assert "info" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert darknet_bn.__version__ in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["nope"]) == 2
    assert cli.main(["bench", "--help"]) == 0
    assert "python -m darknet_bn.bench" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["bench", "demo"])
@pytest.mark.parametrize("returned,status", [(0, 0), (None, 0), (3, 3)])
def test_forwarding_passes_every_argument(monkeypatch, command, returned, status):
    module = __import__(f"darknet_bn.{command}", fromlist=["main"])
    seen = []

    def fake_main(argv=None):
        seen.append(argv)
        return returned

    monkeypatch.setattr(module, "main", fake_main)
    args = ["--quick", "--out", "x y", "--", "info", "--help"]
    assert cli.main([command, *args]) == status
    assert seen == [args]


def test_missing_extra_is_explained(monkeypatch, capsys):
    real_import = cli.importlib.import_module

    def fake_import(name, *a, **kw):
        if name == "darknet_bn.demo":
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    assert cli.main(["demo", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "sklearn" in err and "pip install 'darknet_bn[demo]'" in err


def test_import_error_inside_a_command_is_explained(monkeypatch, capsys):
    import darknet_bn.bench as bench

    def needs_matplotlib(argv=None):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(bench, "main", needs_matplotlib)
    assert cli.main(["bench"]) == 2
    assert "pip install 'darknet_bn[bench]'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- every option checked first
#
# Every option of the three command lines with a bad value: exit status 2, exactly one line on stderr that
# names the option, no traceback, and no work done. The other arguments are left at values that would run
# the full benchmark or demo, so a value that slipped through would start them: print their header and
# progress on stdout and create the output directory, which the tests find empty and absent.


def _file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return str(path)


# (option named in the message, arguments); "{file}" is replaced by a path to an existing regular file.
BENCH_BAD = [
    ("--shapes", ["--shapes", "4x16x4"]),
    ("--shapes", ["--shapes", "4x16x4x4x4"]),
    ("--shapes", ["--shapes", "0x16x4x4"]),
    ("--shapes", ["--shapes", "-4x16x4x4"]),
    ("--shapes", ["--shapes", "4x16x4.5x4"]),
    ("--shapes", ["--shapes", "1x16x1x1"]),  # one value per channel: training needs 2
    ("--shapes", ["--shapes", "2147483648x1x1x1"]),  # beyond a C int
    ("--shapes", ["--shapes", "100000x100000x1000x1000"]),  # beyond this machine's memory
    ("--shapes", ["--shapes", "4x16x4x4", "axbxcxd"]),
    ("--threads", ["--threads", "0"]),
    ("--threads", ["--threads", "-1"]),
    ("--threads", ["--threads", str(_cli.MAX_THREADS + 1)]),
    ("--threads", ["--threads", "1", "two"]),
    ("--threads", ["--threads", "1.5"]),
    ("--reps", ["--reps", "0"]),
    ("--reps", ["--reps", "-3"]),
    ("--reps", ["--reps", "many"]),
    ("--quick", ["--quick=yes"]),
    ("--out", ["--out", "{file}"]),
    ("--out", ["--out", "{file}/sub"]),
    ("--out", ["--out", ""]),
    ("--no-torch", ["--no-torch=1"]),
    ("--cnn-input", ["--cnn-input", "16x3x2x64"]),  # two 2x2 poolings need 4x4
    ("--cnn-input", ["--cnn-input", "16x3x64"]),
    ("--cnn-input", ["--cnn-input", "100000x3x100000x1000"]),  # beyond this machine's memory
    ("--no-cnn", ["--no-cnn=0"]),
    ("--min-time", ["--min-time", "0"]),
    ("--min-time", ["--min-time", "-0.001"]),
    ("--min-time", ["--min-time", "nan"]),
    ("--min-time", ["--min-time", "inf"]),
    ("--min-time", ["--min-time", "soon"]),
    ("--budget", ["--budget", "0.0"]),
    ("--budget", ["--budget", "-6"]),
    ("--budget", ["--budget", "inf"]),
    ("--budget", ["--budget", "NaN"]),
    ("--bandwidth-mb", ["--bandwidth-mb", "0"]),
    ("--bandwidth-mb", ["--bandwidth-mb", "-256"]),
    ("--bandwidth-mb", ["--bandwidth-mb", "0.5"]),
    ("--bandwidth-mb", ["--bandwidth-mb", str(10**12)]),  # two buffers beyond this machine's memory
    ("--no-progress", ["--no-progress=no"]),
    ("--no-such-option", ["--no-such-option"]),
]

DEMO_BAD = [
    ("--quick", ["--quick=1"]),
    ("--steps", ["--steps", "0"]),
    ("--steps", ["--steps", "-10"]),
    ("--steps", ["--steps", "ten"]),
    ("--steps", ["--steps", "1e3"]),
    ("--steps", ["--steps", "1000001"]),  # demo.MAX_STEPS + 1
    ("--eval-every", ["--eval-every", "0"]),
    ("--eval-every", ["--eval-every", "-5"]),
    ("--eval-every", ["--eval-every", "2.5"]),
    ("--eval-every", ["--steps", "1000000", "--eval-every", "1"]),  # millions of test-set evaluations
    ("--seed", ["--seed", "-1"]),
    ("--seed", ["--seed", "0.5"]),
    ("--seed", ["--seed", "zero"]),
    ("--out", ["--out", "{file}"]),
    ("--out", ["--out", "{file}/sub/dir"]),
    ("--out", ["--out", ""]),
    ("--no-progress", ["--no-progress=1"]),
    ("--no-such-option", ["--no-such-option"]),
]

MAIN_BAD = [
    ("COMMAND", []),
    ("COMMAND", ["frobnicate"]),
    ("--json", ["info", "--json=yes"]),
    ("--no-such-option", ["info", "--no-such-option"]),
    ("--no-such-option", ["--no-such-option", "info"]),
    ("--threads", ["bench", "--threads", "257"]),
    ("--seed", ["demo", "--seed", "-1"]),
]


def _fill(args, tmp_path):
    return [a.replace("{file}", _file(tmp_path)) if "{file}" in a else a for a in args]


def _assert_one_line_error(err, option):
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0] and option in lines[0], err


def _fails_fast(main, args, option, capsys):
    threads_before = darknet_bn.get_num_threads()
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _assert_one_line_error(captured.err, option)
    assert darknet_bn.get_num_threads() == threads_before


@pytest.mark.parametrize("option,args", BENCH_BAD, ids=[" ".join(a) for _, a in BENCH_BAD])
def test_bench_rejects_bad_values_first(option, args, tmp_path, capsys):
    from darknet_bn import bench

    out = tmp_path / "never_created"
    extra = [] if option == "--out" else ["--out", str(out)]
    _fails_fast(bench.main, _fill(args, tmp_path) + extra, option, capsys)
    assert not out.exists()


@pytest.mark.parametrize("option,args", DEMO_BAD, ids=[" ".join(a) for _, a in DEMO_BAD])
def test_demo_rejects_bad_values_first(option, args, tmp_path, capsys):
    demo = pytest.importorskip("darknet_bn.demo")
    out = tmp_path / "never_created"
    extra = [] if option == "--out" else ["--out", str(out)]
    _fails_fast(demo.main, _fill(args, tmp_path) + extra, option, capsys)
    assert not out.exists()


@pytest.mark.parametrize("option,args", MAIN_BAD, ids=[" ".join(a) or "(none)" for _, a in MAIN_BAD])
def test_main_rejects_bad_values_first(option, args, capsys):
    if args and args[0] == "demo":
        pytest.importorskip("sklearn")
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing started: no header, no progress
    _assert_one_line_error(captured.err, option)


@pytest.mark.parametrize("module,args,option", [
    ("darknet_bn", ["frobnicate"], "COMMAND"),
    ("darknet_bn", ["bench", "--budget", "0"], "--budget"),
    ("darknet_bn.bench", ["--threads", "0"], "--threads"),
    ("darknet_bn.bench", ["--bandwidth-mb", "0"], "--bandwidth-mb"),
    ("darknet_bn.bench", ["--out", "{file}/sub"], "--out"),
    ("darknet_bn.demo", ["--seed", "-1"], "--seed"),
    ("darknet_bn.demo", ["--out", "{file}"], "--out"),
])
def test_entry_points_print_one_line_and_exit_2(module, args, option, tmp_path):
    """Through the real entry points: status 2, one line, no traceback, long before the work would end."""
    if module == "darknet_bn.demo":
        pytest.importorskip("sklearn")
    # Interpreter start and imports only (the full benchmark and demo these would start take minutes):
    # a run that got as far as the work ends in the timeout.
    p = subprocess.run([sys.executable, "-m", module, *_fill(args, tmp_path)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and p.stdout == ""
    _assert_one_line_error(p.stderr, option)
    assert not (tmp_path / "results").exists()


def test_boundary_values_are_accepted(tmp_path):
    """The limits themselves parse: 1 and 256 threads, seed 0, the most steps, a new nested --out."""
    from darknet_bn import bench

    out = tmp_path / "new" / "nested"
    args = bench.build_parser().parse_args(["--threads", "1", str(_cli.MAX_THREADS), "--reps", "1",
                                            "--min-time", "1e-9", "--budget", "0.001", "--bandwidth-mb", "1",
                                            "--shapes", "2x1x1x1", "--cnn-input", "1x1x4x4", "--out", str(out)])
    assert args.threads == [1, _cli.MAX_THREADS] and args.shapes == [(2, 1, 1, 1)] and args.out == str(out)
    assert not out.exists()  # checked, not created, while parsing
    demo = pytest.importorskip("darknet_bn.demo")
    args = demo.parse_args(["--seed", "0", "--steps", str(demo.MAX_STEPS), "--out", str(out)])
    assert args.seed == 0 and args.steps == demo.MAX_STEPS and args.eval_every == demo.MAX_STEPS // 200
    assert args.out == out and not out.exists()


def test_validators():
    """darknet_bn._cli's type functions: values in range come back parsed, others raise ArgumentTypeError."""
    assert _cli.threads("256") == 256 and _cli.integer(0)("0") == 0 and _cli.integer(-2, 2)("-2") == -2
    assert _cli.positive_real("1e-300") == 1e-300
    assert _cli.shape()("2x3x4x5") == (2, 3, 4, 5) and _cli.shape()("1×1×1×2") == (1, 1, 1, 2)
    bad = [(_cli.threads, "257"), (_cli.threads, "0"), (_cli.integer(0), "-1"), (_cli.integer(1, 3), "4"),
           (_cli.integer(1), "1.0"), (_cli.integer(1), ""), (_cli.positive_real, "0"), (_cli.positive_real, "-1e-9"),
           (_cli.positive_real, "inf"), (_cli.positive_real, "-inf"), (_cli.positive_real, "nan"),
           (_cli.positive_real, "1e999"), (_cli.positive_real, ""), (_cli.shape(), "1x1x1x1"),
           (_cli.shape(min_hw=4), "1x1x3x4"), (_cli.shape(), "1x1x1"), (_cli.shape(), "1x1x1x1x1"),
           (_cli.shape(), "2x0x1x1"), (_cli.shape(), f"1x{2**31}x1x2"), (_cli.output_dir, "")]
    for parse, text in bad:
        with pytest.raises(cli.argparse.ArgumentTypeError):
            parse(text)


def test_output_dir(tmp_path):
    """Existing writable directories and creatable paths pass; files and paths under files do not."""
    assert _cli.output_dir(str(tmp_path)) == str(tmp_path)
    assert _cli.output_dir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
    f = _file(tmp_path)
    for bad in (f, f + "/x", f + "/x/y"):
        with pytest.raises(cli.argparse.ArgumentTypeError, match="not a directory"):
            _cli.output_dir(bad)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(cli.argparse.ArgumentTypeError, match="not writable"):
            _cli.output_dir(str(locked / "x"))


def test_parser_errors_are_one_line(capsys):
    """A message with newlines still comes out as one line, with the program name and exit status 2."""
    parser = _cli.ArgumentParser(prog="prog")
    with pytest.raises(SystemExit) as exc:
        parser.error("first\nsecond")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "prog: error: first second (see prog --help)\n"
