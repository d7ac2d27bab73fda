"""Device profiles: one TOML file describes how to reach a device and how to measure on it.

    name = "raspberrypi4"
    transport = "ssh"            # local | ssh
    host = "pi4.local"
    user = "pi"
    runtime = "onnxruntime"      # onnxruntime | torchscript
    threads = 4

    [measurement]
    src_len = 30                 # HAT's settings
    steps = 30
    beam = 5
    warmup = 5

Profiles are found by name in, first match wins: the directories in $HAT_EDGE_PROFILE_PATH,
./device_profiles, ~/.config/hat-edge/profiles, and the profiles embedded in the package
(`local-cpu`, `local-gpu`), so `--profile local-cpu` works from an installed wheel too.
Every field is documented in docs/profiles.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from hat_edge.errors import UserError
from hat_edge.runtime.errors import RunnerError
from hat_edge.runtime.files import read_file
from hat_edge.runtime.formats import DEVICES, RUNTIMES
from hat_edge.runtime.job import MeasureSpec

PROFILE_SUFFIX = ".toml"
PACKAGE_PROFILES = Path(__file__).resolve().parent.parent / "assets" / "profiles"
EXAMPLE_PROFILES = PACKAGE_PROFILES / "examples"  # commented examples to copy (`hat-edge profile new --from`)
TRANSPORTS = ("local", "ssh")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ProfileError(UserError, ValueError):
    """A bad profile file or field; the message is one line naming the file and field."""


@dataclass(frozen=True)
class DeviceProfile:
    """How to reach a device (transport fields) and how to measure on it (`measurement`, the
    runtime's `MeasureSpec`: runtime, device, threads, env, affinity and the [measurement] table)."""

    name: str
    transport: str = "local"
    host: str | None = None
    port: int | None = None            # None: from ~/.ssh/config, else 22
    user: str | None = None            # None: from ~/.ssh/config, else the local user
    identity_file: str | None = None
    known_hosts: str | None = None     # None: ~/.ssh/known_hosts
    ssh_config_host: str | None = None
    python: str | None = None          # None: this interpreter (local) or "python3" (ssh)
    work_dir: str | None = None        # None: $HAT_EDGE_CACHE/work or ~/.cache/hat-edge/work (local), ~/.hat-edge (ssh)
    connect_timeout_s: float = 5.0     # an unreachable device fails this fast (per try)
    description: str = ""
    measurement: MeasureSpec = field(default_factory=lambda: MeasureSpec(runtime="onnxruntime"))
    source: str = field(default="", compare=False)  # file it came from ("" when built in code)

    # ---- what the measurement spec holds, as profile fields ----
    @property
    def runtime(self) -> str:
        return self.measurement.runtime or "onnxruntime"

    @property
    def device(self) -> str:
        return self.measurement.device

    @property
    def threads(self) -> int:
        """Intra-op threads; 0: the runtime's default (all cores)."""
        return self.measurement.threads or 0

    @property
    def env(self) -> tuple[tuple[str, str], ...]:
        return self.measurement.env

    @property
    def env_dict(self) -> dict[str, str]:
        return self.measurement.env_dict

    @property
    def cpu_affinity(self) -> tuple[int, ...] | None:
        return self.measurement.cpu_affinity

    # ---- derived ----
    @property
    def is_local(self) -> bool:
        return self.transport == "local"

    @property
    def remote_python(self) -> str:
        if self.python:
            return self.python
        return sys.executable if self.is_local else "python3"

    @property
    def resolved_work_dir(self) -> str:
        """The work dir as written, or the default. A leading `~/` is expanded by the transport
        (locally, or via the remote home for ssh): commands are quoted, so no shell expands it."""
        if self.work_dir:
            return self.work_dir
        if not self.is_local:
            return "~/.hat-edge"
        root = os.environ.get("HAT_EDGE_CACHE")  # beside the export cache and the runner's ($HAT_EDGE_CACHE/...)
        return str(Path(root).expanduser() / "work") if root else "~/.cache/hat-edge/work"

    def measure_spec(self, quantize: str | None = None, interleave: bool = False) -> MeasureSpec:
        """The spec a measurement of this profile runs with (`.identity()`: the store key)."""
        m = self.measurement
        return m if (quantize, interleave) == (m.quantize, m.interleave) else \
            replace(m, quantize=quantize, interleave=interleave)

    def with_measurement(self, **changes: Any) -> "DeviceProfile":
        """This profile with some measurement settings changed (validated)."""
        try:
            return replace(self, measurement=self.measurement.with_(**changes)) if changes else self
        except RunnerError as e:
            raise ProfileError(f"{self.source or self.name}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        m = self.measurement
        d: dict[str, Any] = {k: getattr(self, k) for k in (
            "name", "transport", "host", "port", "user", "identity_file", "known_hosts", "ssh_config_host",
            "python", "work_dir", "connect_timeout_s", "runtime", "device", "threads")}
        d["env"] = self.env_dict
        d["cpu_affinity"] = list(self.cpu_affinity) if self.cpu_affinity is not None else None
        d["description"] = self.description
        d["measurement"] = {k: getattr(m, k) for k in _MEASURE}
        d["source"] = self.source
        return d

    def with_runtime(self, runtime: str) -> "DeviceProfile":
        if runtime not in RUNTIMES:
            raise ProfileError(f"runtime '{runtime}' is not supported, allowed: {', '.join(RUNTIMES)}")
        return replace(self, measurement=replace(self.measurement, runtime=runtime))


# --------------------------------------------------------------------------------------------
# Parsing and validation: one rule per field, each error one line naming the file and field.
# --------------------------------------------------------------------------------------------
Check = Callable[[Any], Any]  # returns the normalised value or raises _Bad(allowed)


class _Bad(Exception):
    def __init__(self, allowed: str) -> None:
        self.allowed = allowed


def _str(allowed: str = "a string", pattern: re.Pattern[str] | None = None) -> Check:
    def check(v: Any) -> str:
        if not isinstance(v, str) or not v or (pattern is not None and not pattern.match(v)):
            raise _Bad(allowed)
        return v
    return check


def _choice(options: tuple[str, ...]) -> Check:
    def check(v: Any) -> str:
        if v not in options:
            raise _Bad(", ".join(options))
        return v
    return check


def _int(lo: int, hi: int | None = None) -> Check:
    def check(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            raise _Bad(f"an integer >= {lo}" if hi is None else f"an integer {lo}-{hi}")
        return v
    return check


def _float(lo: float, positive: bool = False) -> Check:
    def check(v: Any) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= lo and (v > lo or not positive)
        if not ok:
            raise _Bad(f"a number > {lo:g}" if positive else f"a number >= {lo:g}")
        if not math.isfinite(v):
            raise _Bad(f"a finite number {'>' if positive else '>='} {lo:g} (not inf or nan)")
        return float(v)
    return check


def _env(v: Any) -> tuple[tuple[str, str], ...]:
    allowed = "a table of NAME = \"value\" strings (NAME: letters, digits, _)"
    if not isinstance(v, dict):
        raise _Bad(allowed)
    out = []
    for k, val in v.items():
        if not _ENV_RE.match(k) or not isinstance(val, (str, int, float)) or isinstance(val, bool):
            raise _Bad(allowed)
        out.append((k, str(val)))
    return tuple(sorted(out))


def _affinity(v: Any) -> tuple[int, ...]:
    allowed = "a non-empty list of CPU indices >= 0, e.g. [2, 3]"
    if not isinstance(v, list) or not v or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in v):
        raise _Bad(allowed)
    return tuple(sorted(set(v)))


_TOP: dict[str, Check] = {
    "name": _str("letters, digits, '.', '_' or '-' (e.g. raspberrypi4)", _NAME_RE),
    "description": _str(),
    "transport": _choice(TRANSPORTS),
    "host": _str("a host name or IP address"),
    "port": _int(1, 65535),
    "user": _str("a user name"),
    "identity_file": _str("a path to a private key file"),
    "known_hosts": _str("a path to a known_hosts file"),
    "ssh_config_host": _str("a Host alias from ~/.ssh/config"),
    "python": _str("the python command or path on the device"),
    "work_dir": _str("a directory path on the device"),
    "connect_timeout_s": _float(0.0, positive=True),
    "runtime": _choice(RUNTIMES),
    "device": _choice(DEVICES),
    "threads": _int(0),
    "env": _env,
    "cpu_affinity": _affinity,
}
_MEASURE: dict[str, Check] = {
    "src_len": _int(1),
    "steps": _int(1),
    "beam": _int(1),
    "warmup": _int(0),
    "min_repeats": _int(1),
    "min_time_s": _float(0.0),
    "cooldown_s": _float(0.0),
    "timeout_s": _float(0.0, positive=True),
    "vocab_size": _int(8),
}


def _field(src: str, key: str, value: Any, check: Check) -> Any:
    try:
        return check(value)
    except _Bad as e:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise ProfileError(f"{src}: field '{key}' is {shown}, allowed: {e.allowed}") from None


def profile_from_dict(data: dict[str, Any], source: str, default_name: str | None = None) -> DeviceProfile:
    """Validate a parsed profile. Raises ProfileError (one line) on the first bad field."""
    kw: dict[str, Any] = {}
    for key, value in data.items():
        if key == "measurement":
            continue
        if key not in _TOP:
            raise ProfileError(
                f"{source}: unknown field '{key}', allowed: {', '.join(list(_TOP) + ['[measurement]'])}"
            )
        kw[key] = _field(source, key, value, _TOP[key])
    m_kw: dict[str, Any] = {}
    meas = data.get("measurement", {})
    if not isinstance(meas, dict):
        raise ProfileError(f"{source}: field 'measurement' must be a table [measurement] with: {', '.join(_MEASURE)}")
    for key, value in meas.items():
        if key not in _MEASURE:
            raise ProfileError(f"{source}: unknown field 'measurement.{key}', allowed: {', '.join(_MEASURE)}")
        m_kw[key] = _field(source, f"measurement.{key}", value, _MEASURE[key])
    if "name" not in kw:
        if not default_name or not _NAME_RE.match(default_name):
            raise ProfileError(f"{source}: missing field 'name'")
        kw["name"] = default_name
    transport = kw.get("transport", "local")
    if transport == "ssh" and not (kw.get("host") or kw.get("ssh_config_host")):
        raise ProfileError(f"{source}: field 'host' is missing, allowed: a host name, or set 'ssh_config_host' (transport 'ssh' needs one)")
    if transport == "local":
        for key in ("host", "port", "user", "identity_file", "known_hosts", "ssh_config_host"):
            if key in kw:
                raise ProfileError(f"{source}: field '{key}' is set but transport is 'local', allowed: only with transport = \"ssh\"")
    if kw.get("device") == "cuda" and kw.get("runtime", "onnxruntime") != "torchscript":
        raise ProfileError(
            f"{source}: field 'runtime' is {kw.get('runtime', 'onnxruntime')!r} with device 'cuda', "
            "allowed: 'torchscript' (CUDA events time the GPU)"
        )
    spec_kw = {k: kw.pop(k) for k in ("runtime", "device", "threads", "env", "cpu_affinity") if k in kw}
    spec_kw.setdefault("runtime", "onnxruntime")
    if spec_kw.get("threads") == 0:
        spec_kw["threads"] = None  # 0 in a profile: the runtime's default
    try:
        spec = MeasureSpec(**spec_kw, **m_kw)
        spec.validate(source)
    except RunnerError as e:
        raise ProfileError(str(e)) from None
    return DeviceProfile(measurement=spec, source=source, **kw)


def load_profile_file(path: str | Path) -> DeviceProfile:
    path = Path(path)
    raw = read_file(path, "no such profile file", ProfileError)
    assert isinstance(raw, bytes)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProfileError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML ({str(e).splitlines()[0]})") from None
    return profile_from_dict(data, str(path), default_name=path.stem)


# --------------------------------------------------------------------------------------------
# Finding profiles by name
# --------------------------------------------------------------------------------------------
def profile_dirs() -> list[Path]:
    """Where profiles are looked up, first match wins."""
    dirs = [Path(p) for p in os.environ.get("HAT_EDGE_PROFILE_PATH", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "device_profiles", Path.home() / ".config" / "hat-edge" / "profiles", PACKAGE_PROFILES]
    return dirs


@dataclass(frozen=True)
class ProfileEntry:
    name: str
    path: Path
    shadowed: bool = False  # a profile of the same name earlier in the search path wins


def list_profiles() -> list[ProfileEntry]:
    seen: set[str] = set()
    out: list[ProfileEntry] = []
    for d in profile_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.glob(f"*{PROFILE_SUFFIX}")):
            out.append(ProfileEntry(p.stem, p, shadowed=p.stem in seen))
            seen.add(p.stem)
    return out


def list_examples() -> list[ProfileEntry]:
    """The example profiles shipped in the package (a board to copy, not a device to measure)."""
    return [ProfileEntry(p.stem, p) for p in sorted(EXAMPLE_PROFILES.glob(f"*{PROFILE_SUFFIX}"))]


def new_profile_text(name: str, example: str, **fields: Any) -> str:
    """An example profile's text (comments kept) with `name` and the given top-level fields set;
    a field the example leaves commented out (`# port = 22`) is set in its place. Validated."""
    src = next((e.path for e in list_examples() if e.name == example), None)
    if src is None:
        raise ProfileError(f"--from {example!r}: allowed: {', '.join(e.name for e in list_examples())}")
    if not _NAME_RE.match(name):
        raise ProfileError(f"NAME {name!r}: allowed: letters, digits, '.', '_' or '-' (e.g. mypi)")
    lines = src.read_text().splitlines()
    values = {"name": name, **{k: v for k, v in fields.items() if v is not None}}
    done: set[str] = set()
    for i, line in enumerate(lines):
        if line.startswith("["):
            break  # top-level fields only
        m = re.match(r"^#?\s*([a-z_]+)\s*=", line)
        if m and m.group(1) in values and m.group(1) not in done:
            key = m.group(1)
            lines[i] = f"{key} = {_toml_value(values[key])}"
            done.add(key)
    head = [f"{k} = {_toml_value(v)}" for k, v in values.items() if k not in done]
    text = "\n".join(head + lines) + "\n"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # a value TOML cannot hold even escaped (e.g. a DEL character)
        raise ProfileError(f"<new profile {name}>: a field's value cannot be written to TOML ({e})") from None
    profile_from_dict(doc, f"<new profile {name}>")  # refuse a bad --port etc. now
    return text


def _toml_value(v: Any) -> str:
    """An int as is, anything else as a TOML basic string: JSON's escapes (backslash, quote,
    control characters) are TOML's, so a value can neither break the string nor add keys."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else json.dumps(str(v), ensure_ascii=False)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A profile by name (searched in `profile_dirs()`) or by path to a `.toml` file."""
    key = str(name_or_path)
    p = Path(key).expanduser()
    if key.endswith(PROFILE_SUFFIX) or os.sep in key:
        return load_profile_file(p)
    for d in profile_dirs():
        cand = d / f"{key}{PROFILE_SUFFIX}"
        if cand.is_file():
            return load_profile_file(cand)
    names = sorted({e.name for e in list_profiles()})
    examples = ", ".join(e.name for e in list_examples())
    raise ProfileError(f"unknown profile '{key}', allowed: {', '.join(names) or 'none found'} or a path to a .toml file "
                       f"(examples to copy: {examples}; `hat-edge profile new NAME --from EXAMPLE --host HOST`)")


__all__ = [
    "DeviceProfile",
    "MeasureSpec",
    "ProfileEntry",
    "ProfileError",
    "RUNTIMES",
    "TRANSPORTS",
    "list_examples",
    "list_profiles",
    "new_profile_text",
    "load_profile",
    "load_profile_file",
    "profile_dirs",
    "profile_from_dict",
]
