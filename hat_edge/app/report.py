"""The main job's report: `report.md` and three PNG plots (matplotlib, Agg: no display needed).

    predicted_vs_measured.png   the predictor's honesty: every candidate's latency predicted before
                                it was measured vs its measurement, and the initial dataset's fit
    search_progress.png         best feasible loss vs fitness evaluations, per loop round, and
                                random search at the same number of evaluations
    loss_vs_latency.png         every evaluated SubTransformer, the Pareto front, the budget, the
                                winner and the largest SubTransformer
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from hat_edge.app.results import RunSummary, budget_verdict
from hat_edge.search.evolution import SearchResult, pareto_front
from hat_edge.search.loop import LoopResult
from hat_edge.space import Arch

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.figure import Figure

REPORT_VERSION = 1
PLOTS = ("predicted_vs_measured.png", "search_progress.png", "loss_vs_latency.png")

_ROUND_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def plot_predicted_vs_measured(loop: LoopResult, path: str | Path, device: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=120)
    cands = {c.arch: c for c in loop.candidates()}
    # The fit data: the final predictor on the measurements it was fitted on (in sample).
    fit_archs = [a for a in loop.measured if a not in cands]
    if fit_archs:
        meas = np.array([loop.measured[a] for a in fit_archs])
        pred = np.asarray(loop.predictor.predict(fit_archs), dtype=float)
        ax.scatter(meas, pred, s=14, c="0.65", label=f"fit data ({len(fit_archs)}, in sample)", zorder=2)
    # The candidates: predicted before they were measured (out of sample), by round.
    from matplotlib.lines import Line2D

    handles: list[Artist] = []
    for r in loop.rounds:
        col = _ROUND_COLORS[(r.round - 1) % len(_ROUND_COLORS)]
        for kind, marker in (("exploit", "o"), ("explore", "s")):
            new = [c for c in r.candidates if c.new and c.kind == kind]
            if not new:
                continue
            m = np.array([c.measured_ms for c in new])
            p = np.array([c.predicted_ms for c in new])
            err = np.array([[c.predicted_ms - c.predicted_lo_ms for c in new],
                            [c.predicted_hi_ms - c.predicted_ms for c in new]])
            ax.errorbar(m, p, yerr=np.clip(err, 0, None), fmt=marker, ms=6, color=col, ecolor=col, elinewidth=0.8,
                        capsize=2, alpha=0.9, mfc=col if kind == "exploit" else "white", zorder=3)
        handles.append(Line2D([], [], color=col, marker="o", ls="", label=f"round {r.round}"))
    # Marker legend: filled = the search's top candidates, open = explored ones; bars = 90% interval.
    handles += [
        Line2D([], [], color="k", marker="o", ls="", label="search's top (predicted before measuring)"),
        Line2D([], [], color="k", marker="s", mfc="white", ls="", label="explored (optimistic search)"),
    ]
    w = loop.winner
    ax.scatter([w.measured_ms], [w.predicted_ms], marker="*", s=260, c="gold", edgecolors="k", zorder=5,
               label=f"winner: {w.predicted_ms:.1f} predicted / {w.measured_ms:.1f} measured ms")
    lo, hi = _limits([*loop.measured.values(), *(c.predicted_ms for c in cands.values())])
    xs = np.array([lo, hi])
    ax.plot(xs, xs, "k-", lw=1, label="predicted = measured")
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="0.85", alpha=0.5, lw=0, label="±10%")
    ax.axvline(loop.budget_ms, color="tab:red", ls="--", lw=1, label=f"budget {loop.budget_ms:.1f} ms")
    ax.axhline(loop.budget_ms, color="tab:red", ls="--", lw=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured latency (ms, median)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"Latency predictor vs measurement{' on ' + device if device else ''}")
    ax.grid(alpha=0.3)
    first = ax.legend(fontsize=7.5, loc="upper left")
    ax.add_artist(first)
    ax.legend(handles=handles, fontsize=7.5, loc="lower right", title="candidates (bars: 90% interval)",
              title_fontsize=7.5)
    return _save(fig, path)


def plot_search_progress(loop: LoopResult, path: str | Path, random: SearchResult | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for r, res in zip(loop.rounds, loop.searches):
        col = _ROUND_COLORS[(r.round - 1) % len(_ROUND_COLORS)]
        ev = [h.evaluations for h in res.history]
        ax.plot(ev, [h.best_loss for h in res.history], "-o", ms=3, color=col,
                label=f"evolution, round {r.round}: best feasible loss")
        ax.plot(ev, [h.parents_mean_loss for h in res.history], ":", color=col, lw=1,
                label=f"round {r.round}: mean loss of the parents")
    if random is not None:
        ax.plot([h.evaluations for h in random.history], [h.best_loss for h in random.history], "-s",
                ms=3, color="0.4", label="random search, same evaluations")
    ax.set_xlabel("fitness evaluations (validation loss of a SubTransformer)")
    ax.set_ylabel("validation loss (lower is better)")
    ax.set_title(f"Search progress under {loop.budget_ms:.1f} ms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5)
    return _save(fig, path)


def plot_front(
    loop: LoopResult,
    path: str | Path,
    references: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """references: label -> (latency ms, loss) of named archs (e.g. the largest SubTransformer)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    # Every arch every round's search evaluated (each once, its latest latency: predicted, or
    # measured when known), the front of them, and what the device measured of the picks.
    seen: dict[Arch, Any] = {}
    for res in loop.searches:
        for c in res.evaluated:
            seen[c.arch] = c
    evaluated = list(seen.values())
    ax.scatter([c.latency_ms for c in evaluated], [c.loss for c in evaluated], s=8, c="0.7",
               label=f"searched ({len(evaluated)}, latency predicted)")
    front = pareto_front(evaluated)
    ax.step([c.latency_ms for c in front], [c.loss for c in front], where="post", color="tab:blue", lw=1.5,
            label="Pareto front of the searched")
    ax.scatter([c.latency_ms for c in front], [c.loss for c in front], s=16, c="tab:blue", zorder=3)
    cands = loop.candidates()
    ax.scatter([c.measured_ms for c in cands], [c.loss for c in cands], s=28, facecolors="none",
               edgecolors="tab:orange", zorder=4, label=f"picks measured on the device ({len(cands)})")
    ax.axvline(loop.budget_ms, color="tab:red", ls="--", lw=1, label=f"budget {loop.budget_ms:.1f} ms")
    if loop.tolerance > 0:
        ax.axvspan(loop.budget_ms, loop.budget_ms * (1 + loop.tolerance), color="tab:red", alpha=0.08,
                   label=f"+{loop.tolerance * 100:g}% tolerance")
    w = loop.winner
    ax.scatter([w.measured_ms], [w.loss], marker="*", s=260, c="gold", edgecolors="k", zorder=5,
               label=f"winner (measured {w.measured_ms:.1f} ms, loss {w.loss:.3f})")
    for i, (label, (ms, loss)) in enumerate((references or {}).items()):
        ax.scatter([ms], [loss], marker="D", s=50, c=["tab:green", "tab:purple", "tab:brown"][i % 3],
                   edgecolors="k", zorder=4, label=f"{label} ({ms:.1f} ms, loss {loss:.3f})")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("validation loss (lower is better)")
    ax.set_title("Accuracy vs latency: the searched SubTransformers and the winner")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5)
    return _save(fig, path)


def _limits(vals: Sequence[float]) -> tuple[float, float]:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    lo, hi = min(v), max(v)
    pad = 0.06 * (hi - lo or hi)
    return max(0.0, lo - pad), hi + pad


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _f(x: float | int | str | None, nd: int = 2, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}{unit}"
    return f"{x}{unit}"


def render_markdown(s: RunSummary) -> str:
    """report.md from the main job's summary (the same result `--json` prints)."""
    w, L, side = s.winner, s.largest, s.side_by_side
    lines = [
        "# hat-edge report",
        "",
        f"Device **{s.device}** ({s.device_desc}); checkpoint **{s.checkpoint}**, "
        f"space **{s.space}**. Generated {s.created_at} in {_f(s.wall_s, 0)} s.",
        "",
        "## Result",
        "",
        "| | winner | largest SubTransformer |",
        "|---|---|---|",
        f"| latency budget | {_f(s.budget_ms)} ms ({s.budget_source}) | |",
        f"| predicted latency | {_f(w.predicted_latency_ms)} ms "
        f"[{_f(w.predicted_lo_ms)}, {_f(w.predicted_hi_ms)}] | |",
        f"| measured latency (median{', int8 bundles' if w.precision == 'int8' else ''}) | "
        f"**{_f(w.measured_latency_ms)} ms** | {_f(L.measured_latency_ms)} ms |",
        f"| deployed latency (median, bundle on device) | {_f(w.deployed_latency_ms)} ms | |",
        f"| validation loss | {_f(w.loss, 4)} | {_f(L.loss, 4)} |",
        f"| BLEU (test, {s.bleu_sentences} sentences, beam {s.bleu_beam}) | "
        f"{_f(w.bleu, 1)} | {_f(L.bleu, 1)} |",
        *([f"| BLEU of the deployed {w.precision} bundle (same sentences) | {_f(w.bleu_deployed, 1)} | |"]
          if w.bleu_deployed is not None else []),
        f"| params (HAT convention) | {_f(w.params / 1e6, 3)} M | {_f(L.params / 1e6, 3)} M |",
        *([f"| side by side (timed in rotation, one process) | {_f(side.winner_ms)} ms | "
           f"{_f(side.largest_ms)} ms |"] if side else []),
        f"| speed-up over the largest{' (side by side)' if side else ''} | "
        f"**{_f(s.speedup, 2)}x** | 1.00x |",
        "",
        f"Budget met: **{'yes' if s.met else 'NO'}** (measured <= budget x {1 + s.tolerance:.2f}): "
        f"{budget_verdict(w.measured_latency_ms, s.budget_ms, s.tolerance)}. "
        f"Winner: `{w.describe}`.",
        "",
        "## The loop",
        "",
        f"{s.initial_measurements} initial measurements, then {len(s.rounds)} round(s); "
        f"{s.device_measurements} models measured on the device in all, "
        f"{s.fitness_evaluations} fitness evaluations.",
        "",
        "Each round measures the search's top candidates and a few `explored` ones: archs an optimistic "
        "search (latency at the low end of the predictor's interval) finds with a lower loss. They are "
        "timed side by side with anchors (initial archs near the budget, timed again in rotation with "
        "them); `device drift` is how much slower the device ran than when the anchors were first "
        "measured, and the candidates' latencies are divided by it. `calibration` scales the round's "
        "predictions by how far the earlier rounds' picks measured over theirs (a search picks the archs "
        "its predictor underestimates most); the predictions shown are the calibrated ones.",
        "",
        "| round | fitted on | evaluations | search s | candidates: predicted -> measured ms (loss) | calibration | device drift | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s.rounds:
        cands = "; ".join(
            f"{'explored ' if c.kind == 'explore' else ''}{c.predicted_ms:.1f} -> {c.measured_ms:.1f} "
            f"({c.loss:.3f})" for c in r.candidates
        )
        lines.append(
            f"| {r.round} | {r.fitted_on} | {r.evaluations} | {r.search_ms / 1e3:.1f} | {cands} | "
            f"{r.calibration:.2f}x | {r.drift:.2f}x | {'yes' if r.met else 'no'} |"
        )
    pe = s.predictor_error
    lines += [
        "",
        f"Predictor on the candidates, predicted before measuring: mean |error| {_f(pe.mape, 1)}%, "
        f"{_f(pe.within_10, 0)}% within 10%.",
    ]
    rnd = s.random_search
    if rnd:
        lines += [
            "",
            f"Random search with the same {rnd.evaluations} evaluations under the same budget: best loss "
            f"{_f(rnd.best_loss, 4)} vs evolution {_f(rnd.evolution_best_loss, 4)}.",
        ]
    dep = s.deploy
    lines += [
        "",
        "## Deployment",
        "",
        f"Bundle `{dep.bundle}` ({dep.runtime}{', ' + dep.quantize if dep.quantize else ''}"
        f"{', exported by ' + dep.exporter if dep.exporter else ''}), "
        f"pushed to `{dep.remote_dir}`: {dep.files_sent} file(s) sent, "
        f"{dep.files_skipped} unchanged. Hashes verified on the device: "
        f"{'yes' if dep.hashes_ok else 'NO'}; device/host translations identical: "
        f"{'yes' if dep.parity else 'NO'}. "
        f"Benchmark there: median {_f(dep.median_ms)} ms, p90 {_f(dep.p90_ms)} ms, CV {_f(dep.cv, 3)}.",
    ]
    if s.translations:
        lines += ["", "## Translations (on the device, winner)", "", "| source | reference | winner |", "|---|---|---|"]
        for t in s.translations:
            lines.append(f"| {_md(t.source)} | {_md(t.reference)} | {_md(t.device)} |")
    lines += [
        "",
        "## Plots",
        "",
        "![predicted vs measured latency](predicted_vs_measured.png)",
        "",
        "![search progress](search_progress.png)",
        "",
        "![loss vs latency](loss_vs_latency.png)",
        "",
    ]
    env = s.device_env
    if env:
        keep = {k: env[k] for k in ("os", "cpu", "cpu_model", "cores", "memory_mb", "python", "numpy", "onnxruntime", "torch", "governor") if k in env}
        lines += ["## Device environment", "", "```json", json.dumps(keep, indent=1), "```", ""]
    lines += ["Reproduce: `" + s.command + "`", ""]
    return "\n".join(lines)


def _md(text: str | None) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_report(
    out_dir: str | Path,
    summary: RunSummary,
    loop: LoopResult,
    random: SearchResult | None = None,
    references: Mapping[str, tuple[float, float]] | None = None,
) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_predicted_vs_measured(loop, out / PLOTS[0], device=summary.device),
        plot_search_progress(loop, out / PLOTS[1], random=random),
        plot_front(loop, out / PLOTS[2], references=references),
    ]
    md = out / "report.md"
    md.write_text(render_markdown(summary))
    js = out / "report.json"
    # The `--json` object without `report` (the list of these files, not known yet).
    d = {k: v for k, v in summary.to_dict().items() if k != "report"}
    report = {"format": "hat-edge-report", "version": REPORT_VERSION, **d}
    js.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return [md, js, *paths]


__all__ = ["PLOTS", "plot_front", "plot_predicted_vs_measured", "plot_search_progress", "render_markdown", "write_report"]
