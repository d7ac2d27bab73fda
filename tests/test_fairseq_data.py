"""HAT's data formats (hat_edge/data/fairseq.py, hat_data.py): dictionaries, both binarized index
formats fairseq writes, Moses + BPE text. The writers below follow the formats' descriptions
(fairseq's `indexed_dataset.py`: IndexedDatasetBuilder and MMapIndexedDataset.Index.writer)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest

from hat_edge.data.fairseq import Dictionary, TextPipeline, load_binarized, read_indexed, remove_bpe
from hat_edge.errors import UserError

_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.uint16: 8}


def write_legacy(prefix: Path, items, dtype=np.int32) -> None:
    """fairseq's IndexedDataset: 'TNTIDX\\0\\0', version, dtype code + element size, counts, then
    int64 dim_offsets, data_offsets (in elements) and sizes."""
    dtype = np.dtype(dtype)
    data, offs, dims, sizes = b"", [0], [0], []
    for x in items:
        a = np.asarray(x, dtype=dtype)
        data += a.tobytes()
        offs.append(offs[-1] + a.size)
        sizes.append(a.size)
        dims.append(dims[-1] + 1)
    Path(f"{prefix}.bin").write_bytes(data)
    hdr = b"TNTIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<QQ", _CODES[dtype.type], dtype.itemsize)
    hdr += struct.pack("<QQ", len(items), len(sizes))
    Path(f"{prefix}.idx").write_bytes(hdr + np.asarray(dims, "<i8").tobytes() + np.asarray(offs, "<i8").tobytes()
                                      + np.asarray(sizes, "<i8").tobytes())


def write_mmap(prefix: Path, items, dtype=np.uint16) -> None:
    """fairseq's MMapIndexedDataset: 'MMIDIDX\\0\\0', version, dtype code, item and doc counts, int32
    sizes, int64 byte pointers, int64 doc_idx."""
    dtype = np.dtype(dtype)
    data, ptrs, sizes, p = b"", [], [], 0
    for x in items:
        a = np.asarray(x, dtype=dtype)
        data += a.tobytes()
        ptrs.append(p)
        sizes.append(a.size)
        p += a.nbytes
    Path(f"{prefix}.bin").write_bytes(data)
    docs = list(range(len(items) + 1))
    hdr = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", _CODES[dtype.type])
    hdr += struct.pack("<Q", len(items)) + struct.pack("<Q", len(docs))
    Path(f"{prefix}.idx").write_bytes(hdr + np.asarray(sizes, "<i4").tobytes() + np.asarray(ptrs, "<i8").tobytes()
                                      + np.asarray(docs, "<i8").tobytes())


ITEMS = [[5, 9, 2], [7, 2], [4, 4, 4, 4, 8, 2], [2]]


@pytest.mark.parametrize("writer,dtype", [(write_legacy, np.int32), (write_legacy, np.uint16),
                                          (write_mmap, np.uint16), (write_mmap, np.int32)])
def test_both_index_formats_round_trip(tmp_path: Path, writer, dtype) -> None:
    writer(tmp_path / "valid.en-de.en", ITEMS, dtype)
    got = read_indexed(tmp_path / "valid.en-de.en")
    assert [x.tolist() for x in got] == ITEMS and all(x.dtype == np.int64 for x in got)


def _one_line_error(prefix: Path, *fragments: str) -> str:
    with pytest.raises(UserError) as e:
        read_indexed(prefix)
    msg = str(e.value)
    assert "\n" not in msg and "valid.en-de.en.idx" in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.mark.parametrize("writer", [write_legacy, write_mmap])
def test_corrupt_index_files_are_one_line_errors_naming_file_and_field(tmp_path: Path, writer) -> None:
    p = tmp_path / "valid.en-de.en"
    idx = Path(f"{p}.idx")

    def fresh() -> bytes:
        writer(p, ITEMS)
        return idx.read_bytes()

    raw = fresh()
    idx.write_bytes(b"XXXXXXXXX" + raw[9:])
    _one_line_error(p, "magic")
    raw = fresh()
    off = 9 if writer is write_mmap else 8
    idx.write_bytes(raw[:off] + struct.pack("<Q", 2) + raw[off + 8:])
    _one_line_error(p, "'version' is 2")
    raw = fresh()
    code_at = 17 if writer is write_mmap else 16
    idx.write_bytes(raw[:code_at] + bytes([9]) + raw[code_at + 1:])
    _one_line_error(p, "dtype")
    raw = fresh()
    idx.write_bytes(raw[:-5])
    _one_line_error(p)
    fresh()
    Path(f"{p}.bin").write_bytes(Path(f"{p}.bin").read_bytes()[:-2])  # the .bin is shorter than the index says
    _one_line_error(p, "past the end")
    raw = fresh()
    if writer is write_legacy:  # data_offsets [0, 3, 2, ...]: not non-decreasing
        n = len(ITEMS)
        start = 48 + 8 * (n + 1)
        offs = np.frombuffer(raw, "<i8", count=n + 1, offset=start).copy()
        offs[2] = 1
        idx.write_bytes(raw[:start] + offs.tobytes() + raw[start + 8 * (n + 1):])
        _one_line_error(p, "'data_offsets' is not non-decreasing at item 1")
    else:
        n = len(ITEMS)
        start = 34 + 4 * n
        ptrs = np.frombuffer(raw, "<i8", count=n, offset=start).copy()
        ptrs[2] = 2
        idx.write_bytes(raw[:start] + ptrs.tobytes() + raw[start + 8 * n:])
        _one_line_error(p, "item 1")
    fresh()
    real = tmp_path / "real.idx"
    idx.rename(real)
    idx.symlink_to(real)
    _one_line_error(p, "symbolic link")


def test_dictionary_ids_are_fairseqs(tmp_path: Path) -> None:
    d = Dictionary.from_text("the 90\nHaus 80\nthe@@ 5\n", "dict.en.txt")
    assert d.symbols[:4] == ("<s>", "<pad>", "</s>", "<unk>") and len(d) == 7
    assert d.index("the") == 4 and d.index("Haus") == 5 and d.index("zebra") == 3
    assert d.encode("the zebra Haus") == [4, 3, 5, 2]
    assert d.string([4, 1, 5, 0, 2, 6]) == "the Haus"  # pad and bos dropped, stops at </s>
    assert Dictionary.from_text(d.to_text(), "x") == d
    assert len(Dictionary.from_text("a 1\na 2 #fairseq:overwrite\n", "x")) == 5
    for text, frag in (("a 1\na 2\n", "dict.en.txt:2: duplicate symbol 'a'"), ("a one\n", "dict.en.txt:1: count 'one'"),
                       ("a 1\n\n", "dict.en.txt:2: empty line"), ("", "empty dictionary"), ("single\n", "expected 'SYMBOL COUNT'")):
        with pytest.raises(UserError, match=frag):
            Dictionary.from_text(text, "dict.en.txt")
    with pytest.raises(UserError, match="no such dictionary file"):
        Dictionary.load(tmp_path / "missing.txt")
    assert remove_bpe("Ha@@ us is@@ t klein") == "Haus ist klein"


def _codes() -> str:
    from subword_nmt.learn_bpe import learn_bpe

    text = "the house is small\nthe houses are small\nein kleines Haus\n" * 5
    out = io.StringIO()
    learn_bpe(io.StringIO(text), out, num_symbols=12)
    return out.getvalue()


def test_text_pipeline_moses_and_bpe_round_trip() -> None:
    codes = _codes()
    p = TextPipeline("en", "de", codes)
    for s in ("The house is small.", "Ein kleines Haus, oder?", "Tom's house & garden are well-kept."):
        bpe = p.encode(s, "en")
        assert p.decode(bpe, "en") == s
    tok = p.tokenize("Tom's house & a well-kept garden", "en")
    assert "&amp;" in tok and "&apos;s" in tok and "well @-@ kept" in tok
    assert "@@ " in p.encode("unknownword houses", "en")
    assert TextPipeline("en", "de", codes, aggressive_dash_splits=False).tokenize("well-kept", "en") == "well-kept"
    with pytest.raises(UserError, match=r"bpe codes:3: expected two space-separated symbols"):
        TextPipeline("en", "de", "#version: 0.2\na b\nc\n")


def test_load_binarized_checks_alignment_and_ids(tmp_path: Path) -> None:
    d = Dictionary.from_text("".join(f"w{i} 1\n" for i in range(10)), "dict")
    write_mmap(tmp_path / "test.en-de.en", ITEMS)
    write_legacy(tmp_path / "test.en-de.de", ITEMS[::-1])
    src, tgt = load_binarized(tmp_path, "test", "en", "de", d, d)
    assert [x.tolist() for x in tgt] == ITEMS[::-1]
    write_legacy(tmp_path / "test.en-de.de", ITEMS[:3])
    with pytest.raises(UserError, match="4 items but .* has 3"):
        load_binarized(tmp_path, "test", "en", "de", d, d)
    write_legacy(tmp_path / "test.en-de.de", ITEMS[:3] + [[99, 2]])
    with pytest.raises(UserError, match=r"test.en-de.de.bin: item 3 holds id 99, outside its dictionary \(0..13\)"):
        load_binarized(tmp_path, "test", "en", "de", d, d)
    with pytest.raises(UserError, match="no binarized 'valid' split"):
        load_binarized(tmp_path, "valid", "en", "de", d, d)


def test_hat_split_reads_binarized_and_text_alike(tmp_path: Path) -> None:
    """The same BPE'd sentences as fairseq-binarized files (each index format) and as text files
    give the same corpus, through the DataSpec an imported checkpoint records."""
    from hat_edge.data.corpus import DataSpec

    words = "the house is small ein kleines Haus Ha@@ us".split()
    dtext = "".join(f"{w} 1\n" for w in words)
    d = Dictionary.from_text(dtext, "dict")
    en = ["the house is small", "the Ha@@ us"]
    de = ["ein kleines Haus", "Ha@@ us"]
    binary, text = tmp_path / "bin", tmp_path / "text"
    binary.mkdir()
    text.mkdir()
    for lang, lines, writer in (("en", en, write_mmap), ("de", de, write_legacy)):
        (binary / f"dict.{lang}.txt").write_text(dtext)
        writer(binary / f"valid.en-de.{lang}", [d.encode(s) for s in lines])
        (text / f"valid.{lang}").write_text("\n".join(lines) + "\n")
    a = DataSpec(str(binary), kind="fairseq", src_lang="en", tgt_lang="de").load_split("valid")
    b = DataSpec.from_dict(DataSpec(str(text), kind="fairseq", src_lang="en", tgt_lang="de").to_dict()).load_split("valid")
    assert a.src == b.src == tuple(en) and a.tgt == b.tgt == tuple(de) and a.level == b.level == "bpe"
    with pytest.raises(UserError, match="no binarized 'test' split"):
        DataSpec(str(binary), kind="fairseq", src_lang="en", tgt_lang="de").load_split("test")
