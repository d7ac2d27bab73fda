"""Parallel text: reading (TSV or a pair of line-aligned files) and a seeded train/valid/test split.

A corpus is either
  - one TSV file, one pair per line: `source<TAB>target`, or
  - two plain-text files with the same number of lines (line i of one translates line i of the other).
Files may be compressed (`.xz`, `.gz`, `.bz2`). The name `demo` means the corpus vendored with
hat-edge (LibreOffice help, English-German, MPL-2.0; see hat_edge/assets/demo/NOTICE-corpus.md).

Every line must hold text on both sides: an empty or malformed line is a `UserError` naming the
file and the line number, because silently dropping lines would misalign a pair of files.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import random
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hat_edge.errors import UserError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
DEMO_CORPUS = ASSETS_DIR / "libreoffice-help.en-de.tsv.xz"

# The demo corpus split (README of the corpus: 1,000 valid, 1,000 test, the rest train).
DEMO_VALID = 1000
DEMO_TEST = 1000
DEMO_SPLIT_SEED = 0


@dataclass(frozen=True)
class ParallelCorpus:
    """Aligned sentence pairs. `source` says where they came from (for messages and metadata)."""

    src: tuple[str, ...]
    tgt: tuple[str, ...]
    source: str = ""
    # "raw": plain text; "bpe": Moses-tokenized BPE'd text as HAT ships it (read by an imported
    # model's fairseq tokenizer as it is)
    level: str = "raw"

    def __post_init__(self) -> None:
        if len(self.src) != len(self.tgt):
            raise ValueError(f"{len(self.src)} source lines but {len(self.tgt)} target lines")
        if self.level not in ("raw", "bpe"):
            raise ValueError(f"level must be 'raw' or 'bpe', got {self.level!r}")

    def __len__(self) -> int:
        return len(self.src)

    def subset(self, indices: list[int], source: str | None = None) -> "ParallelCorpus":
        return ParallelCorpus(
            tuple(self.src[i] for i in indices),
            tuple(self.tgt[i] for i in indices),
            self.source if source is None else source,
            self.level,
        )

    def head(self, n: int) -> "ParallelCorpus":
        return ParallelCorpus(self.src[:n], self.tgt[:n], self.source, self.level)


@dataclass(frozen=True)
class Splits:
    train: ParallelCorpus
    valid: ParallelCorpus
    test: ParallelCorpus

    def get(self, name: str) -> ParallelCorpus:
        if name not in ("train", "valid", "test"):
            raise UserError(f"unknown split '{name}': allowed train, valid, test")
        return getattr(self, name)


def _open_text(path: Path) -> IO[bytes]:
    """Binary handle, decompressing by suffix (bytes: so a bad byte can be reported by line)."""
    try:
        if path.suffix == ".xz":
            return lzma.open(path, "rb")
        if path.suffix == ".gz":
            return gzip.open(path, "rb")
        if path.suffix == ".bz2":
            return bz2.open(path, "rb")
        return open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError) as e:
        raise UserError(f"{path}: cannot read ({e.__class__.__name__})") from None


def _read_lines(path: Path) -> list[str]:
    """Lines without their newline; a final newline does not make an extra (empty) line."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a text file")
    out: list[str] = []
    try:
        with _open_text(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{lineno}: not valid UTF-8") from None
                out.append(line.rstrip("\r\n"))
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise UserError(f"{path}: cannot decompress or read ({e.__class__.__name__}: {e})") from None
    return out


def _is_blank(s: str) -> bool:
    return not s.strip()


def read_tsv(path: str | Path) -> ParallelCorpus:
    """`source<TAB>target` per line. Exactly one tab and text on both sides, or a UserError."""
    path = Path(path)
    src: list[str] = []
    tgt: list[str] = []
    for lineno, line in enumerate(_read_lines(path), 1):
        if _is_blank(line):
            raise UserError(f"{path}:{lineno}: empty line (every line must be 'source<TAB>target')")
        parts = line.split("\t")
        if len(parts) != 2:
            raise UserError(
                f"{path}:{lineno}: expected 2 tab-separated fields 'source<TAB>target', found {len(parts)}"
            )
        s, t = parts[0].strip(), parts[1].strip()
        if not s or not t:
            side = "source" if not s else "target"
            raise UserError(f"{path}:{lineno}: empty {side} side")
        src.append(s)
        tgt.append(t)
    if not src:
        raise UserError(f"{path}: no sentence pairs (empty file)")
    return ParallelCorpus(tuple(src), tuple(tgt), str(path))


def read_pair(src_path: str | Path, tgt_path: str | Path) -> ParallelCorpus:
    """Two line-aligned plain-text files. Line counts must match; no line may be empty."""
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    src = _read_lines(src_path)
    tgt = _read_lines(tgt_path)
    if len(src) != len(tgt):
        raise UserError(
            f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
            "the two files must be line-aligned translations"
        )
    if not src:
        raise UserError(f"{src_path}: no sentences (empty file)")
    for path, lines in ((src_path, src), (tgt_path, tgt)):
        for lineno, line in enumerate(lines, 1):
            if _is_blank(line):
                raise UserError(f"{path}:{lineno}: empty line (every line needs a sentence)")
    return ParallelCorpus(
        tuple(s.strip() for s in src), tuple(t.strip() for t in tgt), f"{src_path}+{tgt_path}"
    )


def read_parallel(path: str | Path, tgt_path: str | Path | None = None) -> ParallelCorpus:
    """A corpus: `demo`, a TSV file, or (with `tgt_path`) a pair of line-aligned files."""
    if tgt_path is None and str(path) == "demo":
        corpus = read_tsv(DEMO_CORPUS)
        return ParallelCorpus(corpus.src, corpus.tgt, "demo")
    if tgt_path is not None:
        return read_pair(path, tgt_path)
    return read_tsv(path)


def split_corpus(
    corpus: ParallelCorpus, n_valid: int = 1000, n_test: int = 1000, seed: int = 0
) -> Splits:
    """A seeded split: shuffle the pair indices with `seed`; test first, then valid, then train.

    The same corpus, sizes and seed always give the same split, so a checkpoint can name its test
    set by (corpus, sizes, seed) instead of carrying it.
    """
    n = len(corpus)
    if n_valid < 0 or n_test < 0:
        raise UserError(f"valid and test sizes must be >= 0, got {n_valid} and {n_test}")
    if n_valid + n_test >= n:
        raise UserError(
            f"{corpus.source}: {n} pairs cannot give {n_valid} valid + {n_test} test pairs and a training set"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = sorted(order[:n_test])
    valid = sorted(order[n_test : n_test + n_valid])
    train = sorted(order[n_test + n_valid :])
    # Sorted within each split: the file order is kept, the membership is random.
    return Splits(
        train=corpus.subset(train, f"{corpus.source}[train]"),
        valid=corpus.subset(valid, f"{corpus.source}[valid]"),
        test=corpus.subset(test, f"{corpus.source}[test]"),
    )


@dataclass(frozen=True)
class DataSpec:
    """How to rebuild a training run's splits: which corpus, and the split's sizes and seed.

    Stored in every checkpoint so `hat-edge evaluate --split test` finds the same test set.
    """

    path: str
    tgt_path: str | None = None
    n_valid: int = DEMO_VALID
    n_test: int = DEMO_TEST
    seed: int = DEMO_SPLIT_SEED
    # "corpus": one corpus split by (n_valid, n_test, seed). "fairseq": HAT's data as it ships, a
    # directory with fairseq-binarized splits ({split}.{src}-{tgt}.{lang}.bin/.idx) or text splits
    # ({split}.{lang}, Moses-tokenized BPE text; or raw text with text_level "raw"), with the ids of
    # the imported model's dictionaries (`hat_edge.data.fairseq`).
    kind: str = "corpus"
    src_lang: str | None = None
    tgt_lang: str | None = None
    text_level: str = "bpe"

    def __post_init__(self) -> None:
        if self.kind not in ("corpus", "fairseq"):
            raise UserError(f"data spec: field 'kind' is {self.kind!r}, allowed: corpus, fairseq")
        if self.kind == "fairseq" and not (self.src_lang and self.tgt_lang):
            raise UserError("data spec: HAT data needs both languages (src_lang, tgt_lang)")
        if self.text_level not in ("raw", "bpe"):
            raise UserError(f"data spec: field 'text_level' is {self.text_level!r}, allowed: raw, bpe")

    def load(self) -> Splits:
        if self.kind == "fairseq":
            return Splits(*(self.load_split(n) for n in ("train", "valid", "test")))
        return split_corpus(read_parallel(self.path, self.tgt_path), self.n_valid, self.n_test, self.seed)

    def load_split(self, name: str) -> ParallelCorpus:
        """One split; HAT's data reads only that split's files (its training set is millions of lines)."""
        if self.kind == "corpus":
            return self.load().get(name)
        if name not in ("train", "valid", "test"):
            raise UserError(f"unknown split '{name}': allowed train, valid, test")
        from hat_edge.data.hat_data import read_hat_split

        assert self.src_lang and self.tgt_lang
        return read_hat_split(Path(self.path), name, self.src_lang, self.tgt_lang, self.text_level)

    def to_dict(self) -> dict:
        d = {
            "path": self.path,
            "tgt_path": self.tgt_path,
            "n_valid": self.n_valid,
            "n_test": self.n_test,
            "seed": self.seed,
        }
        if self.kind != "corpus":
            d.update(kind=self.kind, src_lang=self.src_lang, tgt_lang=self.tgt_lang, text_level=self.text_level)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(
            path=str(d["path"]),
            tgt_path=d.get("tgt_path"),
            n_valid=int(d.get("n_valid", DEMO_VALID)),
            n_test=int(d.get("n_test", DEMO_TEST)),
            seed=int(d.get("seed", DEMO_SPLIT_SEED)),
            kind=str(d.get("kind", "corpus")),
            src_lang=d.get("src_lang"),
            tgt_lang=d.get("tgt_lang"),
            text_level=str(d.get("text_level", "bpe")),
        )
