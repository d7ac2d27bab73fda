"""Options shared by the commands, so that one spelling means one thing everywhere.

    --out FILE          a file a command writes (an arch, a predictor, a CSV)
    --out-dir DIR       a directory a command writes into (a bundle, a report, sampled archs)
    --progress/--no-progress   progress bars on stderr, on every command that shows them
    --search-size SIZE  the evolution's size, for `search`, `loop` and `run`

Old spellings stay one release as hidden aliases (`deprecated_alias`) that print a one-line
warning to stderr.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import click
from click.core import ParameterSource

if TYPE_CHECKING:
    from hat_edge.search.evolution import EvolutionSettings

F = TypeVar("F", bound=Callable[..., Any])


def warn_deprecated(old: str, new: str) -> None:
    click.echo(f"hat-edge: warning: {old} is deprecated and goes in the next release; use {new}", err=True)


def deprecated_alias(
    old: str,
    *,
    new: str,
    dest: str,
    apply: Callable[[dict[str, Any], Any], None] | None = None,
    required: bool = False,
    **option_kw: Any,
) -> Callable[[F], F]:
    """A hidden option `old`, kept one release, that stands for `new` (the option whose parameter
    is `dest`). Given, it warns on stderr, then sets `dest` to its value, or calls
    `apply(kwargs, value)` for anything else. Given together with `new` it is a usage error.
    `required`: `new` is required (checked here, since `old` may stand in for it)."""
    hidden = "deprecated_" + old.lstrip("-").replace("-", "_")

    def deco(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kw: Any) -> Any:
            value = kw.pop(hidden)
            given = value is not None and value is not False
            ctx = click.get_current_context()
            if given:
                warn_deprecated(old, new)
                if apply is not None:
                    apply(kw, value)
                else:
                    if ctx.get_parameter_source(dest) == ParameterSource.COMMANDLINE:
                        raise click.UsageError(f"give {new} only (not also the deprecated {old})", ctx=ctx)
                    kw[dest] = value
            if required and kw.get(dest) is None:
                raise click.UsageError(f"Missing option '{new}'.", ctx=ctx)
            return f(*args, **kw)

        return click.option(old, hidden, hidden=True, default=None, **option_kw)(wrapper)  # type: ignore[return-value]

    return deco


def progress_option(default: bool | None = True, when: str = "") -> Callable[[F], F]:
    """`--progress/--no-progress`. default None: decided by the command (`when` says how)."""
    shown = "on" if default else "off"
    return click.option(
        "--progress/--no-progress", "progress", default=default,
        help=f"Progress bars on stderr (default: {when or shown}).",
    )


TRUST_HELP = "Accept and remember an unknown SSH host key (never a changed one)."

class _Threads(click.ParamType):
    name = "auto|N"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        text = str(value).strip()
        if text == "auto":
            return "auto"
        if text.isdigit():
            return int(text)
        self.fail(f"{value!r}: allowed 'auto' or a whole number >= 0 (0: torch's default)", param, ctx)


threads_option = click.option(
    "--threads", default="auto", show_default=True, type=_Threads(),
    help="Torch threads on the host for the fitness and BLEU. auto: one, or every core (at most 4), "
         "whichever the fitness times faster now (re-timed every 32 archs): two are ~1.8x faster on a "
         "quiet 2-core machine, one is ~2x faster when something else keeps a core busy. N: that many "
         "(0: torch's default).")


# ------------------------------------------------------------------------------------------------
# --search-size
# ------------------------------------------------------------------------------------------------
PRESETS = ("quick", "small", "hat")
SIZE_KEYS = ("population", "parents", "mutations", "crossovers", "iterations")
SEARCH_SIZE_HELP = (
    "Evolution size (population x iterations): quick (24 x 6), small (40 x 10) or hat (HAT's 125 x 30), "
    "with optional overrides of population, parents, mutations, crossovers, iterations, e.g. "
    "'small,iterations=20' or 'population=60,parents=12' (on the default size)."
)


@dataclass(frozen=True)
class SearchSize:
    preset: str  # quick | small | hat
    overrides: tuple[tuple[str, int], ...] = ()

    def with_override(self, key: str, value: int) -> SearchSize:
        return replace(self, overrides=tuple((k, v) for k, v in self.overrides if k != key) + ((key, value),))

    def settings(self, seed: int = 0, mutation_prob: float | None = None) -> EvolutionSettings:
        from hat_edge.search.evolution import EvolutionSettings

        presets: dict[str, Callable[..., EvolutionSettings]] = {
            "quick": EvolutionSettings.quick, "small": EvolutionSettings.small, "hat": EvolutionSettings}
        base = presets[self.preset](seed=seed)
        kw: dict[str, Any] = dict(self.overrides)
        if mutation_prob is not None:
            kw["mutation_prob"] = mutation_prob
        return replace(base, **kw)

    def __str__(self) -> str:
        return ",".join([self.preset, *(f"{k}={v}" for k, v in self.overrides)])


class SearchSizeType(click.ParamType):
    """PRESET, PRESET,KEY=N,..., or KEY=N,... (overrides of the command's default preset)."""

    name = "size"

    def __init__(self, default_preset: str) -> None:
        self.default_preset = default_preset

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[quick|small|hat][,KEY=N...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> SearchSize:
        if isinstance(value, SearchSize):
            return value
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        size = SearchSize(self.default_preset)
        if parts and "=" not in parts[0]:
            if parts[0] not in PRESETS:
                self.fail(f"'{parts[0]}' is not a size: {', '.join(PRESETS)}, optionally with KEY=N overrides",
                          param, ctx)
            size = SearchSize(parts.pop(0))
        for p in parts:
            key, _, num = p.partition("=")
            key = key.strip().replace("-", "_")
            if key not in SIZE_KEYS:
                self.fail(f"'{key}' is not a size key: {', '.join(SIZE_KEYS)}", param, ctx)
            try:
                n = int(num)
            except ValueError:
                self.fail(f"{key}={num!r}: not an integer", param, ctx)
            size = size.with_override(key, n)
        return size


def search_size_option(default: str) -> Callable[[F], F]:
    """`--search-size` (default: the preset `default`), with the old spellings kept one release:
    --population, --parents, --mutations, --crossovers, --iterations (overrides) and --small."""

    def override(key: str) -> Callable[[dict[str, Any], Any], None]:
        def apply(kw: dict[str, Any], value: Any) -> None:
            kw["search_size"] = kw["search_size"].with_override(key, int(value))

        return apply

    def deco(f: F) -> F:
        for key in reversed(SIZE_KEYS):
            f = deprecated_alias(f"--{key}", new=f"--search-size {key}=N", dest="search_size",
                                 type=click.IntRange(min=0), apply=override(key))(f)
        return click.option(
            "--search-size", "search_size", type=SearchSizeType(default), default=default, show_default=True,
            help=SEARCH_SIZE_HELP,
        )(f)

    return deco


def small_alias(f: F) -> F:
    """`hat-edge loop --small`, kept one release: `--search-size small`."""

    def apply(kw: dict[str, Any], _: Any) -> None:
        kw["search_size"] = replace(kw["search_size"], preset="small")

    return deprecated_alias("--small", new="--search-size small", dest="search_size", is_flag=True, apply=apply)(f)


# ------------------------------------------------------------------------------------------------
# Paths
# ------------------------------------------------------------------------------------------------
def file_path(**kw: Any) -> click.Path:
    """A file argument or option value, as a Path."""
    return click.Path(path_type=Path, dir_okay=False, **kw)


def dir_path(**kw: Any) -> click.Path:
    """A directory argument or option value, as a Path."""
    return click.Path(path_type=Path, file_okay=False, **kw)


__all__ = [
    "TRUST_HELP",
    "SearchSize",
    "SearchSizeType",
    "deprecated_alias",
    "dir_path",
    "file_path",
    "progress_option",
    "search_size_option",
    "small_alias",
    "threads_option",
    "warn_deprecated",
]
