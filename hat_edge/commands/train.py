"""`hat-edge train` and `hat-edge evaluate`: thin wrappers over hat_edge.train and hat_edge.evaluate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from hat_edge.commands._options import dir_path, file_path, progress_option
from hat_edge.errors import UserError


def _defaults():
    # The flags' defaults come from TrainConfig: one source of truth for CLI and API.
    from hat_edge.train_config import TrainConfig  # torch-free: every command's start-up stays fast

    return TrainConfig()


_TC = _defaults()


@click.command("train", context_settings={"show_default": True})
@click.option("--data", default=_TC.data, help="Corpus: 'demo' (bundled En-De LibreOffice help), a TSV file "
              "(source<TAB>target per line), or the source file of a line-aligned pair (with --tgt-data). "
              ".xz/.gz/.bz2 are read directly.")
@click.option("--tgt-data", default=None, help="Target-side file when --data is a plain source-side file.")
@click.option("--valid-size", default=_TC.valid_size, type=int, help="Pairs held out for validation (seeded split).")
@click.option("--test-size", default=_TC.test_size, type=int, help="Pairs held out for testing (seeded split).")
@click.option("--split-seed", default=_TC.split_seed, type=int, help="Seed of the train/valid/test split.")
@click.option("--max-len", default=_TC.max_len, type=int, help="Skip training pairs with a side longer than this (tokens).")
@click.option("--tokenizer", default=None, type=file_path(),
              help="An existing SentencePiece .model (pad=0 unk=1 bos=2 eos=3); default: train one on the training split.")
@click.option("--vocab-size", default=_TC.vocab_size, type=int, help="Joint vocabulary size when training the tokenizer.")
@click.option("--space", default=_TC.space, help="Design space: a preset (demo, hat-wmt, hat-iwslt) or a space file.")
@click.option("--arch", default=None, type=file_path(),
              help="Train this one SubTransformer (arch file) instead of sampling one per step: HAT's final "
              "train-the-winner step. Combine with --init to fine-tune from a SuperTransformer.")
@click.option("--init", default=None, help="Start from this checkpoint's weights (and tokenizer), e.g. a trained SuperTransformer.")
@click.option("--dropout", default=_TC.dropout, type=float, help="Dropout at the largest width; scaled down with the sampled embedding dim (HAT).")
@click.option("--attention-dropout", default=_TC.attention_dropout, type=float, help="Dropout on attention weights (not scaled).")
@click.option("--max-tokens", default=_TC.max_tokens, type=int, help="Token budget per micro-batch and process: max(length) x sentences.")
@click.option("--max-sentences", default=None, type=int, help="Optional cap on sentences per micro-batch.")
@click.option("--update-freq", default=_TC.update_freq, type=int, help="Gradient accumulation: micro-batches per optimizer step.")
@click.option("--lr", default=_TC.lr, type=float, help="Peak learning rate (Adam, betas 0.9/0.98).")
@click.option("--min-lr", default=_TC.min_lr, type=float, help="Floor of the decay.")
@click.option("--warmup-steps", default=_TC.warmup_steps, type=int, help="Linear warm-up steps.")
@click.option("--schedule", default=_TC.schedule, type=click.Choice(["cosine", "inverse-sqrt"]), help="Decay after warm-up.")
@click.option("--max-steps", default=_TC.max_steps, type=int, help="Optimizer steps (the cosine schedule ends here).")
@click.option("--max-epochs", default=None, type=int, help="Stop after this many epochs.")
@click.option("--max-time-min", default=None, type=float, help="Stop after this many minutes (a checkpoint is written).")
@click.option("--label-smoothing", default=_TC.label_smoothing, type=float, help="Label smoothing of the cross-entropy.")
@click.option("--weight-decay", default=_TC.weight_decay, type=float, help="Adam weight decay.")
@click.option("--clip-norm", default=_TC.clip_norm, type=float, help="Clip the gradient norm to this (0: off).")
@click.option("--seed", default=_TC.seed, type=int, help="Seed of weights, batch order, sampled archs and dropout.")
@click.option("--amp", default=_TC.amp, type=click.Choice(["auto", "bf16", "fp16", "off"]),
              help="Mixed precision on GPU (auto: bf16 where supported, else fp16 with loss scaling). CPU runs fp32.")
@click.option("--device", default=_TC.device, type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train.")
@click.option("--threads", default=None, type=int, help="CPU threads for torch (default: torch's choice).")
@click.option("--out-dir", default=Path(_TC.out_dir), type=dir_path(), help="Checkpoints, tokenizer and train_log.jsonl go here.")
@click.option("--resume/--no-resume", default=True, help="Continue from OUT_DIR/checkpoint_last.pt if it exists (same data order and RNG).")
@click.option("--save-every-steps", default=_TC.save_every_steps, type=int, help="Write checkpoint_last.pt every N steps ...")
@click.option("--save-every-min", default=_TC.save_every_min, type=float, help="... and at least every N minutes.")
@click.option("--valid-every-steps", default=_TC.valid_every_steps, type=int, help="Validation loss (largest and smallest arch) every N steps; the best goes to checkpoint_best.pt.")
@click.option("--valid-sentences", default=_TC.valid_sentences, type=int, help="Validation pairs used for that loss.")
@click.option("--log-every-steps", default=_TC.log_every_steps, type=int, help="Append a training record to train_log.jsonl every N steps.")
@progress_option()
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as one JSON object.")
def train_cmd(resume: bool, as_json: bool, **kw) -> None:
    """Train a SuperTransformer as HAT does: a random SubTransformer every step.

    \b
    Examples:
      hat-edge train --data demo --out-dir runs/demo            # the bundled corpus
      hat-edge train --data train.tsv --space hat-iwslt --max-steps 50000 --out-dir runs/iwslt
      hat-edge train --data demo --arch best.yml --init runs/demo/checkpoint_best.pt --out-dir runs/best
    \b
    Multi-GPU / multi-node (PyTorch DDP; nccl on GPUs, gloo on CPU):
      torchrun --nproc-per-node 8 -m hat_edge.cli train --data wmt.tsv --space hat-wmt ...
    A killed run started again with the same command resumes from OUT_DIR/checkpoint_last.pt with
    the same data order, archs and dropout masks.
    """
    from hat_edge.train import TrainConfig, train

    # TrainConfig records paths as text (they go into checkpoints and train_log.jsonl).
    cfg = TrainConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})
    summary = train(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    d = {"version": 1, **summary.__dict__}
    if as_json:
        click.echo(json.dumps(d))
        return
    click.echo(f"trained {summary.steps} steps ({summary.epochs:.2f} epochs) in {summary.elapsed_ms / 60000:.1f} min, "
               f"stopped by {summary.stopped_by}")
    for k, v in summary.valid.items():
        click.echo(f"  valid loss ({k}): {v:.3f}")
    click.echo(f"  best: {summary.best_checkpoint}\n  last: {summary.last_checkpoint}")


@click.command("evaluate", context_settings={"show_default": True})
@click.option("--checkpoint", "ckpt", default="demo", help="A checkpoint file, or 'demo' (the bundled demo SuperTransformer).")
@click.option("--bundle", default=None, type=dir_path(),
              help="Evaluate an exported bundle directory instead (BLEU only, decoded by the device's own loop; "
              "the corpus is --data, default the checkpoint's).")
@click.option("--arch", default="largest", help="An arch file, or 'smallest' / 'largest' of the checkpoint's space "
              "(a checkpoint trained with --arch defaults to its own arch).")
@click.option("--split", default="test", type=click.Choice(["valid", "test"]), help="Which held-out split of the training corpus.")
@click.option("--data", default=None, help="Evaluate on another corpus's split (TSV, or with --tgt-data a file pair); default: the checkpoint's corpus.")
@click.option("--tgt-data", default=None, help="Target file for --data.")
@click.option("--max-sentences", default=None, type=int, help="Only the first N pairs of the split.")
@click.option("--beam", default=None, type=int, help="Beam size for BLEU (1: greedy). Default 5; 4 for a model "
              "imported from HAT (its test.sh, with --lenpen 0.6).")
@click.option("--bleu", "metric", default=None, type=click.Choice(["sacrebleu", "hat-normal", "hat-sacre"]),
              help="BLEU as sacreBLEU on detokenised text, or as HAT's test.sh computes it ('normal': Moses-tokenized, "
              "compounds split; 'sacre': detokenised, sacreBLEU). Default: hat-normal for an imported HAT model.")
@click.option("--text-level", default="bpe", type=click.Choice(["bpe", "raw"]),
              help="With --data DIR for an imported HAT model: its text files are BPE'd (HAT's) or raw text.")
@click.option("--no-bleu", is_flag=True, help="Loss only (fast).")
@click.option("--threads", default=None, type=int, help="CPU threads for torch.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (loss, bleu, ...).")
@progress_option(None, when="on, off with --json")
def evaluate_cmd(ckpt: str, bundle: Path | None, arch: str, split: str, data: str | None, tgt_data: str | None,
                 max_sentences: int | None, beam: int | None, metric: str | None, text_level: str, no_bleu: bool,
                 threads: int | None, as_json: bool, progress: bool | None) -> None:
    """Loss and BLEU of one SubTransformer of a trained SuperTransformer (or BLEU of a bundle).

    \b
    Loss: mean cross-entropy per target token (nats, no smoothing), teacher-forced.
    BLEU: sacrebleu (13a) on detokenised beam-search output against the raw references.
    The split is rebuilt from the corpus, sizes and seed recorded in the checkpoint.
    \b
    Examples:
      hat-edge evaluate --checkpoint demo --arch largest --split test --json
      hat-edge evaluate --checkpoint runs/demo/checkpoint_best.pt --arch winner.yml --max-sentences 200
      hat-edge evaluate --bundle out/bundle --checkpoint demo --max-sentences 100   # corpus of 'demo'
      hat-edge evaluate --checkpoint pi_6.9s.pt --data data/binary/wmt16_en_de --bleu hat-sacre
    A model imported from HAT (`hat-edge import hat`) reads HAT's data directory (fairseq-binarized
    {valid,test}.en-de.* or valid.en/valid.de text) and decodes as HAT's test.sh (beam 4, lenpen 0.6).
    """
    import torch

    from hat_edge.checkpoint import load_checkpoint, read_checkpoint
    from hat_edge.data.corpus import DataSpec
    from hat_edge.evaluate import bleu, default_bleu, evaluate
    from hat_edge.space import load_arch

    if threads:
        torch.set_num_threads(threads)
    show = not as_json if progress is None else progress
    if beam is not None and beam < 1:
        raise UserError(f"--beam must be at least 1, got {beam}")

    def data_spec(cp_meta: dict, tok) -> DataSpec | None:
        if data is None:
            return None
        if getattr(tok, "kind", "") == "fairseq":
            if not Path(data).is_dir():
                raise UserError(f"--data {data}: a model imported from HAT reads a data directory (fairseq-binarized "
                                "splits or valid.LANG/test.LANG text files)")
            return DataSpec(str(data), kind="fairseq", src_lang=tok.src_lang, tgt_lang=tok.tgt_lang,
                            text_level=text_level)
        base = DataSpec.from_dict(cp_meta["data"]) if cp_meta.get("data") else DataSpec(data)
        return DataSpec(data, tgt_data, base.n_valid, base.n_test, base.seed)

    if bundle is not None:
        from hat_edge.data.tokenizer import load_tokenizer
        from hat_edge.exporters import load_bundle

        b = load_bundle(bundle)
        tok = load_tokenizer(b.tokenizer_file) if b.tokenizer_file is not None else None
        meta = (read_checkpoint(ckpt).get("meta") or {}) if data is None else {}
        spec = data_spec(meta, tok) or (DataSpec.from_dict(meta["data"]) if meta.get("data") else DataSpec("demo"))
        corpus = spec.load_split(split)
        if max_sentences is not None:
            corpus = corpus.head(max_sentences)
        m, d = default_bleu(tok, beam)
        m = metric or m
        beam = d.beam
        res = bleu(b, tok, corpus, beam=beam, progress=show, metric=m, decoding=d)
        out = {"version": 1, "bundle": str(bundle), "split": split, "n_sentences": res.n_sentences, "bleu": res.bleu,
               "beam": beam, "bleu_signature": res.signature, "bleu_ms": res.elapsed_ms}
        if as_json:
            click.echo(json.dumps(out))
        else:
            click.echo(f"bundle {bundle}: BLEU {res.bleu:.2f} on {res.n_sentences} {split} sentences (beam {beam})")
        return
    cp = load_checkpoint(ckpt)
    a = cp.arch if (arch == "largest" and cp.arch is not None) else load_arch(arch, cp.space)
    spec = data_spec(cp.meta, cp.tokenizer)
    _, d = default_bleu(cp.tokenizer, beam)
    beam = d.beam
    res = evaluate(cp, a, split=split, max_sentences=max_sentences, beam=beam, data=spec, do_bleu=not no_bleu,
                   progress=show, metric=metric, decoding=d)
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo(f"checkpoint  {res['checkpoint']}")
    click.echo(f"arch        {a.describe()}  ({res['params'] / 1e6:.2f}M params)")
    click.echo(f"split       {split} ({res['n_sentences']} sentences)")
    click.echo(f"loss        {res['loss']:.3f} nats/token (ppl {res['ppl']:.2f}, {res['loss_ms']:.0f} ms)")
    if "bleu" in res:
        click.echo(f"BLEU        {res['bleu']:.2f} (beam {beam}, {res['bleu_ms'] / 1000:.1f} s)  {res['bleu_signature']}")


COMMANDS = [train_cmd, evaluate_cmd]
