"""The runner: what runs on a device. `python runner.pyz env|run|check|translate`.

The device has no hat_edge installed: `hat_edge.runtime.pack` ships this package as one zip file
(`runner-<sha256>.pyz`, a zipapp) that needs only the standard library, numpy and the runtime a
bundle uses. The host runs the same file for local profiles, and imports the same modules, so host
and device decode, check bundles and time models with the very same code.

    python runner.pyz env                            one JSON object describing this machine
    python runner.pyz run JOB.json --out RES.jsonl   measure every bundle of a job, one line each
    python runner.pyz translate BUNDLE --src "5 9 3" decode token ids with a bundle (parity checks)
    python runner.pyz check BUNDLE                   verify a bundle's manifest and hashes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

from .backends import Model, open_model, translate
from .bundle import read_manifest
from .envinfo import collect_env, get_throttled, installed_runtimes, temperature_c, throttled_during
from .errors import RunnerError
from .formats import RESULT_VERSION
from .job import MeasureSpec, done_ids, list_jobs, read_job, result_settings
from .lock import LOCK_FILE, BoardLock, lock_status
from .timing import _reset_peak_rss, measure, measure_interleaved, peak_rss_mb


def run_job(job_path: Union[str, Path], out_path: Union[str, Path], resume: bool = False,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
            lock: Optional[str] = None, wait: bool = True, owner: str = "") -> int:
    """Measure every bundle of a job; append one JSON line per bundle, flushed and fsynced at once.

    Returns the number of bundles that failed. A job-level problem raises RunnerError. `lock`:
    the board's lock file (`runtime.lock`), held from before the first model is loaded until the
    last result is written; `wait=False` fails at once when another runner holds it.
    """
    job_path = Path(job_path)
    bundles, raw = read_job(job_path)
    settings, unknown = MeasureSpec.from_job(raw, f"{job_path}: settings")
    if unknown:
        log(f"runner: ignoring unknown settings: {', '.join(unknown)}")
    os.environ.update(settings.env_dict)  # before any runtime import
    if settings.cpu_affinity is not None:
        try:
            os.sched_setaffinity(0, list(settings.cpu_affinity))  # type: ignore[attr-defined]
        except (AttributeError, OSError) as e:
            raise RunnerError(f"{job_path}: cannot pin to CPUs {settings.cpu_affinity} ({e})") from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = done_ids(out) if resume else set()
    board = None
    if lock:
        board = BoardLock(lock, job=str(job_path.parent), out=str(out), host=owner).acquire(wait=wait, on_wait=log)
    try:
        return _measure_all(job_path, bundles, settings, unknown, out, skip, log)
    finally:
        if board is not None:
            board.release()


def _measure_all(job_path: Path, bundles: List[dict], settings: MeasureSpec, unknown: List[str], out: Path,
                 skip: set, log: Callable[[str], None]) -> int:
    """The body of `run_job`, under the board lock."""
    env = collect_env()
    settings_out = result_settings(settings)
    failures = 0
    with open(out, "a") as f:

        def emit(rec: dict) -> None:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a board that reboots keeps every finished line

        def record(bid: str, model: Model, manifest: dict, res: dict, rss_scope: str, thr: tuple, temps: tuple,
                   window: tuple) -> dict:
            rec = {
                "version": RESULT_VERSION,
                "id": bid,
                "runtime": model.runtime,
                "precision": manifest.get("precision", "fp32"),
                "arch": manifest.get("arch"),
                "settings": settings_out,
                **res,
                "peak_rss_mb": peak_rss_mb(),
                "peak_rss_scope": rss_scope,
                "throttled": throttled_during(*thr),
                "throttle_bits": [hex(x) if x is not None else None for x in thr],
                "temperature_c": list(temps),
                "env": env,
                "ignored_settings": unknown,
                "timed_from": window[0],  # wall clock (epoch s) of the first and last timed run
                "timed_to": window[1],
            }
            if rec["cv"] > 0.1:
                log(f"runner: {bid}: CV {rec['cv']:.2f} is high; the machine may be busy")
            return rec

        def fail(i: int, bid: str, e: Exception) -> None:
            nonlocal failures
            failures += 1
            msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            if not isinstance(e, RunnerError):
                msg = f"{e.__class__.__name__}: {msg}"
            emit({"id": bid, "error": msg})
            log(f"runner: [{i + 1}/{len(bundles)}] {bid}: error: {msg}")

        def load(b: dict) -> Tuple[Model, dict]:
            path = Path(b["path"])
            if not path.is_absolute():
                path = (job_path.parent / path).resolve() if not path.exists() else path
            manifest = read_manifest(path)
            return open_model(path, settings.threads, settings.device, settings.runtime,
                              settings.ort_opt_level, manifest=manifest), manifest

        todo = [(i, b) for i, b in enumerate(bundles) if b["id"] not in skip]
        for i, b in enumerate(bundles):
            if b["id"] in skip:
                log(f"runner: [{i + 1}/{len(bundles)}] {b['id']}: already in {out}, skipped")

        if settings.interleave:
            opened = []
            for i, b in todo:
                try:
                    opened.append((i, b["id"], *load(b)))
                except Exception as e:  # one bad bundle must not stop the others
                    fail(i, b["id"], e)
            if opened:
                rss_scope = "process"  # all models are loaded together
                thr0, temp0 = get_throttled(), temperature_c()
                t0 = time.time()
                try:
                    results = measure_interleaved([m for _, _, m, _ in opened], settings)
                except Exception as e:
                    for i, bid, _, _ in opened:
                        fail(i, bid, e)
                    return failures
                thr1, temp1 = get_throttled(), temperature_c()
                t1 = time.time()
                for (i, bid, model, manifest), res in zip(opened, results):
                    emit(record(bid, model, manifest, res, rss_scope, (thr0, thr1), (temp0, temp1), (t0, t1)))
                    log(f"runner: [{i + 1}/{len(bundles)}] {bid}: median {res['median_ms']:.1f} ms "
                        f"({len(res['runs'])} runs in rotation with {len(opened) - 1} other(s))")
            return failures

        for n, (i, b) in enumerate(todo):
            bid = b["id"]
            if settings.cooldown_s > 0 and n > 0:
                time.sleep(settings.cooldown_s)
            try:
                model, manifest = load(b)
                rss_scope = "bundle" if _reset_peak_rss() else "process"
                thr0, temp0 = get_throttled(), temperature_c()
                t0 = time.time()
                res = measure(model, settings)
                t1 = time.time()
                thr1, temp1 = get_throttled(), temperature_c()
                emit(record(bid, model, manifest, res, rss_scope, (thr0, thr1), (temp0, temp1), (t0, t1)))
                log(f"runner: [{i + 1}/{len(bundles)}] {bid}: median {res['median_ms']:.1f} ms "
                    f"({len(res['runs'])} runs, {res['warmup']} warm-up)")
                del model
            except Exception as e:  # one bad bundle must not stop the batch
                fail(i, bid, e)
    return failures


HOST_GONE_EXIT = 3


def watch_host(stream=None, on_gone: Optional[Callable[[], None]] = None) -> threading.Thread:
    """Stop this process when `stream` (standard input) reaches EOF: the host holds its other end
    open while it waits for the results and never writes to it, so EOF means the host is gone
    (killed, even with -9: the kernel closes its end) or the link to it dropped. Every result line
    finished so far is already on disk (fsynced); the board lock is an flock and goes with the
    process. A daemon thread blocks on the read, so it costs nothing while the host lives."""
    src = stream if stream is not None else sys.stdin.buffer

    def gone() -> None:
        print("runner: the host went away (its pipe closed): stopping; finished results are kept",
              file=sys.stderr, flush=True)
        os._exit(HOST_GONE_EXIT)

    def watch() -> None:
        try:
            while src.read(1):
                pass  # the host never writes; ignore anything that arrives
        except (OSError, ValueError):
            pass
        (on_gone or gone)()

    t = threading.Thread(target=watch, name="watch-host", daemon=True)
    t.start()
    return t


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="runner.pyz", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="print one JSON object describing this machine")
    r = sub.add_parser("run", help="measure the bundles of a job file")
    r.add_argument("job")
    r.add_argument("--out", required=True, help="results file (JSON lines, appended)")
    r.add_argument("--resume", action="store_true", help="skip ids already measured in --out")
    r.add_argument("--lock", default=None, help="the board's lock file: one runner times at a time")
    r.add_argument("--no-wait", action="store_true", help="with --lock: fail at once if another runner holds it")
    r.add_argument("--owner", default="", help="the host that started this runner (recorded in the lock)")
    r.add_argument("--watch-host", action="store_true",
                   help="stop when standard input closes: the host keeps it open while it waits (a local "
                        "pipe, or the SSH channel), so a host killed with -9, or a dropped link, leaves no "
                        "runner timing")
    ls = sub.add_parser("lock-status", help="print whether a live runner holds a board lock, and who (JSON)")
    ls.add_argument("lock")
    lj = sub.add_parser("list-jobs", help="the board's lock status, its job dirs with their results, and which "
                                          "runtimes this python has (JSON)")
    lj.add_argument("work_dir")
    t = sub.add_parser("translate", help="decode token ids with a bundle, print JSON")
    t.add_argument("bundle")
    t.add_argument("--src", action="append", required=True, help="space-separated ids (repeatable)")
    t.add_argument("--beam", type=int, default=5)
    t.add_argument("--max-len", type=int, default=None)
    t.add_argument("--threads", type=int, default=None)
    c = sub.add_parser("check", help="verify a bundle's manifest and hashes, print JSON")
    c.add_argument("bundle")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "env":
            print(json.dumps(collect_env()))
            return 0
        if args.cmd == "run":
            if args.watch_host:
                watch_host()
            failures = run_job(args.job, args.out, resume=args.resume, lock=args.lock, wait=not args.no_wait,
                               owner=args.owner)
            return 1 if failures else 0
        if args.cmd == "list-jobs":
            print(json.dumps({"lock": lock_status(os.path.join(args.work_dir, LOCK_FILE)),
                              "jobs": list_jobs(args.work_dir), "runtimes": installed_runtimes()}))
            return 0
        if args.cmd == "lock-status":
            print(json.dumps(lock_status(args.lock)))
            return 0
        if args.cmd == "check":
            m = read_manifest(args.bundle)
            print(json.dumps({"ok": True, "runtime": m["runtime"], "files": sorted(m["files"])}))
            return 0
        if args.cmd == "translate":
            model = open_model(args.bundle, threads=args.threads)
            try:
                srcs = [[int(x) for x in s.split()] for s in args.src]
            except ValueError:
                raise RunnerError("--src takes space-separated integer token ids") from None
            out = translate(model, srcs, beam=args.beam, max_len=args.max_len)
            print(json.dumps({"tokens": out}))
            return 0
    except RunnerError as e:
        print(f"runner: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
