"""Loss and BLEU of SubTransformers.

- `ValidLoss`: the search's fitness. The validation subset is tokenised, length-sorted and padded
  once; `.loss(arch)` sets the arch on the shared SuperTransformer and runs teacher-forced forward
  passes only (no decoding), cached per arch. Loss is the mean cross-entropy per target token in
  nats, without label smoothing (so exp(loss) is the perplexity).
- `bleu(...)`: sacrebleu corpus BLEU (13a tokenisation, detokenised text) of beam-search output,
  for a SuperTransformer + arch, a SubTransformer, or an exported bundle.
- `evaluate(...)`: both, for the CLI (`hat-edge evaluate`).
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F

from hat_edge.data.batching import Batch, EncodedPairs, collate, make_batches
from hat_edge.data.corpus import DataSpec, ParallelCorpus
from hat_edge.data.tokenizer import PAD_ID, Tokenizer, load_tokenizer
from hat_edge.errors import UserError
from hat_edge.space import Arch

# hat-edge's default output length bound: a * source length + b.
MAX_LEN_A = 1.2
MAX_LEN_B = 10

# BLEU metrics: "sacrebleu" (detokenised text, 13a), and HAT's two (configs/*/test.sh):
# "hat-normal" (Moses-tokenized text, BPE removed, compounds split as ##AT##-##AT##, BLEU on
# whitespace tokens as fairseq's score.py) and "hat-sacre" (sacremoses detokenize, then sacreBLEU).
BLEU_METRICS = ("sacrebleu", "hat-normal", "hat-sacre")


@dataclass(frozen=True)
class DecodeSettings:
    """How translations are decoded: beam, length penalty, fairseq's min length, a*src+b steps."""

    beam: int = 5
    len_penalty: float = 1.0
    min_len: int = 0
    max_len_a: float = MAX_LEN_A
    max_len_b: int = MAX_LEN_B


# HAT's test.sh (generate.py --beam 4 --lenpen 0.6) with fairseq's generator defaults (min_len 1,
# max_len_a 0, max_len_b 200; fairseq runs max_len + 1 steps, the last one EOS only: 201 here).
HAT_DECODING = DecodeSettings(beam=4, len_penalty=0.6, min_len=1, max_len_a=0.0, max_len_b=201)


# ------------------------------------------------------------------------------------------------
# loss
# ------------------------------------------------------------------------------------------------
def loss_sums(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
              pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (smoothed loss, nll) over non-pad target tokens.

    logits (B, T, V), target (B, T). The smoothed loss is fairseq's label-smoothed cross-entropy:
    (1 - eps - eps/(V-1)) * nll + eps/(V-1) * sum_v(-log p_v), i.e. eps spread over the other
    classes. Computed in fp32 whatever the autocast dtype (log-softmax over 4k+ classes in bf16
    loses the small probabilities that the smoothing term sums).
    """
    lprobs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    mask = target != pad_id  # (B, T)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
    nll = nll.masked_fill(~mask, 0.0).sum()
    if label_smoothing <= 0.0:
        return nll, nll.detach()
    smooth = -lprobs.sum(dim=-1).masked_fill(~mask, 0.0).sum()
    eps_i = label_smoothing / (lprobs.size(-1) - 1)
    loss = (1.0 - label_smoothing - eps_i) * nll + eps_i * smooth
    return loss, nll.detach()


@torch.inference_mode()
def mean_loss(model: torch.nn.Module, batches: Sequence[Batch], arch: Arch, device: str | torch.device = "cpu") -> float:
    """Mean per-token cross-entropy (nats, no smoothing) of `arch` over `batches`; eval mode."""
    was_training = model.training
    model.eval()
    model.set_arch(arch)
    total, ntok = 0.0, 0
    try:
        for b in batches:
            b = b.to(device)
            logits = model(b.src, b.prev, arch)
            _, nll = loss_sums(logits, b.target, pad_id=b.pad_id)
            total += float(nll)
            ntok += b.ntokens
    finally:
        model.train(was_training)
    return total / max(ntok, 1)


def fixed_batches(pairs: EncodedPairs, max_tokens: int = 6000, max_len: int | None = 256) -> list[Batch]:
    """Length-sorted, padded batches in a fixed order (validation: built once, reused per arch)."""
    if max_len is not None:
        pairs = pairs.truncate(max_len)
    idx = make_batches(pairs.src_lens, pairs.tgt_lens, max_tokens, shuffle=False)
    return [collate(pairs, i) for i in idx]


class ValidLoss:
    """Validation loss of SubTransformers inside one trained SuperTransformer: the search's fitness.

    ValidLoss(checkpoint, split="valid", max_sentences=300).loss(arch) -> float (nats per token)

    The subset is the first `max_sentences` pairs of the split (itself a seeded random sample of
    the corpus) whose sides are at most `max_len` tokens, fixed for the object's lifetime, so the
    losses of different archs compare. Capping the length keeps one arch well under a second on
    two CPU cores (the cost is all teacher-forced matmuls over the subset's tokens; a few long
    paragraphs would otherwise dominate it); `max_len=None` keeps every pair. Results are cached
    per arch (`Arch.to_json()`). Small batches (`max_tokens` 1200) pad less than big ones and are
    faster overall on CPU (0.76 vs 1.33 CPU-s per demo arch, one thread, measured).
    """

    def __init__(
        self,
        checkpoint: Any,
        split: str = "valid",
        max_sentences: int | None = 300,
        max_len: int | None = 48,
        max_tokens: int = 1200,
        data: DataSpec | None = None,
        corpus: ParallelCorpus | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from hat_edge.checkpoint import Checkpoint, load_checkpoint

        self.checkpoint: Checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.model = self.checkpoint.model.to(device).eval()
        self.device = device
        if corpus is None:
            corpus = load_split(self.checkpoint, split, data)
        pairs = EncodedPairs.from_corpus(corpus, self.checkpoint.tokenizer)
        keep = [i for i in range(len(pairs))
                if max_len is None or (len(pairs.src[i]) <= max_len and len(pairs.tgt[i]) <= max_len)]
        if max_sentences is not None:
            keep = keep[:max_sentences]
        if not keep:
            raise UserError(f"no {split} pairs of at most {max_len} tokens to compute a loss on")
        self.corpus = corpus.subset(keep)
        pairs = pairs.select(keep)
        self.batches = fixed_batches(pairs, max_tokens=max_tokens, max_len=self.model.cfg.max_positions)
        self.n_sentences = len(keep)
        self.n_tokens = sum(b.ntokens for b in self.batches)
        self._cache: dict[str, float] = {}

    def loss(self, arch: Arch) -> float:
        key = arch.to_json()
        if key not in self._cache:
            self._cache[key] = self.compute(arch)
        return self._cache[key]

    def compute(self, arch: Arch) -> float:
        """`loss` without the cache: computed every call (what a timing of it needs)."""
        self.checkpoint.space.validate(arch)
        return mean_loss(self.model, self.batches, arch, self.device)

    __call__ = loss

    def fingerprint(self) -> str:
        """What this fitness's values depend on, hashed: the loss's definition, the device kind,
        the model's config and every weight (name, dtype, shape, bytes), and the validation
        batches' token ids. Equal fingerprints: the same arch has the same loss (up to the float
        summation order of a thread count). `search.fitness_store` keys stored losses by it."""
        from hat_edge.checkpoint import content_sha256

        return content_sha256({
            "definition": ["ValidLoss", 1, "mean per-token NLL, no smoothing, eval mode"],
            "device": torch.device(self.device).type, "config": repr(self.model.cfg),
            "weights": self.model.state_dict(),
            "batches": [[b.src, b.prev, b.target, b.pad_id] for b in self.batches],
        })

    @property
    def cache_size(self) -> int:
        return len(self._cache)


def load_split(checkpoint: Any, split: str, data: DataSpec | None = None) -> ParallelCorpus:
    """The `split` of the corpus a checkpoint was trained on (or of `data`, if given)."""
    if data is None:
        spec = checkpoint.meta.get("data")
        if not spec:
            raise UserError(f"{checkpoint.path or 'checkpoint'}: no training data recorded; pass --data")
        data = DataSpec.from_dict(spec)
    return data.load_split(split)


# ------------------------------------------------------------------------------------------------
# translation and BLEU
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BleuResult:
    bleu: float
    n_sentences: int
    hypotheses: tuple[str, ...]
    references: tuple[str, ...]
    signature: str
    elapsed_ms: float


def _max_len(src_len: int, cap: int, d: "DecodeSettings | None" = None) -> int:
    d = d or DecodeSettings()
    return max(2, min(int(d.max_len_a * src_len + d.max_len_b), cap))


def translate(
    model: Any,
    tokenizer: Tokenizer | None,
    sources: Sequence[str],
    arch: Arch | None = None,
    beam: int = 5,
    batch_size: int = 32,
    progress: bool = False,
    level: str = "raw",
    out_level: str = "raw",
    decoding: DecodeSettings | None = None,
) -> list[str]:
    """Detokenised translations of `sources` by beam search (beam=1: greedy).

    `level`/`out_level`: the text level of the sources and of the output ("raw"; "bpe" and "tok"
    for a model imported from HAT, `hat_edge.data.fairseq_tokenizer`). `decoding`: length penalty,
    min length and length bound (default: hat-edge's; `HAT_DECODING`: HAT's test.sh); its beam
    replaces `beam`.

    `model`: a SuperTransformer (with `arch`; cut to a plain SubTransformer first, which is what
    export and the device run), a SubTransformer, or an exported bundle (a `Bundle` or its
    directory; decoded with the device's own loop, `hat_edge.exporters.translate`). `tokenizer`
    may be None for a bundle that carries one. Sentences are decoded in length-sorted batches
    (less padding) and returned in input order; at most 1.2 * source length + 10 tokens each.
    """
    from tqdm import tqdm

    decode_ids, max_positions, bundle_tok = _decoder_for(model, arch)
    tokenizer = tokenizer or bundle_tok
    if tokenizer is None:
        raise UserError("translating needs a tokenizer (the bundle has none: export it with one)")
    d = decoding or DecodeSettings(beam=beam)
    enc = tokenizer.encode_batch(list(sources), side="src", level=level)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out: list[str] = [""] * len(enc)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc="translate", unit="batch", disable=not progress, leave=False):
        longest = max(len(enc[i]) for i in chunk)
        hyps = decode_ids([enc[i] for i in chunk], d, _max_len(longest, max_positions, d))
        for r, i in enumerate(chunk):
            out[i] = tokenizer.decode(hyps[r], level=out_level)
    return out


def _pad(seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> torch.Tensor:
    src = np.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=np.int64)
    for r, s in enumerate(seqs):
        src[r, : len(s)] = s
    return torch.from_numpy(src)  # (B, S), right-padded


def _decoder_for(model: Any, arch: Arch | None):
    """(decode(id lists, beam, max_len) -> id lists, max_positions, tokenizer carried by the model)."""
    if hasattr(model, "extract"):  # SuperTransformer
        if arch is None:
            raise UserError("translating with a SuperTransformer needs an arch")
        return _torch_decoder(model.extract(arch)), model.cfg.max_positions, None
    if hasattr(model, "decode_step"):  # SubTransformer
        return _torch_decoder(model), model.cfg.max_positions, None
    return _bundle_decoder(model)


def _torch_decoder(sub: torch.nn.Module):
    from hat_edge.model import decode

    sub = sub.eval()

    @torch.no_grad()
    def run(seqs: Sequence[Sequence[int]], d: DecodeSettings, max_len: int) -> list[list[int]]:
        src = _pad(seqs, sub.cfg.pad_id)
        if d.beam <= 1:
            hyps = decode.greedy(sub, src, max_len=max_len, min_len=d.min_len)
        else:
            hyps = decode.beam(sub, src, beam=d.beam, max_len=max_len, len_penalty=d.len_penalty, min_len=d.min_len)
        return [list(map(int, h)) for h in hyps]

    return run


def _bundle_decoder(model: Any):
    from pathlib import Path

    from hat_edge import exporters

    bundle = model if isinstance(model, exporters.Bundle) else exporters.load_bundle(Path(model))
    tok_file = bundle.tokenizer_file
    tok = load_tokenizer(tok_file) if tok_file is not None and Path(tok_file).exists() else None

    def run(seqs: Sequence[Sequence[int]], d: DecodeSettings, max_len: int) -> list[list[int]]:
        return exporters.translate(bundle, [list(s) for s in seqs], beam=d.beam, max_len=max_len,
                                   len_penalty=d.len_penalty, min_len=d.min_len)

    return run, int(bundle.manifest["model"].get("max_positions", 512)), tok


def bleu(
    model: Any,
    tokenizer: Tokenizer | None,
    corpus: ParallelCorpus,
    arch: Arch | None = None,
    beam: int = 5,
    batch_size: int = 32,
    progress: bool = False,
    metric: str = "sacrebleu",
    decoding: DecodeSettings | None = None,
) -> BleuResult:
    """Corpus BLEU of beam-search translations of `corpus.src` against `corpus.tgt`.

    `model` as in `translate`: SuperTransformer + arch, SubTransformer, or an exported bundle.
    `metric` (BLEU_METRICS): "sacrebleu" on detokenised text, or HAT's "hat-normal" / "hat-sacre"
    (configs/*/test.sh; for a model imported from HAT). `decoding` as in `translate`.
    """
    if metric not in BLEU_METRICS:
        raise UserError(f"BLEU metric {metric!r}: allowed {', '.join(BLEU_METRICS)}")
    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else _decoder_for(model, arch)[2]
    if tok is None:
        raise UserError("translating needs a tokenizer (the bundle has none: export it with one)")
    out_level = "tok" if metric != "sacrebleu" else "raw"
    hyps = translate(model, tok, corpus.src, arch=arch, beam=beam, batch_size=batch_size, progress=progress,
                     level=corpus.level, out_level=out_level, decoding=decoding)
    refs = [tok.reference(t, corpus.level, out_level) for t in corpus.tgt]
    if metric == "hat-normal":
        hyps, refs = [split_compounds(h) for h in hyps], [split_compounds(r) for r in refs]
        scorer = sacrebleu.BLEU(tokenize="none", smooth_method="none", force=True)
    elif metric == "hat-sacre":
        hyps, refs = [moses_detokenize_en(h) for h in hyps], [moses_detokenize_en(r) for r in refs]
        scorer = sacrebleu.BLEU()
    else:
        scorer = sacrebleu.BLEU()
    score = scorer.corpus_score(hyps, [refs])
    metric_obj = scorer
    return BleuResult(
        bleu=float(score.score),
        n_sentences=len(hyps),
        hypotheses=tuple(hyps),
        references=tuple(refs),
        signature=f"{metric}|{metric_obj.get_signature()}",
        elapsed_ms=(time.perf_counter() - t0) * 1000.0,
    )


def default_bleu(tokenizer: Any, beam: int | None = None) -> tuple[str, DecodeSettings]:
    """(metric, decoding) a checkpoint is scored with by default: HAT's test.sh for a model imported
    from HAT, sacreBLEU with hat-edge's decoding otherwise; `beam` overrides the beam."""
    if getattr(tokenizer, "kind", "") == "fairseq":
        d = HAT_DECODING
        return "hat-normal", d if beam is None else DecodeSettings(beam, d.len_penalty, d.min_len, d.max_len_a, d.max_len_b)
    return "sacrebleu", DecodeSettings(beam=5 if beam is None else beam)


_COMPOUND = re.compile(r"(\S)-(\S)")


def split_compounds(s: str) -> str:
    """HAT's "normal" BLEU preprocessing: `perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g'`."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", s)


@functools.lru_cache(maxsize=1)
def _detokenizer_en() -> Any:
    from sacremoses import MosesDetokenizer

    return MosesDetokenizer(lang="en")


def moses_detokenize_en(s: str) -> str:
    """HAT's "sacre" BLEU preprocessing: `sacremoses detokenize` (its CLI's default language, en)."""
    return _detokenizer_en().detokenize(s.split())


def evaluate(
    checkpoint: Any,
    arch: Arch,
    split: str = "test",
    max_sentences: int | None = None,
    beam: int = 5,
    data: DataSpec | None = None,
    do_bleu: bool = True,
    progress: bool = False,
    metric: str | None = None,
    decoding: DecodeSettings | None = None,
) -> dict[str, Any]:
    """Loss and BLEU of one SubTransformer of a checkpoint on a split (the CLI's `evaluate`).

    metric/decoding None: HAT's ("hat-normal", `HAT_DECODING`) for a model imported from HAT,
    hat-edge's (sacreBLEU, `beam`) otherwise."""
    hat = getattr(checkpoint.tokenizer, "kind", "") == "fairseq"
    metric = metric or ("hat-normal" if hat else "sacrebleu")
    if decoding is None:
        decoding = HAT_DECODING if hat else DecodeSettings(beam=beam)
    checkpoint.space.validate(arch)
    corpus = load_split(checkpoint, split, data)
    if max_sentences is not None:
        corpus = corpus.head(max_sentences)
    t0 = time.perf_counter()
    vl = ValidLoss(checkpoint, corpus=corpus, max_sentences=None, max_len=None)
    loss = vl.loss(arch)
    loss_ms = (time.perf_counter() - t0) * 1000.0
    out: dict[str, Any] = {
        "version": 1,
        "checkpoint": checkpoint.path,
        "split": split,
        "n_sentences": len(corpus),
        "arch": arch.to_dict(),
        "params": arch.params(),
        "loss": loss,
        "ppl": float(np.exp(min(loss, 50.0))),
        "loss_ms": loss_ms,
    }
    if do_bleu:
        res = bleu(checkpoint.model, checkpoint.tokenizer, corpus, arch=arch, beam=decoding.beam, progress=progress,
                   metric=metric, decoding=decoding)
        out.update(bleu=res.bleu, beam=decoding.beam, bleu_metric=metric, len_penalty=decoding.len_penalty,
                   bleu_signature=res.signature, bleu_ms=res.elapsed_ms)
    return out


__all__ = [
    "loss_sums",
    "mean_loss",
    "fixed_batches",
    "ValidLoss",
    "load_split",
    "BleuResult",
    "BLEU_METRICS",
    "DecodeSettings",
    "HAT_DECODING",
    "split_compounds",
    "default_bleu",
    "translate",
    "bleu",
    "evaluate",
]
