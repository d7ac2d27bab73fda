"""HAT's data formats (fairseq 0.8 era): dictionaries, binarized datasets, Moses + BPE text.

- `Dictionary`: fairseq's `dict.en.txt`. Ids `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, then one
  symbol per line in file order, so `len(d) == 4 + lines` (the size of the embedding it belongs to).
- `read_indexed(prefix)`: a binarized split `PREFIX.idx` + `PREFIX.bin` in either index format
  fairseq writes, told apart by the magic: the legacy `IndexedDataset` (`TNTIDX\\0\\0`) and
  `MMapIndexedDataset` (`MMIDIDX\\0\\0`). Both files are untrusted: every header field, length and
  offset is checked before an item is read, and a bad one is one line naming the file and field.
- `TextPipeline`: raw text <-> Moses-tokenized BPE text, with the maintained packages (sacremoses,
  subword-nmt), set up as fairseq's WMT preparation (`tokenizer.perl -a`, escaping on, `@@ `).

Nothing here imports torch: the dictionaries and the text pipeline travel inside checkpoints and
bundles (`hat_edge.data.fairseq_tokenizer`).
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from hat_edge.errors import UserError
from hat_edge.runtime.files import read_text

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
_OVERWRITE = "#fairseq:overwrite"


# ------------------------------------------------------------------------------------------------
# dictionaries
# ------------------------------------------------------------------------------------------------
class Dictionary:
    """fairseq's Dictionary as its `dict.*.txt` file: specials first, then the file's symbols."""

    bos_id, pad_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, symbols: Sequence[str], counts: Sequence[int]) -> None:
        self.symbols = tuple(symbols)
        self.counts = tuple(int(c) for c in counts)
        self._index = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def from_text(cls, text: str, source: str = "<dictionary>") -> "Dictionary":
        symbols, counts = list(SPECIALS), [1] * len(SPECIALS)
        index = {s: i for i, s in enumerate(symbols)}
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.rstrip("\r")
            if not line.strip():
                raise UserError(f"{source}:{lineno}: empty line (each line is 'SYMBOL COUNT')")
            overwrite = False
            if line.endswith(" " + _OVERWRITE):
                overwrite, line = True, line[: -len(_OVERWRITE) - 1]
            parts = line.rsplit(" ", 1)
            if len(parts) != 2 or not parts[0]:
                raise UserError(f"{source}:{lineno}: expected 'SYMBOL COUNT', got {line[:60]!r}")
            sym, count = parts
            try:
                c = int(count)
            except ValueError:
                raise UserError(f"{source}:{lineno}: count {count[:20]!r} is not an integer") from None
            if sym in index:
                if not overwrite:
                    raise UserError(f"{source}:{lineno}: duplicate symbol {sym[:40]!r} (first at id {index[sym]}; "
                                    f"fairseq allows it only with '{_OVERWRITE}')")
                counts[index[sym]] = c
                continue
            index[sym] = len(symbols)
            symbols.append(sym)
            counts.append(c)
        if len(symbols) == len(SPECIALS):
            raise UserError(f"{source}: empty dictionary (no symbols)")
        return cls(symbols, counts)

    @classmethod
    def load(cls, path: str | Path) -> "Dictionary":
        p = Path(path)
        if p.is_symlink():
            raise UserError(f"{p}: is a symbolic link; pass the dictionary file itself")
        return cls.from_text(read_text(p, "no such dictionary file", UserError), str(p))

    def to_text(self) -> str:
        """The file's lines (specials omitted, as fairseq writes them); `from_text` reads back the same ids."""
        return "".join(f"{s} {c}\n" for s, c in zip(self.symbols[len(SPECIALS):], self.counts[len(SPECIALS):]))

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dictionary) and other.symbols == self.symbols

    def __hash__(self) -> int:
        return hash(self.symbols)

    def index(self, sym: str) -> int:
        return self._index.get(sym, self.unk_id)

    def symbol(self, i: int) -> str:
        return self.symbols[i]

    def encode(self, line: str) -> list[int]:
        """Whitespace tokens -> ids (unknown -> <unk>), then </s>: what fairseq's binarizer stores."""
        return [self._index.get(w, self.unk_id) for w in line.split()] + [self.eos_id]

    def string(self, ids: Iterable[int]) -> str:
        """Symbols up to the first </s>, without <pad> and <s>, joined by spaces (no BPE removal)."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.symbols[i] if 0 <= i < len(self.symbols) else SPECIALS[self.unk_id])
        return " ".join(out)


def remove_bpe(s: str, symbol: str = "@@ ") -> str:
    """fairseq's --remove-bpe."""
    return (s + " ").replace(symbol, "").rstrip()


# ------------------------------------------------------------------------------------------------
# binarized datasets
# ------------------------------------------------------------------------------------------------
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float64, 8: np.uint16}
LEGACY_MAGIC = b"TNTIDX\x00\x00"
MMAP_MAGIC = b"MMIDIDX\x00\x00"


def _read_regular(path: Path, what: str) -> bytes:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what} file") from None
    import stat

    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{path}: is a symbolic link; hat-edge reads data files only as themselves")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _int64s(buf: bytes, off: int, n: int, name: str, where: str) -> tuple[np.ndarray, int]:
    end = off + 8 * n
    if n < 0 or end > len(buf):
        raise UserError(f"{where}: field '{name}' runs past the end of the file (truncated index)")
    return np.frombuffer(buf, dtype="<i8", count=n, offset=off).astype(np.int64), end


def _dtype(code: int, where: str) -> Any:
    if code not in _DTYPES:
        raise UserError(f"{where}: field 'dtype' code {code} unknown; allowed {sorted(_DTYPES)}")
    return np.dtype(_DTYPES[code]).newbyteorder("<")


def _check_monotone(a: np.ndarray, name: str, where: str) -> None:
    if a.size and a[0] != 0:
        raise UserError(f"{where}: field '{name}' must start at 0, starts at {int(a[0])}")
    bad = np.flatnonzero(np.diff(a) < 0)
    if bad.size:
        raise UserError(f"{where}: field '{name}' is not non-decreasing at item {int(bad[0])}")


def _read_legacy(idx: bytes, data: bytes, where: str, bin_where: str) -> list[np.ndarray]:
    if len(idx) < 48:
        raise UserError(f"{where}: truncated header (legacy IndexedDataset)")
    version, = struct.unpack_from("<Q", idx, 8)
    if version != 1:
        raise UserError(f"{where}: field 'version' is {version}, allowed: 1")
    code, elem = struct.unpack_from("<QQ", idx, 16)
    dtype = _dtype(code, where)
    if elem != dtype.itemsize:
        raise UserError(f"{where}: field 'element_size' is {elem}, but dtype code {code} has {dtype.itemsize}-byte items")
    n, s = struct.unpack_from("<QQ", idx, 32)
    if n > len(idx) or s > len(idx):
        raise UserError(f"{where}: field 'count' ({n} items, {s} sizes) does not fit the file")
    dim_off, off = _int64s(idx, 48, n + 1, "dim_offsets", where)
    data_off, off = _int64s(idx, off, n + 1, "data_offsets", where)
    sizes, off = _int64s(idx, off, s, "sizes", where)
    if off != len(idx):
        raise UserError(f"{where}: {len(idx) - off} bytes after the last field (not a fairseq index, or corrupt)")
    _check_monotone(dim_off, "dim_offsets", where)
    _check_monotone(data_off, "data_offsets", where)
    if dim_off[-1] != s:
        raise UserError(f"{where}: field 'dim_offsets' ends at {int(dim_off[-1])}, but there are {s} sizes")
    if (sizes < 0).any():
        raise UserError(f"{where}: field 'sizes' has a negative size")
    if int(data_off[-1]) * elem > len(data):
        raise UserError(f"{where}: field 'data_offsets' points past the end of {bin_where} "
                        f"({int(data_off[-1]) * elem} > {len(data)} bytes)")
    arr = np.frombuffer(data, dtype=dtype, count=int(data_off[-1]))
    out = []
    for i in range(n):
        shape = sizes[dim_off[i] : dim_off[i + 1]]
        if shape.size != 1:
            raise UserError(f"{where}: item {i} has shape {shape.tolist()}; token data is 1-D")
        if int(shape[0]) != int(data_off[i + 1] - data_off[i]):
            raise UserError(f"{where}: item {i}: field 'sizes' says {int(shape[0])} elements, 'data_offsets' "
                            f"{int(data_off[i + 1] - data_off[i])}")
        out.append(arr[data_off[i] : data_off[i + 1]].astype(np.int64))
    return out


def _read_mmap(idx: bytes, data: bytes, where: str, bin_where: str) -> list[np.ndarray]:
    if len(idx) < 34:
        raise UserError(f"{where}: truncated header (MMapIndexedDataset)")
    version, = struct.unpack_from("<Q", idx, 9)
    if version != 1:
        raise UserError(f"{where}: field 'version' is {version}, allowed: 1")
    code, = struct.unpack_from("<B", idx, 17)
    dtype = _dtype(code, where)
    n, docs = struct.unpack_from("<QQ", idx, 18)
    off = 34
    if 4 * n + 8 * n + 8 * docs + off != len(idx):
        raise UserError(f"{where}: field 'count' ({n} items, {docs} docs) does not match the file's "
                        f"{len(idx)} bytes (truncated or corrupt index)")
    sizes = np.frombuffer(idx, dtype="<i4", count=n, offset=off).astype(np.int64)
    off += 4 * n
    pointers, off = _int64s(idx, off, n, "pointers", where)
    if (sizes < 0).any():
        raise UserError(f"{where}: field 'sizes' has a negative size")
    if n:
        if pointers[0] != 0 or (np.diff(pointers) < 0).any():
            bad = int(np.flatnonzero(np.diff(pointers) < 0)[0]) if pointers[0] == 0 else 0
            raise UserError(f"{where}: field 'pointers' is not non-decreasing from 0 at item {bad}")
        ends = pointers + sizes * dtype.itemsize
        if (ends[:-1] > pointers[1:]).any():
            bad = int(np.flatnonzero(ends[:-1] > pointers[1:])[0])
            raise UserError(f"{where}: item {bad} overlaps the next one (fields 'sizes' and 'pointers' disagree)")
        if int(ends[-1]) > len(data):
            raise UserError(f"{where}: field 'pointers' points past the end of {bin_where} ({int(ends[-1])} > "
                            f"{len(data)} bytes)")
    return [np.frombuffer(data, dtype=dtype, count=int(k), offset=int(p)).astype(np.int64)
            for k, p in zip(sizes, pointers)]


def read_indexed(prefix: str | Path) -> list[np.ndarray]:
    """The items (int64 token arrays) of `PREFIX.idx` + `PREFIX.bin`, either fairseq index format."""
    prefix = Path(prefix)
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    idx = _read_regular(idx_path, "index")
    data = _read_regular(bin_path, "data")
    where = idx_path.name if idx_path.parent == Path(".") else str(idx_path)
    if idx[:9] == MMAP_MAGIC:
        return _read_mmap(idx, data, where, bin_path.name)
    if idx[:8] == LEGACY_MAGIC:
        return _read_legacy(idx, data, where, bin_path.name)
    raise UserError(f"{where}: field 'magic' is {idx[:9]!r}: not a fairseq index (expected {LEGACY_MAGIC!r} or "
                    f"{MMAP_MAGIC!r})")


def find_split(data_dir: str | Path, split: str, src_lang: str, tgt_lang: str) -> tuple[Path, Path]:
    """The (source, target) prefixes fairseq names `{split}.{src}-{tgt}.{lang}` (either pair order)."""
    d = Path(data_dir)
    tried = []
    for a, b in ((src_lang, tgt_lang), (tgt_lang, src_lang)):
        s, t = d / f"{split}.{a}-{b}.{src_lang}", d / f"{split}.{a}-{b}.{tgt_lang}"
        tried.append(f"{s.name}.idx")
        if Path(f"{s}.idx").exists() and Path(f"{t}.idx").exists():
            return s, t
    raise UserError(f"{d}: no binarized '{split}' split for {src_lang}-{tgt_lang} (looked for {' and '.join(tried)})")


def load_binarized(data_dir: str | Path, split: str, src_lang: str, tgt_lang: str, src_dict: Dictionary,
                   tgt_dict: Dictionary) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Both sides of a binarized split, aligned, every id inside its dictionary."""
    s, t = find_split(data_dir, split, src_lang, tgt_lang)
    src, tgt = read_indexed(s), read_indexed(t)
    if len(src) != len(tgt):
        raise UserError(f"{s}.idx has {len(src)} items but {t}.idx has {len(tgt)}: the two sides must align")
    for prefix, items, d in ((s, src, src_dict), (t, tgt, tgt_dict)):
        for i, x in enumerate(items):
            if x.size and (int(x.min()) < 0 or int(x.max()) >= len(d)):
                bad = int(x.max()) if int(x.max()) >= len(d) else int(x.min())
                raise UserError(f"{prefix}.bin: item {i} holds id {bad}, outside its dictionary (0..{len(d) - 1})")
    return src, tgt


def languages_in(data_dir: str | Path) -> list[tuple[str, str]]:
    """The (src, tgt) pairs of the binarized splits in a directory (`valid.en-de.en.idx` -> ('en', 'de'))."""
    pairs = set()
    for p in Path(data_dir).glob("*.*-*.*.idx"):
        parts = p.name.split(".")
        if len(parts) == 4 and "-" in parts[1]:
            a, b = parts[1].split("-", 1)
            if parts[2] in (a, b):
                pairs.add((a, b))
    return sorted(pairs)


def split_names(data_dir: str | Path) -> list[str]:
    return sorted({p.name.split(".")[0] for p in Path(data_dir).glob("*.*-*.*.idx")})


# ------------------------------------------------------------------------------------------------
# Moses + BPE
# ------------------------------------------------------------------------------------------------
def check_bpe_codes(codes: str, source: str = "bpe codes") -> None:
    """subword-nmt's codes file: an optional `#version: X.Y` line, then pairs `A B`."""
    lines = codes.splitlines()
    for lineno, line in enumerate(lines, 1):
        if lineno == 1 and line.startswith("#version:"):
            continue
        parts = line.rstrip("\r\n").split(" ")
        if len(parts) != 2 or not all(parts):
            raise UserError(f"{source}:{lineno}: expected two space-separated symbols (a BPE merge), got {line[:60]!r}")
    if not any(not line.startswith("#version:") for line in lines):
        raise UserError(f"{source}: no BPE merges in the file")


class TextPipeline:
    """raw text <-> Moses-tokenized BPE text (sacremoses + subword-nmt), per language."""

    def __init__(self, src_lang: str, tgt_lang: str, bpe_codes: Optional[str], *, aggressive_dash_splits: bool = True,
                 escape: bool = True, source: str = "bpe codes") -> None:
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.aggressive_dash_splits, self.escape = aggressive_dash_splits, escape
        self._bpe = None
        if bpe_codes is not None:
            check_bpe_codes(bpe_codes, source)
            from subword_nmt.apply_bpe import BPE

            self._bpe = BPE(io.StringIO(bpe_codes), separator="@@")
        self._tok: dict[str, Any] = {}
        self._detok: dict[str, Any] = {}

    def to_dict(self) -> dict[str, Any]:
        return {"aggressive_dash_splits": self.aggressive_dash_splits, "escape": self.escape}

    @classmethod
    def from_dict(cls, src_lang: str, tgt_lang: str, bpe_codes: Optional[str], d: dict[str, Any]) -> "TextPipeline":
        return cls(src_lang, tgt_lang, bpe_codes, **d)

    def tokenize(self, text: str, lang: str) -> str:
        if lang not in self._tok:
            from sacremoses import MosesTokenizer

            self._tok[lang] = MosesTokenizer(lang=lang)
        return self._tok[lang].tokenize(text, aggressive_dash_splits=self.aggressive_dash_splits,
                                         escape=self.escape, return_str=True)

    def detokenize(self, tokens: str, lang: str) -> str:
        if lang not in self._detok:
            from sacremoses import MosesDetokenizer

            self._detok[lang] = MosesDetokenizer(lang=lang)
        return self._detok[lang].detokenize(tokens.split(), unescape=self.escape)

    def apply_bpe(self, tokenized: str) -> str:
        return tokenized if self._bpe is None else self._bpe.process_line(tokenized).strip()

    def encode(self, text: str, lang: str) -> str:
        return self.apply_bpe(self.tokenize(text, lang))

    def decode(self, bpe_text: str, lang: str) -> str:
        return self.detokenize(remove_bpe(bpe_text), lang)


__all__ = ["Dictionary", "remove_bpe", "read_indexed", "find_split", "load_binarized", "languages_in", "split_names",
           "TextPipeline", "check_bpe_codes", "LEGACY_MAGIC", "MMAP_MAGIC"]
