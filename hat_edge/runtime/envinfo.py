"""What machine is this: OS, CPU, cores, memory, python and runtime versions, governor, and on a
Raspberry Pi its temperature and throttling (`runner env`, and each result's `env`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any, Dict, List, Optional

import numpy as np

from .formats import RUNNER_VERSION


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip("\x00 \n\t") or None
    except OSError:
        return None


def _cmd(argv: List[str], timeout: float = 5.0) -> Optional[str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def _cpu_model() -> Optional[str]:
    info = _read("/proc/cpuinfo") or ""
    fields: Dict[str, str] = {}
    for line in info.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip(), v.strip())
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if fields.get(key):
            return fields[key]
    if sys.platform == "darwin":
        return _cmd(["sysctl", "-n", "machdep.cpu.brand_string"])
    return platform.processor() or None


def _memory_mb() -> Optional[float]:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    if sys.platform == "darwin":
        v = _cmd(["sysctl", "-n", "hw.memsize"])
        return round(int(v) / 2**20, 1) if v and v.isdigit() else None
    return None


def _pkg_version(module: str) -> Optional[str]:
    try:
        from importlib import metadata

        for dist in (module, f"{module}-gpu"):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    except ImportError:
        pass
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", None))
    except ImportError:
        return None


def raspberry_pi_model() -> Optional[str]:
    model = _read("/proc/device-tree/model")
    return model if model and "Raspberry Pi" in model else None


def temperature_c() -> Optional[float]:
    """SoC temperature: `vcgencmd measure_temp` on a Pi, else thermal zone 0 when Linux has one."""
    out = _cmd(["vcgencmd", "measure_temp"]) if raspberry_pi_model() else None
    if out and "=" in out:
        try:
            return float(out.split("=")[1].split("'")[0])
        except ValueError:
            pass
    raw = _read("/sys/class/thermal/thermal_zone0/temp")
    try:
        return round(int(raw) / 1000.0, 1) if raw else None
    except ValueError:
        return None


def get_throttled() -> Optional[int]:
    """The Pi firmware's throttle bits (`vcgencmd get_throttled`), or None off a Pi."""
    if not raspberry_pi_model():
        return None
    out = _cmd(["vcgencmd", "get_throttled"])
    if not out or "=" not in out:
        return None
    try:
        return int(out.split("=")[1], 16)
    except ValueError:
        return None


def throttled_during(before: Optional[int], after: Optional[int]) -> Optional[bool]:
    """Throttling seen during a measurement: a 'now' bit (0-3) set before or after, or a sticky
    'since boot' bit (16-19) that turned on in between. None when the board cannot tell."""
    if before is None or after is None:
        return None
    return bool(((before | after) & 0xF) or ((after & ~before) & 0xF0000))


def installed_runtimes() -> Dict[str, bool]:
    """Which bundle runtimes this python can import (found, not imported: cheap)."""
    import importlib.util

    return {"onnxruntime": importlib.util.find_spec("onnxruntime") is not None,
            "torchscript": importlib.util.find_spec("torch") is not None}


def _platform(uname: "platform.uname_result") -> str:
    """`platform.platform()` without its `uname -p` subprocess on Linux (Python runs one to learn
    the processor, which Linux reports as unknown or as the machine): a runner starts no child
    while it holds the board, so nothing else on the board carries a runner's command line (a
    child between fork and exec does)."""
    if uname.system != "Linux":
        return platform.platform()
    lib, ver = platform.libc_ver()
    parts = [uname.system, uname.release, uname.machine] + (["with", lib + ver] if lib else [])
    text = "-".join(x.strip() for x in parts if x and x.strip())
    for ch in ' /\\:;"()':
        text = text.replace(ch, "_" if ch == " " else "-")
    while "--" in text:
        text = text.replace("--", "-")
    return text


def collect_env(probe_runtimes: bool = True) -> dict:
    """One JSON-able object describing this machine (absent facts are null)."""
    uname = platform.uname()
    try:
        usable = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        usable = os.cpu_count()
    env: Dict[str, Any] = {
        "version": RUNNER_VERSION,
        "os": f"{uname.system} {uname.release}",
        "platform": _platform(uname),
        "machine": uname.machine,
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_mb": _memory_mb(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": None,
        "onnxruntime_providers": None,
        "torch": None,
        "cuda_device": None,
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "cpu_max_mhz": None,
        "raspberry_pi": raspberry_pi_model(),
        "temperature_c": temperature_c(),
        "throttled": None,
    }
    maxf = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if maxf and maxf.isdigit():
        env["cpu_max_mhz"] = int(maxf) // 1000
    t = get_throttled()
    env["throttled"] = hex(t) if t is not None else None
    if probe_runtimes:
        try:
            import onnxruntime as ort

            env["onnxruntime"] = ort.__version__
            env["onnxruntime_providers"] = list(ort.get_available_providers())
        except ImportError:
            pass
        env["torch"] = _pkg_version("torch")
        if env["torch"] and os.environ.get("HAT_EDGE_ENV_NO_TORCH") != "1":
            try:
                import torch

                if torch.cuda.is_available():
                    env["cuda_device"] = torch.cuda.get_device_name(0)
            except Exception:  # a broken torch install must not break `env`
                pass
    return env


# ------------------------------------------------------------------------------------------------
