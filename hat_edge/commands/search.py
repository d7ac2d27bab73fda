"""`hat-edge search | loop | deploy`: find, verify on the device, deploy (`hat-edge run`: commands/run.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
import dataclasses
from typing import TYPE_CHECKING, Any

import click

from hat_edge.commands._options import (
    TRUST_HELP,
    SearchSize,
    deprecated_alias,
    dir_path,
    file_path,
    progress_option,
    search_size_option,
    small_alias,
    threads_option,
)
from hat_edge.errors import UserError

if TYPE_CHECKING:
    from hat_edge.checkpoint import Checkpoint
    from hat_edge.search.protocols import LatencyPredictor



def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _evolution_options(default_size: str):
    """The evolution's size (`--search-size`, old spellings kept one release), mutation chance and seed."""

    def deco(f):
        f = click.option("--seed", default=0, show_default=True, help="Search seed: same seed, same result.")(f)
        f = click.option("--mutation-prob", default=0.3, show_default=True, type=click.FloatRange(0, 1),
                         help="Chance that each gene is redrawn in a mutation (HAT: 0.3).")(f)
        return search_size_option(default_size)(f)

    return deco



def _write_arch(arch, path: Path | None) -> None:
    if path:
        try:
            arch.save(path)
        except OSError as e:
            raise UserError(f"--out {path}: cannot write ({e.strerror or e.__class__.__name__})") from None


# ------------------------------------------------------------------------------------------------
# hat-edge search
# ------------------------------------------------------------------------------------------------
@click.command("search")
@click.option("--checkpoint", default="demo", show_default=True,
              help="SuperTransformer checkpoint whose validation loss ranks SubTransformers ('demo': the bundled one).")
@click.option("--budget", "budget_ms", type=float, default=None,
              help="Latency budget in ms (predicted). Required unless --pareto.")
@click.option("--predictor", "predictor_path", default=None, type=file_path(),
              help="A saved latency predictor (`hat-edge predictor train ... --out MODEL`).")
@click.option("--profile", "profile_name", default=None,
              help="Instead of --predictor: fit one now on this device's measurements in --store.")
@click.option("--store", "store_path", default=None, type=file_path(),
              help="Latency store for --profile. Default: $HAT_EDGE_STORE or .hat-edge/latency.sqlite.")
@click.option("--pareto", is_flag=True, help="Rank by (loss, latency) fronts and print the whole front.")
@click.option("--max-params", type=float, default=None, help="Also require params <= this (millions, HAT's count).")
@click.option("--max-memory-mb", type=float, default=None,
              help="Also require estimated model memory (weights + caches, fp32) <= this many MB.")
@click.option("--valid-sentences", default=200, show_default=True, type=click.IntRange(min=1),
              help="Validation sentences for the fitness (loss).")
@threads_option
@_evolution_options("hat")
@click.option("--out", "out_path", default=None, type=file_path(),
              help="Write the winner to this file (HAT YAML, or .json).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@progress_option()
def search_cmd(checkpoint: str, budget_ms: float | None, predictor_path: Path | None, profile_name: str | None,
               store_path: Path | None, pareto: bool, max_params: float | None, max_memory_mb: float | None,
               valid_sentences: int, threads: int | str, out_path: Path | None, as_json: bool, progress: bool,
               search_size: SearchSize, mutation_prob: float, seed: int) -> None:
    """HAT's evolutionary search against a latency predictor (no device needed).

    Fitness: the validation loss each SubTransformer inherits from the SuperTransformer. Constraint:
    the predicted latency <= --budget (plus optional params and memory limits). The latency comes
    from --predictor, or from a predictor fitted on the --profile's measurements in --store.
    `hat-edge loop` adds on-device measurements until the budget holds for real.

    \b
    Examples:
      hat-edge search --budget 60 --profile local-cpu --out winner.yml
      hat-edge search --pareto --predictor pi4.json --search-size hat,iterations=10 --json
    """
    from hat_edge.app.job import make_fitness, set_host_threads
    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.search.evolution import Constraints, check_constraints, estimate_memory_mb, evolution_search

    settings = search_size.settings(seed=seed, mutation_prob=mutation_prob)
    set_host_threads(threads)
    if budget_ms is None and not pareto:
        raise UserError("--budget MS is required (or use --pareto to get the loss-vs-latency front)")
    if (predictor_path is None) == (profile_name is None):
        raise UserError("give the latency model as --predictor MODEL or --profile P (with --store), one of them")
    ckpt = load_checkpoint(checkpoint)
    pred = _predictor(predictor_path, profile_name, store_path, ckpt)
    vocab = int(ckpt.model.cfg.vocab_size)
    cons = Constraints(
        latency_ms=budget_ms, max_params=int(max_params * 1e6) if max_params else None, max_memory_mb=max_memory_mb
    )
    memory_fn = (lambda a: estimate_memory_mb(a, vocab)) if max_memory_mb else None
    check_constraints(ckpt.space, pred.predict, cons, memory_fn)  # before building the fitness
    fit = make_fitness(ckpt, valid_sentences, threads=threads)
    res = evolution_search(
        ckpt.space, fit, pred.predict, cons, settings, pareto=pareto, memory_fn=memory_fn,
        progress=progress, check=False,
    )
    _write_arch(res.best.arch, out_path)
    if as_json:
        d = res.to_dict()
        d["arch"] = res.best.arch.to_dict()
        d["predicted_latency_ms"] = res.best.latency_ms
        d["loss"] = res.best.loss
        d["budget_ms"] = budget_ms
        click.echo(json.dumps(d))
        return
    b = res.best
    click.echo(f"best under {cons.describe()}: loss {b.loss:.4f}, predicted {b.latency_ms:.2f} ms, "
               f"params {b.params / 1e6:.2f} M")
    click.echo(f"  {b.arch.describe()}")
    click.echo(f"  {res.evaluations} fitness evaluations in {res.wall_ms / 1e3:.1f} s")
    if pareto:
        click.echo("front (latency ms -> loss):")
        for c in res.front:
            click.echo(f"  {c.latency_ms:9.2f}  {c.loss:.4f}  {c.params / 1e6:6.2f} M  {c.arch.describe()}")
    if out_path:
        click.echo(f"wrote {out_path}")


def _predictor(predictor_path: Path | None, profile_name: str | None, store_path: Path | None,
               ckpt: Checkpoint) -> LatencyPredictor:
    if predictor_path:
        from hat_edge.latency.predictor import load_predictor

        return load_predictor(predictor_path)
    from hat_edge.devices.profiles import load_profile
    from hat_edge.latency.store import DEFAULT_STORE_PATH, LatencyStore
    from hat_edge.search.loop import ProfileDevice, fit_predictor

    profile = load_profile(profile_name)  # type: ignore[arg-type]
    path = Path(store_path or DEFAULT_STORE_PATH)
    if not path.exists():
        raise UserError(f"--store {path}: no such latency store; measure first (`hat-edge measure --profile {profile_name}`)")
    dev = ProfileDevice(profile, LatencyStore(path))
    measured = {a: ms for a, ms in dev.measured().items() if ckpt.space.contains(a)}
    if len(measured) < 10:
        raise UserError(
            f"--store {path}: {len(measured)} measurements of space '{ckpt.space.name}' for profile "
            f"'{profile.name}' with settings {profile.measure_spec().identity()}; at least 10 are needed "
            f"(`hat-edge measure --profile {profile.name} --space {ckpt.space.name} -n 40`)"
        )
    return fit_predictor("default", measured, dev.split(), profile.name)


# ------------------------------------------------------------------------------------------------
# hat-edge loop
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _SimJob:
    """What the loop needs of a job, on a simulated board (no profile, no store, no runner)."""

    profile: Any
    space: Any
    device: Any
    env: Any
    checkpoint: Any
    prior_exclude: str
    simulated: bool = True
    threads: Any = None

    def fitness(self, n: int) -> Any:
        from hat_edge.app.job import make_fitness

        return make_fitness(self.checkpoint, n, threads=self.threads)

    def close(self) -> None:  # nothing was exported or opened
        pass


def _loop_job(profile_name: str, checkpoint: str, store_path: Path | None, threads: int | str | None,
              trust_new_host: bool, seed: int) -> Any:
    """The loop's job: a real device through its profile (checked first), or a simulated board."""
    from hat_edge.devices.sim import SIM_DEVICES, SIM_NOTE, SimDevice, SimSettings, is_sim

    if not is_sim(profile_name):
        from hat_edge.app.job import prepare_job

        job = prepare_job(profile_name, checkpoint, store=store_path, threads=threads, trust_new_host=trust_new_host)
        job.prior_exclude, job.simulated = job.profile.name, False  # type: ignore[attr-defined]
        return job
    from hat_edge.app.job import set_host_threads
    from hat_edge.checkpoint import load_checkpoint

    dev = SimDevice(profile_name, SimSettings(noise=0.02, bias=0.05, drift=1.15, drift_after=24, seed=seed))
    set_host_threads(threads)
    env = dev.check()
    _log(f"{dev.name}: {SIM_NOTE}")
    ckpt = load_checkpoint(checkpoint)
    # the board's own HAT file is the simulation: the prior is the other two
    return _SimJob(profile=dev, space=ckpt.space, device=dev, env=env, checkpoint=ckpt,
                   prior_exclude=SIM_DEVICES[dev.which], threads=threads)



@click.command("loop")
@click.option("--profile", "profile_name", required=True, help="Device profile (name or .toml file).")
@click.option("--budget", "budget_ms", type=float, required=True, help="Latency budget in ms, measured on the device.")
@click.option("--checkpoint", default="demo", show_default=True, help="SuperTransformer checkpoint ('demo': bundled).")
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(min=1),
              help="Most search + measure rounds.")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1),
              help="Candidates measured per round (the lowest-loss ones under the budget).")
@click.option("--tolerance", default=0.03, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Accept a winner measuring up to budget x (1 + tolerance) (measurement noise).")
@click.option("--initial", default=None, type=click.IntRange(min=5),
              help="Measurements before the first search.  [default: 40 (random + smallest + largest); with a "
                   "latency prior 20 informative ones, fewer once the predictor's cross-validated MAPE is at most 8%]")
@click.option("--explore", default=2, show_default=True, type=click.IntRange(min=0),
              help="Extra candidates measured per round: archs with a lower loss that an optimistic "
                   "search finds (latency at the low end of the predictor's interval). 0: off.")
@click.option("--anchors", default=2, show_default=True, type=click.IntRange(min=0),
              help="Initial archs near the budget timed again side by side with each round's candidates; "
                   "how much slower they run now corrects the candidates for the device's drift. 0: off.")
@click.option("--store", "store_path", default=None, type=file_path(),
              help="Latency store. Default: $HAT_EDGE_STORE or .hat-edge/latency.sqlite.")
@click.option("--valid-sentences", default=200, show_default=True, type=click.IntRange(min=1),
              help="Validation sentences for the fitness (loss).")
@threads_option
@_evolution_options("hat")
@small_alias
@click.option("--out", "out_path", default=None, type=file_path(),
              help="Write the winner to this file (HAT YAML, or .json).")
@click.option("--prior", "priors", multiple=True, default=("builtin",), show_default=True,
              help="Latency prior (repeat): 'builtin', a prior JSON, a latency CSV or store. The initial dataset is "
                   "then the most informative archs and stops before --initial once the predictor's CV error allows.")
@click.option("--no-prior", is_flag=True, help="No latency prior: --initial random archs, as HAT does.")
@click.option("--trust-new-host", is_flag=True, help=TRUST_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@progress_option()
def loop_cmd(profile_name: str, budget_ms: float, checkpoint: str, rounds: int, top_k: int, tolerance: float,
             initial: int | None, explore: int, anchors: int, store_path: Path | None, valid_sentences: int, threads: int,
             out_path: Path | None, priors: tuple[str, ...], no_prior: bool, trust_new_host: bool, as_json: bool, progress: bool,
             search_size: SearchSize, mutation_prob: float, seed: int) -> None:
    """Search, measure the best candidates on the device, refit the predictor, repeat.

    Stops when the search's winner measures within --budget (x 1 + --tolerance) on the device, or
    after --rounds. The device is checked first (connect + runner env): an unreachable device fails
    before any search work. Measurements go to --store and are reused by later runs.

    \b
    Examples:
      hat-edge loop --profile local-cpu --budget 60 --search-size small
      hat-edge loop --profile raspberrypi4 --budget 900 --rounds 3 --json > winner.json
      hat-edge loop --profile sim:hat-pi4 --budget 700      # no board: HAT's Pi, simulated
    
    `--profile sim:hat-pi4` (also sim:hat-xeon, sim:hat-titanxp) is a simulated board: the cost
    model fitted on all 2,000 rows of HAT's Raspberry Pi 4 latency file, with seeded timing noise,
    per-arch deviations, a memory cliff and a slowdown part-way (hat_edge/devices/sim.py). It tries
    the loop in seconds; its latencies are HAT's Pi at HAT's settings, not a measurement.
    """
    from dataclasses import replace

    from hat_edge.devices.sim import SIM_NOTE
    from hat_edge.latency.prior import resolve_priors
    from hat_edge.search.loop import LoopSettings, initial_default, run_loop

    settings = search_size.settings(seed=seed, mutation_prob=mutation_prob)
    ls = LoopSettings(budget_ms=budget_ms, rounds=rounds, top_k=top_k, tolerance=tolerance, initial=initial or 40,
                      evolution=settings, seed=settings.seed, explore=explore, anchors=anchors)
    prior = resolve_priors(priors) if priors and not no_prior else None  # a bad prior file fails before the device check
    # The device is checked first, before any search work.
    job = _loop_job(profile_name, checkpoint, store_path, threads, trust_new_host, seed)
    if prior is not None:
        ls = replace(ls, prior=prior.for_device(job.prior_exclude))
    if initial is None:
        ls = replace(ls, initial=initial_default(40, ls.prior))
    try:
        res = run_loop(job.space, job.fitness(valid_sentences), job.device, ls, progress=progress,
                       log=_log, checked_env=job.env)
    finally:
        job.close()  # the store, and the exports the loop kept to time archs again
    profile = job.profile
    _write_arch(res.winner.arch, out_path)
    if as_json:
        d = res.to_dict()
        if job.simulated:
            d["simulated"] = SIM_NOTE
        click.echo(json.dumps(d))
    else:
        w = res.winner
        sim = f" ({SIM_NOTE})" if job.simulated else ""
        click.echo(f"{'met' if res.met else 'NOT MET'}: budget {budget_ms:.2f} ms on {profile.name}{sim}, "
                   f"{len(res.rounds)} round(s), {res.device_measurements} models measured")
        click.echo(f"  winner    {w.arch.describe()}")
        click.echo(f"  latency   predicted {w.predicted_ms:.2f} ms [{w.predicted_lo_ms:.2f}, {w.predicted_hi_ms:.2f}], "
                   f"measured {w.measured_ms:.2f} ms")
        click.echo(f"  loss      {w.loss:.4f}   params {w.arch.params() / 1e6:.2f} M")
        click.echo("  round  fitted  evals  candidates: predicted -> measured ms (loss)")
        for r in res.rounds:
            c = "; ".join(f"{'explored ' if x.kind == 'explore' else ''}{x.predicted_ms:.1f} -> "
                          f"{x.measured_ms:.1f} ({x.loss:.3f})" for x in r.candidates)
            click.echo(f"  {r.round:5d}  {r.fitted_on:6d}  {r.evaluations:5d}  {c}")
        if out_path:
            click.echo(f"wrote {out_path}")
    if not res.met:
        sys.exit(1)


# ------------------------------------------------------------------------------------------------
# hat-edge deploy
# ------------------------------------------------------------------------------------------------
@click.command("deploy")
@click.option("--profile", "profile_name", required=True, help="Device profile (name or .toml file).")
@click.argument("arch_file", required=False)
@click.option("--checkpoint", default=None, help="With ARCH_FILE: the checkpoint with the weights ('demo': bundled).")
@click.option("--bundle", "bundle_dir", default=None, type=dir_path(),
              help="Instead of ARCH_FILE: an exported bundle directory.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="Export int8 (onnxruntime dynamic quantization).")
@click.option("--out-dir", "out_dir", default=None, type=dir_path(),
              help="Where to export the bundle. Default: hat-edge-deploy/<profile>-<arch hash>[-int8].")
@deprecated_alias("--out", new="--out-dir", dest="out_dir", type=dir_path())
@click.option("--sentence", "sentences", multiple=True,
              help="Test sentence to translate on the device (repeatable). Default: 3 from the test split.")
@click.option("--beam", default=5, show_default=True, type=click.IntRange(min=1), help="Beam for the test translations.")
@click.option("--no-bench", is_flag=True, help="Skip the benchmark.")
@click.option("--trust-new-host", is_flag=True, help=TRUST_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def deploy_cmd(profile_name: str, arch_file: str | None, checkpoint: str | None, bundle_dir: Path | None,
               quantize: str | None, out_dir: Path | None, sentences: tuple[str, ...], beam: int, no_bench: bool,
               trust_new_host: bool, as_json: bool) -> None:
    """Export, push, verify and benchmark one SubTransformer on a device.

    ARCH_FILE is an arch file (HAT YAML or hat-edge JSON), or `smallest` / `largest` of the
    checkpoint's space. With ARCH_FILE and --checkpoint the arch's weights are cut from the SuperTransformer and exported
    for the profile's runtime, then checked on the host against PyTorch. With --bundle an exported
    bundle goes as it is. On the device: the sha256 of every file is checked, test sentences are
    translated and compared token for token with the host, and the model is benchmarked with the
    profile's settings. Deploying again sends only changed files.

    \b
    Examples:
      hat-edge deploy --profile local-cpu winner.yml --checkpoint demo
      hat-edge deploy --profile raspberrypi4 --bundle hat-edge-deploy/pi4-1a2b3c --json
    """
    from hat_edge.app.deploy import VERIFY_SENTENCES, deploy, render_deploy
    from hat_edge.devices.profiles import load_profile

    if arch_file and bundle_dir:
        raise UserError("give ARCH_FILE (with --checkpoint) or --bundle DIR, not both")
    if not arch_file and not bundle_dir:
        raise UserError("missing what to deploy: ARCH_FILE with --checkpoint, or --bundle DIR")
    if arch_file and not checkpoint:
        raise UserError("ARCH_FILE needs --checkpoint (a checkpoint file, or 'demo' for the bundled model)")
    profile = load_profile(profile_name)
    arch = ckpt = None
    refs = None
    verify: list[str] | None = None
    sents = list(sentences)
    if arch_file:
        from hat_edge.app.job import prepare_profile
        from hat_edge.checkpoint import load_checkpoint
        from hat_edge.space import load_arch

        ckpt = load_checkpoint(checkpoint)  # type: ignore[arg-type]
        arch = load_arch(arch_file, ckpt.space)
        ckpt.space.validate(arch, arch_file)
        profile = prepare_profile(profile, int(ckpt.model.cfg.vocab_size))
        if not sents:
            from hat_edge.evaluate import load_split

            try:
                test = load_split(ckpt, "test")
                sents, refs = list(test.head(3).src), list(test.head(3).tgt)
                verify = list(test.head(VERIFY_SENTENCES).src)
            except UserError:
                sents = []
    elif not sents:
        sents = []
    res = deploy(profile, bundle=bundle_dir, arch=arch, checkpoint=ckpt, out_dir=out_dir, quantize=quantize,
                 sentences=sents or None, references=refs, verify_sentences=verify, beam=beam, benchmark=not no_bench,
                 trust_new_host=trust_new_host, log=_log)
    if as_json:
        click.echo(json.dumps(res.to_dict()))
    else:
        click.echo(render_deploy(res))
    if not res.ok:
        sys.exit(1)


COMMANDS = [search_cmd, loop_cmd, deploy_cmd]
