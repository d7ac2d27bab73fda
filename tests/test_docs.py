"""The documents a newcomer reads agree with the code: the README's commands parse with the CLI as
written, its set-up commands are the ones CI runs, and the profile shown in the docs is the file the
package ships."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from hat_edge.cli import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
EXAMPLES = REPO / "hat_edge" / "assets" / "profiles" / "examples"


def _fenced(text: str, lang: str = "") -> list[str]:
    """The bodies of the ```lang fenced blocks of a markdown text."""
    return re.findall(rf"(?ms)^```{lang}\n(.*?)^```", text)


def _commands(text: str) -> list[str]:
    """Every `hat-edge ...` command line in the code blocks and tables of a markdown text (comments
    stripped, continuation lines joined)."""
    out = []
    for block in _fenced(text, r"[a-z]*"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("hat-edge "):
                out.append(line)
    out += re.findall(r"`(hat-edge [^`]+)`", text)
    return out


def _parse(argv: list[str]) -> None:
    """Resolve argv through the CLI's groups (their first word names the subcommand) and parse the
    leaf command's options as click would, without running it: an unknown command or option, or a
    bad choice or type, raises."""
    cmd: click.Command = cli
    ctx = None
    name = "hat-edge"
    while isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=name, parent=ctx)
        if not argv:
            return
        name, *argv = argv
        sub = cmd.get_command(ctx, name)
        if sub is None:
            raise click.UsageError(f"no such command {name!r}")
        cmd = sub
    # resilient_parsing off: every given value is converted (a bad choice raises); required
    # options and arguments a README line leaves out on purpose are filled in as missing only
    for p in cmd.params:
        p.required, was = False, p.required
        p._was_required = was  # type: ignore[attr-defined]
    try:
        cmd.make_context(name, list(argv), parent=ctx)
    finally:
        for p in cmd.params:
            p.required = p._was_required  # type: ignore[attr-defined]


def test_every_readme_command_parses() -> None:
    cmds = _commands(README.read_text())
    assert len(cmds) >= 15, cmds  # the loop table and the walkthrough
    for line in cmds:
        try:
            _parse(shlex.split(line)[1:])
        except click.ClickException as e:
            pytest.fail(f"README: `{line}` does not parse: {e.format_message()}")


def test_a_wrong_readme_command_would_be_caught() -> None:
    """The check above can fail: a misspelt option and an unknown command are refused."""
    with pytest.raises(click.ClickException):
        _parse(["profile", "new", "mypi", "--hots", "raspberrypi.local"])
    with pytest.raises(click.ClickException):
        _parse(["profiel", "check", "mypi"])
    with pytest.raises(click.ClickException):
        _parse(["run", "--search-size", "huge"])


def test_readme_setup_command_2_is_what_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    bash = _fenced(README.read_text(), "bash")[0]
    assert ci in bash.splitlines()


def test_the_profile_in_the_docs_is_the_shipped_example() -> None:
    """docs/profiles.md shows raspberrypi4.toml byte for byte (comments included), so what a reader
    copies is what `hat-edge profile new` writes."""
    shown = [b for b in _fenced((REPO / "docs" / "profiles.md").read_text(), "toml") if 'name = "raspberrypi4"' in b]
    assert shown == [(EXAMPLES / "raspberrypi4.toml").read_text()]
    # and no other document carries its own variant of the Pi profile
    for md in [README, *sorted((REPO / "docs").glob("*.md"))]:
        if md.name == "profiles.md":
            continue
        assert not [b for b in _fenced(md.read_text(), "toml") if "raspberrypi" in b], md


def test_readme_links_resolve() -> None:
    text = README.read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links
    for link in links:
        if "://" not in link:
            assert (REPO / link).exists(), f"README links to {link}, which does not exist"


def test_every_command_in_bring_hats_models_parses() -> None:
    """docs/hat_models.md is a walkthrough a HAT user copies from: its commands parse as written."""
    cmds = _commands((REPO / "docs" / "hat_models.md").read_text())
    assert len(cmds) >= 6, cmds
    for line in cmds:
        try:
            _parse(shlex.split(line)[1:])
        except click.ClickException as e:
            pytest.fail(f"docs/hat_models.md: `{line}` does not parse: {e.format_message()}")
