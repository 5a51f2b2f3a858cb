"""The command line: ``python -m darknet_bn info | bench | demo``.

- ``info`` prints the library's version, instruction-set path and thread count
  (``--json`` for one JSON object);
- ``bench`` runs :mod:`darknet_bn.bench` (needs the ``bench`` extra);
- ``demo`` runs :mod:`darknet_bn.demo` (needs the ``demo`` extra).

``bench`` and ``demo`` hand every argument after their name to their module's
``main``, so ``python -m darknet_bn bench --help`` is the benchmark's own help.
In all three, every option is checked before any work starts (darknet_bn._cli):
a bad value ends the program with one line on stderr naming the option and
exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import _cli

__all__ = ["main", "build_parser"]

#: Subcommands that forward their arguments: name -> (module, extra, one-line help).
FORWARDED: Dict[str, Tuple[str, str, str]] = {
    "bench": (
        "darknet_bn.bench",
        "bench",
        "time the layer against PyTorch, NumPy and the reference loops (python -m darknet_bn.bench)",
    ),
    "demo": (
        "darknet_bn.demo",
        "demo",
        "the batch-norm paper's experiment: training with and without batch norm (python -m darknet_bn.demo)",
    ),
}


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (``bench`` and ``demo`` are listed here, parsed by their modules).

    Usage errors are one line on stderr with exit status 2 (darknet_bn._cli).
    """
    parser = _cli.ArgumentParser(
        prog="python -m darknet_bn",
        description="darknet_bn: CPU batch normalization in the Darknet style.",
        epilog="Run 'python -m darknet_bn COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"darknet_bn {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = commands.add_parser(
        "info",
        help="print the version, instruction-set path and thread count",
        description="Print darknet_bn.info(): the library version, the instruction-set path in use "
        "('avx2' or 'generic') and the thread count, plus the environment variables that set them.",
    )
    info.add_argument("--json", action="store_true", help="print one JSON object instead of lines of text")
    for name, (_module, _extra, summary) in FORWARDED.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


#: The environment variables that change what the library chooses.
ENV_SETTINGS = ("DARKNET_BN_NUM_THREADS", "DARKNET_BN_SIMD", "DARKNET_BN_GROUP_KB", "DARKNET_BN_MIN_WORK",
                "DARKNET_BN_STREAM", "DARKNET_BN_TEAM")


def info_report() -> Dict[str, object]:
    """What ``info`` prints: :func:`darknet_bn.info` and the settings' environment variables."""
    import darknet_bn

    report: Dict[str, object] = dict(darknet_bn.info())
    report["package_version"] = darknet_bn.__version__
    report["usable_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report["env"] = {name: os.environ.get(name) for name in ENV_SETTINGS}
    return report


def run_info(as_json: bool) -> int:
    """The ``info`` command; returns the exit status."""
    report = info_report()
    if as_json:
        print(json.dumps(report, sort_keys=True))
        return 0
    env = report["env"]
    assert isinstance(env, dict)
    print(f"darknet_bn {report['version']}")
    print(f"simd:         {report['simd']}")
    print(f"threads:      {report['threads']} (usable cores: {report['usable_cores']}), run by: {report['team']}")
    tuning = report["tuning"]
    assert isinstance(tuning, dict)
    print(f"caches:       L2 {tuning['l2_bytes'] >> 10} KiB, L3 {tuning['l3_bytes'] >> 10} KiB (0: unknown)")
    print(f"group:        {tuning['group_bytes'] >> 10} KiB per channel group ({tuning['group_source']}), "
          "then timed per pass")
    print(f"min work:     {tuning['min_work_per_thread']} values per extra thread ({tuning['min_work_source']}; "
          f"wake-up {tuning['wake_us']} us, {tuning['value_ns']} ns per value)")
    print(f"streaming:    {tuning['stream']} ({tuning['stream_source']})")
    for d in tuning["stream_decisions"]:
        sizes = ", ".join(f"{g['group_kb']} KiB {g['ms']:.3f} ms" for g in d["group_ms"])
        print(f"  {d['pass']:<15} >= {d['bytes_at_least'] >> 20} MiB, {d['threads']} thread(s): {d['choice']} "
              f"(plain {d['plain_ms']:.3f} ms, stream {d['stream_ms']:.3f} ms), group {d['group_kb']} KiB "
              f"({sizes})")
    for name, value in env.items():
        print(f"{name}: {value if value is not None else '(not set)'}")
    return 0


def _exit_status(exc: SystemExit) -> int:
    """The exit status a ``SystemExit`` stands for (None: 0; a message: 1, as the interpreter does)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def run_forwarded(name: str, argv: List[str]) -> int:
    """Run ``darknet_bn.<name>.main(argv)``; returns its exit status."""
    module_name, extra, _summary = FORWARDED[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"python -m darknet_bn {name}: cannot import {module_name} ({exc}); "
              f"install the extra: pip install 'darknet_bn[{extra}]'", file=sys.stderr)
        return 2
    entry: Callable[[Optional[Sequence[str]]], Optional[int]] = module.main
    try:
        status = entry(argv)
    except SystemExit as exc:  # the module's argparse: --help, usage errors
        return _exit_status(exc)
    except ImportError as exc:  # an optional dependency imported on the way
        print(f"python -m darknet_bn {name}: {exc}; install the extra: pip install 'darknet_bn[{extra}]'",
              file=sys.stderr)
        return 2
    return int(status or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command and return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in FORWARDED:
        return run_forwarded(args[0], args[1:])
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help, --version, usage errors
        return _exit_status(exc)
    if ns.command == "info":
        return run_info(ns.json)
    parser.error(f"unknown command {ns.command!r}")  # pragma: no cover - argparse rejects it first
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
