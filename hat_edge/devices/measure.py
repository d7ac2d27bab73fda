"""Measure SubTransformers on a device and keep every result in the latency store.

    measure_archs(profile, archs, store)   # -> list[LatencyRecord], one per arch (stored or new)

For each arch not yet stored: export it with random weights (latency does not depend on weight
values) into a local cache, push the bundles to the device (local: used in place), and run the
runner on a batch of them over one connection. The runner appends one JSON line per model to a
results file on the device; the host reads that file as it grows and commits each model to the
store at once, so a killed process or a dropped link loses at most the model in flight. After a
dropped link the host reconnects with exponential backoff, recovers the lines written meanwhile,
kills the orphaned runner, and goes on with the rest. Running the same command again skips every
stored model.

Nothing else runs on the device while it measures: uploads happen before a batch starts, and the
clean-up (bundles, job files) after it ends; only a small SFTP read of the results file per second.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hat_edge.latency.drift import drift_factor
from hat_edge.devices.profiles import DeviceProfile
from hat_edge.devices.transport import (
    ConnectionLost,
    HostKeyError,
    Transport,
    TransportError,
    open_transport,
    python_missing,
)
from hat_edge.errors import UserError
from hat_edge.latency.store import LatencyRecord, LatencyStore, utc_now
from hat_edge.runtime import pack
from hat_edge.runtime.errors import RunnerError
from hat_edge.runtime.formats import (
    FORMAT_OF_RUNTIME,
    JOB_FILE,
    JOB_HOST_FILE,
    JOBS_DIR,
    MANIFEST,
    RESULTS_FILE,
    RUNNER_LOG,
)
from hat_edge.runtime.job import (
    MeasureSpec,
    make_job,
    make_job_host,
    parse_result_line,
    parse_result_lines,
    read_job_host,
    read_result,
)
from hat_edge.runtime.lock import LOCK_FILE, describe
from hat_edge.space import Arch

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
_EXPORT_LOCK = threading.Lock()  # torch export keeps global state: one export at a time per process


class MeasureCancelled(UserError):
    """Measurement stopped on request (Ctrl-C); everything committed so far stays stored."""


class ExportCacheError(UserError):
    """The local cache of exported bundles could not be written (names the directory)."""


@dataclass(frozen=True)
class MeasureError:
    """A model the runner could not measure (its error line), or that timed out."""

    device: str
    arch: Arch
    error: str


def default_cache_dir() -> Path:
    """Local cache of exported bundles: $HAT_EDGE_CACHE/bundles, else ~/.cache/hat-edge/bundles."""
    root = os.environ.get("HAT_EDGE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "hat-edge") / "bundles"


def bundle_key(arch: Arch, profile: DeviceProfile, quantize: str | None = None) -> str:
    """Cache key of an exported bundle: what changes the exported files."""
    text = json.dumps(
        [arch.to_json(), FORMAT_OF_RUNTIME[profile.runtime], quantize, profile.measurement.vocab_size, "weightless"],
        sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def export_for_measurement(
    arch: Arch, profile: DeviceProfile, cache_dir: Path, quantize: str | None = None, seed: int = 0
) -> Path:
    """Export `arch` with random weights into `cache_dir/<key>`, reusing a finished export. The
    caller holds a use of the returned dir (`_release(path, delete)` when done with it): other
    processes sharing the cache neither see it half-written nor delete it meanwhile.

    ONNX goes through torch's TorchScript-based exporter: about 10x faster than the dynamo one
    (1-2 s instead of 13-17 s per demo model on one core) for graphs that time the same on
    onnxruntime (demo largest: 127-133 ms vs 128 ms). The parity check is skipped: random weights
    have no reference to agree with beyond what the exporter's own tests cover. ONNX bundles are
    made weightless while they are exported (`export_bundle(weightless_seed=)`, as
    `make_weightless` would make them): the graphs travel, the device writes random weights
    (demo smallest at a 32k vocabulary: 0.2 MB instead of 80 MB; the same latency measured
    side by side, 85.1 vs 85.1 ms).
    """
    # torch and onnx only here, where a model is exported: a device check (`profile check`) or a
    # command that measures nothing new starts without them (~3 s of imports on 2 cores)
    from hat_edge.exporters import export_bundle
    from hat_edge.model import SubTransformer

    key = bundle_key(arch, profile, quantize)
    final = cache_dir / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        # Held before it is used: another process cannot delete it meanwhile (and if it did just
        # before, the manifest is gone and it is exported again).
        if (final / MANIFEST).is_file() and _acquire(final):
            if (final / MANIFEST).is_file():
                return final
            _release(final, delete=False)
        fmt = FORMAT_OF_RUNTIME[profile.runtime]
        # ONNX: ship the graphs only, the device writes random weights of the same sizes itself
        extra = {**MEASURE_EXPORT_KW, "weightless_seed": seed if fmt == "onnx" else None}
        with _EXPORT_LOCK:
            if (final / MANIFEST).is_file():  # another device's worker exported it meanwhile
                continue
            # Export beside it and rename into place: another process exporting the same arch
            # never sees (or uses, or removes) a half-written directory.
            tmp = cache_dir / f".partial-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                sub = SubTransformer.random(arch, profile.measurement.vocab_size, seed=seed)
                out = export_bundle(sub, tmp, fmt=fmt, quantize=quantize, **extra)
                _move_into_place(Path(out), final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    raise ExportCacheError(f"{final}: the export kept disappearing (another process removing the cache?)")


def _move_into_place(src: Path, final: Path) -> None:
    """Rename a finished export to its cache name; when another process got there first, its
    finished copy is kept (same key, same files). A manifest-less leftover of an old crash is
    replaced."""
    for _ in range(2):
        try:
            os.rename(src, final)
            return
        except OSError as e:
            if (final / MANIFEST).is_file():
                return
            if final.is_symlink() or not final.is_dir():
                raise ExportCacheError(f"{final}: in the way of an export ({e.strerror}); it is not a directory "
                                       f"hat-edge made: remove it") from None
            shutil.rmtree(final, ignore_errors=True)
    raise ExportCacheError(f"{final}: could not move the finished export {src.name} there (a leftover directory "
                           f"that cannot be removed? delete it by hand)")


# Export directories in use by a worker of this process: several devices measuring the same archs
# share one cache, and a directory is deleted only when no worker needs it any more.
_IN_USE: dict[Path, int] = {}
_IN_USE_LOCK = threading.Lock()


_LOCK_FDS: dict[Path, int] = {}


def _open_dir(path: Path) -> int | None:
    """A descriptor of the export dir itself, for flock (no lock files to leave behind)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None


def _acquire(path: Path) -> bool:
    """Count a use of an export dir; the first use in this process also takes a shared flock on
    the dir, so a process that finished with it does not delete it under another. False when the
    dir is gone."""
    with _IN_USE_LOCK:
        n = _IN_USE.get(path, 0)
        if n == 0:
            fd = _open_dir(path)
            if fd is None:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
            _LOCK_FDS[path] = fd
        _IN_USE[path] = n + 1
        return True


def _release(path: Path, delete: bool) -> None:
    """Undo one `_acquire`; with `delete`, the last user anywhere removes the dir (when another
    process still holds it, that process's last user removes it, or `device clean` does)."""
    with _IN_USE_LOCK:
        n = _IN_USE.get(path, 0) - 1
        if n > 0:
            _IN_USE[path] = n
            return
        _IN_USE.pop(path, None)
        fd = _LOCK_FDS.pop(path, None)
        if fd is None:
            return
        try:
            if delete:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # in use by another process
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def remove_export_if_unused(path: Path) -> bool:
    """Remove an export dir unless a process (this one included) is using it; True when removed."""
    with _IN_USE_LOCK:
        if path in _IN_USE:
            return False
        fd = _open_dir(path)
        if fd is None:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            shutil.rmtree(path, ignore_errors=True)  # a real dir: links in it are unlinked, not followed
            return not os.path.lexists(path)
        finally:
            os.close(fd)


class KeptExports:
    """The exports a job keeps while it runs, for the archs it times again: the anchors re-timed
    beside each round's candidates, the winner and the largest side by side at the end. Pass
    `keep_exports=True` to the measure calls meanwhile; `close()` then removes the exports that
    appeared in the cache since this object was made and that no process is using (one made
    before, e.g. by `measure --keep-exports`, stays). On the demo a `hat-edge run` re-timed 8
    archs whose exports it had deleted, at about 1.5 s of export each."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._before = self._names()

    def _names(self) -> set[str]:
        """The finished exports in the cache: directories named by a `bundle_key` (no links)."""
        try:
            entries = list(os.scandir(self.cache_dir))
        except OSError:
            return set()
        return {e.name for e in entries if _KEY_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)}

    def close(self) -> int:
        """Remove the exports made since; returns how many were removed."""
        return sum(remove_export_if_unused(self.cache_dir / n) for n in sorted(self._names() - self._before))


_KEY_RE = re.compile(r"[0-9a-f]{20}")  # bundle_key's form


# Options of export_bundle for measurement bundles (see export_for_measurement).
MEASURE_EXPORT_KW: dict[str, Any] = {"exporter": "torchscript", "parity_check": False}


# --------------------------------------------------------------------------------------------
# Runner on the device
# --------------------------------------------------------------------------------------------
def runner_remote_path(t: Transport) -> str:
    """The runner zipapp's path on the device (`runtime.pack`): named by its hash, so hosts with
    different hat-edge versions can share a board without overwriting each other's runner.
    Local profiles run the cached build in place."""
    local = pack.build_runner()
    return str(local) if t.is_local else t.join(t.work_dir, local.name)


def push_runner(t: Transport) -> str:
    path = runner_remote_path(t)
    if not t.is_local:
        t.push(pack.build_runner(), path)
    return path


def last_json_line(text: str, what: str) -> dict[str, Any]:
    """The last line of a runner's output that starts with "{", as a JSON object (else a
    TransportError quoting the output's end)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except (ValueError, RecursionError):
                break
            if isinstance(doc, dict):
                return doc
            break
    raise TransportError(f"{what}: no JSON in the runner's output: {text.strip()[-300:]!r}")


def device_env(profile: DeviceProfile, trust_new_host: bool = False, timeout: float = 120.0,
               retries: int = 3) -> dict[str, Any]:
    """Connect and describe the device (`runner.pyz env`): OS, CPU, cores, memory, python, runtime
    versions, governor, Raspberry Pi temperature and throttling. `retries`: connection attempts
    after the first (0: an unreachable device fails within the profile's connect_timeout_s)."""
    with open_transport(profile, trust_new_host=trust_new_host, retries=retries) as t:
        runner = push_runner(t)
        res = t.run([t.python, runner, "env"], timeout=timeout, env=profile.env_dict)
        python_missing(res, t)
        if res.returncode != 0:
            tail = " | ".join(res.stderr.strip().splitlines()[-3:])
            raise TransportError(f"{profile.name}: `{t.python} {Path(runner).name} env` failed (exit {res.returncode}): "
                                 f"{tail or 'no output'}; is numpy installed for {t.python}? {VENV_HINT}")
        env = last_json_line(res.stdout, f"{profile.name}: runner env")
        env.setdefault("profile", profile.name)
        env.setdefault("transport", profile.transport)
        if not t.is_local:
            env.setdefault("host", t.target.display)  # type: ignore[attr-defined]
        env.setdefault("work_dir", t.work_dir)
        return env


def owner_tag() -> str:
    """Who starts a runner: `host:pid` of this process (recorded in the board lock and job notes)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def runner_argv(t: Transport, job_path: str, out_path: str, wait: bool = True) -> list[str]:
    """`python runner.pyz run JOB --out RESULTS` holding the board lock (one runner at a time)."""
    argv = [t.python, runner_remote_path(t), "run", job_path, "--out", out_path,
            "--lock", t.work_path(LOCK_FILE), "--owner", owner_tag(), "--watch-host"]
    return argv if wait else [*argv, "--no-wait"]


def write_job_files(t: Transport, job: Mapping[str, Any],
                    note: Mapping[str, Any] | None = None) -> tuple[str, str, str]:
    """A fresh job dir under the work dir with its job file (0600: its env may hold private
    values) and, when given, the host's note (`job-host.json`: what its results are, so a later
    command can store them if this one dies); returns (job dir, job file, results file)."""
    job_dir = t.work_path(JOBS_DIR, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    t.makedirs(job_dir)
    job_path, out_path = t.join(job_dir, JOB_FILE), t.join(job_dir, RESULTS_FILE)
    if note is not None:
        t.write_bytes(t.join(job_dir, JOB_HOST_FILE), json.dumps(note).encode(), private=True)
    t.write_bytes(job_path, (json.dumps(job, indent=1) + "\n").encode(), private=True)
    return job_dir, job_path, out_path


def run_one_job(t: Transport, bundles: Sequence[tuple[str, str]], spec: MeasureSpec,
                what: str) -> list[dict[str, Any]]:
    """Run one runner job on an open transport and wait for it (deploy's benchmark): write the
    job, run the runner, return its checked result lines; the job dir is removed in every case."""
    job_dir, job_path, out_path = write_job_files(t, make_job(bundles, spec))
    try:
        res = t.run(runner_argv(t, job_path, out_path), timeout=spec.timeout_s * len(bundles))
        text = t.read_from(out_path).decode("utf-8", "replace")
    finally:
        t.remove(job_dir)
    try:
        lines = parse_result_lines(text, what)
    except RunnerError as e:
        raise UserError(str(e)) from None
    if not lines and res.returncode != 0:
        tail = " | ".join(res.stderr.strip().splitlines()[-3:]) or "no output"
        raise TransportError(f"{what}: the runner failed (exit {res.returncode}): {tail}")
    return lines


# --------------------------------------------------------------------------------------------
# Jobs left behind: adopted, never measured twice, never run beside
# --------------------------------------------------------------------------------------------
ORPHAN_AGE_S = 120.0  # a job of another host's command, with no runner, untouched this long: its host is gone
_ADOPTED: set[tuple[str, str]] = set()  # (profile, work dir) adopted in this process already


VENV_HINT = ("On the board (Pi OS bookworm refuses a plain pip install): `python3 -m venv ~/hat-venv && "
             "~/hat-venv/bin/pip install numpy onnxruntime`, then set the profile's field 'python' to "
             "~/hat-venv/bin/python (its full path)")
_RUNTIME_HINT = {
    "onnxruntime": "install it there (`pip install onnxruntime` in the board's venv)",
    "torchscript": "install torch there, or set the profile's field 'runtime' to \"onnxruntime\"",
}


def require_runtime(profile: DeviceProfile, installed: bool | None, python: str) -> None:
    """Fail before anything is exported or sent when the device's python lacks the profile's
    runtime (None: unknown, let the runner say)."""
    if installed is False:
        where = f"on the device '{profile.name}'" if not profile.is_local else "on this machine"
        raise UserError(f"{profile.name}: the profile's runtime '{profile.runtime}' is not installed for {python} "
                        f"{where}: {_RUNTIME_HINT[profile.runtime]}; nothing was exported or sent")


def _owner_alive(owner: Any) -> bool:
    """Is the command that started a job (`host:pid`) still running? Known only on this host;
    elsewhere it is presumed alive (never take a live command's job)."""
    host, _, pid = str(owner).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def board_state(t: Transport, runner: str, what: str) -> dict[str, Any]:
    """The board as the runner sees it (`runner.pyz list-jobs`): {"lock": {"held", "holder"},
    "jobs": [...], "runtimes": {...}}. The one way the host reads the board lock and the jobs."""
    res = t.run([t.python, runner, "list-jobs", t.work_dir], timeout=DEFAULT_LIST_TIMEOUT_S)
    if res.returncode != 0:
        tail = " | ".join(res.stderr.strip().splitlines()[-3:])
        raise TransportError(f"{what}: listing jobs failed (exit {res.returncode}): {tail or 'no output'}")
    return last_json_line(res.stdout, what)


DEFAULT_LIST_TIMEOUT_S = 120.0


def lock_of(state: dict[str, Any]) -> dict[str, Any]:
    """{"held": bool, "holder": dict | None} from a `board_state` (anything else: not held)."""
    lock = state.get("lock") if isinstance(state.get("lock"), dict) else {}
    holder = lock.get("holder") if lock.get("held") and isinstance(lock.get("holder"), dict) else None
    return {"held": holder is not None, "holder": holder}


def adopt_orphans(t: Transport, store: LatencyStore, say: Callable[[str], None] | None = None,
                  stop: bool = False, poll_s: float = 1.0, no_wait: bool = False) -> int:
    """Jobs a dead command left on the board (kill -9, a closed lid, a lost link): a runner still
    timing one is waited for (or, with `stop`, stopped), the results it finished are stored under
    the job's own device, runtime and settings (its `job-host.json`), and its job dir is removed.
    A live command's job is left alone (its runner holds the lock; ours will wait for it), or with
    `no_wait` it is a one-line error naming it, before anything is exported or sent.
    Starts no runner. Returns the number of records stored."""
    name = t.profile.name
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    runner = push_runner(t)
    data = board_state(t, runner, f"{name}: adopting left-over jobs")
    runtimes = data.get("runtimes") if isinstance(data.get("runtimes"), dict) else {}
    require_runtime(t.profile, runtimes.get(t.profile.runtime), t.python)
    said = False
    while True:
        holder = lock_of(data)["holder"]
        if holder is None:
            break
        if _owner_alive(holder.get("host")):
            if no_wait:
                raise UserError(f"{name}: the board is busy: {describe(holder)} holds "
                                f"{t.work_path(LOCK_FILE)}; wait for it, or stop it")
            break
        if stop and isinstance(holder.get("pid"), int):
            say(f"{name}: stopping the orphaned {describe(holder)}")
            t.kill_stale(holder["pid"], str(holder.get("out") or RESULTS_FILE))
        elif not said:
            say(f"{name}: waiting for the orphaned {describe(holder)} to finish; its results will be stored")
            said = True
        time.sleep(poll_s)
        data = board_state(t, runner, f"{name}: adopting left-over jobs")
    live = holder.get("job") if holder else None
    stored = 0
    for job in data.get("jobs") or []:
        where = f"{name}: {job.get('dir')}/{JOB_HOST_FILE}"
        if not isinstance(job, dict) or job.get("dir") == live or job.get("host") is None:
            continue  # running for a live command, or not ours to read (older hat-edge): `device clean`
        try:
            note = read_job_host(job["host"], where)
        except RunnerError as e:
            log.warning("%s; left in place", e)
            continue
        host_of_owner = note["owner"].rpartition(":")[0]
        if _owner_alive(note["owner"]) and (host_of_owner == socket.gethostname()
                                            or float(job.get("age_s") or 0.0) < ORPHAN_AGE_S):
            continue
        lines = parse_result_lines(str(job.get("results") or ""), where)
        for res in lines:
            arch_d = note["archs"].get(res["id"])
            if "error" in res or arch_d is None:
                continue
            arch = Arch.from_dict(arch_d, where)
            stored += store.add(_record(note["device"], note["runtime"], arch, res, note["settings"]))
        say(f"{name}: stored {stored} result(s) a stopped command left in {job['dir']}")
        t.remove(str(job["dir"]))
    return stored


def _adopt(profile: DeviceProfile, store: LatencyStore, kw: Mapping[str, Any]) -> int:
    """`adopt_once` into a real store (a scratch `:memory:` store is not where results belong)."""
    if str(store.path) == ":memory:":
        return 0
    n = adopt_once(profile, store, bool(kw.get("trust_new_host", False)), no_wait=bool(kw.get("no_wait", False)))
    if n and kw.get("on_adopt") is not None:
        kw["on_adopt"](n)
    return n


def adopt_once(profile: DeviceProfile, store: LatencyStore, trust_new_host: bool = False,
               say: Callable[[str], None] | None = None, no_wait: bool = False) -> int:
    """`adopt_orphans` once per profile and work dir in this process (before its first measurement).
    A device where the runner cannot even list its jobs (no numpy, a wrong python) is left to the
    measurement, which says why in one line; the board lock still keeps runners apart."""
    key = (profile.name, profile.resolved_work_dir)
    if key in _ADOPTED:
        return 0
    with open_transport(profile, trust_new_host=trust_new_host) as t:
        try:
            n = adopt_orphans(t, store, say, no_wait=no_wait)
        except (ConnectionLost, HostKeyError):
            raise
        except TransportError as e:
            log.warning("%s; left-over jobs not adopted", e)
            return 0
    _ADOPTED.add(key)
    return n


# --------------------------------------------------------------------------------------------
# One device: batches over one connection each
# --------------------------------------------------------------------------------------------
@dataclass
class _Item:
    arch: Arch
    id: str
    local_dir: Path | None = None
    remote_dir: str | None = None


def record_from_result(profile: DeviceProfile, arch: Arch, res: Mapping[str, Any],
                       settings: Mapping[str, Any]) -> LatencyRecord:
    """A runner result line (docs/CONTRACTS.md, checked by `runtime.job.read_result`) as a LatencyRecord."""
    return _record(profile.name, profile.runtime, arch, res, settings)


def _record(device: str, runtime: str, arch: Arch, res: Mapping[str, Any], settings: Mapping[str, Any]) -> LatencyRecord:
    try:
        res = read_result(res, device)
    except RunnerError as e:
        raise UserError(str(e)) from None
    if "error" in res:
        raise UserError(f"{device}: result {res['id']!r} is an error line: {res['error']}")
    env = dict(res.get("env") or {})
    env["measurement"] = {
        k: res.get(k) for k in ("warmup", "warmup_stable", "timing", "peak_rss_mb", "throttled", "temperature_c",
                                "settings", "timed_from", "timed_to") if k in res
    }
    if isinstance(res.get("warmup_ms"), list):  # time spent running the model before the timed runs
        env["measurement"]["warmup_total_ms"] = float(sum(float(x) for x in res["warmup_ms"]))
    return LatencyRecord(
        device=device, arch=arch, features=tuple(arch.features()), runtime=runtime,
        settings=dict(settings), median_ms=float(res["median_ms"]), mean_10_90_ms=float(res["mean_10_90_ms"]),
        p90_ms=float(res["p90_ms"]), iqr_ms=float(res["iqr_ms"]), cv=float(res["cv"]),
        runs=tuple(res["runs"]), encoder_ms=_opt(res.get("encoder_median_ms")),
        decoder_ms=_opt(res.get("decoder_median_ms")), env=env, created_at=utc_now(),
    )


def _manifest_hashes(bundle_dir: Path) -> dict[Path, str]:
    """sha256 of a bundle's files as its manifest lists them (computed by the exporter)."""
    try:
        files = json.loads((bundle_dir / "manifest.json").read_text()).get("files", {})
    except (OSError, ValueError, RecursionError, AttributeError):
        return {}
    return {bundle_dir / name: e["sha256"] for name, e in files.items()
            if isinstance(e, dict) and isinstance(e.get("sha256"), str)}


def _opt(x: Any) -> float | None:
    return None if x is None else float(x)


@dataclass
class _DeviceWorker:
    """Measures one profile's archs; see the module doc for the protocol."""

    p: DeviceProfile
    store: LatencyStore
    trust_new_host: bool
    batch_size: int
    cache_dir: Path
    keep_exports: bool
    quantize: str | None
    seed: int
    reconnect_tries: int
    backoff_s: float
    poll_s: float
    bar: Any
    on_record: Callable[[LatencyRecord], None] | None
    on_error: Callable[[MeasureError], None] | None
    cancel: threading.Event = field(default_factory=threading.Event)
    no_wait: bool = False  # another runner holds the board: fail at once instead of waiting
    interleave: bool = False  # time the whole batch in rotation (measure_archs(interleave=True))
    done: dict[str, LatencyRecord] = field(default_factory=dict, init=False)
    errors: list[MeasureError] = field(default_factory=list, init=False)
    # After a dropped link: (results path, runner pid, bytes already read, runner marker).
    _stale: tuple[str, int | None, int, str] | None = field(default=None, init=False)
    _job_dirs: list[str] = field(default_factory=list, init=False)  # device job dirs to remove after the batch

    def __post_init__(self) -> None:
        self.batch_size = max(1, self.batch_size)
        self.spec: MeasureSpec = self.p.measure_spec(self.quantize)
        self.settings = self.spec.identity()

    # ---- the whole list ----
    def run(self, archs: Sequence[Arch]) -> None:
        pending = [_Item(a, f"m{i:05d}-{bundle_key(a, self.p, self.quantize)[:10]}") for i, a in enumerate(archs)]
        try:
            while pending:
                if self.cancel.is_set():
                    raise MeasureCancelled(f"{self.p.name}: cancelled; stored models are kept")
                batch = pending[: self.batch_size]
                self._export(batch)
                finished = self._run_batch(batch)
                pending = [it for it in pending if it.id not in finished]
        finally:
            # Stopped by an error or Ctrl-C: the exports of unfinished models stay in the cache
            # (a rerun uses them) but are no longer held by this process, so `device clean` and
            # other processes may remove them.
            for it in pending:
                if it.local_dir is not None:
                    _release(it.local_dir, delete=False)
                    it.local_dir = None

    def _export(self, batch: list[_Item]) -> None:
        for it in batch:
            if self.bar is not None:
                self.bar.set_postfix_str("exporting", refresh=True)
            if it.local_dir is None:
                it.local_dir = export_for_measurement(it.arch, self.p, self.cache_dir, self.quantize, self.seed)
        if self.bar is not None:
            self.bar.set_postfix_str("measuring", refresh=True)

    # ---- one batch ----
    def _run_batch(self, batch: list[_Item]) -> set[str]:
        """Measure a batch; returns the ids finished (stored or failed). Survives dropped links."""
        finished: set[str] = set()
        stale: tuple[str, int | None, int, str] | None = None
        drops = 0
        delay = self.backoff_s
        while True:
            try:
                with open_transport(self.p, trust_new_host=self.trust_new_host,
                                    retries=self.reconnect_tries, backoff_s=self.backoff_s) as t:
                    try:
                        if stale is not None:
                            self._recover(t, batch, finished, stale)
                            stale = None
                        todo = [it for it in batch if it.id not in finished]
                        if todo:
                            self._measure_on(t, todo, finished)
                    except ConnectionLost:
                        raise
                    except BaseException:  # a user error or Ctrl-C: still leave the device tidy
                        try:
                            self._cleanup(t, batch, finished)
                        except Exception:  # the original error matters more
                            pass
                        raise
                    self._cleanup(t, batch, finished)
                    return finished
            except ConnectionLost as e:
                drops += 1
                if drops > self.reconnect_tries:
                    raise ConnectionLost(
                        f"{e}; {self.store.count(self.p.name)} models of '{self.p.name}' are stored in "
                        f"{self.store.path}: run the same command again to resume"
                    ) from None
                msg = f"{self.p.name}: {e}; reconnecting in {delay:.1f} s"
                log.warning(msg)
                if self.bar is not None:
                    self.bar.write(msg, file=sys.stderr)
                time.sleep(delay)
                delay *= 2
                if self._stale is not None:
                    stale, self._stale = self._stale, None

    def _measure_on(self, t: Transport, todo: list[_Item], finished: set[str]) -> None:
        """Push what the batch needs, run the runner, store results as they appear."""
        runner = runner_remote_path(t)
        if t.is_local:
            for it in todo:
                it.remote_dir = str(it.local_dir)
        else:
            # The runner and the bundles in one push: one hash command on the device, not two.
            pairs: list[tuple[Path, str]] = [(pack.build_runner(), runner)]
            known: dict[Path, str] = {}
            for it in todo:
                local_dir: Path = it.local_dir  # type: ignore[assignment]
                it.remote_dir = t.work_path("bundles", local_dir.name)
                hashes = _manifest_hashes(local_dir)
                # The bundle's own files only: not weights the runner generated here for a local
                # measurement of the same export (the device writes its own).
                pairs += [(f, t.join(it.remote_dir, *f.relative_to(local_dir).parts))
                          for f in sorted(local_dir.rglob("*"))
                          if f.is_file() and (f in hashes or f.name == "manifest.json")]
                known.update(hashes)
            # A second hashing pass on the device for the runner only (when it was sent): the runner
            # checks every bundle file against the manifest's sha256 before it measures, so a
            # damaged bundle upload is that model's error.
            t.push_many(pairs, known_sha256=known, verify={runner})
        job = make_job([(it.id, str(it.remote_dir)) for it in todo], self.spec.with_(interleave=self.interleave))
        note = make_job_host(self.p.name, self.p.runtime, self.settings, owner_tag(),
                             {it.id: it.arch.to_dict() for it in todo})
        job_dir, job_path, out_path = write_job_files(t, job, note)
        self._job_dirs.append(job_dir)
        # The profile's env travels in the 0600 job file (the runner applies it before importing
        # anything), not on the device's command line.
        env: dict[str, str] = {}
        if self.p.device == "cpu" and self.p.runtime == "onnxruntime":
            env["HAT_EDGE_ENV_NO_TORCH"] = "1"  # the runner's env probe need not import torch
        log_path = t.join(job_dir, RUNNER_LOG)
        proc = t.spawn(runner_argv(t, job_path, out_path, wait=not self.no_wait), env=env, log_path=log_path)
        by_id = {it.id: it for it in todo}
        offset, buf = 0, b""
        log_offset = 0
        last = time.monotonic()
        # In rotation every result arrives at the end: the per-model silence limit covers them all.
        timeout = self.spec.timeout_s * (len(todo) if self.interleave else 1)
        next_read = 0.0
        try:
            while True:
                rc = proc.poll()  # before reading: every line written before exit is then seen
                # Read the results at most every poll_s (each read wakes the device's SFTP server
                # while it measures), and once more at exit.
                if rc is not None or time.monotonic() >= next_read:
                    next_read = time.monotonic() + self.poll_s
                    data = t.read_from(out_path, offset)
                    offset += len(data)
                    buf += data
                    lines, _, buf = buf.rpartition(b"\n")
                    if lines:
                        self._handle_lines(lines.decode("utf-8", "replace"), by_id, finished)
                        last = time.monotonic()
                    elif offset == 0:  # nothing yet: the runner may be waiting for the board
                        said = t.read_from(log_path, log_offset)
                        log_offset += len(said)
                        for msg in said.decode("utf-8", "replace").splitlines():
                            if "board busy" in msg:
                                self._say(f"{self.p.name}: {msg.removeprefix('runner: ')}")
                                last = time.monotonic()  # waiting for the board is not a stuck model
                if rc is not None:
                    break
                if self.cancel.is_set():  # Ctrl-C in the main thread: stop the runner, tidy up
                    proc.kill()
                    raise MeasureCancelled(f"{self.p.name}: cancelled; stored models are kept")
                if time.monotonic() - last > timeout:
                    proc.kill()
                    stuck = next(it for it in todo if it.id not in finished)
                    self._fail(stuck, f"timed out after {timeout:g} s (measurement.timeout_s) and was killed")
                    finished.add(stuck.id)
                    return
                wait = max(0.0, min(next_read - time.monotonic(), self.poll_s))
                if hasattr(proc, "wait_io"):
                    proc.wait_io(wait)  # wakes early when the runner exits
                else:
                    time.sleep(min(wait, 0.25))
        except ConnectionLost:
            # Remember where we were: after reconnecting, read what the runner wrote meanwhile
            # and stop the orphan before measuring the rest.
            self._stale = (out_path, proc.pid, offset - len(buf), proc.marker)  # from the last whole line
            raise
        except BaseException:  # Ctrl-C, SIGTERM/SIGHUP (as KeyboardInterrupt), any error: stop the runner
            proc.kill()
            raise
        unfinished = [it for it in todo if it.id not in finished]
        if unfinished:
            err = t.read_from(log_path).decode("utf-8", "replace")
            tail = " | ".join(err.strip().splitlines()[-3:]) or "no output"
            if offset == 0 and rc != 0 and "the board is busy" in tail:  # --no-wait
                raise UserError(f"{self.p.name}: {tail.rpartition('runner: error: ')[2]}")
            if offset == 0 and rc != 0:  # not one line: the runner itself cannot run there
                raise TransportError(
                    f"{self.p.name}: the runner failed before measuring anything (exit {rc}): {tail}; "
                    f"check the device with `hat-edge profile check {self.p.name}`"
                )
            for it in unfinished:
                self._fail(it, f"runner exited with status {rc} before this model: {tail}")
                finished.add(it.id)

    def _recover(self, t: Transport, batch: list[_Item], finished: set[str], stale: tuple) -> None:
        out_path, pid, offset, marker = stale
        if pid is not None:
            t.kill_stale(pid, marker)  # the runner may still be going on the device: stop it first
        data = t.read_from(out_path, offset)
        lines, _, _ = data.rpartition(b"\n")
        if lines:
            self._handle_lines(lines.decode("utf-8", "replace"), {it.id: it for it in batch}, finished)

    def _handle_lines(self, text: str, by_id: Mapping[str, _Item], finished: set[str]) -> None:
        for line in text.splitlines():
            try:
                res = parse_result_line(line, self.p.name)
            except RunnerError as e:
                log.warning("%s: ignoring a malformed result line (%s): %.200s", self.p.name, e, line)
                continue
            if res is None:
                continue
            it = by_id.get(res.get("id"))
            if it is None or it.id in finished:
                continue
            finished.add(it.id)
            if "error" in res:
                self._fail(it, str(res["error"]))
                continue
            rec = record_from_result(self.p, it.arch, res, self.settings)
            self.store.add(rec)  # committed now: a crash after this line loses nothing
            self.done[it.arch.to_json()] = rec
            if self.bar is not None:
                self.bar.update(1)
            if self.on_record is not None:
                self.on_record(rec)

    def _say(self, msg: str) -> None:
        log.info(msg)
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _fail(self, it: _Item, error: str) -> None:
        err = MeasureError(self.p.name, it.arch, error)
        self.errors.append(err)
        msg = f"{self.p.name}: {it.arch.describe()}: {error}"
        if self.bar is not None:  # one channel: the bar's line, else the log (never both)
            self.bar.write(f"error: {msg}", file=sys.stderr)
            self.bar.update(1)
        else:
            log.warning(msg)
        if self.on_error is not None:
            self.on_error(err)

    def _cleanup(self, t: Transport, batch: list[_Item], finished: set[str]) -> None:
        """After the batch: remove job files and the device copies of finished models, and the
        local exports of stored ones (a failed one keeps its export for the rerun)."""
        stored = [it for it in batch if it.id in finished and it.arch.to_json() in self.done]
        stored_ids = {it.id for it in stored}
        paths = list(self._job_dirs)
        if not t.is_local:  # failed ones too: the device keeps nothing (the local export stays)
            paths += [it.remote_dir for it in batch if it.id in finished and it.remote_dir]
        t.remove(*paths)
        self._job_dirs.clear()
        for it in batch:
            if it.id in finished and it.local_dir is not None:
                _release(it.local_dir, delete=it.id in stored_ids and not self.keep_exports)
                it.local_dir = None


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
def measure_archs(
    profile: DeviceProfile,
    archs: Sequence[Arch],
    store: LatencyStore,
    progress: bool = True,
    *,
    trust_new_host: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: str | Path | None = None,
    keep_exports: bool = False,
    quantize: str | None = None,
    seed: int = 0,
    reconnect_tries: int = 4,
    backoff_s: float = 1.0,
    poll_s: float = 1.0,
    position: int = 0,
    cancel: threading.Event | None = None,
    on_record: Callable[[LatencyRecord], None] | None = None,
    on_error: Callable[[MeasureError], None] | None = None,
    interleave: bool = False,
    no_wait: bool = False,
    on_adopt: Callable[[int], None] | None = None,
) -> list[LatencyRecord]:
    """Measure each arch not yet stored for this device and settings; return a record per arch
    (stored or new), in input order. `interleave`: all of them in one batch, timed in rotation
    (side by side: their ratios survive a drifting device; results arrive at the end). Archs that failed are missing from the list (each failure is
    reported on stderr and to `on_error`); a lost device raises ConnectionLost after retrying.

    Exports are cached in `cache_dir` (default `default_cache_dir()`) and deleted once stored,
    unless `keep_exports`. `on_record` is called after each commit (in the worker's thread).

    One runner per board: before its first measurement on a board, a process stores what a dead
    command's runner finished there (`adopt_orphans`, waiting for one still timing); its own
    runner then waits for the board lock, or with `no_wait` fails at once naming the holder.
    """
    settings = profile.measure_spec(quantize).identity()
    unique = list(dict.fromkeys(archs))

    def split() -> tuple[dict[str, LatencyRecord], list[Arch]]:
        have: dict[str, LatencyRecord] = {}
        todo: list[Arch] = []
        for a in unique:
            rec = store.get(profile.name, a, profile.runtime, settings)
            if rec is None:
                todo.append(a)
            else:
                have[a.to_json()] = rec
        return have, todo

    have, todo = split()
    if todo and _adopt(profile, store, {"trust_new_host": trust_new_host, "on_adopt": on_adopt, "no_wait": no_wait}):
        have, todo = split()
    bar = None
    if todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=profile.name, unit="model", position=position, file=sys.stderr,
                   disable=not progress, dynamic_ncols=True, leave=True)
        if have:
            bar.write(f"{profile.name}: {len(have)} of {len(unique)} already stored, measuring {len(todo)}",
                      file=sys.stderr)
    worker = _DeviceWorker(
        profile, store, trust_new_host=trust_new_host, batch_size=max(len(todo), 1) if interleave else batch_size,
        cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(), keep_exports=keep_exports,
        quantize=quantize, seed=seed,
        reconnect_tries=reconnect_tries, backoff_s=backoff_s, poll_s=poll_s, bar=bar,
        on_record=on_record, on_error=on_error, cancel=cancel or threading.Event(), interleave=interleave,
        no_wait=no_wait,
    )
    try:
        if todo:
            worker.run(todo)
    finally:
        if bar is not None:
            bar.close()
    have.update(worker.done)
    return [have[a.to_json()] for a in unique if a.to_json() in have]


def measure_anchored(
    profile: DeviceProfile,
    archs: Sequence[Arch],
    store: LatencyStore,
    anchors: Mapping[Arch, float],
    progress: bool = True,
    **kw: Any,
) -> tuple[list[LatencyRecord], float]:
    """Measure the archs not yet stored side by side with `anchors` (archs measured before, value:
    their latency on the scale to keep), all timed in rotation in one runner process. The
    anchors' median ratio now / before is the device's drift since (a shared host's neighbours, a
    clock change); each new record keeps its raw runs and stores that factor in its env
    (`drift_factor`, `anchors`): `LatencyRecord.corrected_ms` is on the anchors' scale. The
    anchors' re-timing is not stored. Returns (a record per arch, stored or new, in input order;
    the drift factor, 1.0 when nothing was measured). `kw` goes to `measure_archs`."""
    from dataclasses import replace as _replace

    settings = profile.measure_spec(kw.get("quantize")).identity()
    unique = list(dict.fromkeys(archs))
    have = {a: store.get(profile.name, a, profile.runtime, settings) for a in unique}
    if any(r is None for r in have.values()) and _adopt(profile, store, kw):
        have = {a: store.get(profile.name, a, profile.runtime, settings) for a in unique}
    todo = [a for a in unique if have[a] is None]
    new = set(todo)
    anchors = {a: float(v) for a, v in anchors.items() if a not in new and v > 0}
    if not todo:
        return [r for r in have.values() if r is not None], 1.0
    if not anchors:
        return measure_archs(profile, unique, store, progress, interleave=True, **kw), 1.0
    recs = measure_archs(profile, [*todo, *anchors], LatencyStore(":memory:"), progress, interleave=True, **kw)
    got = {r.arch: r for r in recs if r.arch is not None}
    drift = drift_factor((got[a].median_ms, v) for a, v in anchors.items() if a in got)
    note = {"drift_factor": drift,
            "anchors": [[a.to_json(), v, got[a].median_ms] for a, v in anchors.items() if a in got]}
    for a in todo:
        if a in got:
            rec = _replace(got[a], env={**dict(got[a].env), **note})
            store.add(rec)
            have[a] = rec
    return [r for r in (have[a] for a in unique) if r is not None], drift


def measure_side_by_side(
    profile: DeviceProfile,
    archs: Sequence[Arch],
    store: LatencyStore,
    progress: bool = True,
    *,
    group: int = 12,
    anchors: int = 2,
    **kw: Any,
) -> list[LatencyRecord]:
    """Measure archs side by side, so that their ratios survive a device whose speed drifts
    (this project's shared 2-core VM: 10-17% within three minutes; two models timed in rotation
    kept their ratio within 3%). At most `group` models are open at once (a board's memory); every
    group is anchored (`measure_anchored`) to `anchors` archs already stored for this device and
    settings (spread over their latencies), or, in an empty store, to the first group. Each
    group is committed when it finishes: a crash loses at most the group in flight. Returns a
    record per arch (stored or new), in input order; read `corrected_ms`."""
    if group < anchors + 1:
        raise UserError(f"--group must be at least {anchors + 1} (the {anchors} anchors and one arch), got {group}")
    settings = profile.measure_spec(kw.get("quantize")).identity()
    unique = list(dict.fromkeys(archs))
    todo = [a for a in unique if not store.has(profile.name, a, profile.runtime, settings)]
    if todo and _adopt(profile, store, kw):
        todo = [a for a in unique if not store.has(profile.name, a, profile.runtime, settings)]
    stored = [r for r in store.records(device=profile.name, runtime=profile.runtime, settings=settings)
              if r.arch is not None]

    def pick(recs: Sequence[LatencyRecord]) -> dict[Arch, float]:
        """Anchors spread over the stored latencies (the 1/3 and 2/3 quantiles for two): a batch
        spans the space, and an anchor drifts most like archs of its own size."""
        if not recs or anchors == 0:
            return {}
        by = sorted(recs, key=lambda r: r.corrected_ms)
        idx = sorted({(k + 1) * len(by) // (anchors + 1) for k in range(anchors)})
        return {by[i].arch: by[i].corrected_ms for i in idx}

    ref = pick(stored)
    # One bar for all the groups (a group's results arrive together when its rotation ends).
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"{profile.name} side by side", unit="model", file=sys.stderr,
               disable=not progress or not todo, dynamic_ncols=True, leave=True,
               position=kw.get("position", 0))
    if todo and len(todo) < len(unique):
        bar.write(f"{profile.name}: {len(unique) - len(todo)} of {len(unique)} already stored, measuring {len(todo)}",
                  file=sys.stderr)
    i = 0
    try:
        while i < len(todo):
            step = group - len(ref) if ref else group
            part = todo[i:i + step]
            bar.set_postfix_str(f"group of {len(part) + len(ref)} in rotation", refresh=True)
            recs, drift = measure_anchored(profile, part, store, ref, False, **kw)
            bar.update(len(part))
            if ref:
                bar.set_postfix_str(f"drift {drift:.3f}", refresh=True)
            else:
                ref = pick(recs)  # the first group, in an empty store
            i += step
    finally:
        bar.close()
    return [r for r in (store.get(profile.name, a, profile.runtime, settings) for a in unique) if r is not None]


def measure_many(
    profiles: Sequence[DeviceProfile],
    archs: Sequence[Arch],
    store: LatencyStore,
    progress: bool = True,
    *,
    side_by_side: bool = False,
    group: int = 12,
    **kw: Any,
) -> dict[str, list[LatencyRecord]]:
    """Measure the same archs on several devices at once: one worker thread per device, each
    with its own connection and progress bar. A device that fails does not stop the others; the
    first failure is raised once all are done. `side_by_side`: `measure_side_by_side` in groups
    of `group` per device, else `measure_archs` one model after another."""
    if side_by_side:
        fn: Callable[..., list[LatencyRecord]] = measure_side_by_side
        kw = {**kw, "group": group}
    else:
        fn = measure_archs
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise UserError(f"profile names must differ, got {', '.join(names)}")
    if sum(p.is_local for p in profiles) > 1:
        log.warning("several local profiles measured at once share this machine's CPU: timings interfere")
    if len(profiles) == 1:  # no thread: Ctrl-C reaches the measurement directly
        return {profiles[0].name: fn(profiles[0], archs, store, progress, **kw)}
    results: dict[str, list[LatencyRecord]] = {}
    errors: list[BaseException] = []
    cancel = threading.Event()
    with ThreadPoolExecutor(max_workers=len(profiles), thread_name_prefix="measure") as ex:
        futs = {p.name: ex.submit(fn, p, archs, store, progress, position=i, cancel=cancel, **kw)
                for i, p in enumerate(profiles)}
        try:
            while not all(f.done() for f in futs.values()):
                time.sleep(0.2)  # the main thread stays interruptible
        except KeyboardInterrupt:
            cancel.set()  # each worker kills its runner and tidies its device, then stops
            for f in futs.values():
                try:
                    f.result()
                except BaseException:  # the interrupt is what the user wants to see
                    pass
            raise
        for name, fut in futs.items():
            try:
                results[name] = fut.result()
            except BaseException as e:  # collect; re-raised below after every device finished
                errors.append(e)
    if errors:
        raise errors[0]
    return results


__all__ = [
    "ExportCacheError",
    "KeptExports",
    "MeasureCancelled",
    "MeasureError",
    "board_state",
    "last_json_line",
    "bundle_key",
    "device_env",
    "export_for_measurement",
    "remove_export_if_unused",
    "lock_of",
    "measure_anchored",
    "measure_archs",
    "measure_many",
    "measure_side_by_side",
    "record_from_result",
]
