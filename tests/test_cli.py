"""The command line ``python -m darknet_bn info | bench | demo``: subprocess and in-process."""
import json
import os
import subprocess
import sys

import pytest

import darknet_bn
from darknet_bn import __main__ as cli

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
    assert report["env"] == {"DARKNET_BN_NUM_THREADS": "1", "DARKNET_BN_SIMD": "generic"}
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
    assert {k: report[k] for k in ("version", "simd", "threads")} == darknet_bn.info()
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
