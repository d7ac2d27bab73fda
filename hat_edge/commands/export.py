"""`hat-edge export`: a SubTransformer to a deployable ONNX / TorchScript bundle."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click

from hat_edge.commands._options import deprecated_alias, dir_path

DEFAULT_VOCAB = 8000


def _build_sub(arch_file: str, checkpoint: Optional[str], random_init: bool, seed: int, vocab_size: int,
               space_name: str) -> tuple[Any, Any, Any]:
    """(SubTransformer, tokenizer or None, arch) from a checkpoint's shared weights or random init."""
    from hat_edge.space import get_space, load_arch

    if checkpoint is not None:
        from hat_edge.checkpoint import load_checkpoint

        ck = load_checkpoint(checkpoint)
        arch = load_arch(arch_file, ck.space)
        ck.space.validate(arch, arch_file)  # SpaceError names the field and the allowed values
        return ck.model.extract(arch).eval(), ck.tokenizer, arch
    from hat_edge.model import SubTransformer

    arch = load_arch(arch_file, get_space(space_name))
    return SubTransformer.random(arch, vocab_size, seed=seed), None, arch


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


@click.command("export")
@click.argument("arch_file")
@click.option("--checkpoint", "checkpoint", default=None, metavar="CKPT",
              help="Take the weights from this checkpoint (a file, or 'demo'); ARCH_FILE must lie in its space.")
@click.option("--random-init", is_flag=True, help="Random weights instead of a checkpoint (latency work).")
@click.option("--seed", default=0, show_default=True, help="Seed of --random-init.")
@click.option("--vocab-size", default=DEFAULT_VOCAB, show_default=True,
              help="Vocabulary of --random-init (HAT's WMT'14 En-De joint vocabulary is ~32k).")
@click.option("--space", "space_name", default="hat-wmt", show_default=True,
              help="Space for ARCH_FILE smallest/largest with --random-init (a preset or a space file).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True,
              help="onnx (onnxruntime) or torchscript (torch.jit; needs torch on the device).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="onnxruntime dynamic int8 quantization of both graphs (ONNX only).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18).")
@click.option("--out-dir", "out_dir", default=None, type=dir_path(),
              help="Bundle directory: created, or replaced if it already holds a bundle.  [required]")
@deprecated_alias("--out", new="--out-dir", dest="out_dir", type=dir_path(), required=True)
@click.option("--verify", is_flag=True,
              help="Run PyTorch and the exported graphs on the same inputs: max |diff| and token equality "
                   "of greedy and beam decoding (fp32 must match within 1e-4 with equal tokens).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def export_cmd(arch_file: str, checkpoint: Optional[str], random_init: bool, seed: int, vocab_size: int,
               space_name: str, fmt: str, quantize: Optional[str], opset: Optional[int], out_dir: Path,
               verify: bool, as_json: bool) -> None:
    """Export the SubTransformer ARCH_FILE to a bundle for the runner on a device.

    ARCH_FILE: a HAT `*-subtransformer` YAML or hat-edge arch file, or one of smallest, largest
    (of the checkpoint's space, or --space), transformer-base, transformer-big.

    \b
    The bundle DIR holds an encoder graph (once per source) and a decoder-step graph with
    explicit key/value caches, the tokenizer (with --checkpoint), and manifest.json (arch,
    runtime, opset, input/output names and shapes, sha256 of every file, parity figures).
    \b
    Examples:
      hat-edge export HAT_wmt14ende_raspberrypi@6.9s_bleu@28.4.yml --random-init \\
          --vocab-size 32000 --format onnx --quantize int8 --out-dir bundles/pi
      hat-edge export largest --checkpoint demo --format torchscript --out-dir bundles/demo --verify
    """
    from hat_edge.exporters import export_bundle, load_bundle, verify_bundle
    from hat_edge.exporters.bundle import check_out_dir

    if (checkpoint is None) == (not random_init):
        raise click.UsageError("give exactly one of --checkpoint CKPT or --random-init")
    if quantize and fmt != "onnx":
        raise click.UsageError("--quantize int8 needs --format onnx")
    if vocab_size < 8:
        raise click.UsageError("--vocab-size must be at least 8")
    out = check_out_dir(out_dir)  # before the slow part
    say = (lambda m: click.echo(m, err=True)) if sys.stderr.isatty() or not as_json else (lambda m: None)
    t0 = time.perf_counter()
    sub, tokenizer, arch = _build_sub(arch_file, checkpoint, random_init, seed, vocab_size, space_name)
    say(f"exporting {arch.describe()} as {fmt}{' int8' if quantize else ''} to {out} ...")
    path = export_bundle(sub, out, fmt=fmt, quantize=quantize, tokenizer=tokenizer, opset=opset)
    export_ms = (time.perf_counter() - t0) * 1e3
    figures = None
    if verify:
        say("verifying against PyTorch (encoder, decoder step, greedy and beam decoding) ...")
        figures = verify_bundle(sub, path)
    bundle = load_bundle(path)
    m = bundle.manifest
    result: dict[str, Any] = {
        "bundle": str(path),
        "arch": arch_file,
        "format": fmt,
        "runtime": m["runtime"],
        "precision": m["precision"],
        "opset": m["opset"],
        "vocab_size": m["model"]["vocab_size"],
        "weights": "checkpoint" if checkpoint else f"random (seed {seed})",
        "files": {name: f["bytes"] for name, f in m["files"].items()},
        "export_ms": export_ms,
        "parity": m["parity"],
    }
    if figures is not None:
        result.update(
            max_abs_diff=figures["max_abs_diff"],
            tokens_equal=figures["tokens_equal"],
            greedy_agreement=figures["greedy_agreement"],
            beam_agreement=figures["beam_agreement"],
            passed=figures["passed"],
            verify=figures,
        )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{path}  ({m['runtime']}, {m['precision']}, {arch.describe()})")
        for name, size in result["files"].items():
            click.echo(f"  {name:24s} {_fmt_bytes(size)}")
        click.echo(f"  export took {export_ms / 1e3:.1f} s; export-time max |diff| vs PyTorch "
                   f"{m['parity']['max_abs_diff']:.2e}" if m.get("parity") else "")
        if figures is not None:
            verdict = "PASSED" if figures["passed"] else "FAILED"
            click.echo(f"  verify: max |diff| {figures['max_abs_diff']:.2e}, greedy tokens "
                       f"{'equal' if figures['greedy_equal'] else 'differ'} ({figures['greedy_agreement']:.0%}), "
                       f"beam tokens {'equal' if figures['beam_equal'] else 'differ'} "
                       f"({figures['beam_agreement']:.0%})" + (f"  {verdict}" if m["precision"] == "fp32" else ""))
    if figures is not None and not figures["passed"]:
        raise click.exceptions.Exit(1)


COMMANDS = [export_cmd]

__all__ = ["COMMANDS", "export_cmd"]
