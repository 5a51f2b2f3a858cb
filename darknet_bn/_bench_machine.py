"""The description of the machine a benchmark ran on, and a short name for it.

:func:`machine_info` gathers the CPU (vendor, model name, the instruction-set
flags that matter to the kernels), its caches (from sysfs, else ``lscpu``),
core counts, kernel, hypervisor, library versions and the date;
:func:`machine_text` prints it as the header of ``bench.txt``;
:func:`machine_slug` makes a short file-system-safe name of it
(``intel-xeon-avx512-2c``) for the default output directory.
"""
from __future__ import annotations

import datetime as _dt
import glob
import os
import platform
import re
import shutil
import subprocess
import textwrap
from typing import Any, Dict, List, Optional

import numpy as np

import darknet_bn
from darknet_bn._bench_common import usable_cores

#: Instruction-set flags (as /proc/cpuinfo spells them) that matter to the kernels and to PyTorch.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "amx_tile")
_CPU_DIR = "/sys/devices/system/cpu"
_VENDORS = {"genuineintel": "intel", "authenticamd": "amd", "hygongenuine": "hygon", "centaurhauls": "centaur"}
#: Words of a model name left out of the slug.
_NOISE = {"processor", "cpu", "with", "radeon", "graphics", "genuine", "intel", "amd", "core(tm)", "(r)", "(tm)",
          "gold", "platinum", "silver", "bronze", "apu", "mobile", "vcpu"}


def cpuinfo() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def lscpu() -> Dict[str, str]:
    """``lscpu``'s "Key: value" lines, or {} when it is missing or fails."""
    exe = shutil.which("lscpu")
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields: Dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def parse_size(text: str) -> Optional[int]:
    """``"48K"``, ``"2048K"``, ``"32 MiB"``, ``"1M"`` -> bytes; None if unreadable."""
    m = re.match(r"^\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*$", text or "", re.IGNORECASE)
    if not m:
        return None
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def fmt_bytes(n: Optional[int]) -> str:
    """Bytes in KiB/MiB/GiB, as lscpu prints them."""
    if n is None:
        return "?"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def _cpu_count_in(cpu_list: str) -> int:
    """``"0-3,8"`` -> 5."""
    n = 0
    for part in filter(None, cpu_list.split(",")):
        lo, _, hi = part.partition("-")
        n += int(hi) - int(lo) + 1 if hi else 1
    return n


def cpu_caches() -> List[Dict[str, Any]]:
    """The data and unified caches of cpu0: level, type, size, sharing, instances and total.

    From /sys/devices/system/cpu/cpu*/cache/index*/ (``level``, ``type``,
    ``size``, ``shared_cpu_list``): ``instances`` counts the distinct sharing
    sets over all CPUs, so ``total_bytes`` = size x instances. Falls back to
    ``lscpu`` ("L1d cache: 96 KiB (2 instances)", totals only).
    """
    caches: List[Dict[str, Any]] = []
    for index in sorted(glob.glob(os.path.join(_CPU_DIR, "cpu0", "cache", "index*"))):
        level, kind, size = (_read(os.path.join(index, k)) for k in ("level", "type", "size"))
        shared = _read(os.path.join(index, "shared_cpu_list")) or ""
        if level is None or kind is None or kind == "Instruction":
            continue
        sets = set()
        leaf = os.path.basename(index)
        for other in glob.glob(os.path.join(_CPU_DIR, "cpu[0-9]*", "cache", leaf)):
            if _read(os.path.join(other, "level")) == level and _read(os.path.join(other, "type")) == kind:
                sets.add(_read(os.path.join(other, "shared_cpu_list")))
        size_b = parse_size(size or "")
        sharing = _cpu_count_in(shared) if shared else None
        name = f"L{level}" + ("d" if kind == "Data" else "")
        caches.append({
            "name": name, "level": int(level), "type": kind, "size": size, "size_bytes": size_b,
            "shared_cpu_list": shared, "cpus_sharing": sharing, "instances": len(sets) or None,
            "total_bytes": size_b * len(sets) if size_b and sets else None,
            "scope": "per core" if sharing == 1 else (f"shared by {sharing} CPUs" if sharing else "?"),
            "source": "sysfs",
        })
    if caches:
        return caches
    info = lscpu()
    for name in ("L1d", "L2", "L3"):
        text = info.get(f"{name} cache")
        if not text:
            continue
        m = re.match(r"^(.*?)\s*(?:\((\d+) instances?\))?$", text)
        total = parse_size(m.group(1)) if m else None
        inst = int(m.group(2)) if m and m.group(2) else None
        caches.append({
            "name": name, "level": int(name[1]), "type": "Data" if name == "L1d" else "Unified",
            "size": text, "size_bytes": total // inst if total and inst else None, "shared_cpu_list": None,
            "cpus_sharing": None, "instances": inst, "total_bytes": total,
            "scope": "?", "source": "lscpu",
        })
    return caches


def hypervisor(flags: List[str], lscpu_fields: Dict[str, str]) -> Optional[str]:
    """The hypervisor vendor (lscpu, /sys/hypervisor), "unknown" if the CPU says there is one, else None."""
    vendor = lscpu_fields.get("Hypervisor vendor") or _read("/sys/hypervisor/type")
    if vendor:
        return vendor
    return "unknown" if "hypervisor" in flags else None


def _torch_info(torch: Any) -> Optional[Dict[str, Any]]:
    if torch is None:
        return None
    parallel = ""
    try:
        parallel = next((line.split(":", 1)[1].strip() for line in torch.__config__.parallel_info().splitlines()
                         if line.startswith("ATen parallel backend")), "")
    except Exception:  # noqa: BLE001 - descriptive only
        pass
    return {"version": torch.__version__, "parallel_backend": parallel, "default_threads": torch.get_num_threads()}


def machine_info(torch: Any) -> Dict[str, Any]:
    """CPU model, ISA flags, caches, core counts, kernel, hypervisor, library versions and the date."""
    cpu = cpuinfo()
    ls = lscpu()
    model = cpu.get("model name") or ls.get("Model name") or platform.processor() or ""
    flags = (cpu.get("flags") or cpu.get("Features") or ls.get("Flags") or "").split()
    vendor_id = cpu.get("vendor_id") or ls.get("Vendor ID") or ""
    siblings = _read(os.path.join(_CPU_DIR, "cpu0", "topology", "thread_siblings_list"))
    return {
        "cpu_model": model,
        "cpu_vendor": vendor_id,
        "cpu_family": cpu.get("cpu family"),
        "cpu_model_number": cpu.get("model"),
        "cpu_stepping": cpu.get("stepping"),
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "caches": cpu_caches(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "threads_per_core": _cpu_count_in(siblings) if siblings else None,
        "sockets": int(ls["Socket(s)"]) if ls.get("Socket(s)", "").isdigit() else None,
        "kernel": platform.release(),
        "hypervisor": hypervisor(flags, ls),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "darknet_bn": darknet_bn.info(),
        "torch": torch.__version__ if torch is not None else None,
        "torch_info": _torch_info(torch),
        "omp_env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS",
                                                   "DARKNET_BN_NUM_THREADS", "DARKNET_BN_TEAM",
                                                   "DARKNET_BN_STREAM", "DARKNET_BN_GROUP_KB",
                                                   "DARKNET_BN_MIN_WORK", "DARKNET_BN_SIMD")},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "slug": machine_slug(model, vendor_id, flags, usable_cores()),
    }


def _flat(value: Any, prefix: str = "") -> List[str]:
    """A nested dict as ``key=value`` items, nested keys joined with dots."""
    if isinstance(value, dict):
        items: List[str] = []
        for k, v in value.items():
            items += _flat(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}")
        return items
    return [f"{prefix.rstrip('.')}={value}"]


def _cache_text(c: Dict[str, Any]) -> str:
    """``"L2 2 MiB per core (2 instances, 4 MiB total)"``."""
    text = f"{c['name']} {fmt_bytes(c['size_bytes'])} {c['scope']}"
    n = c.get("instances")
    if n:
        text += f" ({n} instance{'s' if n != 1 else ''}, {fmt_bytes(c['total_bytes'])} total)"
    return text


def machine_text(machine: Dict[str, Any]) -> str:
    """The machine as the header lines of ``bench.txt``."""
    caches = "; ".join(_cache_text(c) for c in machine["caches"]) or "unknown"
    cores = f"{machine['cores']} CPUs, {machine['usable_cores']} usable"
    if machine.get("threads_per_core"):
        cores += f", {machine['threads_per_core']} thread(s) per core"
    torch = machine.get("torch_info")
    lines = [
        f"machine   {machine['cpu_model'] or '?'} ({machine['cpu_vendor'] or '?'}); {cores}",
        f"ISA       {' '.join(machine['isa_flags']) or 'none of ' + ' '.join(ISA_FLAGS)}",
        f"caches    {caches}",
        f"system    Linux {machine['kernel']}" if platform.system() == "Linux" else f"system    {machine['platform']}",
    ]
    lines[-1] += f"; hypervisor {machine['hypervisor'] or 'none'}; {machine['date']}"
    lines.append(f"software  python {machine['python']}, numpy {machine['numpy']}, torch "
                 + (f"{torch['version']} ({torch['parallel_backend']})" if torch else "not used"))
    omp = ", ".join(f"{k}={v}" for k, v in machine["omp_env"].items() if v is not None) or "none set"
    lines.append(f"env       {omp}")
    lines += textwrap.wrap(", ".join(_flat(machine["darknet_bn"])), width=110, initial_indent="darknet_bn ",
                           subsequent_indent=" " * 11, break_on_hyphens=False)
    end = machine.get("darknet_bn_end")
    if end and end != machine["darknet_bn"]:
        lines += textwrap.wrap(", ".join(_flat(end)), width=110, initial_indent="  at end: ",
                               subsequent_indent=" " * 11, break_on_hyphens=False)
    return "\n".join(lines)


def _model_words(model: str) -> List[str]:
    """The family and model-number words of a CPU model name, lower case (``["xeon"]``, ``["epyc", "9xx4"]``)."""
    text = model.lower()
    text = re.sub(r"\((r|tm)\)", " ", text)
    text = re.sub(r"@.*$", " ", text)  # "@ 2.90GHz"
    text = re.sub(r"\b\d+-core\b", " ", text)
    words = [w for w in re.split(r"[\s,]+", text) if w and w not in _NOISE and not re.fullmatch(r"[\d.]+ghz", w)]
    out: List[str] = []
    for w in words[:2]:
        if re.fullmatch(r"\d[0-9a-z]{2}\d[a-z]*", w):  # EPYC 9R14, 7763, Xeon 8375C: generation, x x, tier
            w = w[0] + "xx" + w[3]
        out.append(w)
    return out


def machine_slug(model: Optional[str] = None, vendor_id: Optional[str] = None, flags: Optional[List[str]] = None,
                 cores: Optional[int] = None) -> str:
    """A short file-system-safe name of this machine: vendor, model family, best ISA, usable cores.

    ``intel-xeon-avx512-2c``, ``amd-epyc-9xx4-avx512-2c``, ``arm-neon-8c``:
    lower-case letters, digits and dashes only. Every argument defaults to
    this machine's (/proc/cpuinfo, lscpu, the affinity mask).
    """
    if model is None or vendor_id is None or flags is None:
        cpu = cpuinfo()
        ls = lscpu() if not cpu else {}
        if model is None:
            model = cpu.get("model name") or ls.get("Model name") or platform.processor() or ""
        if vendor_id is None:
            vendor_id = cpu.get("vendor_id") or ls.get("Vendor ID") or ""
        if flags is None:
            flags = (cpu.get("flags") or cpu.get("Features") or ls.get("Flags") or "").split()
    cores = usable_cores() if cores is None else cores
    vendor = _VENDORS.get(vendor_id.lower(), "")
    if not vendor:
        first = (model.split() or [""])[0].lower()
        vendor = {"intel(r)": "intel", "amd": "amd"}.get(first, "") or re.sub(r"[^a-z0-9]", "", vendor_id.lower())
    if not vendor:
        vendor = re.sub(r"[^a-z0-9]", "", platform.machine().lower()) or "cpu"
    if "avx512f" in flags:
        isa = "avx512"
    elif "avx2" in flags:
        isa = "avx2"
    elif "avx" in flags:
        isa = "avx"
    elif "sve" in flags:
        isa = "sve"
    elif "asimd" in flags or "neon" in flags:
        isa = "neon"
    elif "sse4_2" in flags:
        isa = "sse4"
    else:
        isa = "generic"
    words = [w for w in _model_words(model) if w != vendor]
    parts = [vendor, *words, isa, f"{cores}c"]
    slug = "-".join(re.sub(r"[^a-z0-9]+", "-", p).strip("-") for p in parts)
    slug = re.sub(r"-{2,}", "-", slug).strip("-")
    return slug[:60].rstrip("-") or "machine"
