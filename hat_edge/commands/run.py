"""`hat-edge run`: the main job, the whole of HAT on one device in one command (hat_edge/app/mainjob.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from hat_edge.commands._options import (
    TRUST_HELP,
    SearchSize,
    deprecated_alias,
    dir_path,
    progress_option,
    search_size_option,
    threads_option,
)
from hat_edge.errors import UserError


def _log(msg: str) -> None:
    click.echo(msg, err=True)


# ------------------------------------------------------------------------------------------------
# hat-edge run: the main job
# ------------------------------------------------------------------------------------------------
@click.command("run")
@click.option("--profile", "profile_name", default="local-cpu", show_default=True,
              help="Device profile (name or .toml file).")
@click.option("--checkpoint", default="demo", show_default=True, help="SuperTransformer checkpoint ('demo': bundled).")
@click.option("--budget", "budget_ms", type=float, default=None,
              help="Latency budget in ms. Default: --budget-percentile of the space's latency.")
@click.option("--budget-percentile", default=40.0, show_default=True, type=float,
              help="Default budget: this percentile of the design space's latency, as predicted for 1,000 sampled "
                   "archs from the initial measurements (the share of the space that fits).")
@click.option("--initial", default=None, type=click.IntRange(min=5),
              help="SubTransformers measured before the first search.  [default: 24 random ones; with a latency "
                   "prior 12 informative ones, fewer once the predictor's cross-validated MAPE is at most 8%]")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=1), help="Most loop rounds.")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1), help="Candidates measured per round.")
@search_size_option("quick")
@click.option("--valid-sentences", default=60, show_default=True, type=click.IntRange(min=1),
              help="Validation sentences for the fitness (loss).")
@click.option("--bleu-sentences", default=100, show_default=True, type=click.IntRange(min=1),
              help="Test sentences translated (winner and largest) for the report's BLEU.")
@click.option("--bleu-beam", default=None, type=click.IntRange(min=1),
              help="Beam of that BLEU.  [default: 5; 4 with lenpen 0.6 (HAT's test.sh) for a model imported from HAT]")
@threads_option
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="Deploy the winner as int8.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True,
              help="ONNX exporter of the deployed winner: 'torchscript', the one every latency in the loop was "
                   "measured with (seconds); 'dynamo', the smaller graphs of `hat-edge deploy` (4-16x longer to export).")
@click.option("--out-dir", "out_dir", default=Path("hat-edge-run"), show_default=True, type=dir_path(),
              help="Output directory: report.md, plots, report.json, the bundle, the latency store.")
@deprecated_alias("--out", new="--out-dir", dest="out_dir", type=dir_path())
@click.option("--compare-random", is_flag=True,
              help="Also run random search with as many fitness evaluations (slower; plotted with the search).")
@click.option("--seed", default=0, show_default=True, help="Seed of sampling and search.")
@click.option("--prior", "priors", multiple=True, default=("builtin",), show_default=True,
              help="Latency prior (repeat): 'builtin' (HAT's Pi, Xeon, TITAN Xp), a prior JSON, a latency CSV or store. "
                   "The initial dataset is then half as large, the most informative archs (see --initial), and the "
                   "predictor starts from the prior's cost models.")
@click.option("--no-prior", is_flag=True, help="No latency prior: --initial random archs, as HAT does.")
@click.option("--trust-new-host", is_flag=True, help=TRUST_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@progress_option()
def run_cmd(profile_name: str, checkpoint: str, budget_ms: float | None, budget_percentile: float, initial: int | None,
            rounds: int, top_k: int, search_size: SearchSize, valid_sentences: int, bleu_sentences: int,
            bleu_beam: int | None, threads: int | str,
            quantize: str | None, exporter: str, out_dir: Path, compare_random: bool, seed: int, priors: tuple[str, ...],
            no_prior: bool, trust_new_host: bool, as_json: bool, progress: bool) -> None:
    """The whole job: measure, fit, search under a budget, deploy, benchmark, report.

    On the default `local-cpu` profile with the bundled demo SuperTransformer this takes a few
    minutes on 2 cores: it measures a small latency dataset, fits the latency predictor, runs the
    search-and-measure loop under a budget (by default the 40th percentile of the space's latency),
    exports and deploys the winner through the profile's transport, benchmarks it there, translates
    a few test sentences, and writes report.md with plots to --out-dir. A second run reuses every
    measurement in --out-dir/latency.sqlite, the validation losses in --out-dir/fitness.sqlite and
    the winner's export when it is the same model.

    \b
    Examples:
      hat-edge run
      hat-edge run --budget 50 --out-dir run-50ms
      hat-edge run --profile raspberrypi4 --checkpoint wmt.pt --search-size hat
      hat-edge run --checkpoint wmt14ende_super.pt --bleu-sentences 20   # imported: hat-edge import hat
    """
    from hat_edge.app.mainjob import RunSettings, render_summary, run_main_job

    if budget_ms is not None and budget_ms <= 0:
        raise UserError(f"--budget must be a positive number of milliseconds, got {budget_ms}")
    s = RunSettings(
        profile=profile_name, checkpoint=checkpoint, budget_ms=budget_ms, budget_percentile=budget_percentile,
        initial=initial, rounds=rounds, top_k=top_k, quantize=quantize, exporter=exporter, out_dir=str(out_dir),
        evolution=search_size.settings(seed=seed),
        valid_sentences=valid_sentences, bleu_sentences=bleu_sentences, bleu_beam=bleu_beam, threads=threads or None,
        compare_random=compare_random, seed=seed, trust_new_host=trust_new_host, prior=() if no_prior else tuple(priors),
    )
    argv = " ".join(sys.argv[1:]) if sys.argv and "hat-edge" in Path(sys.argv[0]).name else "run"
    summary, _, _ = run_main_job(s, progress=progress, log=_log, command=f"hat-edge {argv}")
    if as_json:
        click.echo(json.dumps(summary.to_dict(), default=str))
    else:
        click.echo(render_summary(summary))
    if not summary.met:
        sys.exit(1)


COMMANDS = [run_cmd]
