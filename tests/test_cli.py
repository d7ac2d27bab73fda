"""The command line's conventions, across every command (fast: help, argument errors, no device work).

    --out FILE / --out-dir DIR; --progress/--no-progress wherever bars are shown; --search-size for
    search, loop and run; paths as Paths; `run` first in `hat-edge --help`; old spellings kept one
    release as hidden aliases that warn on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hat_edge.cli import cli


def _commands(group: click.Group = cli, path: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _option(cmd: click.Command, opt: str) -> click.Option | None:
    return next((p for p in cmd.params if isinstance(p, click.Option) and opt in (*p.opts, *p.secondary_opts)), None)


def test_run_is_listed_first_in_help():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0, r.output
    listed = r.output.split("Commands:", 1)[1].split()
    assert listed[0] == "run"
    assert "hat-edge run" in r.output.split("Commands:", 1)[0]  # the one-command path, in the description


def test_the_cli_starts_without_torch():
    """Every command's flags are built without importing torch (2+ s on a small CPU, paid by
    `profile list` and `--help` alike): torch is imported by the commands that run a model."""
    import subprocess
    import sys

    code = ("import sys\nfrom hat_edge.cli import main\n"
            "for argv in (['--help'], ['profile', 'list'], ['run', '--help'], ['train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "NO-TORCH"


@pytest.mark.parametrize("command, threshold", [("run", "INITIAL_CV_MAPE"), ("loop", "LOOP_INITIAL_CV_MAPE")])
def test_initial_help_quotes_the_early_stop_threshold_in_use(command: str, threshold: str):
    """The `--initial` help quotes the early-stop threshold as a number (the CLI does not import the
    search loop to build its help); it must be the one measure_initial uses (it once said 4% for a 3%)."""
    import re

    from hat_edge.search import loop

    r = CliRunner().invoke(cli, [command, "--help"], terminal_width=500)
    assert r.exit_code == 0, r.output
    said = re.findall(r"cross-validated MAPE is at most ([0-9.]+)%", " ".join(r.output.split()))
    assert said and float(said[0]) == getattr(loop, threshold), (said, getattr(loop, threshold))


@pytest.mark.parametrize("command", ["search", "loop", "run"])
def test_search_size_is_the_way_to_size_the_search(command: str):
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0, r.output
    assert "--search-size" in r.output
    for old in ("--population ", "--parents ", "--mutations ", "--crossovers ", "--iterations ", "--small "):
        assert old not in r.output  # old spellings are hidden aliases


def test_out_is_a_file_and_out_dir_a_directory_everywhere():
    seen = {"--out": 0, "--out-dir": 0}
    for path, cmd in _commands():
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden:
                continue
            if "--out" in p.opts:
                seen["--out"] += 1
                assert isinstance(p.type, click.Path) and not p.type.dir_okay, (path, "--out must be a FILE")
            if "--out-dir" in p.opts:
                seen["--out-dir"] += 1
                assert isinstance(p.type, click.Path) and not p.type.file_okay, (path, "--out-dir must be a DIR")
    assert seen["--out"] >= 4 and seen["--out-dir"] >= 5, seen


def test_paths_are_typed_as_paths():
    for path, cmd in _commands():
        for p in cmd.params:
            if isinstance(p.type, click.Path):
                assert p.type.type is Path, (path, p.name)  # click.Path(path_type=Path)


@pytest.mark.parametrize("command", [
    ("measure",), ("bench",), ("train",), ("evaluate",), ("predictor", "train"), ("predictor", "eval"),
    ("search",), ("loop",), ("run",),
])
def test_progress_flag_on_every_command_that_shows_bars(command: tuple[str, ...]):
    cmd: click.Command = cli
    for name in command:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    opt = _option(cmd, "--progress")
    assert opt is not None and opt.secondary_opts == ["--no-progress"], command


def test_no_command_keeps_a_bare_no_progress_flag():
    for path, cmd in _commands():
        opt = _option(cmd, "--no-progress")
        assert opt is None or "--progress" in opt.opts, path


def test_deprecated_out_still_works_and_warns(tmp_path: Path):
    out = tmp_path / "archs"
    r = CliRunner().invoke(cli, ["space", "sample", "demo", "-n", "2", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert "--out is deprecated" in r.stderr and "--out-dir" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line
    listed = json.loads(r.stdout)
    assert len(listed) == 2 and len(list(out.glob("*.yml"))) == 2
    # the new spelling: no warning
    r = CliRunner().invoke(cli, ["space", "sample", "demo", "-n", "2", "--out-dir", str(tmp_path / "b"), "--json"])
    assert r.exit_code == 0 and r.stderr == "" and len(list((tmp_path / "b").glob("*.yml"))) == 2
    # both at once: a usage error
    r = CliRunner().invoke(cli, ["space", "sample", "demo", "--out", str(out), "--out-dir", str(out)])
    assert r.exit_code == 2 and "--out-dir only" in r.output


def test_deprecated_search_size_spellings_warn_and_still_apply():
    # --population is applied (parents 25 > population 8 is refused by the settings) after its warning
    r = CliRunner().invoke(cli, ["search", "--budget", "10", "--predictor", "p.json", "--population", "8"])
    assert r.exit_code != 0
    assert "--population is deprecated" in r.stderr and "--search-size population=N" in r.stderr
    assert "'parents' (25) must be <= 'population' (8)" in r.output
    r = CliRunner().invoke(cli, ["search", "--budget", "10", "--search-size", "population=8"])
    assert r.exit_code != 0 and "deprecated" not in r.output and "(8)" in r.output
    r = CliRunner().invoke(cli, ["search", "--budget", "10", "--search-size", "huge"])
    assert r.exit_code == 2 and "'huge' is not a size" in r.output


def test_search_size_values():
    from hat_edge.commands._options import SearchSize, SearchSizeType
    from hat_edge.search.evolution import EvolutionSettings

    t = SearchSizeType("hat")
    assert t.convert("quick", None, None).settings(seed=3) == EvolutionSettings.quick(seed=3)
    assert t.convert("small", None, None).settings() == EvolutionSettings.small()
    assert t.convert("hat", None, None).settings() == EvolutionSettings()
    s = t.convert("population=8,parents=3,mutations=3,crossovers=2,iterations=2", None, None)
    assert s.preset == "hat" and s.settings() == EvolutionSettings(population=8, parents=3, mutations=3,
                                                                   crossovers=2, iterations=2)
    assert t.convert("small, iterations=20", None, None) == SearchSize("small", (("iterations", 20),))
    assert SearchSizeType("quick").convert("iterations=2", None, None).settings().population == 24


def test_run_and_loop_check_the_device_before_writing_anything(tmp_path: Path):
    """The commands reach the app layer's set-up (prepare_job): an unknown profile fails before the
    output directory or the store exists; the deprecated spellings warn first."""
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", "--profile", "nope-profile", "--out", str(out)])
    assert r.exit_code != 0 and "unknown profile 'nope-profile'" in r.output, r.output
    assert "--out is deprecated" in r.stderr and not out.exists()
    store = tmp_path / "s.sqlite"
    r = CliRunner().invoke(cli, ["loop", "--profile", "nope-profile", "--budget", "5", "--small",
                                 "--store", str(store)])
    assert r.exit_code != 0 and "unknown profile 'nope-profile'" in r.output, r.output
    assert "--small is deprecated" in r.stderr and not store.exists()


def test_run_and_loop_start_from_the_packaged_latency_prior_unless_told_not_to(tmp_path: Path, monkeypatch):
    """#16: `run` and `loop` use the packaged prior ('builtin') by default; --no-prior is HAT's way
    (random initial archs); --prior replaces the default. Captured where the command hands its
    settings to the app layer (the job itself is tested in test_app / test_loop)."""
    import hat_edge.app.mainjob as mainjob

    got: list[tuple[str, ...]] = []

    def capture(s, **kw):
        assert s.initial is None  # resolved by the job once the prior is read (initial_default)
        got.append(s.prior)
        raise click.ClickException("captured")

    monkeypatch.setattr(mainjob, "run_main_job", capture)
    for extra, want in (([], ("builtin",)), (["--no-prior"], ()), (["--prior", "mine.json"], ("mine.json",))):
        r = CliRunner().invoke(cli, ["run", "--out-dir", str(tmp_path / "o"), *extra])
        assert "captured" in r.output, r.output
        assert got[-1] == want, (extra, got[-1])
    loop = next(cmd for path, cmd in _commands() if path == ("loop",))
    assert _option(loop, "--prior").default == ("builtin",) and _option(loop, "--no-prior").is_flag
    # --initial unset: half as many initial archs with a prior (run: 12 of 24; loop: 20 of 40)
    from hat_edge.latency.prior import packaged_prior
    from hat_edge.search.loop import initial_default

    assert initial_default(24, None) == 24 and initial_default(24, packaged_prior()) == 12
    assert initial_default(40, packaged_prior()) == 20 and initial_default(10, packaged_prior()) == 8
