"""`hat-edge import hat`: HAT's own checkpoints (fairseq) as hat-edge checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

from hat_edge.commands._options import file_path


@click.group("import")
def import_group() -> None:
    """Bring models trained elsewhere into hat-edge (HAT's fairseq checkpoints)."""


@import_group.command("hat")
@click.argument("ckpt", type=file_path())
@click.option("--dict", "src_dict", required=True, type=file_path(),
              help="fairseq dictionary of the source (dict.en.txt; WMT's is joint and serves both sides).")
@click.option("--tgt-dict", type=file_path(), default=None,
              help="fairseq dictionary of the target, when it differs (HAT's IWSLT'14 De-En).")
@click.option("--arch", "arch", type=file_path(), default=None,
              help="HAT subtransformer YAML: the file is that fixed SubTransformer (HAT's trained "
                   "HAT_<task>_<device>@<latency>_bleu@<bleu>.pt files).")
@click.option("--bpe-codes", type=file_path(), default=None,
              help="subword-nmt BPE codes (HAT's bpe.32000) for raw text in and out; without them only "
                   "BPE'd text and binarized data can be read.")
@click.option("--src-lang", default=None, help="Source language code (default: args.source_lang, else en).")
@click.option("--tgt-lang", default=None, help="Target language code (default: args.target_lang, else de).")
@click.option("--data", "data", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="HAT's data directory (fairseq-binarized valid/test, or valid.LANG/test.LANG text): "
                   "recorded in the checkpoint so search, loop, run and evaluate use it.")
@click.option("--text-level", type=click.Choice(["bpe", "raw"]), default="bpe", show_default=True,
              help="What text files in --data hold: HAT's Moses-tokenized BPE text, or raw text.")
@click.option("--no-aggressive-dash-splits", is_flag=True,
              help="Moses without -a (fairseq's WMT preparation uses -a: 'a-b' -> 'a @-@ b').")
@click.option("--half", is_flag=True, help="Store the weights as fp16 (half the file; loaded back as fp32).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The hat-edge checkpoint to write (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def import_hat_cmd(ckpt: Path, src_dict: Path, tgt_dict: Optional[Path], arch: Optional[Path],
                   bpe_codes: Optional[Path], src_lang: Optional[str], tgt_lang: Optional[str], data: Optional[Path],
                   text_level: str, no_aggressive_dash_splits: bool, half: bool, out: Path, as_json: bool) -> None:
    """Import a HAT SuperTransformer or SubTransformer checkpoint (fairseq TransformerSuperModel).

    The design space comes from the checkpoint's args (every choice list, qkv_dim, layer counts,
    embedding sharing); fairseq's ids are kept (<s> 0, <pad> 1, </s> 2, <unk> 3); the
    dictionaries, BPE codes and Moses settings go inside the new checkpoint. The pickle is read
    with weights_only and only argparse.Namespace allowed: anything else is refused.

    \b
    Examples (file names from HAT's README):
      hat-edge import hat HAT_wmt14ende_super_space0.pt --dict dict.en.txt \\
          --bpe-codes bpe.32000 --data data/binary/wmt16_en_de --out wmt14ende_super.pt
      hat-edge import hat HAT_wmt14ende_raspberrypi@6.9s_bleu@28.4.pt --dict dict.en.txt \\
          --arch HAT_wmt14ende_raspberrypi@6.9s_bleu@28.4.yml --out pi_6.9s.pt
      hat-edge evaluate --checkpoint pi_6.9s.pt --split test
      hat-edge run --checkpoint wmt14ende_super.pt --profile mypi
    """
    from hat_edge.hat_import import import_hat, read_fairseq_checkpoint

    args = read_fairseq_checkpoint(ckpt)["args"]  # refuses a crafted pickle before anything else
    src_lang = src_lang or str(getattr(args, "source_lang", None) or "en")
    tgt_lang = tgt_lang or str(getattr(args, "target_lang", None) or "de")
    moses = {"aggressive_dash_splits": not no_aggressive_dash_splits}
    summary = import_hat(ckpt, out, src_dict=src_dict, tgt_dict=tgt_dict, arch=arch, bpe_codes=bpe_codes,
                         src_lang=src_lang, tgt_lang=tgt_lang, data=data, text_level=text_level, moses=moses,
                         half=half)
    if as_json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    sp = summary["space"]
    click.echo(f"imported {ckpt} -> {summary['out']}")
    click.echo(f"  space: embed {sp['encoder_embed_choice']}/{sp['decoder_embed_choice']}, ffn "
               f"{sp['encoder_ffn_embed_dim_choice']}, decoder layers {sp['decoder_layer_num_choice']}, "
               f"qkv_dim {sp['qkv_dim']}")
    v = summary["vocab"]
    click.echo(f"  vocabulary: {v['src']} source / {v['tgt']} target ({'joint' if v['joint'] else 'separate'}), "
               f"{src_lang}-{tgt_lang}, BPE codes {'inside' if summary['bpe'] else 'none (BPE text only)'}")
    if summary["arch"] is not None:
        click.echo("  a fixed SubTransformer (--arch): evaluate/export/deploy use it by default")
    if summary["data"] is not None:
        click.echo(f"  data: {summary['data']['path']} (search, loop, run and evaluate read it)")


COMMANDS = [import_group]
