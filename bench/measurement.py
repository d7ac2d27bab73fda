"""How good and how fast is hat-edge's latency measurement? Three numbers, on this machine.

(a) stability: the same 5 demo archs measured in 3 separate runs (a fresh runner process each):
    the CV of timed runs within a run, and the spread of each arch's median across runs,
    (max - min) / mean. Target: spread <= 3%.
(b) SSH vs local: the same archs measured over SSH on loopback, runs interleaved with (a) (a real sshd started here, the
    "board" a virtualenv with only numpy + onnxruntime) against the local runs: the ratio of
    medians (target within 3%) and the per-model overhead of the SSH path in wall time, uploads
    included (target <= 10% of the local time per model).
(c) throughput: new demo archs measured per minute at HAT's settings, export included.

This shared VM's speed drifts (10-17% within three minutes, seen with the same model timed in a
loop), so (a) and (b) are also given drift-corrected: each run times the 5 archs side by side with
3 reference archs (not among the 5), and divides by how much slower the references ran than in the
first local run (`hat-edge measure --side-by-side` and the loop's anchors do the same). Raw and
corrected figures are both printed.

Settings are the `local-cpu` profile's (HAT's: 30 source tokens, 30 decoder steps, beam 5, 5
warm-up runs; 1 thread; >= 10 timed runs and >= 2 s per model), unless --quick.

    .venv/bin/python bench/measurement.py            # ~4 minutes on 2 cores
    .venv/bin/python bench/measurement.py --quick    # fewer repeats, for a smoke test

Writes bench/results/measurement.json and prints a table.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the loopback sshd and board venv of the device tests
from _results import write_json  # noqa: E402  (bench/, the script's own folder)

from hat_edge.devices.measure import export_for_measurement, measure_archs  # noqa: E402
from hat_edge.devices.profiles import load_profile, profile_from_dict  # noqa: E402
from hat_edge.latency.store import LatencyStore  # noqa: E402
from hat_edge.space import PRESETS  # noqa: E402

RESULT_FORMAT = "hat-edge-bench-measurement"
RESULT_VERSION = 1


def demo_archs(n: int = 5):
    space = PRESETS["demo"]
    return [space.smallest(), space.largest(), *space.sample_n(n - 2, seed=1)]


def reference_archs(exclude, n: int = 3):
    """Archs to time beside the measured ones, their drift corrects the runs: spread over sizes
    (FLOPs quantiles of a sample), since an arch drifts most like archs of its own size."""
    space = PRESETS["demo"]
    pool = sorted((a for a in space.sample_n(40, seed=7) if a not in exclude), key=lambda a: a.flops())
    return [pool[round((k + 0.5) * len(pool) / n)] for k in range(n)]


def timed_measure(profile, archs, cache: Path, interleave: bool = False):
    t0 = time.perf_counter()
    recs = measure_archs(profile, archs, LatencyStore(":memory:"), progress=False, cache_dir=cache,
                         keep_exports=True, batch_size=len(archs), interleave=interleave)
    wall = time.perf_counter() - t0
    if len(recs) != len(archs):
        raise SystemExit(f"{profile.name}: only {len(recs)} of {len(archs)} archs measured")
    return recs, wall


def model_time_s(recs) -> float:
    """Seconds the runner spent running the models (warm-up and timed runs): the rest of a job's
    wall time is transport, start-up and export, what the SSH overhead is about."""
    return sum(sum(r.total_runs_ms) + float(r.env.get("measurement", {}).get("warmup_total_ms", 0.0))
               for r in recs) / 1e3


def loadavg() -> float | None:
    """1-minute load average: on a shared machine, the first thing to read next to the numbers."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="separate runs for (a)")
    ap.add_argument("--throughput-n", type=int, default=8, help="new archs measured for (c)")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the profile's")
    ap.add_argument("--no-ssh", action="store_true", help="skip (b)")
    ap.add_argument("--no-side-by-side", dest="side_by_side", action="store_false",
                    help="skip (a'): the same archs timed in rotation in each run")
    ap.add_argument("--quick", action="store_true", help="min_repeats 5, min_time_s 0.5, warm-up 2")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "measurement.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    base = load_profile("local-cpu")
    meas = base.measurement
    if args.quick:
        meas = replace(meas, min_repeats=5, min_time_s=0.5, warmup=2)
    if args.vocab_size:
        meas = replace(meas, vocab_size=args.vocab_size)
    work = Path(tempfile.mkdtemp(prefix="hat-edge-bench-"))
    local = replace(base, measurement=meas, work_dir=str(work / "local-work"))
    archs = demo_archs()
    refs = reference_archs(archs)
    cache = work / "cache"
    t0 = time.perf_counter()
    for a in [*archs, *refs]:
        export_for_measurement(a, local, cache)
    export_s = (time.perf_counter() - t0) / len(archs)
    print(f"exported {len(archs)} demo archs ({export_s:.1f} s each); settings {local.measure_spec().to_job()}",
          file=sys.stderr)

    # (a) stability, and (b) SSH runs interleaved with the local ones (L S L S L S): load on a
    # shared machine drifts, and interleaving lets the drift hit both sides alike.
    server = remote = None
    if not args.no_ssh:
        from ssh_fixtures import SSHServer, board_venv, keygen

        key = keygen(work / "id_ed25519")
        server = SSHServer(work / "sshd", Path(f"{key}.pub")).start()
        known = work / "known_hosts"
        known.write_text(server.known_hosts_line())
        remote = profile_from_dict({
            "name": "loopback", "transport": "ssh", "host": "127.0.0.1", "port": server.port,
            "identity_file": str(key), "known_hosts": str(known), "python": str(board_venv()),
            "work_dir": str(work / "board-work"), "runtime": local.runtime, "threads": local.threads,
        }, "<bench>")
        remote = replace(remote, measurement=meas)
    medians: list[list[float]] = []
    side_medians: list[list[float]] = []
    cvs: list[list[float]] = []
    walls: list[float] = []
    model_s: list[float] = []
    ssh_model_s: list[float] = []
    ssh_medians: list[list[float]] = []
    ssh_walls: list[float] = []
    ssh_side_medians: list[list[float]] = []
    local_refs: list[list[float]] = []  # the references' medians in each local side-by-side run
    ssh_refs: list[list[float]] = []
    loads: list[float | None] = [loadavg()]

    def side_run(profile, label: str, i: int, meds: list, ref_meds: list) -> None:
        """The archs and the references timed side by side, one runner job."""
        recs, _ = timed_measure(profile, [*archs, *refs], cache, interleave=True)
        meds.append([r.median_ms for r in recs[: len(archs)]])
        ref_meds.append([r.median_ms for r in recs[len(archs):]])
        print(f"{label} side-by-side run {i + 1}: medians {[round(m, 1) for m in meds[-1]]}, "
              f"references {[round(m, 1) for m in ref_meds[-1]]}", file=sys.stderr)

    try:
        for i in range(args.runs):
            recs, wall = timed_measure(local, archs, cache)
            medians.append([r.median_ms for r in recs])
            cvs.append([r.cv for r in recs])
            walls.append(wall)
            model_s.append(model_time_s(recs))
            loads.append(loadavg())
            print(f"local run {i + 1}: {wall:.1f} s, medians {[round(m, 1) for m in medians[-1]]}, "
                  f"load {loads[-1]}", file=sys.stderr)
            if args.side_by_side:
                side_run(local, "local", i, side_medians, local_refs)
            if remote is not None:
                recs, wall = timed_measure(remote, archs, cache)
                ssh_medians.append([r.median_ms for r in recs])
                ssh_walls.append(wall)
                ssh_model_s.append(model_time_s(recs))
                loads.append(loadavg())
                print(f"ssh run {i + 1}: {wall:.1f} s, medians {[round(m, 1) for m in ssh_medians[-1]]}, "
                      f"load {loads[-1]}", file=sys.stderr)
                if args.side_by_side:
                    side_run(remote, "ssh", i, ssh_side_medians, ssh_refs)
    finally:
        if server is not None:
            server.stop()
    per_arch = []
    for j, a in enumerate(archs):
        ms = [run[j] for run in medians]
        per_arch.append({
            "arch": a.describe(),
            "medians_ms": ms,
            "spread": (max(ms) - min(ms)) / statistics.mean(ms),
            "cv_within_run": statistics.median(run[j] for run in cvs),
        })
    stability = {
        "runs": args.runs,
        "per_arch": per_arch,
        "median_cv_within_run": statistics.median(c for run in cvs for c in run),
        "max_spread_across_runs": max(p["spread"] for p in per_arch),
        "median_spread_across_runs": statistics.median(p["spread"] for p in per_arch),
        "wall_s": walls,
        "load_average_1m": loads,
    }
    def rel_spread(runs: list[list[float]]) -> dict:
        """Spread across runs of each arch's median, and of its median relative to the run's
        geometric mean (what ranking, predictor fits and speed-up ratios depend on)."""
        rel = [[m / math.exp(statistics.mean(math.log(x) for x in run)) for m in run] for run in runs]
        sp = lambda vals: (max(vals) - min(vals)) / statistics.mean(vals)  # noqa: E731
        n = len(runs[0])
        return {
            "medians_ms": runs,
            "spread_of_medians": [sp([r[j] for r in runs]) for j in range(n)],
            "spread_of_relative": [sp([r[j] for r in rel]) for j in range(n)],
        }

    def drift(ref_now: list[float]) -> float:
        """How much slower the references ran than in the first local side-by-side run (geometric
        mean over the references)."""
        return math.exp(statistics.mean(math.log(n / b) for n, b in zip(ref_now, local_refs[0])))

    side = None
    if side_medians:
        side = {"runs": len(side_medians), **rel_spread(side_medians)}
        stability["spread_of_relative_sequential"] = rel_spread(medians)["spread_of_relative"]
        drifts = [drift(r) for r in local_refs]
        corrected = [[m / d for m in run] for run, d in zip(side_medians, drifts)]
        side["references"] = [a.describe() for a in refs]
        side["reference_medians_ms"] = local_refs
        side["drift"] = drifts
        side["corrected_medians_ms"] = corrected
        side["spread_of_corrected"] = rel_spread(corrected)["spread_of_medians"]
    ssh = None
    if remote is not None:
        local_med = [statistics.median(run[j] for run in medians) for j in range(len(archs))]
        ssh_med = [statistics.median(run[j] for run in ssh_medians) for j in range(len(archs))]
        ratios = [s_ / l_ for s_, l_ in zip(ssh_med, local_med)]
        local_wall, ssh_wall = statistics.median(walls), statistics.median(ssh_walls)
        ssh = {
            "runs": args.runs,
            "medians_ms": ssh_medians,
            "ratio_ssh_over_local": ratios,
            "max_abs_ratio_deviation": max(abs(x - 1) for x in ratios),
            "wall_s": ssh_walls,
            "local_wall_s": walls,
            "overhead_s_per_model": (ssh_wall - local_wall) / len(archs),
            "overhead_fraction_of_local": (ssh_wall - local_wall) / local_wall,
            "board_python": remote.python,
            # The same overhead without the timing noise: wall minus the time spent running the
            # models (warm-up until stable varies from run to run; the device's speed drifts).
            "model_s": ssh_model_s,
            "local_model_s": model_s,
            "non_model_overhead_s_per_model": statistics.median(
                (sw - sm) - (lw - lm) for sw, sm, lw, lm in zip(ssh_walls, ssh_model_s, walls, model_s)) / len(archs),
        }
        ssh["non_model_overhead_fraction_of_local"] = ssh["non_model_overhead_s_per_model"] * len(archs) / local_wall
        if ssh_side_medians and local_refs:
            # Each side's run corrected by its own references against the first local run: the two
            # paths are compared on one scale although they ran minutes apart on a drifting machine.
            loc = [[m / drift(r) for m in run] for run, r in zip(side_medians, local_refs)]
            rem = [[m / drift(r) for m in run] for run, r in zip(ssh_side_medians, ssh_refs)]
            cr = [statistics.median(rem[i][j] / loc[i][j] for i in range(len(rem))) for j in range(len(archs))]
            ssh["side_by_side"] = {
                "medians_ms": ssh_side_medians,
                "reference_medians_ms": ssh_refs,
                "drift": [drift(r) for r in ssh_refs],
                "raw_ratio_ssh_over_local": [
                    statistics.median(ssh_side_medians[i][j] / side_medians[i][j] for i in range(len(rem)))
                    for j in range(len(archs))],
                "corrected_ratio_ssh_over_local": cr,
                "max_abs_corrected_ratio_deviation": max(abs(x - 1) for x in cr),
            }

    # (c) throughput, export included
    space = PRESETS["demo"]
    new = [a for a in space.sample_n(args.throughput_n + len(archs), seed=123) if a not in archs][: args.throughput_n]
    t0 = time.perf_counter()
    recs = measure_archs(local, new, LatencyStore(":memory:"), progress=False, cache_dir=work / "cache-c")
    wall = time.perf_counter() - t0
    throughput = {
        "archs": len(recs),
        "wall_s": wall,
        "archs_per_minute": 60 * len(recs) / wall,
        "export_s_per_arch": export_s,
        "median_latency_ms": statistics.median(r.median_ms for r in recs),
    }

    result = {
        "format": RESULT_FORMAT,
        "version": RESULT_VERSION,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu": recs[0].env.get("cpu_model") if recs else None, "cores": recs[0].env.get("cores") if recs else None},
        "settings": local.measure_spec().to_job() | {"vocab_size": meas.vocab_size},
        "quick": args.quick,
        "stability": stability,
        "ssh": ssh,
        "side_by_side": side,
        "throughput": throughput,
    }
    out = write_json(args.out, result)

    known = [x for x in loads if x is not None]
    if known:
        print(f"\nload average (1 min) during the runs: {min(known):.1f} - {max(known):.1f} on {result['machine']['cores']} cores")
    print(f"\n(a) stability, {args.runs} runs of {len(archs)} demo archs "
          f"(src {meas.src_len}, steps {meas.steps}, beam {meas.beam}, vocab {meas.vocab_size}, 1 thread)")
    print(f"  {'arch':78s} {'medians ms':>24s} {'spread':>7s} {'CV':>6s}")
    for p in per_arch:
        print(f"  {p['arch'][:78]:78s} {' / '.join(f'{m:.1f}' for m in p['medians_ms']):>24s} "
              f"{pct(p['spread']):>7s} {pct(p['cv_within_run']):>6s}")
    print(f"  median CV within a run {pct(stability['median_cv_within_run'])}; spread of medians across runs: "
          f"median {pct(stability['median_spread_across_runs'])}, max {pct(stability['max_spread_across_runs'])} "
          "(target <= 3%)")
    if side:
        seq_rel = stability["spread_of_relative_sequential"]
        print(f"(a') the same archs timed side by side (in rotation, one runner process), {side['runs']} runs:")
        print(f"  spread of medians across runs: median {pct(statistics.median(side['spread_of_medians']))}, "
              f"max {pct(max(side['spread_of_medians']))}")
        print(f"  spread of each arch's median relative to its run (ratios): side by side median "
              f"{pct(statistics.median(side['spread_of_relative']))}, max {pct(max(side['spread_of_relative']))}; "
              f"one after another median {pct(statistics.median(seq_rel))}, max {pct(max(seq_rel))}")
        print(f"  drift-corrected by {len(refs)} reference archs timed beside them (drift per run: "
              f"{', '.join(f'{d:.3f}' for d in side['drift'])}): spread of medians across runs median "
              f"{pct(statistics.median(side['spread_of_corrected']))}, max {pct(max(side['spread_of_corrected']))} "
              "(target <= 3%)")
    if ssh:
        print(f"(b) SSH on loopback vs local, {args.runs} runs each, interleaved (medians of the runs' medians)")
        print(f"  ratio of medians ssh/local: {', '.join(f'{r:.3f}' for r in ssh['ratio_ssh_over_local'])} "
              f"(max deviation {pct(ssh['max_abs_ratio_deviation'])}, target <= 3%)")
        print(f"  wall (median run): ssh {statistics.median(ssh['wall_s']):.1f} s vs local "
              f"{statistics.median(ssh['local_wall_s']):.1f} s for {len(archs)} models: "
              f"overhead {ssh['overhead_s_per_model']:.2f} s per model = {pct(ssh['overhead_fraction_of_local'])} "
              "of the local time (target <= 10%)")
        print(f"  the same without the models' own time (wall minus warm-up and timed runs, paired runs): overhead "
              f"{ssh['non_model_overhead_s_per_model']:.2f} s per model = {pct(ssh['non_model_overhead_fraction_of_local'])} "
              "of the local time")
        sb = ssh.get("side_by_side")
        if sb:
            print(f"  side by side with the references, each path's run corrected by its own references' drift: "
                  f"ratio ssh/local {', '.join(f'{r:.3f}' for r in sb['corrected_ratio_ssh_over_local'])} "
                  f"(max deviation {pct(sb['max_abs_corrected_ratio_deviation'])}, target <= 3%); raw "
                  f"{', '.join(f'{r:.3f}' for r in sb['raw_ratio_ssh_over_local'])}")
    print(f"(c) throughput: {throughput['archs']} new demo archs in {wall:.1f} s = "
          f"{throughput['archs_per_minute']:.1f} archs/minute (export {export_s:.1f} s of each)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
