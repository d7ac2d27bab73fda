"""`hat-edge profile ...`, `hat-edge measure`, `hat-edge bench`: devices and their latencies."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import click

from hat_edge.commands._options import file_path, progress_option
from hat_edge.errors import UserError

_TRUST_HELP = ("Accept the device's host key if it is not in known_hosts yet, and add it there. "
               "A CHANGED key is always refused. Check the printed fingerprint first.")


def _echo_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    click.echo(fmt.format(*header))
    click.echo(fmt.format(*["-" * w for w in widths]))
    for r in rows:
        click.echo(fmt.format(*r))


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


# --------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------
@click.group("profile")
def profile_group() -> None:
    """Device profiles: how to reach a device and how to measure on it (TOML files).

    \b
    Profiles are looked up by name in $HAT_EDGE_PROFILE_PATH, ./device_profiles,
    ~/.config/hat-edge/profiles and the built-in ones (local-cpu, local-gpu); any
    command also takes a path to a .toml file. Every field: docs/profiles.md.
    """


@profile_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def profile_list(as_json: bool) -> None:
    """Every profile found, where it comes from, and whether it loads."""
    from hat_edge.devices.profiles import list_profiles, load_profile_file

    out = []
    for e in list_profiles():
        item: dict[str, Any] = {"name": e.name, "path": str(e.path), "shadowed": e.shadowed}
        try:
            p = load_profile_file(e.path)
            item.update(transport=p.transport, runtime=p.runtime, device=p.device,
                        target=_target(p), description=p.description, error=None)
            if p.name != e.name:  # a copied example keeps its old `name`: messages and the store use that
                item["error"] = (f"field 'name' is '{p.name}' but the file is {e.path.name}: --profile {e.name} "
                                 f"measures as '{p.name}'; set name = \"{e.name}\"")
        except UserError as err:
            item.update(transport=None, runtime=None, device=None, target=None, description="", error=str(err))
        out.append(item)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    rows = [[i["name"] + (" (shadowed)" if i["shadowed"] else ""), i["transport"] or "?",
             i["runtime"] or "?", i["target"] or "", i["error"] or i["description"], i["path"]] for i in out]
    _echo_table(rows, ["name", "transport", "runtime", "target", "description", "file"])
    from hat_edge.devices.profiles import list_examples

    click.echo(f"examples to copy: {', '.join(e.name for e in list_examples())} "
               "(`hat-edge profile new NAME --from EXAMPLE --host HOST`)")


@profile_group.command("new")
@click.argument("name")
@click.option("--host", default=None, help="The device's host name or IP address.")
@click.option("--user", default=None, help="The login user on the device (default: your local user, or ~/.ssh/config).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="SSH port (default 22, or ~/.ssh/config).")
@click.option("--ssh-config-host", default=None, help="A Host alias of ~/.ssh/config instead of --host/--user/--port.")
@click.option("--python", "python", default=None,
              help="The board's python with numpy + onnxruntime (e.g. /home/pi/hat-venv/bin/python).")
@click.option("--from", "example", default="raspberrypi4", show_default=True,
              help="The example to start from (`hat-edge profile list` names them).")
@click.option("--dir", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write NAME.toml. Default: ./device_profiles if it exists, else ~/.config/hat-edge/profiles.")
@click.option("--force", is_flag=True, help="Replace an existing NAME.toml.")
@click.option("--check/--no-check", default=True, show_default=True, help="Run `profile check NAME` after writing.")
@click.option("--trust-new-host", is_flag=True, help=_TRUST_HELP)
def profile_new(name: str, host: str | None, user: str | None, port: int | None, ssh_config_host: str | None,
                python: str | None, example: str, out_dir: Path | None, force: bool, check: bool,
                trust_new_host: bool) -> None:
    """Write a profile NAME.toml for a new board from an example (its comments kept, `name` set to
    NAME), then check the board: connect, find its python and runtime, and say what to fix.

    \b
    Example (a Raspberry Pi 4 on Pi OS bookworm 64-bit, after the venv in docs/profiles.md):
      hat-edge profile new mypi --host raspberrypi.local --user pi --python /home/pi/hat-venv/bin/python
    """
    from hat_edge.devices.measure import device_env
    from hat_edge.devices.profiles import load_profile_file, new_profile_text

    if not (host or ssh_config_host):
        raise UserError("profile new needs --host HOST (or --ssh-config-host ALIAS)")
    text = new_profile_text(name, example, host=host, user=user, port=port, ssh_config_host=ssh_config_host,
                            python=python)
    d = out_dir or (Path("device_profiles") if Path("device_profiles").is_dir()
                    else Path.home() / ".config" / "hat-edge" / "profiles")
    path = d / f"{name}.toml"
    if path.exists() and not force:
        raise UserError(f"{path} exists; edit it, or pass --force to replace it")
    d.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    click.echo(f"wrote {path} (from the '{example}' example; edit it to change anything)")
    if check:
        p = load_profile_file(path)
        try:
            env = device_env(p, trust_new_host=trust_new_host, retries=0)
        except UserError as e:
            raise UserError(f"{e} (then: hat-edge profile check {path})") from None
        click.echo(f"{p.name}: reachable; python {env.get('python')}, numpy {env.get('numpy')}, "
                   f"onnxruntime {env.get('onnxruntime') or 'MISSING'}")
        for w in _env_warnings(p, env):
            click.echo(f"  warning: {w}", err=True)


def _target(p) -> str:
    if p.is_local:
        return f"this machine ({p.device})"
    if p.ssh_config_host and not p.host:
        return f"ssh {p.ssh_config_host} (~/.ssh/config)"
    return f"ssh {(p.user + '@') if p.user else ''}{p.host}{':' + str(p.port) if p.port else ''}"


@profile_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def profile_show(name: str, as_json: bool) -> None:
    """Every field of profile NAME (a name or a .toml path), defaults filled in."""
    from hat_edge.devices.profiles import load_profile

    p = load_profile(name)
    d = p.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"{p.name}  ({p.source or 'built in'})")
    for k, v in d.items():
        if k in ("measurement", "name", "source"):
            continue
        click.echo(f"  {k:16s} {v if v not in (None, '') else '-'}")
    click.echo("  [measurement]")
    for k, v in d["measurement"].items():
        click.echo(f"    {k:14s} {v}")


@profile_group.command("check")
@click.argument("name")
@click.option("--trust-new-host", is_flag=True, help=_TRUST_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def profile_check(name: str, trust_new_host: bool, as_json: bool) -> None:
    """Connect to the device of profile NAME and describe it.

    Reports OS, CPU model, cores, memory, python and runtime versions, the CPU frequency
    governor and, on a Raspberry Pi, temperature and `vcgencmd get_throttled`. Warns about
    what makes timings unstable (a non-performance governor, throttling, a missing runtime).
    """
    from hat_edge.devices.measure import device_env
    from hat_edge.devices.profiles import load_profile

    p = load_profile(name)
    env = device_env(p, trust_new_host=trust_new_host, retries=0)  # a doctor answers at once
    warnings = _env_warnings(p, env)
    if as_json:
        click.echo(json.dumps({**env, "warnings": warnings}, indent=2))
        return
    click.echo(f"{p.name}: reachable ({env.get('host') or 'this machine'})")
    keys = ("os", "machine", "cpu_model", "cores", "cores_usable", "memory_mb", "python", "numpy",
            "onnxruntime", "torch", "cuda_device", "governor", "cpu_max_mhz", "raspberry_pi",
            "temperature_c", "throttled", "work_dir")
    for k in keys:
        if k in env:
            v = env[k]
            click.echo(f"  {k:14s} {'-' if v is None else v}")
    for w in warnings:
        click.echo(f"  warning: {w}", err=True)


def _env_warnings(p, env: dict[str, Any]) -> list[str]:
    from hat_edge.devices.measure import VENV_HINT
    from hat_edge.runtime.formats import RUNNER_MIN_PYTHON

    out = []
    py = str(env.get("python") or "")
    try:
        too_old = tuple(int(x) for x in py.split(".")[:2]) < RUNNER_MIN_PYTHON
    except ValueError:
        too_old = False
    if too_old:
        need = ".".join(map(str, RUNNER_MIN_PYTHON))
        out.append(f"the device's python is {py}; the runner needs {need} or newer: set the profile's field "
                   f"'python' to one (e.g. python{need}, or a venv made with it)")
    machine = str(env.get("machine") or "")
    if machine in ("armv7l", "armv6l", "armhf"):
        out.append(f"the device runs a 32-bit OS ({machine}): onnxruntime has no wheel for it; "
                   "install a 64-bit OS (Raspberry Pi OS 64-bit, aarch64)")
    if p.runtime == "onnxruntime" and not env.get("onnxruntime"):
        out.append(f"onnxruntime is not installed for {p.remote_python} on the device. {VENV_HINT}")
    ort = str(env.get("onnxruntime") or "")
    try:
        old_ort = bool(ort) and tuple(int(x) for x in ort.split(".")[:2]) < (1, 14)
    except ValueError:
        old_ort = False
    if p.runtime == "onnxruntime" and old_ort:
        out.append(f"onnxruntime {ort} on the device cannot load the opset-18 graphs hat-edge exports: it needs "
                   ">= 1.14 (`pip install -U onnxruntime` in the board's venv)")
    if env.get("raspberry_pi") and env.get("throttled") is None:
        out.append("throttling cannot be read: `vcgencmd` is missing (sudo apt install libraspberrypi-bin); "
                   "a throttled Pi times slower without telling")
    if p.runtime == "torchscript" and not env.get("torch"):
        out.append(f"torch is not installed for {p.remote_python}")
    if p.device == "cuda" and not env.get("cuda_device"):
        out.append("no CUDA device visible to torch")
    gov = env.get("governor")
    if gov and gov not in ("performance",):
        out.append(f"CPU governor is '{gov}': timings vary with frequency scaling "
                   "(echo performance | sudo tee /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor)")
    thr = env.get("throttled")
    if thr not in (None, "0x0"):
        out.append(f"the device reports throttling ({thr}): check power supply and cooling")
    return out


# --------------------------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------------------------
@click.command("measure")
@click.option("--profile", "profiles", multiple=True, required=True,
              help="Device profile (name or .toml). Repeat to measure several devices at once, one worker each.")
@click.option("--space", "space_name", default="demo", show_default=True,
              help="Design space to sample from: hat-wmt, hat-iwslt, demo, or a space file.")
@click.option("-n", "n", type=click.IntRange(min=1), default=50, show_default=True, help="How many archs to sample.")
@click.option("--seed", default=0, show_default=True, help="Sampling seed: the same seed gives the same archs.")
@click.option("--store", "store_path", default=None, type=file_path(),
              help="Latency store (SQLite). Default: $HAT_EDGE_STORE or .hat-edge/latency.sqlite.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Models per runner invocation (one connection each).")
@click.option("--side-by-side", is_flag=True,
              help="Time the models in rotation, --group at a time, each group anchored to archs already "
                   "measured (timed again beside it): on a device whose speed drifts (a shared host) the "
                   "latencies stay on one scale. A group is committed when it ends.")
@click.option("--group", default=12, show_default=True, type=click.IntRange(min=3),
              help="With --side-by-side: models open at once (anchors included); mind a board's memory.")
@click.option("--trust-new-host", is_flag=True, help=_TRUST_HELP)
@click.option("--no-wait", is_flag=True,
              help="If another runner is timing on the board (one runner per board), fail at once naming it "
                   "instead of waiting for it.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary per device.")
@progress_option()
def measure_cmd(profiles: tuple[str, ...], space_name: str, n: int, seed: int, store_path: Path | None,
                batch_size: int, side_by_side: bool, group: int, trust_new_host: bool, no_wait: bool, as_json: bool,
                progress: bool) -> None:
    """Sample N SubTransformers and measure their latency on each device into the store.

    Each model is exported with random weights (latency does not depend on weight values), run
    by the on-device runner at the profile's settings (HAT's: 30 source tokens, 30 decoder steps,
    beam 5), and committed to the store the moment it finishes. Resumable: run the same command
    again after a crash, a reboot or a dropped link and only the missing models are measured.

    One runner per board: a runner waits while another one times on the same board (or, with
    --no-wait, this command fails at once naming it). Results a killed command's runner left on
    the board are stored before anything is measured, never measured twice. Ctrl-C, SIGTERM and
    SIGHUP stop the runner on the device too.

    \b
    Examples:
      hat-edge measure --profile local-cpu -n 100
      hat-edge measure --profile raspberrypi4 --profile jetson-nano --space hat-wmt -n 500
      hat-edge measure --profile local-cpu -n 100 --side-by-side   # a shared, drifting machine
    """
    from hat_edge.devices.measure import measure_many
    from hat_edge.devices.profiles import load_profile
    from hat_edge.latency.store import DEFAULT_STORE_PATH, LatencyStore
    from hat_edge.space import get_space

    profs = [load_profile(p) for p in profiles]
    space = get_space(space_name)
    archs = space.sample_n(n, seed=seed)
    store = LatencyStore(store_path or DEFAULT_STORE_PATH)
    before = {p.name: sum(store.has(p.name, a, p.runtime, p.measure_spec().identity()) for a in archs) for p in profs}
    errors: dict[str, int] = {p.name: 0 for p in profs}
    why: set[str] = set()
    adopted = [0]

    def on_error(err) -> None:
        errors[err.device] += 1
        why.add(err.error)

    results = measure_many(profs, archs, store, progress=progress, trust_new_host=trust_new_host,
                           batch_size=batch_size, on_error=on_error, side_by_side=side_by_side, group=group,
                           no_wait=no_wait, on_adopt=lambda n: adopted.__setitem__(0, adopted[0] + n))
    summary = []
    for p in profs:
        recs = results[p.name]
        med = [r.corrected_ms for r in recs]  # anchored records on their anchors' scale
        summary.append({
            "device": p.name, "runtime": p.runtime, "archs": len(archs), "stored_before": before[p.name],
            "measured": len(recs) - before[p.name] - (adopted[0] if len(profs) == 1 else 0),
            "adopted": adopted[0] if len(profs) == 1 else None, "failed": errors[p.name],
            "median_ms_min": min(med) if med else None, "median_ms_max": max(med) if med else None,
            "median_cv": statistics.median([r.cv for r in recs if r.cv is not None]) if recs else None,
            "store": str(store.path),
        })
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        rows = [[s["device"], s["runtime"], str(s["archs"]), str(s["stored_before"]), str(s["measured"]),
                 str(s["failed"]), f"{_ms(s['median_ms_min'])} - {_ms(s['median_ms_max'])}",
                 "-" if s["median_cv"] is None else f"{s['median_cv']:.3f}"] for s in summary]
        _echo_table(rows, ["device", "runtime", "archs", "stored before", "measured", "failed",
                           "median ms (min - max)", "median CV"])
        click.echo(f"store: {store.path}")
    if any(errors.values()):
        n = sum(errors.values())
        if len(why) == 1 and n > 1:  # one cause for all: a rerun cannot help until it is fixed
            raise UserError(f"all {n} failed models failed the same way: {next(iter(why))}; fix that first "
                            f"(`hat-edge profile check {profs[0].name}`), then run the same command again")
        raise UserError(f"{n} models failed (see the errors above); run the same command again to retry them")


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------
@click.command("bench")
@click.option("--profile", "profile_name", required=True, help="Device profile (name or .toml).")
@click.argument("arch_files", nargs=-1, required=True)
@click.option("--runtime", type=click.Choice(["onnxruntime", "torchscript"]), default=None,
              help="Override the profile's runtime.")
@click.option("--space", "space_name", default=None,
              help="Space for the names `smallest` / `largest` (hat-wmt, hat-iwslt, demo or a file).")
@click.option("--store", "store_path", default=None, type=file_path(),
              help="Also record the results in this latency store.")
@click.option("--side-by-side", is_flag=True,
              help="Time the archs in rotation (one run of each in turn) instead of one after another: "
                   "on a device whose speed drifts their ratios stay fair. Results arrive at the end.")
@click.option("--trust-new-host", is_flag=True, help=_TRUST_HELP)
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list: arch, median_ms, p90_ms, iqr_ms, cv, runs (total ms of each timed run), ...")
@progress_option(None, when="on, off with --json")
def bench_cmd(profile_name: str, arch_files: tuple[str, ...], runtime: str | None, space_name: str | None,
              store_path: Path | None, side_by_side: bool, trust_new_host: bool, as_json: bool,
              progress: bool | None) -> None:
    """Measure the given ARCH_FILE... on a device now and print their latencies.

    ARCH_FILE is a HAT `*-subtransformer` YAML, a hat-edge arch JSON, transformer-base /
    transformer-big, or smallest / largest of --space. Always measures afresh (the store is not
    consulted); --store also records the results.

    \b
    Examples:
      hat-edge bench --profile raspberrypi4 HAT_wmt14ende_raspberrypi@3.5s_bleu@25.8.yml --json
      hat-edge bench --profile local-cpu --space demo smallest largest --side-by-side
    """
    from hat_edge.devices.measure import measure_archs
    from hat_edge.devices.profiles import load_profile
    from hat_edge.latency.store import LatencyStore
    from hat_edge.space import get_space, load_arch

    p = load_profile(profile_name)
    if runtime:
        p = p.with_runtime(runtime)
    space = get_space(space_name) if space_name else None
    archs = [load_arch(f, space) for f in arch_files]
    scratch = LatencyStore(":memory:")
    if side_by_side and len(set(archs)) < len(archs):
        raise UserError("--side-by-side: the same arch is given twice; give each once")
    recs = measure_archs(p, archs, scratch, progress=not as_json if progress is None else progress,
                         trust_new_host=trust_new_host,
                         interleave=side_by_side)
    by_arch = {r.arch: r for r in recs}
    if store_path:
        store = LatencyStore(store_path)
        for r in recs:
            store.add(r)
    out = []
    for f, a in zip(arch_files, archs):
        r = by_arch.get(a)
        if r is None:
            out.append({"arch": f, "device": p.name, "runtime": p.runtime, "error": "not measured (see above)"})
            continue
        out.append({
            "arch": f, "device": p.name, "runtime": p.runtime, "median_ms": r.median_ms, "p90_ms": r.p90_ms,
            "mean_10_90_ms": r.mean_10_90_ms, "iqr_ms": r.iqr_ms, "cv": r.cv, "encoder_ms": r.encoder_ms,
            "decoder_ms": r.decoder_ms, "runs": r.total_runs_ms, "settings": dict(r.settings),
        })
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        rows = [[o["arch"], _ms(o.get("median_ms")), _ms(o.get("p90_ms")), _ms(o.get("iqr_ms")),
                 "-" if o.get("cv") is None else f"{o['cv']:.3f}", _ms(o.get("encoder_ms")),
                 _ms(o.get("decoder_ms")), str(len(o.get("runs", []))) if "runs" in o else o["error"]]
                for o in out]
        _echo_table(rows, ["arch", "median ms", "p90 ms", "IQR ms", "CV", "encoder ms", "decoder ms", "runs"])
        for o in out:
            if o.get("cv") is not None and o["cv"] > 0.05:
                click.echo(f"warning: {o['arch']}: CV {o['cv']:.2f} is high; the device may be busy", err=True)
    if any("error" in o for o in out):
        raise UserError(f"{sum('error' in o for o in out)} of {len(out)} archs could not be measured")



# --------------------------------------------------------------------------------------------
# device clean
# --------------------------------------------------------------------------------------------
@click.group("device")
def device_group() -> None:
    """Housekeeping on a device's work dir (see also `hat-edge profile check`)."""


@device_group.command("clean")
@click.option("--profile", "profile_name", required=True, help="Device profile (name or .toml).")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--keep-deployed", default=1, show_default=True, type=click.IntRange(min=0),
              help="Keep this many most recently modified deployed bundles (besides those in use), so the "
                   "last deployment stays usable.")
@click.option("--all-uploads", is_flag=True,
              help="Remove every partial upload, not only those untouched for 10 minutes (only when no "
                   "push to this device is running).")
@click.option("--store", "store_path", default=None, type=file_path(),
              help="Latency store deciding which local exports are done with. "
                   "Default: $HAT_EDGE_STORE or .hat-edge/latency.sqlite (as `hat-edge measure`).")
@click.option("--trust-new-host", is_flag=True, help=_TRUST_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (removed, kept, by_kind, total_mb).")
def device_clean(profile_name: str, dry_run: bool, keep_deployed: int, all_uploads: bool,
                 store_path: Path | None, trust_new_host: bool, as_json: bool) -> None:
    """Remove what measurements and deployments left on the device, and local exports
    already measured. Prints each item with its size, grouped by kind, and the total.

    \b
    On the device, inside the profile's work_dir only:
      deployed/<name>    deployed bundles, except those in use and the --keep-deployed newest
      jobs/<id>          job dirs, except active ones
      .incoming/<file>   partial uploads of a killed push, untouched for 10 minutes
                         (all of them with --all-uploads)
      bundles/<key>      measurement bundles, except those an active job names
      runner-*.pyz/.py   runners of other hat-edge versions (kept while a job is active)
    On this machine:
      the export cache ($HAT_EDGE_CACHE/bundles or ~/.cache/hat-edge/bundles): exports whose
      arch is stored in --store for this profile at its settings (runtime, precision, vocabulary)

    \b
    Active job: the one of the runner holding the board lock (work_dir/runner.lock), and any
    job dir written to in the last 10 minutes (a runner starting, waiting for the lock, or run
    without it). In use: a bundle an active job's job.json names. Links are never followed: a
    link is removed as a link, a linked dir is left alone. Ages use the device's clock.

    \b
    Examples:
      hat-edge device clean --profile raspberrypi4 --dry-run
      hat-edge device clean --profile raspberrypi4 --keep-deployed 0 --json
    """
    from hat_edge.devices.clean import clean, render_clean
    from hat_edge.devices.profiles import load_profile
    from hat_edge.latency.store import DEFAULT_STORE_PATH

    p = load_profile(profile_name)
    rep = clean(p, dry_run=dry_run, keep_deployed=keep_deployed, all_uploads=all_uploads,
                store_path=store_path or DEFAULT_STORE_PATH, trust_new_host=trust_new_host)
    click.echo(json.dumps(rep.to_dict(), indent=2) if as_json else render_clean(rep))


COMMANDS = [profile_group, measure_cmd, bench_cmd, device_group]
