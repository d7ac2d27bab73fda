"""`hat-edge predictor train|predict|eval`: latency predictors from measurements."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from hat_edge.commands._options import file_path, progress_option
from hat_edge.errors import UserError

KIND_CHOICE = click.Choice(["default", "hat-mlp"])


# --------------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------------
def _data_from_store(store_path: Path, profile: str, runtime: str | None):
    """Rows of one device (and runtime, and measurement settings) from the latency store."""
    from hat_edge.latency.features import LatencyData
    from hat_edge.latency.store import LatencyStore

    # A profile names the device, its runtime and the measurement settings its records carry;
    # a name that is no profile here is taken as the device name the store holds.
    device, settings = profile, None
    try:
        from hat_edge.devices.profiles import load_profile

        prof = load_profile(profile)
        device, runtime, settings = prof.name, runtime or prof.runtime, prof.measure_spec().identity()
    except UserError:
        pass
    if not Path(store_path).exists():
        raise UserError(f"{store_path}: no such latency store")
    store = LatencyStore(store_path)
    recs = store.records(device=device, runtime=runtime, settings=settings)
    if not recs and settings is not None:
        recs = store.records(device=device, runtime=runtime)  # measured with other settings
    if not recs:
        raise UserError(
            f"{store_path}: no records for device '{device}'"
            + (f" with runtime '{runtime}'" if runtime else "")
            + f" (devices: {', '.join(store.devices()) or 'none'})"
        )
    groups = {(r.runtime, json.dumps(dict(r.settings), sort_keys=True)) for r in recs}
    if len(groups) > 1:
        shown = "; ".join(f"{rt} {st}" for rt, st in sorted(groups)[:4])
        raise UserError(
            f"{store_path}: device '{device}' has records under {len(groups)} runtime/settings "
            f"combinations ({shown}); choose one with --runtime or a profile with those settings"
        )
    src = f"{store_path} [{device}]"
    # Anchored records (measured side by side with earlier ones) on their anchors' scale.
    return LatencyData.from_records(recs, src), device


def _load_data(data_path: Path | None, store_path: Path | None, profile: str | None, runtime: str | None):
    from hat_edge.latency.features import read_latency_csv

    if data_path and store_path:
        raise UserError("give either --data CSV or --store PATH --profile P, not both")
    if store_path:
        if not profile:
            raise UserError("--store needs --profile P (the device whose records to use)")
        return _data_from_store(store_path, profile, runtime)
    if not data_path:
        raise UserError("no training data: give --data CSV (HAT's latency CSV or hat-edge's) or --store PATH --profile P")
    return read_latency_csv(data_path), Path(data_path).stem


def _params(kind: str, steps: int | None, lat_norm: float | None, seed: int) -> dict[str, Any]:
    if kind == "hat-mlp":
        p: dict[str, Any] = {"seed": seed, "lat_norm": lat_norm}
        if steps is not None:
            p["steps"] = steps
        return p
    return {"seed": seed}


class _Bar:
    """tqdm on stderr, or nothing when stderr is not a terminal or tqdm is missing."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="step")
            except ImportError:  # pragma: no cover
                self.bar = None
        self.n = 0

    def to(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n - self.n)
        self.n = n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_metrics(m: dict[str, Any]) -> str:
    return (f"RMSE {m['rmse_ms']:.2f} ms  MAPE {m['mape_pct']:.2f}%  within 5% {m['acc5_pct']:.1f}%  "
            f"within 10% {m['acc10_pct']:.1f}%  Kendall tau {m['kendall_tau']:.3f}")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
@click.group("predictor")
def predictor_group() -> None:
    """Latency predictors: fit one on a device's measurements, predict, evaluate.

    \b
    default   analytic cost model (per-layer work: projections, FFN, heads, cross-attention
              over 1-3 encoder layers, decoder steps) fitted robustly; accurate from ~30 rows
    hat-mlp   HAT's MLP (10 -> 400 x4 -> 1, 5,000 Adam steps), the baseline; wants ~1,000+ rows
    \b
    Example:
      hat-edge predictor eval --data wmt14ende_cpu_xeon_all.csv --kind default --kind hat-mlp
      hat-edge predictor train --data wmt14ende_cpu_xeon_all.csv --out xeon.json
      hat-edge predictor train --data new_board_10_rows.csv --prior builtin --out new.json
      hat-edge predictor train --store .hat-edge/latency.sqlite --profile local-cpu --out cpu.json
      hat-edge predictor predict --model xeon.json --data archs.csv --out predicted.csv
    """


@predictor_group.command("train")
@click.option("--data", "data_path", type=file_path(), default=None,
              help="Latency CSV: HAT's (10 features + latency_mean_encoder/decoder) or hat-edge's "
                   "(arch JSON column and/or features, latency_ms).")
@click.option("--store", "store_path", type=file_path(), default=None,
              help="Latency store (SQLite) written by `hat-edge measure`; needs --profile.")
@click.option("--profile", default=None, help="Device profile (name or .toml) whose records to use from --store.")
@click.option("--runtime", default=None, help="Only records of this runtime (default: the profile's).")
@click.option("--out", "out_path", required=True, type=file_path(), help="Predictor file to write (JSON).")
@click.option("--kind", type=KIND_CHOICE, default="default", show_default=True, help="Predictor kind.")
@click.option("--device", default=None, help="Device name recorded in the file (default: CSV file name or profile).")
@click.option("--folds", default=5, show_default=True,
              help="Cross-validation folds for the recorded error (default kind: its own model-selection CV; "
                   "hat-mlp: K extra trainings, 0 skips).")
@click.option("--steps", default=None, type=int, help="hat-mlp training steps (HAT: 5000).")
@click.option("--lat-norm", default=None, type=float,
              help="hat-mlp latency normaliser in ms (HAT: 5000 Pi, 300 Xeon, 200 GPU); default: the largest "
                   "training latency rounded up.")
@click.option("--seed", default=0, show_default=True)
@click.option("--prior", "priors", multiple=True,
              help="Devices measured before, to start a new board's model from (default kind; repeat): "
                   "'builtin' (HAT's Pi, Xeon and TITAN Xp, packaged), a prior JSON file, a latency CSV, or a "
                   "latency store (.sqlite). "
                   "With a prior, 5-10 measured rows suffice.")
@click.option("--prior-strength", default=None, type=float,
              help="How strongly the prior pulls each cost term (default: chosen by cross-validation on the rows).")
@click.option("--json", "as_json", is_flag=True, help="Print the predictor's summary as JSON.")
@progress_option(None, when="on when stderr is a terminal, off with --json")
def train_cmd(data_path, store_path, profile, runtime, out_path, kind, device, folds, steps, lat_norm, seed, priors,
              prior_strength, as_json, progress):
    """Fit a latency predictor on measured latencies and save it.

    The file records the kind, the feature set (per-layer archs or HAT's 10 averaged features),
    the device, the number of training rows and the cross-validated error.
    """
    from hat_edge.latency.predictor import cross_validate, make_predictor
    from hat_edge.latency.prior import resolve_priors

    if (priors or prior_strength is not None) and kind != "default":
        raise UserError("--prior and --prior-strength apply to the default kind only")
    data, default_device = _load_data(data_path, store_path, profile, runtime)
    device = device or default_device
    params = _params(kind, steps, lat_norm, seed)
    if kind == "default":
        params["folds"] = max(folds, 2) if folds else 5
        prior = resolve_priors(priors, exclude=device) if priors else None
        if priors and prior is None:
            raise UserError(f"--prior: no device left besides '{device}' itself")
        if prior is not None:
            params["prior"] = prior
            params["prior_strength"] = prior_strength
    pred = make_predictor(kind, **params)
    show = (not as_json and sys.stderr.isatty()) if progress is None else progress
    cv = None
    if kind == "hat-mlp" and folds:
        if folds < 2:
            raise UserError(f"--folds must be 0 or >= 2, got {folds}")
        total = folds * (steps or pred.steps)
        bar = _Bar(total, f"hat-mlp {folds}-fold CV", show)
        done = [0]

        def on_fold(i: int) -> None:
            done[0] = i * (steps or pred.steps)
            bar.to(done[0])

        cv = cross_validate(kind, data, folds=folds, seed=seed, params=params, on_fold=on_fold)
        bar.close()
    if kind == "hat-mlp":
        bar = _Bar(pred.steps, "hat-mlp training", show)
        pred.progress = bar.to
        pred.fit_data(data, device=device)
        bar.close()
        if cv is not None:
            pred.meta["cv"] = {"folds": cv.folds, **cv.metrics}
            pred._resid_log = np.log(data.latency_ms / np.maximum(cv.oof_ms, 1e-9))  # honest interval
    else:
        pred.fit_data(data, device=device)
    path = pred.save(out_path)
    summary = pred.summary()
    if as_json:
        click.echo(json.dumps({"path": str(path), **summary}, indent=2))
        return
    split = data.encoder_ms is not None
    click.echo(f"fitted {kind} predictor on {len(data)} rows of {data.source}")
    click.echo(f"  device {device}   features {summary['feature_set']}"
               + ("   encoder/decoder fitted separately" if split and kind == "default" else ""))
    if kind == "default" and pred.prior is not None:
        click.echo(f"  prior: {', '.join(pred.prior.names())}, strength {pred.lam:g}"
                   + (" (chosen by cross-validation)" if prior_strength is None else ""))
    if kind == "default":
        click.echo(f"  learned correction: {pred.rounds} trees" + ("" if pred.rounds else " (cross-validation kept the analytic model alone)"))
    if summary["cv"]:
        click.echo(f"  cross-validated ({summary['cv']['folds']} folds): {_fmt_metrics(summary['cv'])}")
    else:
        click.echo("  no cross-validated error (too few rows or --folds 0)")
    click.echo(f"wrote {path}")


@predictor_group.command("predict")
@click.option("--model", "model_path", required=True, type=file_path(), help="Predictor file from `predictor train`.")
@click.option("--data", "data_path", required=True, type=file_path(),
              help="CSV of archs: an 'arch' JSON column and/or HAT's 10 feature columns (latency columns optional).")
@click.option("--out", "out_path", required=True, type=file_path(),
              help="CSV to write: the input rows plus predicted_latency_ms, predicted_lo_ms, predicted_hi_ms.")
@click.option("--level", default=0.9, show_default=True, help="Central coverage of the interval columns.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def predict_cmd(model_path, data_path, out_path, level, as_json):
    """Predict the latency (ms) and an interval for every row of a CSV.

    If the CSV also holds measured latencies, the accuracy against them is printed.
    """
    from hat_edge.latency.features import read_latency_csv
    from hat_edge.latency.fitting import accuracy_metrics
    from hat_edge.latency.predictor import load_predictor

    if not 0 < level < 1:
        raise UserError(f"--level must be between 0 and 1, got {level}")
    pred = load_predictor(model_path)
    data = read_latency_csv(data_path, require_latency=False)
    p = pred.predict(data.X)
    lo, hi = pred.predict_interval(data.X, level=level)
    cols = [c for c in data.columns if c not in ("predicted_latency_ms", "predicted_lo_ms", "predicted_hi_ms")]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols + ["predicted_latency_ms", "predicted_lo_ms", "predicted_hi_ms"])
        for row, a, b, c in zip(data.rows, p, lo, hi):
            w.writerow([row.get(k, "") for k in cols] + [f"{a:.4f}", f"{b:.4f}", f"{c:.4f}"])
    summary: dict[str, Any] = {"model": str(model_path), "kind": pred.kind, "device": pred.meta.get("device"),
                               "rows": len(data), "out": str(out), "level": level}
    if data.latency_ms is not None:
        summary["accuracy"] = accuracy_metrics(p, data.latency_ms)
        summary["interval_coverage_pct"] = float(100 * np.mean((data.latency_ms >= lo) & (data.latency_ms <= hi)))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"predicted {len(data)} rows with {pred.kind} ({pred.meta.get('device')}): "
               f"median {np.median(p):.2f} ms, range {p.min():.2f}-{p.max():.2f} ms")
    if "accuracy" in summary:
        click.echo(f"  against the measured column: {_fmt_metrics(summary['accuracy'])}")
        click.echo(f"  {level:.0%} interval covers {summary['interval_coverage_pct']:.1f}% of rows")
    click.echo(f"wrote {out}")


@predictor_group.command("eval")
@click.option("--data", "data_path", type=file_path(), default=None, help="Latency CSV (as for train).")
@click.option("--store", "store_path", type=file_path(), default=None, help="Latency store; needs --profile.")
@click.option("--profile", default=None, help="Device profile whose records to use from --store.")
@click.option("--runtime", default=None, help="Only records of this runtime.")
@click.option("--kind", "kinds", type=KIND_CHOICE, multiple=True, help="Predictor kind (repeat to compare; default: default).")
@click.option("--folds", default=5, show_default=True, help="K of the K-fold cross-validation.")
@click.option("--steps", default=None, type=int, help="hat-mlp training steps (HAT: 5000).")
@click.option("--lat-norm", default=None, type=float, help="hat-mlp latency normaliser in ms.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fold split and the fits.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@progress_option(None, when="on when stderr is a terminal, off with --json")
def eval_cmd(data_path, store_path, profile, runtime, kinds, folds, steps, lat_norm, seed, as_json, progress):
    """K-fold cross-validated accuracy of predictor kinds on one dataset.

    Reports RMSE, MAPE, the share of rows predicted within 5% and 10% (HAT's accuracy), and
    Kendall's tau between predicted and measured (what ranking archs by latency needs).
    """
    from hat_edge.latency.predictor import cross_validate

    data, device = _load_data(data_path, store_path, profile, runtime)
    kinds = kinds or ("default",)
    show = (not as_json and sys.stderr.isatty()) if progress is None else progress
    results = []
    for kind in kinds:
        params = _params(kind, steps, lat_norm, seed)
        bar = _Bar(folds, f"{kind} {folds}-fold CV", show)
        cv = cross_validate(kind, data, folds=folds, seed=seed, params=params, on_fold=bar.to)
        bar.close()
        results.append({"kind": kind, "folds": folds, **cv.metrics})
    if as_json:
        click.echo(json.dumps({"data": data.source, "device": device, "rows": len(data), "results": results}, indent=2))
        return
    click.echo(f"{data.source}: {len(data)} rows, {folds}-fold cross-validation")
    head = f"{'kind':<9} {'RMSE ms':>10} {'MAPE %':>7} {'within 5%':>10} {'within 10%':>11} {'Kendall tau':>12}"
    click.echo(head)
    click.echo("-" * len(head))
    for r in results:
        click.echo(f"{r['kind']:<9} {r['rmse_ms']:>10.2f} {r['mape_pct']:>7.2f} {r['acc5_pct']:>9.1f}% "
                   f"{r['acc10_pct']:>10.1f}% {r['kendall_tau']:>12.3f}")


COMMANDS = [predictor_group]
