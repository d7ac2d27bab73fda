"""How well does hat-edge's search work, and what does it cost? On this machine, local CPU.

(a) search cost: wall time and fitness evaluations of the evolution (the CPU-sized settings, and
    HAT's 125 x 30 with --full), and the time per fitness evaluation (validation loss).
(b) the loop: for a few budgets (percentiles of the measured range), the rounds needed until the
    winner's measured latency is within the budget, and the winner's predicted vs measured latency.
(c) evolution vs random search at an equal number of fitness evaluations, same budget and same
    latency model, over several seeds: best validation loss found (lower is better).

The demo SuperTransformer, the demo space and the `local-cpu` profile (measurement settings as
the profile's, unless --quick). All measurements go to a store in a temporary directory
(--store to keep them).

    .venv/bin/python bench/search.py            # ~10 minutes on 2 cores
    .venv/bin/python bench/search.py --quick    # a smoke test

Writes bench/results/search.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _results import write_json  # noqa: E402  (bench/, the script's own folder)

import torch  # noqa: E402

from hat_edge.search.evolution import (  # noqa: E402
    CachedFitness,
    Constraints,
    EvolutionSettings,
    evolution_search,
    random_search,
)
from hat_edge.search.loop import (  # noqa: E402
    LoopSettings,
    budget_from_measurements,
    fit_predictor,
    latency_fn,
    measure_initial,
    run_loop,
)

RESULT_FORMAT = "hat-edge-bench-search"
RESULT_VERSION = 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="demo")
    ap.add_argument("--profile", default="local-cpu")
    ap.add_argument("--initial", type=int, default=30, help="initial latency dataset size")
    ap.add_argument("--percentiles", default="25,40,60", help="budgets, as percentiles of the measured range")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the evolution-vs-random comparison")
    ap.add_argument("--valid-sentences", type=int, default=100)
    ap.add_argument("--full", action="store_true", help="also time HAT's full 125 x 30 evolution")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and seeds: a smoke test")
    ap.add_argument("--store", default=None, help="latency store (default: a temporary one)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "search.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    from hat_edge.app.job import prepare_job

    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="hat-edge-bench-search-"))
    # torch's threads: set to 1 above (threads=None leaves them)
    job = prepare_job(args.profile, args.checkpoint, store=args.store or tmp / "latency.sqlite", threads=None,
                      min_time_s=0.5 if args.quick else None, min_repeats=5 if args.quick else None)
    profile, env, space, dev = job.profile, job.env, job.space, job.device
    small = EvolutionSettings.small()
    seeds = 1 if args.quick else args.seeds
    pcts = [float(x) for x in args.percentiles.split(",")]
    if args.quick:
        pcts = pcts[:2]

    # The initial latency dataset, and the fitness.
    t = time.perf_counter()
    measured, init, n_new = measure_initial(space, dev, args.initial, seed=0, progress=True)
    initial_s = time.perf_counter() - t
    fit = job.fitness(args.valid_sentences)
    t = time.perf_counter()
    probe = space.sample_n(10, seed=123)
    for a in probe:
        fit(a)
    per_eval_ms = (time.perf_counter() - t) / len(probe) * 1e3

    # (a) search cost against the predictor fitted on the initial dataset
    pred = fit_predictor("default", measured, dev.split(), profile.name)
    lat = latency_fn(pred, measured)
    b40 = budget_from_measurements({a: measured[a] for a in init}, 40)
    cost = []
    runs = [("small (40 x 10)", small)] + ([("HAT (125 x 30)", EvolutionSettings())] if args.full else [])
    for name, st in runs:
        f = CachedFitness(fit.fn)  # a fresh cache: count the evaluations this search really pays for
        res = evolution_search(space, f, lat, Constraints(latency_ms=b40), st, progress=True)
        cost.append({"settings": name, **dataclasses.asdict(st), "wall_s": res.wall_ms / 1e3,
                     "fitness_evaluations": res.evaluations, "latency_queries": res.latency_queries,
                     "upper_bound_evaluations": st.evaluations_upper_bound(), "best_loss": res.best.loss,
                     "best_predicted_ms": res.best.latency_ms})
        print(f"(a) {name}: {res.evaluations} evaluations in {res.wall_ms / 1e3:.1f} s", file=sys.stderr)

    # (b) the loop at several budgets
    loops = []
    for p in pcts:
        budget = budget_from_measurements({a: measured[a] for a in init}, p)
        t = time.perf_counter()
        res = run_loop(space, fit, dev, LoopSettings(budget_ms=budget, rounds=4, top_k=3, initial=args.initial,
                                                      evolution=small), progress=False, checked_env=env)
        w = res.winner
        loops.append({
            "percentile": p, "budget_ms": budget, "met": res.met, "rounds": len(res.rounds),
            "rounds_detail": [{"round": r.round, "met": r.met, "fitted_on": r.fitted_on,
                               "candidates": [[c.predicted_ms, c.measured_ms] for c in r.candidates]}
                              for r in res.rounds],
            "winner_predicted_ms": w.predicted_ms, "winner_measured_ms": w.measured_ms,
            "winner_interval_ms": [w.predicted_lo_ms, w.predicted_hi_ms],
            "winner_error_pct": (w.predicted_ms - w.measured_ms) / w.measured_ms * 100,
            "winner_loss": w.loss, "winner_params": w.arch.params(),
            "models_measured": res.device_measurements, "wall_s": time.perf_counter() - t,
        })
        print(f"(b) budget {budget:.1f} ms: {len(res.rounds)} round(s), winner {w.predicted_ms:.1f} predicted / "
              f"{w.measured_ms:.1f} measured", file=sys.stderr)

    # (c) evolution vs random at equal evaluations (the final predictor, measured where known)
    lat = latency_fn(fit_predictor("default", dev.measured(), dev.split(), profile.name), dev.measured())
    comp = []
    for p in pcts:
        budget = budget_from_measurements({a: measured[a] for a in init}, p)
        for seed in range(seeds):
            evo = evolution_search(space, fit, lat, Constraints(latency_ms=budget), dataclasses.replace(small, seed=seed))
            rnd = random_search(space, fit, lat, Constraints(latency_ms=budget), evaluations=evo.evaluations, seed=seed)
            comp.append({"percentile": p, "budget_ms": budget, "seed": seed, "evaluations": evo.evaluations,
                         "evolution_best_loss": evo.best.loss, "random_best_loss": rnd.best.loss,
                         "evolution_best_ms": evo.best.latency_ms, "random_best_ms": rnd.best.latency_ms})
    wins = sum(c["evolution_best_loss"] < c["random_best_loss"] for c in comp)
    ties = sum(c["evolution_best_loss"] == c["random_best_loss"] for c in comp)

    out = {
        "format": RESULT_FORMAT,
        "version": RESULT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu": env.get("cpu_model") or env.get("cpu"), "cores": env.get("cores")},
        "profile": profile.name,
        "measurement": dataclasses.asdict(profile.measurement),
        "quick": args.quick,
        "checkpoint": args.checkpoint,
        "initial": {"n": len(init), "measured_now": n_new, "wall_s": initial_s,
                    "range_ms": [min(measured[a] for a in init), max(measured[a] for a in init)]},
        "fitness": {"valid_sentences": args.valid_sentences, "ms_per_evaluation": per_eval_ms},
        "search_cost": cost,
        "loop": loops,
        "evolution_vs_random": {"runs": comp, "evolution_wins": wins, "ties": ties, "n": len(comp),
                                "mean_loss_gap": statistics.fmean(c["random_best_loss"] - c["evolution_best_loss"]
                                                                  for c in comp)},
        "wall_s": time.perf_counter() - t_all,
    }
    job.close()  # the store, and the measurement exports the loops kept
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out, indent=1)

    print(f"\nsearch bench on {profile.name} ({out['machine']['cpu']}), demo checkpoint, "
          f"{len(init)} initial measurements in {initial_s:.0f} s; fitness {per_eval_ms:.0f} ms/evaluation")
    print("\n(a) search cost (budget = 40th percentile)")
    print(f"  {'settings':16s} {'evals':>6s} {'bound':>6s} {'wall s':>7s} {'best loss':>10s}")
    for c in cost:
        print(f"  {c['settings']:16s} {c['fitness_evaluations']:6d} {c['upper_bound_evaluations']:6d} "
              f"{c['wall_s']:7.1f} {c['best_loss']:10.4f}")
    print("\n(b) the loop")
    print(f"  {'pct':>4s} {'budget ms':>9s} {'rounds':>6s} {'met':>4s} {'predicted':>9s} {'measured':>8s} {'err %':>6s} {'measured models':>15s}")
    for lp in loops:
        print(f"  {lp['percentile']:4.0f} {lp['budget_ms']:9.1f} {lp['rounds']:6d} {'yes' if lp['met'] else 'NO':>4s} "
              f"{lp['winner_predicted_ms']:9.1f} {lp['winner_measured_ms']:8.1f} {lp['winner_error_pct']:6.1f} "
              f"{lp['models_measured']:15d}")
    print("\n(c) evolution vs random search, equal fitness evaluations")
    print(f"  {'pct':>4s} {'seed':>4s} {'evals':>5s} {'evolution':>9s} {'random':>9s}")
    for c in comp:
        print(f"  {c['percentile']:4.0f} {c['seed']:4d} {c['evaluations']:5d} {c['evolution_best_loss']:9.4f} "
              f"{c['random_best_loss']:9.4f}")
    print(f"  evolution better in {wins}/{len(comp)} (ties {ties}); mean loss gap "
          f"{out['evolution_vs_random']['mean_loss_gap']:.4f}")
    print(f"\nwrote {args.out} ({out['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
