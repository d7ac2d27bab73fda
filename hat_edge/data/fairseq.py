"""HAT's data as HAT ships it (fairseq 0.8 era): dictionaries, Moses + BPE text, binarized splits.

HAT's released models were trained on fairseq's preprocessed WMT/IWSLT data: `dict.en.txt`-style
dictionaries, text Moses-tokenized (`tokenizer.perl -a -l LANG`) and split with subword-nmt BPE
(`@@ ` continuation markers), binarized by `fairseq-preprocess` into `SPLIT.SRC-TGT.LANG.idx/.bin`.
This module reads those files as they are, so a HAT checkpoint can be evaluated on the data it was
trained with and its output scored the way the paper scored it. It is written from the file
formats, not from fairseq's code, and needs neither fairseq nor torch.

Ids follow fairseq, not hat-edge's SentencePiece tokenizer: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3,
then the dictionary file's symbols in file order.

Every file here is a user's file, and the binarized ones are untrusted bytes: every check that
fails is a one-line `UserError` naming the file and the field or line, never a traceback and never
a silently wrong tensor. sacremoses and subword-nmt are imported only by `TextPipeline`, so reading
binarized data needs only numpy.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from hat_edge.errors import UserError
from hat_edge.runtime.files import read_text

if TYPE_CHECKING:  # pragma: no cover - typing only
    from subword_nmt.apply_bpe import BPE

__all__ = [
    "Dictionary",
    "remove_bpe",
    "TextPipeline",
    "read_indexed",
    "find_split",
    "load_binarized",
    "languages_in",
    "split_names",
]

# ---------------------------------------------------------------------------------------------
# Dictionary
# ---------------------------------------------------------------------------------------------
_OVERWRITE_FLAG = "#fairseq:overwrite"
_COUNT = re.compile(r"[0-9]+")


class Dictionary:
    """fairseq's token dictionary: 4 specials, then one symbol per line of `dict.LANG.txt`.

    A model's embedding row i is symbol i, so the ids must be exactly fairseq's: every file line
    gets the next id, even a `#fairseq:overwrite` duplicate (fairseq appends it too; `index()` of
    the symbol then answers the newer id, the older row keeps its symbol). `symbols` and `counts`
    hold all ids, specials included (fairseq gives each special the count 1).
    """

    bos_id = 0
    pad_id = 1
    eos_id = 2
    unk_id = 3
    SPECIALS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")

    def __init__(self, symbols: Iterable[str] = (), counts: Iterable[int] | None = None,
                 source: str = "<dictionary>") -> None:
        """`symbols`: the file's symbols (after the specials), in id order; `counts` alike (default
        1 each). A repeated symbol is allowed here, as with `#fairseq:overwrite`: `index()` answers
        its last id. `source` names the dictionary in messages (it is not part of equality)."""
        syms = list(symbols)
        cnts = [1] * len(syms) if counts is None else [int(c) for c in counts]
        if len(cnts) != len(syms):
            raise ValueError(f"{len(syms)} symbols but {len(cnts)} counts")
        for s in syms:
            if not isinstance(s, str) or not s or "\n" in s or "\r" in s:
                raise ValueError(f"dictionary symbol {s!r}: must be a non-empty string without line breaks")
        if any(c < 0 for c in cnts):
            raise ValueError("dictionary counts must be >= 0")
        self._symbols: tuple[str, ...] = self.SPECIALS + tuple(syms)
        self._counts: tuple[int, ...] = (1,) * len(self.SPECIALS) + tuple(cnts)
        self._indices: dict[str, int] = {s: i for i, s in enumerate(self._symbols)}  # last id wins
        self.source = source

    # ---- ids ----
    @property
    def symbols(self) -> tuple[str, ...]:
        return self._symbols

    @property
    def counts(self) -> tuple[int, ...]:
        return self._counts

    def __len__(self) -> int:
        return len(self._symbols)

    def __contains__(self, sym: object) -> bool:
        return sym in self._indices

    def index(self, sym: str) -> int:
        """The id of `sym`; `unk_id` when the dictionary does not hold it."""
        return self._indices.get(sym, self.unk_id)

    def symbol(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self._symbols):
            raise IndexError(f"id {i} outside the dictionary (ids 0..{len(self._symbols) - 1})")
        return self._symbols[i]

    # ---- text <-> ids ----
    def encode(self, line: str) -> list[int]:
        """What fairseq's binarizer stores for one line: whitespace-split symbols, unknown -> unk,
        then eos."""
        get, unk = self._indices.get, self.unk_id
        return [get(w, unk) for w in line.split()] + [self.eos_id]

    def string(self, ids: Iterable[int]) -> str:
        """Symbols joined by single spaces; stops at the first eos, skips pad and bos. BPE markers
        stay (see `remove_bpe`), as in fairseq's `Dictionary.string` without `bpe_symbol`."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.symbol(i))
        return " ".join(out)

    # ---- the file format ----
    @classmethod
    def from_text(cls, text: str, source: str = "<dictionary>") -> "Dictionary":
        """Parse `SYMBOL COUNT[ #fairseq:overwrite]` lines (the symbol is everything before the last
        space). A repeated symbol needs the flag, because without it fairseq refuses the file and the
        ids after it would not be the ones the model was trained with."""
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline
        if not lines:
            raise UserError(f"{source}:1: empty dictionary (expected 'SYMBOL COUNT' lines)")
        syms: list[str] = []
        cnts: list[int] = []
        seen = set(cls.SPECIALS)
        for lineno, raw in enumerate(lines, 1):
            line = raw.rstrip()
            overwrite = False
            if line.endswith(" " + _OVERWRITE_FLAG):
                overwrite = True
                line = line[: -len(_OVERWRITE_FLAG) - 1]
            parts = line.rsplit(" ", 1)
            if len(parts) != 2 or not parts[0]:
                raise UserError(
                    f"{source}:{lineno}: expected 'SYMBOL COUNT' (optionally followed by ' {_OVERWRITE_FLAG}'), "
                    f"got {raw[:60]!r}"
                )
            sym, count = parts
            if not _COUNT.fullmatch(count):
                raise UserError(f"{source}:{lineno}: count {count[:30]!r} of {sym[:30]!r} is not a non-negative integer")
            if sym in seen and not overwrite:
                raise UserError(
                    f"{source}:{lineno}: duplicate symbol {sym[:30]!r} (allowed only with ' {_OVERWRITE_FLAG}')"
                )
            seen.add(sym)
            syms.append(sym)
            cnts.append(int(count))
        return cls(syms, cnts, source)

    @classmethod
    def load(cls, path: str | Path) -> "Dictionary":
        """A `dict.LANG.txt` file."""
        p = Path(path)
        return cls.from_text(read_text(p, "no such dictionary file", UserError), str(p))

    def to_text(self) -> str:
        """The file form: `from_text(d.to_text())` gives the same ids and counts."""
        out: list[str] = []
        seen = set(self.SPECIALS)
        for sym, count in zip(self._symbols[len(self.SPECIALS):], self._counts[len(self.SPECIALS):]):
            flag = f" {_OVERWRITE_FLAG}" if sym in seen else ""
            seen.add(sym)
            out.append(f"{sym} {count}{flag}\n")
        return "".join(out)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dictionary) and (self._symbols, self._counts) == (other._symbols, other._counts)

    def __hash__(self) -> int:
        return hash((self._symbols, self._counts))

    def __repr__(self) -> str:
        return f"Dictionary({len(self)} symbols, {self.source})"


def remove_bpe(s: str, symbol: str = "@@ ") -> str:
    """fairseq's `--remove-bpe`: join subword-nmt pieces ("new@@ s" -> "news"), including a
    dangling marker at the end of a hypothesis."""
    return (s + " ").replace(symbol, "").rstrip()


# ---------------------------------------------------------------------------------------------
# Raw text <-> Moses-tokenized, BPE'd text
# ---------------------------------------------------------------------------------------------
_LANG = re.compile(r"[A-Za-z0-9_]+")
_VERSION_LINE = re.compile(r"#version: [0-9]+\.[0-9]+")


def _check_lang(lang: object, what: str) -> str:
    if not isinstance(lang, str) or not _LANG.fullmatch(lang):
        raise UserError(f"{what} {lang!r}: a language code is letters, digits or '_' (e.g. en, de)")
    return lang


def _check_codes(codes: str, source: str) -> str:
    """The codes text, checked line by line, because subword-nmt exits the process (sys.exit) on a
    bad line instead of raising."""
    lines = codes.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.rstrip("\r") for line in lines]
    first = 0
    if lines and lines[0].startswith("#version"):
        if not _VERSION_LINE.fullmatch(lines[0]):
            raise UserError(f"{source}:1: version line must be '#version: X.Y', got {lines[0][:40]!r}")
        first = 1
    if len(lines) == first:
        raise UserError(f"{source}:{first + 1}: no BPE merges (expected lines 'LEFT RIGHT')")
    for lineno in range(first + 1, len(lines) + 1):
        line = lines[lineno - 1]
        if line.startswith("#version"):
            raise UserError(f"{source}:{lineno}: '#version' is allowed only on the first line (two codes files joined?)")
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise UserError(
                f"{source}:{lineno}: expected two space-separated subword units 'LEFT RIGHT', got {line[:60]!r}"
            )
    return "\n".join(lines) + "\n"


class TextPipeline:
    """Raw sentences <-> the BPE'd Moses tokens fairseq models read and write.

    The defaults are those of fairseq's WMT preparation scripts (`tokenizer.perl -a -l LANG`:
    aggressive dash splits, `a-b` -> `a @-@ b`; escaping of `& < > ' " | [ ]` as `&amp;` ...), then
    subword-nmt BPE with the `@@` separator. A model trained on that text only knows those symbols,
    so its input must be made the same way and its output undone the same way before scoring.
    (The scripts' punctuation normalisation and non-printing-character removal are not applied.)
    """

    def __init__(self, src_lang: str, tgt_lang: str, bpe_codes: str | None, *,
                 aggressive_dash_splits: bool = True, escape: bool = True, source: str = "bpe codes") -> None:
        self.src_lang = _check_lang(src_lang, "source language")
        self.tgt_lang = _check_lang(tgt_lang, "target language")
        self.aggressive_dash_splits = bool(aggressive_dash_splits)
        self.escape = bool(escape)
        self.source = source
        self._codes = None if bpe_codes is None else _check_codes(bpe_codes, source)
        self._bpe: BPE | None = None
        self._tokenizers: dict[str, Any] = {}
        self._detokenizers: dict[str, Any] = {}

    @classmethod
    def load(cls, src_lang: str, tgt_lang: str, bpe_codes_path: str | Path | None, **kwargs: Any) -> "TextPipeline":
        """With the codes read from a file (fairseq's `code` / `bpecodes`), named in messages."""
        if bpe_codes_path is None:
            return cls(src_lang, tgt_lang, None, **kwargs)
        p = Path(bpe_codes_path)
        return cls(src_lang, tgt_lang, read_text(p, "no such BPE codes file", UserError), source=str(p), **kwargs)

    @property
    def has_bpe(self) -> bool:
        return self._codes is not None

    def _lang(self, lang: str) -> str:
        if lang not in (self.src_lang, self.tgt_lang):
            raise UserError(f"language {lang!r}: this pipeline is for {self.src_lang} and {self.tgt_lang}")
        return lang

    def _tokenizer(self, lang: str) -> Any:
        tok = self._tokenizers.get(lang)
        if tok is None:
            from sacremoses import MosesTokenizer

            tok = self._tokenizers[lang] = MosesTokenizer(lang=lang)
        return tok

    def _detokenizer(self, lang: str) -> Any:
        detok = self._detokenizers.get(lang)
        if detok is None:
            from sacremoses import MosesDetokenizer

            detok = self._detokenizers[lang] = MosesDetokenizer(lang=lang)
        return detok

    def tokenize(self, text: str, lang: str) -> str:
        """Moses tokens of one sentence, space-separated."""
        return self._tokenizer(self._lang(lang)).tokenize(
            text, aggressive_dash_splits=self.aggressive_dash_splits, return_str=True, escape=self.escape
        )

    def detokenize(self, tokens: str, lang: str) -> str:
        """The sentence back from Moses tokens (`@-@` joined, `&amp;` ... unescaped when escaping)."""
        return self._detokenizer(self._lang(lang)).detokenize(tokens.split(), return_str=True, unescape=self.escape)

    def apply_bpe(self, tokenized: str) -> str:
        """subword-nmt segmentation with `@@ ` markers; the text unchanged without codes."""
        if self._codes is None:
            return tokenized
        if self._bpe is None:
            from subword_nmt.apply_bpe import BPE

            self._bpe = BPE(io.StringIO(self._codes), separator="@@")
        return self._bpe.process_line(tokenized)

    def encode(self, text: str, lang: str) -> str:
        """Raw sentence -> what fairseq-preprocess read (tokenized, then BPE)."""
        return self.apply_bpe(self.tokenize(text, lang))

    def decode(self, bpe_text: str, lang: str) -> str:
        """A model's output string (`Dictionary.string`) -> raw sentence for scoring."""
        return self.detokenize(remove_bpe(bpe_text), lang)

    # ---- settings (the codes travel separately) ----
    def to_dict(self) -> dict:
        return {
            "src_lang": self.src_lang,
            "tgt_lang": self.tgt_lang,
            "bpe": self.has_bpe,
            "aggressive_dash_splits": self.aggressive_dash_splits,
            "escape": self.escape,
        }

    @classmethod
    def from_dict(cls, d: dict, bpe_codes: str | None = None, source: str = "bpe codes") -> "TextPipeline":
        """The pipeline `to_dict` described; `bpe_codes` must be given exactly when it used BPE."""
        if not isinstance(d, dict):
            raise UserError(f"text pipeline settings: expected a mapping, got {type(d).__name__}")
        for key, kind in (("src_lang", str), ("tgt_lang", str), ("aggressive_dash_splits", bool), ("escape", bool)):
            if key not in d:
                raise UserError(f"text pipeline settings: field '{key}' missing")
            if not isinstance(d[key], kind):
                raise UserError(f"text pipeline settings: field '{key}' must be {kind.__name__}, got {d[key]!r}")
        uses_bpe = bool(d.get("bpe", bpe_codes is not None))
        if uses_bpe and bpe_codes is None:
            raise UserError("text pipeline settings: field 'bpe' is true but no BPE codes were given")
        if not uses_bpe and bpe_codes is not None:
            raise UserError("text pipeline settings: field 'bpe' is false but BPE codes were given")
        return cls(d["src_lang"], d["tgt_lang"], bpe_codes, aggressive_dash_splits=d["aggressive_dash_splits"],
                   escape=d["escape"], source=source)

    def __repr__(self) -> str:
        return f"TextPipeline({self.src_lang}-{self.tgt_lang}, bpe={self.has_bpe})"


# ---------------------------------------------------------------------------------------------
# Binarized datasets (.idx + .bin)
# ---------------------------------------------------------------------------------------------
LEGACY_MAGIC = b"TNTIDX\x00\x00"
MMAP_MAGIC = b"MMIDIDX\x00\x00"
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("u1"), 2: np.dtype("i1"), 3: np.dtype("<i2"), 4: np.dtype("<i4"), 5: np.dtype("<i8"),
    6: np.dtype("<f8"), 7: np.dtype("<f8"), 8: np.dtype("<u2"),
}
_TOKEN_CODES = "1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16"
_I8 = np.dtype("<i8")
_I4 = np.dtype("<i4")


def _open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refusing a symlink (lstat, then O_NOFOLLOW, then the same
    inode), so an untrusted directory cannot point the reader at a file it should not read."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.__class__.__name__})") from None
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{path}: is a symbolic link, refused (pass the file it points to)")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.__class__.__name__})") from None
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise UserError(f"{path}: changed while being opened, refused")
    return fd


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


class _Index:
    """Parses one .idx held in memory; every error names the file and the field."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self.pos = 0

    def fail(self, msg: str) -> UserError:
        return UserError(f"{self.path}: {msg}")

    def unpack(self, fmt: str, field: str) -> int:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise self.fail(f"field '{field}' truncated (file is {len(self.data)} bytes)")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return int(value)

    def dtype(self, code: int) -> np.dtype:
        if code not in _DTYPES:
            raise self.fail(f"field 'dtype' is code {code}, allowed {_TOKEN_CODES}")
        dt = _DTYPES[code]
        if dt.kind == "f":
            raise self.fail(f"field 'dtype' is code {code} ({dt.name}), not token data: allowed {_TOKEN_CODES}")
        return dt

    def check_length(self, fields: list[tuple[str, np.dtype, int]], header: str) -> None:
        """The file must be exactly the header plus `fields`: a shorter one is cut, a longer one is
        not what its header says."""
        end = self.pos
        for name, dt, count in fields:
            end += dt.itemsize * count
            if end > len(self.data):
                raise self.fail(
                    f"field '{name}' truncated: {header} needs at least {end} bytes, the file has {len(self.data)}"
                )
        if end < len(self.data):
            raise self.fail(
                f"{len(self.data) - end} bytes after the last field '{fields[-1][0]}' ({header}: {end} bytes expected)"
            )

    def array(self, dt: np.dtype, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, dtype=dt, count=count, offset=self.pos).astype(np.int64)
        self.pos += dt.itemsize * count
        return out

    def non_negative_non_decreasing(self, name: str, values: np.ndarray) -> None:
        i = _first(values < 0)
        if i is not None:
            raise self.fail(f"field '{name}' is negative at item {i} ({int(values[i])})")
        i = _first(np.diff(values) < 0)
        if i is not None:
            raise self.fail(f"field '{name}' is not non-decreasing at item {i + 1}")


def _items(bin_fd: int, bin_size: int, dt: np.dtype, starts: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
    """Items `[starts[i], ends[i])` (in elements) of the .bin, as int64 arrays; the offsets are
    already checked to lie inside the file."""
    n = len(starts)
    if n == 0:
        return []
    if int(ends[-1]) == 0 or bin_size < dt.itemsize:
        return [np.zeros(0, dtype=np.int64) for _ in range(n)]
    with os.fdopen(os.dup(bin_fd), "rb") as fh:
        mm = np.memmap(fh, dtype=dt, mode="r", shape=(bin_size // dt.itemsize,))
    try:
        if n == 1 or bool(np.all(starts[1:] == ends[:-1])):
            # Back to back (what fairseq writes): one conversion, then views of it.
            flat = np.array(mm[int(starts[0]):int(ends[-1])], dtype=np.int64)
            return np.split(flat, ends[:-1] - starts[0])
        return [np.array(mm[int(s):int(e)], dtype=np.int64) for s, e in zip(starts, ends)]
    finally:
        del mm


def _read_legacy(ix: _Index, bin_path: Path, bin_size: int) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """fairseq's IndexedDataset index: element offsets, shapes in a separate sizes table."""
    ix.pos = len(LEGACY_MAGIC)
    version = ix.unpack("<Q", "version")
    if version != 1:
        raise ix.fail(f"field 'version' is {version}, allowed 1")
    dt = ix.dtype(ix.unpack("<Q", "dtype"))
    element_size = ix.unpack("<Q", "element_size")
    if element_size != dt.itemsize:
        raise ix.fail(f"field 'element_size' is {element_size}, but dtype {dt.name} has {dt.itemsize}-byte elements")
    n = ix.unpack("<Q", "count")
    s = ix.unpack("<Q", "sizes_count")
    ix.check_length([("dim_offsets", _I8, n + 1), ("data_offsets", _I8, n + 1), ("sizes", _I8, s)],
                    f"a header of {n} items and {s} sizes")
    dim_offsets = ix.array(_I8, n + 1)
    data_offsets = ix.array(_I8, n + 1)
    sizes = ix.array(_I8, s)

    ix.non_negative_non_decreasing("dim_offsets", dim_offsets)
    i = _first(dim_offsets > s)
    if i is not None:
        raise ix.fail(f"field 'dim_offsets' at item {i} is {int(dim_offsets[i])}, past the {s} sizes")
    i = _first(np.diff(dim_offsets) != 1)
    if i is not None:
        raise ix.fail(f"field 'dim_offsets' says item {i} has {int(dim_offsets[i + 1] - dim_offsets[i])} dimensions; "
                      "token data is 1-D")
    ix.non_negative_non_decreasing("data_offsets", data_offsets)
    elements = bin_size // dt.itemsize
    i = _first(data_offsets > elements)
    if i is not None:
        raise ix.fail(f"field 'data_offsets' at item {i} is element {int(data_offsets[i])}, past the end of "
                      f"{bin_path} ({elements} elements of {dt.name})")
    lengths = np.diff(data_offsets)
    shape = sizes[dim_offsets[:-1]] if n else np.zeros(0, dtype=np.int64)
    i = _first(shape != lengths)
    if i is not None:
        raise ix.fail(f"field 'sizes' says item {i} has {int(shape[i])} elements, 'data_offsets' give it "
                      f"{int(lengths[i])}")
    return dt, data_offsets[:-1], data_offsets[1:]


def _read_mmap(ix: _Index, bin_path: Path, bin_size: int) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """MMapIndexedDataset index: int32 sizes, int64 byte pointers. fairseq writes no document
    table; Megatron-style writers add a count after the item count and the table at the end. The
    two are told apart by the file's exact length (they cannot both fit it)."""
    ix.pos = len(MMAP_MAGIC)
    version = ix.unpack("<Q", "version")
    if version != 1:
        raise ix.fail(f"field 'version' is {version}, allowed 1")
    dt = ix.dtype(ix.unpack("<B", "dtype"))
    n = ix.unpack("<Q", "count")
    fields = [("sizes", _I4, n), ("pointers", _I8, n)]
    d: int | None = None
    if len(ix.data) != ix.pos + 12 * n and len(ix.data) >= ix.pos + 8 + 12 * n:
        d = ix.unpack("<Q", "doc_count")
        fields.append(("doc_idx", _I8, d))
        ix.check_length(fields, f"a header of {n} items and {d} documents")
    else:
        ix.check_length(fields, f"a header of {n} items (no document table)")
    sizes = ix.array(_I4, n)
    pointers = ix.array(_I8, n)

    i = _first(sizes < 0)
    if i is not None:
        raise ix.fail(f"field 'sizes' is negative at item {i} ({int(sizes[i])})")
    ix.non_negative_non_decreasing("pointers", pointers)
    i = _first(pointers > bin_size)
    if i is not None:
        raise ix.fail(f"field 'pointers' at item {i} is byte {int(pointers[i])}, past the end of {bin_path} "
                      f"({bin_size} bytes)")
    i = _first(pointers % dt.itemsize != 0)
    if i is not None:
        raise ix.fail(f"field 'pointers' at item {i} is byte {int(pointers[i])}, not a multiple of the "
                      f"{dt.itemsize}-byte {dt.name} elements")
    ends = pointers + sizes * dt.itemsize  # no overflow: pointers <= bin_size, sizes < 2**31
    i = _first(ends > bin_size)
    if i is not None:
        raise ix.fail(f"field 'sizes' at item {i} ends at byte {int(ends[i])}, past the end of {bin_path} "
                      f"({bin_size} bytes)")
    i = _first(pointers[1:] < ends[:-1])
    if i is not None:
        raise ix.fail(f"field 'pointers' at item {i + 1} is byte {int(pointers[i + 1])}, inside item {i} "
                      f"(which 'sizes' ends at byte {int(ends[i])})")
    if d is not None:
        doc_idx = ix.array(_I8, d)
        ix.non_negative_non_decreasing("doc_idx", doc_idx)
        i = _first(doc_idx > n)
        if i is not None:
            raise ix.fail(f"field 'doc_idx' at item {i} is {int(doc_idx[i])}, past the {n} items")
    return dt, pointers // dt.itemsize, ends // dt.itemsize


def read_indexed(prefix: str | Path) -> list[np.ndarray]:
    """The items of a fairseq binarized dataset `PREFIX.idx` + `PREFIX.bin`, as int64 arrays.

    Both index formats fairseq writes are read (told apart by their magic): the legacy
    `IndexedDataset` (`--dataset-impl lazy/cached`, HAT's default) and `MMapIndexedDataset`
    (`--dataset-impl mmap`). The files are untrusted: the header, the exact index length, every
    offset and size are checked before a byte of the .bin is used.
    """
    idx_path = Path(f"{prefix}.idx")
    bin_path = Path(f"{prefix}.bin")
    fd = _open_regular(idx_path)
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise UserError(f"{idx_path}: cannot read ({e.__class__.__name__})") from None
    ix = _Index(idx_path, data)
    if data[: len(MMAP_MAGIC)] == MMAP_MAGIC:
        reader = _read_mmap
    elif data[: len(LEGACY_MAGIC)] == LEGACY_MAGIC:
        reader = _read_legacy
    else:
        raise ix.fail(f"field 'magic' is {data[:9]!r}, expected {LEGACY_MAGIC!r} (fairseq IndexedDataset) or "
                      f"{MMAP_MAGIC!r} (MMapIndexedDataset): not a fairseq index")
    bin_fd = _open_regular(bin_path)
    try:
        bin_size = os.fstat(bin_fd).st_size
        dt, starts, ends = reader(ix, bin_path, bin_size)
        try:
            return _items(bin_fd, bin_size, dt, starts, ends)
        except (OSError, ValueError) as e:
            raise UserError(f"{bin_path}: cannot read ({e.__class__.__name__})") from None
    finally:
        os.close(bin_fd)


# ---------------------------------------------------------------------------------------------
# Splits in a fairseq-preprocess directory
# ---------------------------------------------------------------------------------------------
_SPLIT = re.compile(r"[A-Za-z0-9_]+")
_DATA_FILE = re.compile(r"(?P<split>[A-Za-z0-9_]+)\.(?P<a>[A-Za-z0-9_]+)-(?P<b>[A-Za-z0-9_]+)\.(?P<lang>[A-Za-z0-9_]+)\.idx")
_SPLIT_ORDER = {"train": 0, "valid": 1, "test": 2}


def _data_dir(data_dir: str | Path) -> Path:
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"{d}: {'not a directory' if d.exists() else 'no such directory'} (expected fairseq's "
                        "binarized data: SPLIT.SRC-TGT.LANG.idx/.bin)")
    return d


def _has_dataset(prefix: Path) -> bool:
    # lexists: a symlinked file counts as there, so read_indexed refuses it by name instead of
    # "not found".
    return os.path.lexists(f"{prefix}.idx") and os.path.lexists(f"{prefix}.bin")


def find_split(data_dir: str | Path, split: str, src_lang: str, tgt_lang: str) -> tuple[Path, Path]:
    """The source and target prefixes of `split`, as fairseq-preprocess names them
    (`{split}.{src}-{tgt}.{src}` and `.{tgt}`; the `{tgt}-{src}` pair order too, as fairseq's
    translation task accepts)."""
    d = _data_dir(data_dir)
    if not isinstance(split, str) or not _SPLIT.fullmatch(split):
        raise UserError(f"split {split!r}: a split name is letters, digits or '_' (e.g. train, valid, test)")
    src = _check_lang(src_lang, "source language")
    tgt = _check_lang(tgt_lang, "target language")
    if src == tgt:
        raise UserError(f"source and target language are both {src!r}")
    looked: list[str] = []
    for pair in (f"{src}-{tgt}", f"{tgt}-{src}"):
        src_prefix, tgt_prefix = d / f"{split}.{pair}.{src}", d / f"{split}.{pair}.{tgt}"
        if _has_dataset(src_prefix) and _has_dataset(tgt_prefix):
            return src_prefix, tgt_prefix
        looked += [f"{src_prefix.name}.idx/.bin", f"{tgt_prefix.name}.idx/.bin"]
    found = ", ".join(f"{s}.{a}-{b}" for s, a, b in _datasets(d)) or "none"
    raise UserError(f"{d}: no binarized split '{split}' for {src}-{tgt}: looked for {', '.join(looked)} "
                    f"(binarized splits here: {found})")


def load_binarized(data_dir: str | Path, split: str, src_lang: str, tgt_lang: str,
                   src_dict: Dictionary, tgt_dict: Dictionary) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Both sides of a binarized split, checked against their dictionaries: the same number of
    items (item i of one translates item i of the other) and every id inside its dictionary, since
    an id past the embedding table would fail deep inside a model, or not at all."""
    src_prefix, tgt_prefix = find_split(data_dir, split, src_lang, tgt_lang)
    src = read_indexed(src_prefix)
    tgt = read_indexed(tgt_prefix)
    if len(src) != len(tgt):
        raise UserError(f"{src_prefix}.idx has {len(src)} items but {tgt_prefix}.idx has {len(tgt)}: "
                        "the two sides of a split must be aligned")
    for prefix, items, dictionary in ((src_prefix, src, src_dict), (tgt_prefix, tgt, tgt_dict)):
        _check_ids(Path(f"{prefix}.bin"), items, dictionary)
    return src, tgt


def _check_ids(path: Path, items: Sequence[np.ndarray], dictionary: Dictionary, chunk: int = 65536) -> None:
    """Every id in 0..len(dictionary)-1; vectorised over chunks of items (bounded memory)."""
    n = len(dictionary)
    for first in range(0, len(items), chunk):
        part = items[first:first + chunk]
        flat = np.concatenate(part) if part else np.zeros(0, dtype=np.int64)
        bad = _first((flat < 0) | (flat >= n))
        if bad is None:
            continue
        ends = np.cumsum([len(a) for a in part])
        item = int(np.searchsorted(ends, bad, side="right"))
        raise UserError(f"{path}: item {first + item} holds id {int(flat[bad])}, outside the dictionary "
                        f"{dictionary.source} (ids 0..{n - 1})")


def _datasets(d: Path) -> list[tuple[str, str, str]]:
    """(split, a, b) of every complete binarized pair `split.a-b.{a,b}.idx/.bin` in `d`."""
    found: set[tuple[str, str, str]] = set()
    try:
        names = os.listdir(d)
    except OSError as e:
        raise UserError(f"{d}: cannot list ({e.__class__.__name__})") from None
    for name in names:
        m = _DATA_FILE.fullmatch(name)
        if not m or m["a"] == m["b"] or m["lang"] != m["a"]:
            continue
        split, a, b = m["split"], m["a"], m["b"]
        if _has_dataset(d / f"{split}.{a}-{b}.{a}") and _has_dataset(d / f"{split}.{a}-{b}.{b}"):
            found.add((split, a, b))
    return sorted(found, key=lambda t: (_SPLIT_ORDER.get(t[0], len(_SPLIT_ORDER)), t))


def languages_in(data_dir: str | Path) -> list[tuple[str, str]]:
    """The (src, tgt) pairs of the binarized splits in `data_dir`, in the order their file names
    give (fairseq-preprocess names files `SRC-TGT`), sorted."""
    return sorted({(a, b) for _, a, b in _datasets(_data_dir(data_dir))})


def split_names(data_dir: str | Path, src_lang: str | None = None, tgt_lang: str | None = None) -> list[str]:
    """The binarized splits in `data_dir` (train, valid, test first), optionally only those of one
    language pair (either pair order)."""
    out: list[str] = []
    for split, a, b in _datasets(_data_dir(data_dir)):
        if src_lang is not None and tgt_lang is not None and {a, b} != {src_lang, tgt_lang}:
            continue
        if split not in out:
            out.append(split)
    return out
