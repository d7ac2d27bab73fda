"""The job and result formats, and `MeasureSpec`: how a model is measured.

`MeasureSpec` is the one shape of measurement settings. A device profile builds it
(`DeviceProfile.measurement`); `.to_job()` is the `settings` object of a job file, which the
runner reads back with `MeasureSpec.from_job`; `.identity()` is the latency store's key: exactly the
fields a latency depends on. A new setting is one field here, and one decision: does it change the
latency (then it joins `identity()`), or only how precisely it is measured.

Job file (written by `write_job`, read by `read_job`):
    {"format": "hat-edge-job", "version": 1, "bundles": [{"id": str, "path": str}], "settings": {...}}
Result line (one JSON object per bundle, appended to the results file; read by `read_result`):
    {"version": 1, "id", "runtime", "precision", "arch", "settings", "runs": [...], "median_ms", ...}
    or {"id", "error"} when that bundle failed.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import RunnerError
from .files import read_text
from .formats import (
    DEVICES,
    JOB_FORMAT,
    JOB_HOST_FILE,
    JOB_HOST_FORMAT,
    JOB_HOST_VERSION,
    JOB_VERSION,
    JOBS_DIR,
    ORT_OPT_LEVELS,
    QUANTIZE,
    RESULT_VERSION,
    RESULTS_FILE,
    RUNTIMES,
)

# Fields of MeasureSpec the host keeps to itself: they shape the exported models (vocab_size,
# quantize) or the host's patience (timeout_s); a job file does not carry them.
HOST_FIELDS = ("vocab_size", "quantize", "timeout_s")


@dataclass(frozen=True)
class MeasureSpec:
    """How to measure a model on a device; defaults follow HAT (batch 1, 30 source tokens, 30
    decoder steps, beam 5, 5 warm-up runs). Timed runs repeat until both `min_repeats` and
    `min_time_s` are reached."""

    runtime: Optional[str] = None  # onnxruntime | torchscript; None: each bundle's own
    device: str = "cpu"  # cpu | cuda
    threads: Optional[int] = None  # intra-op threads; None: the runtime's default (all cores)
    env: Tuple[Tuple[str, str], ...] = ()  # (name, value) pairs set before the runtime is imported
    cpu_affinity: Optional[Tuple[int, ...]] = None  # pin the process to these CPUs
    src_len: int = 30
    steps: int = 30
    beam: int = 5  # 1 = greedy
    warmup: int = 5  # at least this many warm-up runs, then until stable
    max_warmup: Optional[int] = None  # cap on warm-up runs; default max(3 * warmup, warmup + 10)
    min_repeats: int = 10
    min_time_s: float = 2.0
    max_repeats: int = 1000
    cooldown_s: float = 0.0  # sleep before each bundle (not before the first)
    ort_opt_level: str = "all"
    seed: int = 0  # source tokens of the measurement
    # Time the job's bundles in rotation (one run of each in turn) instead of one after another:
    # a machine whose speed drifts then slows all of them alike, and their ratios are measured
    # side by side. Results arrive together at the end of the job.
    interleave: bool = False
    # Host only (HOST_FIELDS). Vocabulary of the measured models (random weights): the output
    # projection and softmax cost grow with it; HAT's WMT'14 En-De models have about 32k.
    vocab_size: int = 32000
    quantize: Optional[str] = None  # None (fp32) | "int8": the measured bundles' precision
    timeout_s: float = 600.0  # per model, on the host's clock

    def identity(self) -> Dict[str, Any]:
        """The latency store's key (with device name and runtime): what a latency depends on.
        Repeats, warm-up, cool-down and timeouts only change how precisely it is measured."""
        out: Dict[str, Any] = {
            "batch": 1,
            "src_len": self.src_len,
            "steps": self.steps,
            "beam": self.beam,
            "threads": self.threads or 0,
            "device": self.device,
            "vocab_size": self.vocab_size,
        }
        if self.quantize:
            out["quantize"] = self.quantize
        if self.cpu_affinity is not None:
            out["cpu_affinity"] = list(self.cpu_affinity)
        return out

    def to_job(self) -> Dict[str, Any]:
        """The `settings` object of a job file: every runner field, JSON-ready."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in HOST_FIELDS}
        out["env"] = dict(self.env)
        out["cpu_affinity"] = list(self.cpu_affinity) if self.cpu_affinity is not None else None
        return out

    @property
    def env_dict(self) -> Dict[str, str]:
        return dict(self.env)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["env"] = dict(self.env)
        d["cpu_affinity"] = list(self.cpu_affinity) if self.cpu_affinity is not None else None
        return d

    def with_(self, **changes: Any) -> "MeasureSpec":
        """A copy with some fields changed, validated like a job's settings."""
        spec = replace(self, **changes)
        spec.validate(f"settings {sorted(changes)}")
        return spec

    def warmup_cap(self) -> int:
        return self.max_warmup if self.max_warmup is not None else max(3 * self.warmup, self.warmup + 10)

    @classmethod
    def from_job(cls, data: Any, where: str = "settings") -> Tuple["MeasureSpec", List[str]]:
        """Validated settings of a job file and the list of unknown keys (reported, not fatal)."""
        if not isinstance(data, dict):
            raise RunnerError(f"{where}: must be a JSON object")
        known = {f.name for f in fields(cls)} - set(HOST_FIELDS)
        unknown = sorted(k for k in data if k not in known)
        kw = {k: v for k, v in data.items() if k in known}
        if kw.get("env") is None:
            kw.pop("env", None)
        elif isinstance(kw["env"], dict):
            if not all(isinstance(k, str) for k in kw["env"]):
                raise RunnerError(f"{where}: field 'env' must map variable names to strings")
            kw["env"] = tuple(sorted((k, str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                                     for k, v in kw["env"].items()))
        aff = kw.get("cpu_affinity")
        if isinstance(aff, list):
            kw["cpu_affinity"] = tuple(aff)
        for k in ("min_time_s", "cooldown_s"):
            if _is_number(kw.get(k)):
                kw[k] = float(kw[k])
        spec = cls(**kw)
        spec.validate(where)
        return spec, unknown

    def validate(self, where: str) -> None:
        """Raise RunnerError (one line naming the field and what is allowed) on a bad value."""
        for k, lo in (("src_len", 1), ("steps", 1), ("beam", 1), ("warmup", 0), ("min_repeats", 1),
                      ("max_repeats", 1), ("seed", 0), ("threads", 1), ("max_warmup", 1), ("vocab_size", 8)):
            v = getattr(self, k)
            if v is None and k in ("threads", "max_warmup"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                what = "a positive integer" if lo else "an integer >= 0"
                raise RunnerError(f"{where}: field '{k}' must be {what}, got {v!r}")
        for k in ("min_time_s", "cooldown_s", "timeout_s"):
            v = getattr(self, k)
            if not _is_number(v) or not math.isfinite(v) or v < 0 or (k == "timeout_s" and v == 0):
                raise RunnerError(f"{where}: field '{k}' must be a finite number "
                                  f"{'> 0' if k == 'timeout_s' else '>= 0'}, got {v!r}")
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise RunnerError(f"{where}: field 'runtime' is {self.runtime!r}, allowed: {', '.join(RUNTIMES)}")
        if self.device not in DEVICES:
            raise RunnerError(f"{where}: field 'device' is {self.device!r}, allowed: {', '.join(DEVICES)}")
        if self.ort_opt_level not in ORT_OPT_LEVELS:
            raise RunnerError(f"{where}: field 'ort_opt_level' is {self.ort_opt_level!r}, "
                              f"allowed: {', '.join(ORT_OPT_LEVELS)}")
        if self.quantize not in QUANTIZE:
            raise RunnerError(f"{where}: field 'quantize' is {self.quantize!r}, allowed: none, int8")
        if not isinstance(self.env, tuple) or not all(
                isinstance(kv, tuple) and len(kv) == 2 and all(isinstance(x, str) for x in kv) for kv in self.env):
            raise RunnerError(f"{where}: field 'env' must map variable names to strings")
        if not isinstance(self.interleave, bool):
            raise RunnerError(f"{where}: field 'interleave' must be true or false, got {self.interleave!r}")
        aff = self.cpu_affinity
        if aff is not None and (not isinstance(aff, tuple) or not aff
                                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in aff)):
            raise RunnerError(f"{where}: field 'cpu_affinity' must be a non-empty list of CPU numbers")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------------
# job files
# ------------------------------------------------------------------------------------------------
def make_job(bundles: Sequence[Tuple[str, str]], spec: MeasureSpec) -> Dict[str, Any]:
    """A job object: `bundles` as (id, path on the device) pairs, measured with `spec`."""
    return {
        "format": JOB_FORMAT,
        "version": JOB_VERSION,
        "bundles": [{"id": bid, "path": path} for bid, path in bundles],
        "settings": spec.to_job(),
    }


def write_job(path: Union[str, Path], bundles: Sequence[Tuple[str, str]], spec: MeasureSpec) -> Path:
    """Write a job file (created 0600: its env may hold values a board's owner keeps private)."""
    p = Path(path)
    data = json.dumps(make_job(bundles, spec), indent=1).encode()
    fd = os.open(str(p), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return p


def read_job(path: Union[str, Path]) -> Tuple[List[dict], dict]:
    """(bundles, raw settings) of a job file, checked; RunnerError names the bad field."""
    p = Path(path)
    return parse_job(read_text(p, "no such job file"), str(p))


def parse_job(text: str, p: str) -> Tuple[List[dict], dict]:
    """(bundles, raw settings) of a job file's text, checked; RunnerError names the bad field."""
    try:
        job = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RunnerError(f"{p}: not a readable JSON job file ({e.__class__.__name__})") from None
    if not isinstance(job, dict) or job.get("format") != JOB_FORMAT:
        raise RunnerError(f"{p}: field 'format' must be '{JOB_FORMAT}'")
    if job.get("version") != JOB_VERSION:
        raise RunnerError(f"{p}: field 'version' is {job.get('version')!r}, this runner reads version {JOB_VERSION}")
    bundles = job.get("bundles")
    if not isinstance(bundles, list):
        raise RunnerError(f"{p}: field 'bundles' must be a list of {{\"id\", \"path\"}}")
    seen = set()
    for i, b in enumerate(bundles):
        if not isinstance(b, dict) or not isinstance(b.get("id"), str) or not isinstance(b.get("path"), str):
            raise RunnerError(f"{p}: bundles[{i}] needs string fields 'id' and 'path'")
        if b["id"] in seen:
            raise RunnerError(f"{p}: bundles[{i}] repeats id {b['id']!r}")
        seen.add(b["id"])
    settings = job.get("settings", {})
    if not isinstance(settings, dict):
        raise RunnerError(f"{p}: field 'settings' must be an object")
    return bundles, settings


def make_job_host(device: str, runtime: str, identity: Mapping[str, Any], owner: str,
                  archs: Mapping[str, Any]) -> Dict[str, Any]:
    """The host's note beside a job (`job-host.json`): the store key of its results and the arch
    (as a dict) each bundle id stands for, and who started it (`host:pid`)."""
    return {"format": JOB_HOST_FORMAT, "version": JOB_HOST_VERSION, "device": device, "runtime": runtime,
            "settings": dict(identity), "owner": owner, "archs": dict(archs)}


def read_job_host(data: Any, where: str) -> Dict[str, Any]:
    """A `job-host.json` object, checked (RunnerError names the field)."""
    if not isinstance(data, dict) or data.get("format") != JOB_HOST_FORMAT:
        raise RunnerError(f"{where}: field 'format' must be '{JOB_HOST_FORMAT}'")
    if data.get("version") != JOB_HOST_VERSION:
        raise RunnerError(f"{where}: field 'version' is {data.get('version')!r}, this hat-edge reads "
                          f"version {JOB_HOST_VERSION}")
    for key, typ in (("device", str), ("runtime", str), ("settings", dict), ("owner", str), ("archs", dict)):
        if not isinstance(data.get(key), typ):
            raise RunnerError(f"{where}: field '{key}' must be a {typ.__name__}")
    if data["runtime"] not in RUNTIMES:
        raise RunnerError(f"{where}: field 'runtime' is {data['runtime']!r}, allowed: {', '.join(RUNTIMES)}")
    if not all(isinstance(k, str) and isinstance(v, dict) for k, v in data["archs"].items()):
        raise RunnerError(f"{where}: field 'archs' must map bundle ids to arch objects")
    return data


def list_jobs(work_dir: str) -> List[Dict[str, Any]]:
    """Every job dir under `work_dir/jobs` (links skipped, never followed): its path, its host
    note as parsed JSON (None when missing or unreadable), its results file's text, and `age_s`:
    seconds since anything in it last changed."""
    root = os.path.join(work_dir, JOBS_DIR)
    out: List[Dict[str, Any]] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return out
    for e in entries:
        if not e.is_dir(follow_symlinks=False):
            continue
        note: Any = None
        try:
            note = json.loads(read_text(os.path.join(e.path, JOB_HOST_FILE)))
        except (RunnerError, ValueError, RecursionError):
            pass
        try:
            results = read_text(os.path.join(e.path, RESULTS_FILE))
        except RunnerError:
            results = ""
        mtimes = [e.stat(follow_symlinks=False).st_mtime]
        for f in os.scandir(e.path):
            mtimes.append(f.stat(follow_symlinks=False).st_mtime)
        out.append({"dir": e.path, "host": note, "results": results, "age_s": time.time() - max(mtimes)})
    return out


def apply_job_env(argv: Sequence[str]) -> None:
    """For `run JOB ...`, set the job's env before numpy or a runtime is imported (a job's
    OMP_NUM_THREADS and friends must reach every library at its import). The env travels in the
    0600 job file, never on a command line. A bad job is left to `run_job`, which reports it."""
    if len(argv) >= 2 and argv[0] == "run":
        try:
            spec, _ = MeasureSpec.from_job(read_job(argv[1])[1])
        except RunnerError:
            return
        os.environ.update(spec.env_dict)


# ------------------------------------------------------------------------------------------------
# result lines
# ------------------------------------------------------------------------------------------------
_RESULT_NUMBERS = ("median_ms", "mean_10_90_ms", "p90_ms", "iqr_ms", "cv")


def read_result(rec: Any, where: str) -> Dict[str, Any]:
    """A result line, checked: an error line `{"id", "error"}` or a measurement of this version
    whose statistics are finite numbers and whose runs are a non-empty list of timings."""
    if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
        raise RunnerError(f"{where}: a result line must be an object with a string 'id'")
    if "error" in rec:
        if not isinstance(rec["error"], str):
            raise RunnerError(f"{where}: result {rec['id']!r}: field 'error' must be a string")
        return rec
    if rec.get("version") != RESULT_VERSION:
        raise RunnerError(f"{where}: runner result version {rec.get('version')!r} is not supported "
                          f"(this hat-edge reads version {RESULT_VERSION}); the runner on the device is stale")
    for k in _RESULT_NUMBERS:
        v = rec.get(k)
        if not _is_number(v) or not math.isfinite(v) or v < 0:
            raise RunnerError(f"{where}: result {rec['id']!r}: field '{k}' must be a finite number >= 0")
    runs = rec.get("runs")
    ok = isinstance(runs, list) and bool(runs) and all(
        isinstance(r, dict) and all(_is_number(r.get(k)) and math.isfinite(r[k])
                                    for k in ("encoder_ms", "decode_ms", "total_ms")) for r in runs)
    if not ok:
        raise RunnerError(f"{where}: result {rec['id']!r}: field 'runs' must list timings "
                          "{encoder_ms, decode_ms, total_ms}")
    return rec


def parse_result_line(line: str, where: str) -> Optional[Dict[str, Any]]:
    """One line of a results file, checked (`read_result`); None for a blank line or one cut
    short by a crash (the runner writes each line at once, so only the last can be partial)."""
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return read_result(rec, where)


def parse_result_lines(text: str, where: str) -> List[Dict[str, Any]]:
    """Every whole, checked result line of a results file's text."""
    return [rec for rec in (parse_result_line(x, where) for x in text.splitlines()) if rec is not None]


def done_ids(out_path: Path) -> set:
    """Ids with a finished (non-error) result line in an existing results file."""
    ids: set = set()
    if not out_path.is_file():
        return ids
    for line in out_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line cut short by a crash
        if isinstance(rec, dict) and "error" not in rec and "id" in rec:
            ids.add(rec["id"])
    return ids


def result_settings(spec: MeasureSpec) -> Mapping[str, Any]:
    """The settings echoed in each result line: the job's settings without env values (names
    only: a profile's env may hold secrets, and results are stored)."""
    out = spec.to_job()
    out["env"] = sorted(name for name, _ in spec.env)
    return out
