"""The `hat-edge` command line. Commands are thin: each wires rooms together.

Each room's commands live in `hat_edge/commands/<room>.py` and expose `COMMANDS`, a list of click
commands or groups; this module collects them. User mistakes (`UserError`) print as one line.
"""

from __future__ import annotations

import importlib
import signal
import sys

import click

from hat_edge import __version__
from hat_edge.errors import UserError

# Rooms whose commands make up the CLI, in `--help` order: `run`, the one-command path, first.
_COMMAND_MODULES = (
    "hat_edge.commands.run",
    "hat_edge.commands.arch",
    "hat_edge.commands.export",
    "hat_edge.commands.devices",
    "hat_edge.commands.predictor",
    "hat_edge.commands.train",
    "hat_edge.commands.hatimport",
    "hat_edge.commands.search",
)


class _Group(click.Group):
    """A click group that turns UserError into a one-line message and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # keep registration order


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hat-edge")
def cli() -> None:
    """hat-edge: find, export, deploy and benchmark hardware-specialised Transformers (HAT).

    \b
    The whole job, one command:
      hat-edge run                          measure, search under a budget, deploy, report
                                            (local-cpu and the bundled demo model by default)
    \b
    The loop, one command per step:
      hat-edge space show demo              the design space
      hat-edge measure --profile local-cpu  a latency dataset on a device
      hat-edge predictor train ...          a latency predictor from it
      hat-edge loop --profile local-cpu     search + measure until the budget holds
      hat-edge deploy --profile P ...       export, push, verify, benchmark
    Run `hat-edge COMMAND --help` for each command's options.
    """


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that room has no commands yet
                continue
            raise
        for cmd in getattr(mod, "COMMANDS", []):
            cli.add_command(cmd)


_register()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP (a closed terminal or laptop lid, `kill`) stop a command the way Ctrl-C
    does: every path that started a runner stops it and tidies its job dir on the way out."""
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _interrupt)


def main(argv: list[str] | None = None) -> int:
    stop_on_signals()
    try:
        cli.main(args=argv, prog_name="hat-edge", standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        _stop_children()
    return 0


def _stop_children() -> None:
    """On the way out (an interrupt included), no runner this command started is left timing: the
    paths that start one stop it themselves; this catches one an interrupt reached between its
    spawn and that code. (A runner also stops by itself when this process dies: --watch-host.)"""
    transport = sys.modules.get("hat_edge.devices.transport")  # only if this command loaded it
    if transport is not None:
        transport.kill_live_processes()


if __name__ == "__main__":
    sys.exit(main())
