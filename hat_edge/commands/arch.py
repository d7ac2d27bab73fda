"""`hat-edge arch ...` and `hat-edge space ...`: look at SubTransformers and design spaces."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hat_edge.commands._options import deprecated_alias, dir_path
from hat_edge.errors import UserError
from hat_edge.space import FEATURE_NAMES, PRESETS, SpaceError, get_space, load_arch


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


@click.group("arch")
def arch_group() -> None:
    """Inspect SubTransformer architectures (HAT `*-subtransformer` YAML or hat-edge JSON)."""


@arch_group.command("info")
@click.argument("arch_file")
@click.option("--space", "space_name", default=None,
              help="Validate against this space: a preset (hat-wmt, hat-iwslt, demo) or a space file. "
                   "Default: the first preset that contains the arch.")
@click.option("--src-len", default=30, show_default=True, help="Source tokens for the FLOPs count.")
@click.option("--tgt-len", default=30, show_default=True, help="Target tokens for the FLOPs count.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def arch_info(arch_file: str, space_name: str | None, src_len: int, tgt_len: int, as_json: bool) -> None:
    """Params, FLOPs and HAT's 10 latency features of ARCH_FILE, and whether it lies in a space.

    ARCH_FILE is a file, or one of transformer-base / transformer-big. Params and FLOPs follow
    HAT's convention: the embedding table and output projection are excluded.

    \b
    Example:
      hat-edge arch info HAT_wmt14ende_raspberrypi@3.5s_bleu@25.8.yml --json
    """
    arch = load_arch(arch_file)
    validation: dict[str, object]
    if space_name is not None:
        space = get_space(space_name)
        try:
            space.validate(arch, arch_file)
            validation = {"space": space.name, "valid": True, "error": None}
        except SpaceError as e:
            validation = {"space": space.name, "valid": False, "error": str(e)}
    else:
        inside = [s.name for s in PRESETS.values() if s.contains(arch)]
        validation = {"space": inside[0] if inside else None, "valid": bool(inside), "error": None}
    out = {
        "arch": arch_file,
        "params": arch.params(),
        "flops": arch.flops(src_len, tgt_len),
        "features": arch.features(),
        "feature_names": list(FEATURE_NAMES),
        "validation": validation,
        "config": arch.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"{arch_file}")
        click.echo(f"  {arch.describe()}")
        click.echo(f"  params  {_fmt_count(out['params'])}  (embeddings and output projection excluded)")
        click.echo(f"  FLOPs   {_fmt_count(out['flops'])}  (src {src_len}, tgt {tgt_len} tokens)")
        for name, v in zip(FEATURE_NAMES, out["features"]):
            click.echo(f"  {name:34s} {v:g}")
        if validation["valid"]:
            click.echo(f"  in space '{validation['space']}'")
        elif validation["error"]:
            click.echo(f"  NOT in space: {validation['error']}")
        else:
            click.echo("  in no preset space (fine for baselines and latency work)")
    if space_name is not None and not validation["valid"]:
        raise click.exceptions.Exit(1)


@click.group("space")
def space_group() -> None:
    """Show design spaces and sample SubTransformers from them."""


@space_group.command("show")
@click.argument("name", default="demo")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def space_show(name: str, as_json: bool) -> None:
    """The choices of space NAME (a preset: hat-wmt, hat-iwslt, demo; or a space file)."""
    space = get_space(name)
    d = space.to_dict()
    d["size"] = space.size()
    d["largest_params"] = space.largest().params()
    d["smallest_params"] = space.smallest().params()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"space '{space.name}'" + (f": {space.description}" if space.description else ""))
    for k, v in space.to_dict().items():
        if k.endswith("_choice") or k == "qkv_dim":
            click.echo(f"  {k:38s} {v}")
    click.echo(f"  {'SubTransformers':38s} {d['size']:.3e}")
    click.echo(f"  {'params (smallest .. largest)':38s} {_fmt_count(d['smallest_params'])} .. "
               f"{_fmt_count(d['largest_params'])}")


@space_group.command("sample")
@click.argument("name", default="demo")
@click.option("-n", "count", default=5, show_default=True, help="How many distinct archs.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same archs).")
@click.option("--out-dir", "out_dir", type=dir_path(), default=None,
              help="Write each arch as HAT YAML into this folder (arch-000.yml, ...).")
@deprecated_alias("--out", new="--out-dir", dest="out_dir", type=dir_path())
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of archs.")
def space_sample(name: str, count: int, seed: int, out_dir: Path | None, as_json: bool) -> None:
    """Sample N SubTransformers of space NAME uniformly, as HAT does."""
    if count < 1:
        raise UserError(f"-n must be at least 1, got {count}")
    space = get_space(name)
    archs = space.sample_n(count, seed=seed)
    paths: list[str] = []
    if out_dir:
        d = out_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
            for i, a in enumerate(archs):
                paths.append(str(a.save(d / f"arch-{i:03d}.yml")))
        except OSError as e:
            raise UserError(f"{out_dir}: cannot write ({e.strerror})") from None
    if as_json:
        click.echo(json.dumps([dict(a.to_dict(), params=a.params(), file=(paths[i] if paths else None))
                               for i, a in enumerate(archs)], indent=2))
        return
    for i, a in enumerate(archs):
        where = f"  -> {paths[i]}" if paths else ""
        click.echo(f"{i:3d}  {_fmt_count(a.params()):>7s}  {a.describe()}{where}")


COMMANDS = [arch_group, space_group]


