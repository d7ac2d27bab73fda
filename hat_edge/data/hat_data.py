"""HAT's evaluation data as it ships: fairseq-binarized splits or Moses-tokenized BPE text.

`read_hat_split(dir, split, src, tgt, text_level)` gives one split as a `ParallelCorpus`:
- binarized (`{split}.{src}-{tgt}.{lang}.bin/.idx`, either index format fairseq writes): the ids
  are turned back into symbols with the directory's own `dict.{lang}.txt` (fairseq-preprocess
  writes them beside the data), so the imported model's dictionary re-reads them; the result is
  at the "bpe" level;
- text (`{split}.{lang}`, optionally compressed): HAT's `*.tok.bpe.32000.*` files are Moses-tokenized
  BPE text ("bpe", the default); raw text needs text_level "raw" (Moses + BPE at encode time).
Only the asked split is read: a training set has millions of lines.
"""

from __future__ import annotations

from pathlib import Path

from hat_edge.data.corpus import ParallelCorpus, read_pair
from hat_edge.data.fairseq import Dictionary, find_split, load_binarized
from hat_edge.errors import UserError

_SUFFIXES = ("", ".gz", ".xz", ".bz2")


def _text_file(d: Path, split: str, lang: str) -> Path | None:
    for suffix in _SUFFIXES:
        p = d / f"{split}.{lang}{suffix}"
        if p.is_file() and not p.is_symlink():
            return p
    return None


def read_hat_split(data_dir: Path, split: str, src_lang: str, tgt_lang: str, text_level: str = "bpe") -> ParallelCorpus:
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"{d}: HAT data must be a directory (fairseq-binarized or {split}.{src_lang}/{split}.{tgt_lang})")
    s, t = _text_file(d, split, src_lang), _text_file(d, split, tgt_lang)
    if s is not None and t is not None:
        c = read_pair(s, t)
        return ParallelCorpus(c.src, c.tgt, f"{d}[{split}]", text_level)
    try:
        find_split(d, split, src_lang, tgt_lang)
    except UserError as e:
        raise UserError(f"{e} (nor text files {split}.{src_lang} and {split}.{tgt_lang})") from None
    dicts = []
    for lang in (src_lang, tgt_lang):
        p = d / f"dict.{lang}.txt"
        if not p.is_file():
            raise UserError(f"{p}: missing; fairseq-binarized data needs the dictionaries it was binarized with")
        dicts.append(Dictionary.load(p))
    src_ids, tgt_ids = load_binarized(d, split, src_lang, tgt_lang, dicts[0], dicts[1])
    src = tuple(dicts[0].string(x.tolist()) for x in src_ids)
    tgt = tuple(dicts[1].string(x.tolist()) for x in tgt_ids)
    for side, lines in (("source", src), ("target", tgt)):
        for i, line in enumerate(lines):
            if not line.strip():
                raise UserError(f"{d}: {split} item {i} has an empty {side} side")
    return ParallelCorpus(src, tgt, f"{d}[{split}]", "bpe")


__all__ = ["read_hat_split"]
