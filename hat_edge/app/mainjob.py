"""The main job (`hat-edge run`): the whole of HAT on one device, in one command.

On `local-cpu` with the bundled demo SuperTransformer, in order:
  1. check the device (connect + `runner.py env`): an unreachable device fails before any work
  2. measure a small latency dataset (random SubTransformers + the smallest and largest)
  3. choose the budget (a percentile of the space's predicted latency, or --budget)
  4. the loop: fit the predictor, search, measure the top candidates, refit, until the budget holds
  5. optionally, random search at the same number of fitness evaluations, for comparison
  6. export and deploy the winner through the profile's transport; verify and benchmark it there
  7. loss and BLEU of the winner and of the largest SubTransformer, test translations on the device
  8. report.md, report.json and three plots in the output directory

Everything measured is kept in `<out>/latency.sqlite`: running the job again measures nothing it
already has.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable


from hat_edge.app.job import prepare_job
from hat_edge.app.results import LargestSummary, PredictorError, RandomComparison, RunSummary, SideBySide
from hat_edge.app.results import WinnerSummary, budget_verdict
from hat_edge.errors import UserError
from hat_edge.search.evolution import Constraints, EvolutionSettings, SearchResult, random_search
from hat_edge.search.loop import (
    LoopResult,
    LoopSettings,
    budget_from_space,
    latency_fn,
    initial_default,
    measure_initial,
    run_loop,
)

FITNESS_FILE = "fitness.sqlite"  # in the output dir: the validation losses a rerun reads (search.fitness_store)


@dataclass(frozen=True)
class RunSettings:
    profile: str = "local-cpu"
    checkpoint: str = "demo"
    budget_ms: float | None = None  # None: `budget_percentile` of the initial measurements
    budget_percentile: float = 40.0
    initial: int | None = None  # None: 24 random archs, or 12 informative ones with a prior
    rounds: int = 2
    top_k: int = 3
    explore: int = 2
    anchors: int = 2  # initial archs re-timed side by side with each round's candidates (drift)
    tolerance: float = 0.03
    evolution: EvolutionSettings = field(default_factory=EvolutionSettings.quick)
    valid_sentences: int = 60  # fitness: validation loss on this many sentences
    bleu_sentences: int = 100
    bleu_beam: int | None = None  # None: 5, or 4 (HAT's test.sh, lenpen 0.6) for a model imported from HAT
    translations: int = 4
    quantize: str | None = None
    # The winner's ONNX export: the TorchScript-based exporter measured every latency of the loop,
    # so the deployed graph is the one timed (and the export takes 0.6 s, not 9 s, for the demo's
    # largest); "dynamo" gives the smaller graphs `hat-edge deploy` and `export` make (docs/export.md).
    exporter: str = "torchscript"
    compare_random: bool = False  # doubles the fitness work; bench/search.py does it properly
    out_dir: str = "hat-edge-run"
    store: str | None = None  # default: <out_dir>/latency.sqlite
    min_time_s: float | None = None  # override the profile's measurement.min_time_s
    min_repeats: int | None = None
    seed: int = 0
    trust_new_host: bool = False
    threads: int | str | None = 1  # host torch threads (fitness, BLEU); None: torch's default; "auto": timed
    # Latency priors ("builtin", prior JSON files, latency CSVs; `latency.prior.resolve_priors`):
    # with one, the initial dataset is the most informative archs first and stops early once the
    # predictor's cross-validated error allows (LoopSettings.prior). Empty: none.
    prior: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.initial is not None and self.initial < 5:
            raise UserError(f"--initial must be >= 5 measurements (the predictor needs data), got {self.initial}")
        if not 0 < self.budget_percentile < 100:
            raise UserError(f"--budget-percentile must be in (0, 100), got {self.budget_percentile}")
        from hat_edge.exporters.onnx_export import EXPORTERS

        if self.exporter not in EXPORTERS:
            raise UserError(f"--exporter {self.exporter!r}: allowed: {', '.join(EXPORTERS)}")


def run_main_job(
    s: RunSettings,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    command: str = "hat-edge run",
) -> tuple[RunSummary, LoopResult, SearchResult | None]:
    """Run the whole job; returns (summary, loop result, random-search result). Writes the report."""
    from hat_edge.app.deploy import VERIFY_SENTENCES, deploy
    from hat_edge.app.report import write_report
    from hat_edge.evaluate import bleu, default_bleu, load_split

    say = log or (lambda m: print(m, file=sys.stderr))
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        times[name] = round(now - since, 2)
        return now

    out = Path(s.out_dir)
    # 0. the priors are files: a bad one fails before the device is even reached
    prior = None
    if s.prior:
        from hat_edge.latency.prior import resolve_priors

        prior = resolve_priors(s.prior)
    # 1. the device, before anything else; then the checkpoint, the output dir and the store
    job = prepare_job(
        s.profile, s.checkpoint, store=s.store or None, out_dir=out, threads=s.threads,
        trust_new_host=s.trust_new_host, min_time_s=s.min_time_s, min_repeats=s.min_repeats, quantize=s.quantize,
        announce=lambda p: say(f"[1/7] checking device '{p.name}' ({p.transport}, {p.runtime})"),
    )
    try:
        profile, env, ckpt, store, device, space = job.profile, job.env, job.checkpoint, job.store, job.device, job.space
        times["device_check_s"] = round(job.check_s, 2)
        times["load_s"] = round(job.load_s, 2)
        t = time.perf_counter()

        # 2. the initial latency dataset (a prior never includes the device's own entry)
        if prior is not None:
            prior = prior.for_device(profile.name)
        n_initial = s.initial if s.initial is not None else initial_default(24, prior)
        say(f"[2/7] latency dataset: {'up to ' if prior else ''}{n_initial} SubTransformers of space "
            f"'{space.name}' on '{profile.name}'" + (f" (prior: {', '.join(prior.names())})" if prior else ""))
        measured, init, n_new = measure_initial(space, device, n_initial, s.seed, progress=progress, log=say,
                                                prior=prior)
        t = lap("initial_measure_s", t)

        # 3. the budget
        if s.budget_ms is not None:
            budget, budget_source = float(s.budget_ms), "--budget"
        else:
            budget = budget_from_space(space, device, {a: measured[a] for a in init}, s.budget_percentile, prior,
                                       seed=s.seed)
            budget_source = (f"{s.budget_percentile:g}th percentile of the space's latency, predicted for 1,000 "
                             f"sampled archs from {len(init)} measured")
        init_ms = sorted(measured[a] for a in init)
        say(f"[3/7] budget {budget:.1f} ms ({budget_source}; measured range {init_ms[0]:.1f}-{init_ms[-1]:.1f} ms)")

        # 4. the loop
        say(f"[4/7] search + measure loop (up to {s.rounds} rounds, top {s.top_k} measured per round)")
        # losses a run into this directory computed before are read, not computed again
        fit = job.fitness(s.valid_sentences, persist=out / FITNESS_FILE)
        ls = LoopSettings(
            budget_ms=budget, rounds=s.rounds, top_k=s.top_k, tolerance=s.tolerance, initial=n_initial,
            evolution=s.evolution, seed=s.seed, explore=s.explore, anchors=s.anchors, prior=prior,
        )
        loop = run_loop(space, fit, device, ls, progress=progress, log=say, checked_env=env,
                        initial=(measured, init))
        if hasattr(fit.fn, "describe"):
            say(f"      fitness on {fit.fn.describe()}")
        if fit.reused:
            say(f"      fitness: {fit.reused} arch(s)' validation loss read from {out / FITNESS_FILE} (computed by an "
                f"earlier run on the same weights and sentences), {fit.calls} computed")
        t = lap("loop_s", t)

        # 5. random search at the same number of evaluations, same latency model and budget
        rnd = None
        if not s.compare_random:
            say("      step 5/7, random search for comparison: skipped (--compare-random runs it)")
        else:
            n_eval = loop.last_search.evaluations
            say(f"[5/7] random search with the same {n_eval} evaluations, for comparison")
            rnd = random_search(
                space, fit, latency_fn(loop.predictor, loop.measured), Constraints(latency_ms=budget),
                evaluations=n_eval, seed=s.seed + 1,
            )
        t = lap("random_search_s", t)

        # 6. deploy the winner
        w = loop.winner
        test = load_split(ckpt, "test")
        metric, decoding = default_bleu(ckpt.tokenizer, s.bleu_beam)
        k = max(0, s.translations)
        say(f"[6/7] deploying the winner to '{profile.name}'")
        dep = deploy(
            profile, arch=w.arch, checkpoint=ckpt, out_dir=out / "bundle", quantize=s.quantize,
            sentences=list(test.src[:k]), references=list(test.tgt[:k]), verify_sentences=list(test.src[:VERIFY_SENTENCES]),
            beam=decoding.beam, env=env, log=say,
            trust_new_host=s.trust_new_host, level=test.level, exporter=s.exporter,
        )
        t = lap("deploy_s", t)

        # The speed-up claim, measured side by side: the winner and the largest SubTransformer timed
        # in rotation in one runner process, so a drift of the device's speed between the loop's
        # measurements cannot make or break it.
        largest = space.largest()
        pair = device.time_together([w.arch, largest], trust_new_host=s.trust_new_host) if w.arch != largest else {}
        side = SideBySide.of(pair[w.arch], pair[largest]) if len(pair) == 2 else None
        if side:
            say(f"      side by side: winner {side.winner_ms:.2f} ms, largest {side.largest_ms:.2f} ms "
                f"-> {side.speedup:.2f}x")
        t = lap("side_by_side_s", t)

        # 7. loss and BLEU: the winner and the largest SubTransformer
        say(f"[7/7] BLEU on {min(s.bleu_sentences, len(test))} test sentences (beam {decoding.beam}, {metric})")
        bleu_corpus = test.head(s.bleu_sentences)
        b_w = bleu(ckpt.model, ckpt.tokenizer, bleu_corpus, arch=w.arch, metric=metric, decoding=decoding)
        b_l = bleu(ckpt.model, ckpt.tokenizer, bleu_corpus, arch=largest, metric=metric, decoding=decoding)
        b_q = None
        if s.quantize:  # the deployed int8 bundle's own BLEU (host onnxruntime, the device's search)
            from hat_edge.exporters import load_bundle

            b_q = bleu(load_bundle(dep.bundle), ckpt.tokenizer, bleu_corpus, metric=metric, decoding=decoding).bleu
        t = lap("bleu_s", t)

        largest_ms = loop.measured.get(largest)
        cand_err = [abs(c.error()) * 100 for c in loop.candidates() if c.new]
        created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        winner = WinnerSummary(
            arch=w.arch,
            predicted_latency_ms=w.predicted_ms,
            predicted_lo_ms=w.predicted_lo_ms,
            predicted_hi_ms=w.predicted_hi_ms,
            measured_latency_ms=w.measured_ms,
            deployed_latency_ms=dep.median_ms,
            loss=w.loss,
            found_in=f"round {w.round}" if w.round else "earlier measurements",
            bleu=b_w.bleu,
            precision=s.quantize or "fp32",
            bleu_deployed=b_q,
        )
        big = LargestSummary(arch=largest, measured_latency_ms=largest_ms, loss=fit(largest), bleu=b_l.bleu)
        summary = RunSummary(
            device=profile.name,
            device_desc=profile.description,
            checkpoint=s.checkpoint,
            space=space.name,
            created_at=created_at,
            command=command,
            budget_ms=budget,
            budget_source=budget_source,
            tolerance=s.tolerance,
            met=loop.met,
            measured_range_ms=(init_ms[0], init_ms[-1]),
            winner=winner,
            largest=big,
            speedup=side.speedup if side else ((largest_ms / w.measured_ms) if largest_ms else None),
            side_by_side=side,
            bleu_sentences=len(bleu_corpus),
            bleu_beam=decoding.beam,
            initial_measurements=len(init),
            device_measurements=n_new + loop.device_measurements,
            fitness_evaluations=fit.calls,  # after the largest's loss: it counts
            rounds=loop.rounds,
            predictor_error=PredictorError.of(cand_err),
            random_search=None if rnd is None else RandomComparison(
                evaluations=rnd.evaluations,
                best_loss=rnd.best.loss,
                evolution_best_loss=loop.last_search.best.loss,
            ),
            deploy=dep,
            device_env=dict(env),
            store=str(store.path),
            timings_s=times,
            wall_s=round(time.perf_counter() - t0, 1),
        )
        refs = {"largest": (largest_ms, big.loss)} if largest_ms else {}
        files = write_report(out, summary, loop, random=rnd, references=refs)
        summary = dataclasses.replace(summary, report=tuple(str(f) for f in files),
                                      wall_s=round(time.perf_counter() - t0, 1))
        return summary, loop, rnd
    finally:
        job.close()  # the store, the fitness file and the exports kept to time archs again


def render_summary(s: RunSummary) -> str:
    """The job's result as a short human table."""
    w, L, d = s.winner, s.largest, s.deploy
    side = s.side_by_side
    f = lambda x, nd=2: "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"  # noqa: E731
    lines = [
        f"hat-edge run: {s.device}, checkpoint {s.checkpoint} (space {s.space}), {s.wall_s:.0f} s",
        f"  budget                {f(s.budget_ms, 1)} ms ({s.budget_source})",
        f"  winner latency        predicted {f(w.predicted_latency_ms)} ms "
        f"[{f(w.predicted_lo_ms)}, {f(w.predicted_hi_ms)}], measured {f(w.measured_latency_ms)} ms "
        f"-> {budget_verdict(w.measured_latency_ms, s.budget_ms, s.tolerance)}",
        f"  deployed              median {f(d.median_ms)} ms, p90 {f(d.p90_ms)} ms "
        f"(hashes {'ok' if d.hashes_ok else 'BAD'}, device = host: {'yes' if d.parity else 'NO'}, "
        f"{d.files_sent} file(s) sent)",
        f"  loss / BLEU           {f(w.loss, 3)} / {f(w.bleu, 1)}   "
        f"(largest: {f(L.loss, 3)} / {f(L.bleu, 1)})",
        f"  params                {w.params / 1e6:.2f} M (largest {L.params / 1e6:.2f} M)",
        f"  speed-up vs largest   {f(s.speedup)}x "
        + (f"(side by side: {f(side.winner_ms)} vs {f(side.largest_ms)} ms)"
           if side else f"(largest measured {f(L.measured_latency_ms)} ms)"),
        f"  loop                  {len(s.rounds)} round(s), {s.device_measurements} models measured, "
        f"{s.fitness_evaluations} fitness evaluations",
    ]
    dep_ms, loop_ms = d.median_ms, w.measured_latency_ms
    if dep_ms and loop_ms and abs(dep_ms / loop_ms - 1) > 0.10:
        lines.append(
            f"  note                  the deployed benchmark is {100 * (dep_ms / loop_ms - 1):+.0f}% off the loop's "
            f"measurement of the same arch: this device's speed drifts between measurements"
            + (f" (side by side just after: {f(side.winner_ms)} ms)" if side else "")
        )
    rnd = s.random_search
    if rnd:
        lines.append(
            f"  vs random search      best loss {f(rnd.evolution_best_loss, 3)} (evolution) vs "
            f"{f(rnd.best_loss, 3)} (random), {rnd.evaluations} evaluations each"
        )
    if s.translations:
        lines.append("  translations (winner, on the device):")
        for t in s.translations:
            lines.append(f"    EN  {t.source}")
            lines.append(f"    DE  {t.device}")
            if t.reference:
                lines.append(f"    ref {t.reference}")
    rep = [p for p in s.report if p.endswith(".md")]
    if rep:
        lines.append(f"  report                {rep[0]} (+ plots)")
    return "\n".join(lines)


__all__ = ["RunSettings", "RunSummary", "render_summary", "run_main_job"]
