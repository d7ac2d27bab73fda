"""Data room, HAT's fairseq data: dictionaries, Moses + subword-nmt text, binarized .idx/.bin splits.

Real files in tmp_path, written by tests/fairseq_files.py in both index formats; real sacremoses
and subword-nmt (BPE codes learned here on a few sentences).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from fairseq_files import write_legacy, write_mmap
from hat_edge.data.fairseq import (
    Dictionary,
    TextPipeline,
    find_split,
    languages_in,
    load_binarized,
    read_indexed,
    remove_bpe,
    split_names,
)
from hat_edge.errors import UserError

ITEMS = [[4, 5, 6, 2], [7, 2], [], [300, 8, 9, 10, 11, 2]]


def _one_line_error(excinfo: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# read_indexed: both formats
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "writer,dtype",
    [
        (write_legacy, "int32"),  # fairseq's legacy builder writes int32 elements
        (write_legacy, "uint16"),
        (write_mmap, "uint16"),  # what fairseq picks for a vocabulary < 65500
        (write_mmap, "int32"),
        (lambda p, items, dt: write_mmap(p, items, dt, docs=False), "uint16"),  # no document table
    ],
    ids=["legacy-int32", "legacy-uint16", "mmap-uint16", "mmap-int32", "mmap-nodocs-uint16"],
)
def test_read_indexed_round_trip(tmp_path: Path, writer, dtype: str) -> None:
    prefix = tmp_path / "train.en-de.en"
    writer(prefix, ITEMS, dtype)
    got = read_indexed(prefix)
    assert len(got) == len(ITEMS)
    for a, want in zip(got, ITEMS):
        assert a.dtype == np.int64 and a.ndim == 1
        assert a.tolist() == want


def test_read_indexed_large_ids_and_no_items(tmp_path: Path) -> None:
    write_mmap(tmp_path / "a", [[65535, 0], [40000]], "uint16")
    assert [a.tolist() for a in read_indexed(tmp_path / "a")] == [[65535, 0], [40000]]
    write_legacy(tmp_path / "b", [], "int32")
    assert read_indexed(tmp_path / "b") == []


# name, writer kwargs, field the message must name
CORRUPTIONS = [
    ("legacy-magic", write_legacy, {"magic": b"TNTIDY\x00\x00"}, "magic"),
    ("mmap-magic", write_mmap, {"magic": b"MMIDIDY\x00\x00"}, "magic"),
    ("legacy-version", write_legacy, {"version": 2}, "version"),
    ("mmap-version", write_mmap, {"version": 2}, "version"),
    ("legacy-dtype", write_legacy, {"code": 9}, "dtype"),
    ("mmap-dtype", write_mmap, {"code": 0}, "dtype"),
    ("legacy-float", write_legacy, {"code": 6, "element_size": 8}, "dtype"),
    ("legacy-element-size", write_legacy, {"element_size": 8}, "element_size"),
    ("legacy-past-bin", write_legacy, {"data_offsets": [0, 4, 6, 6, 13]}, "data_offsets"),
    ("legacy-decreasing", write_legacy, {"data_offsets": [0, 4, 3, 6, 12], "sizes": [4, 2, 0, 6]},
     "data_offsets"),
    ("legacy-size-mismatch", write_legacy, {"sizes": [4, 2, 1, 6]}, "sizes"),
    ("legacy-2d", write_legacy, {"dim_offsets": [0, 2, 3, 4, 4], "sizes": [2, 2, 2, 0, 6]}, "dim_offsets"),
    ("mmap-pointer-past-bin", write_mmap, {"pointers": [0, 8, 12, 100]}, "pointers"),
    ("mmap-size-past-bin", write_mmap, {"sizes": [4, 2, 0, 7]}, "sizes"),
    ("mmap-decreasing", write_mmap, {"pointers": [0, 8, 4, 12]}, "pointers"),
    ("mmap-overlap", write_mmap, {"pointers": [0, 6, 12, 12]}, "pointers"),
    ("mmap-negative-size", write_mmap, {"sizes": [4, -2, 0, 6]}, "sizes"),
    ("mmap-unaligned", write_mmap, {"pointers": [0, 9, 13, 13]}, "pointers"),
    ("mmap-doc-idx", write_mmap, {"doc_idx": [0, 9]}, "doc_idx"),
]


@pytest.mark.parametrize("writer,kwargs,field", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_read_indexed_corruption_is_one_line_naming_file_and_field(tmp_path: Path, writer, kwargs, field) -> None:
    prefix = tmp_path / "valid.en-de.en"
    writer(prefix, ITEMS, "int32" if writer is write_legacy else "uint16", **kwargs)
    with pytest.raises(UserError) as e:
        read_indexed(prefix)
    _one_line_error(e, "valid.en-de.en.idx", f"'{field}'")


def test_decreasing_offsets_name_the_item(tmp_path: Path) -> None:
    items = [[1, 2]] * 10
    offsets = [0, 2, 4, 6, 8, 10, 12, 9, 16, 18, 20]
    write_legacy(tmp_path / "valid.en-de.en", items, "int32", data_offsets=offsets)
    with pytest.raises(UserError) as e:
        read_indexed(tmp_path / "valid.en-de.en")
    assert str(e.value).endswith("valid.en-de.en.idx: field 'data_offsets' is not non-decreasing at item 7")


@pytest.mark.parametrize("writer", [write_legacy, write_mmap], ids=["legacy", "mmap"])
@pytest.mark.parametrize("cut", [1, 8, 30])
def test_truncated_or_padded_index(tmp_path: Path, writer, cut: int) -> None:
    prefix = tmp_path / "test.en-de.de"
    writer(prefix, ITEMS)
    idx = Path(f"{prefix}.idx")
    full = idx.read_bytes()
    idx.write_bytes(full[:-cut])
    with pytest.raises(UserError) as e:
        read_indexed(prefix)
    _one_line_error(e, "test.en-de.de.idx", "truncated")
    idx.write_bytes(full + b"\x00" * cut)
    with pytest.raises(UserError) as e:
        read_indexed(prefix)
    _one_line_error(e, "test.en-de.de.idx", "bytes after the last field")


def test_header_cut_short(tmp_path: Path) -> None:
    Path(tmp_path / "x.idx").write_bytes(b"MMIDIDX\x00\x00\x01\x00")
    Path(tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(UserError) as e:
        read_indexed(tmp_path / "x")
    _one_line_error(e, "x.idx", "field 'version' truncated")


def test_symlinks_refused(tmp_path: Path) -> None:
    write_mmap(tmp_path / "real", ITEMS)
    for ext in ("idx", "bin"):
        os.symlink(tmp_path / f"real.{ext}", tmp_path / f"link.{ext}")
    with pytest.raises(UserError) as e:
        read_indexed(tmp_path / "link")
    _one_line_error(e, "link.idx", "symbolic link")
    (tmp_path / "link.idx").unlink()
    (tmp_path / "link.idx").write_bytes((tmp_path / "real.idx").read_bytes())
    with pytest.raises(UserError) as e:
        read_indexed(tmp_path / "link")
    _one_line_error(e, "link.bin", "symbolic link")


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        read_indexed(tmp_path / "nothing")
    _one_line_error(e, "nothing.idx", "no such file")
    (tmp_path / "d.idx").mkdir()
    with pytest.raises(UserError) as e:
        read_indexed(tmp_path / "d")
    _one_line_error(e, "d.idx", "not a regular file")


# ---------------------------------------------------------------------------------------------
# Dictionary
# ---------------------------------------------------------------------------------------------
DICT_TEXT = "the 100\n, 80\nHaus 50\nnew@@ 7\n"


def test_dictionary_ids() -> None:
    d = Dictionary.from_text(DICT_TEXT, "dict.en.txt")
    assert len(d) == 4 + 4
    assert d.symbols[:4] == ("<s>", "<pad>", "</s>", "<unk>")
    assert (d.bos_id, d.pad_id, d.eos_id, d.unk_id) == (0, 1, 2, 3)
    assert d.index("the") == 4 and d.symbol(4) == "the"
    assert d.index("new@@") == 7 and d.counts[7] == 7
    assert d.index("absent") == d.unk_id
    assert d.index("</s>") == 2
    with pytest.raises(IndexError):
        d.symbol(8)


def test_dictionary_symbol_is_before_the_last_field() -> None:
    d = Dictionary.from_text("a b 3\n", "dict.en.txt")
    assert d.symbols[4] == "a b" and d.counts[4] == 3


def test_dictionary_overwrite_and_duplicates() -> None:
    d = Dictionary.from_text("a 5\nb 4\na 3 #fairseq:overwrite\n<unk> 1 #fairseq:overwrite\n", "dict.en.txt")
    assert len(d) == 8  # every line takes an id, as in fairseq
    assert d.index("a") == 6 and d.symbol(4) == "a"
    assert d.unk_id == 3 and d.index("<unk>") == 7
    assert d.encode("zzz") == [3, 2]
    with pytest.raises(UserError) as e:
        Dictionary.from_text("a 5\nb 4\na 3\n", "dict.en.txt")
    _one_line_error(e, "dict.en.txt:3:", "duplicate symbol 'a'", "#fairseq:overwrite")
    with pytest.raises(UserError) as e:
        Dictionary.from_text("a 5\n</s> 4\n", "dict.en.txt")
    _one_line_error(e, "dict.en.txt:2:", "duplicate")


@pytest.mark.parametrize(
    "text,where,what",
    [
        ("", "d.txt:1:", "empty"),
        ("a 5\nnocount\n", "d.txt:2:", "SYMBOL COUNT"),
        ("a 5\n\nb 3\n", "d.txt:2:", "SYMBOL COUNT"),
        ("a 5\nb x\n", "d.txt:2:", "not a non-negative integer"),
        ("a 5\nb -3\n", "d.txt:2:", "not a non-negative integer"),
        ("a 5\nb 2.5\n", "d.txt:2:", "not a non-negative integer"),
        (" 5\n", "d.txt:1:", "SYMBOL COUNT"),
    ],
)
def test_dictionary_bad_lines(text: str, where: str, what: str) -> None:
    with pytest.raises(UserError) as e:
        Dictionary.from_text(text, "d.txt")
    _one_line_error(e, where, what)


def test_dictionary_round_trip_and_load(tmp_path: Path) -> None:
    text = "a 5\nb 4\na 3 #fairseq:overwrite\nx y 2\n"
    d = Dictionary.from_text(text, "x")
    assert d.to_text() == text
    again = Dictionary.from_text(d.to_text(), "y")
    assert again == d and again.symbols == d.symbols and hash(again) == hash(d)
    path = tmp_path / "dict.de.txt"
    path.write_text(DICT_TEXT, encoding="utf-8")
    assert Dictionary.load(path) == Dictionary.from_text(DICT_TEXT)
    assert Dictionary.load(path) != d
    with pytest.raises(UserError) as e:
        Dictionary.load(tmp_path / "dict.fr.txt")
    _one_line_error(e, "dict.fr.txt", "no such dictionary file")


def test_dictionary_encode_string_round_trip_with_unk() -> None:
    d = Dictionary.from_text(DICT_TEXT, "dict.en.txt")
    ids = d.encode("  the Haus ,\tnew@@ Baum ")
    assert ids == [4, 6, 5, 7, 3, 2]
    assert d.string(ids) == "the Haus , new@@ <unk>"
    assert d.string([0, 4, 1, 1, 6, 2, 5, 5]) == "the Haus"  # bos/pad skipped, stops at eos
    assert d.string(np.array(d.encode("the the"))) == "the the"


def test_remove_bpe() -> None:
    assert remove_bpe("new@@ s from Ber@@ lin") == "news from Berlin"
    assert remove_bpe("dangling@@") == "dangling"
    assert remove_bpe("plain text") == "plain text"
    assert remove_bpe("a▁b", symbol="▁") == "ab"


# ---------------------------------------------------------------------------------------------
# TextPipeline
# ---------------------------------------------------------------------------------------------
TRAIN_LINES = [
    "the house is small and the garden is large",
    "the houses are old , the gardens are new",
    "das Haus ist klein und der Garten ist groß",
    "die Häuser sind alt , die Gärten sind neu",
    "we see the small houses and the old gardens",
    "wir sehen die kleinen Häuser und die alten Gärten",
]


@pytest.fixture(scope="module")
def codes() -> str:
    from subword_nmt.learn_bpe import learn_bpe

    out = io.StringIO()
    learn_bpe(io.StringIO("\n".join(TRAIN_LINES) + "\n"), out, 40, min_frequency=2)
    return out.getvalue()


@pytest.fixture(scope="module")
def pipe(codes: str) -> TextPipeline:
    return TextPipeline("en", "de", codes)


@pytest.mark.parametrize(
    "text,lang",
    [
        ("The gardens behind the houses are larger than ours.", "en"),
        ("Tom's house & garden are well-known, aren't they?", "en"),
        ("Die Gärten hinter den Häusern sind größer als unsere.", "de"),
        ("Das Rhein-Main-Gebiet ist groß & schön.", "de"),
    ],
)
def test_pipeline_round_trip(pipe: TextPipeline, text: str, lang: str) -> None:
    bpe = pipe.encode(text, lang)
    assert "@@ " in bpe
    assert pipe.decode(bpe, lang) == text


def test_pipeline_escaping_and_dashes(pipe: TextPipeline) -> None:
    tok = pipe.tokenize("Tom's garden & well-known house", "en")
    assert tok == "Tom &apos;s garden &amp; well @-@ known house"
    assert pipe.detokenize(tok, "en") == "Tom's garden & well-known house"
    plain = TextPipeline("en", "de", None, aggressive_dash_splits=False, escape=False)
    assert plain.tokenize("Tom's well-known house & garden", "en") == "Tom 's well-known house & garden"
    assert plain.encode("Tom's house", "en") == "Tom 's house"  # no codes: no BPE
    assert plain.decode("Tom 's house", "en") == "Tom's house"


def test_pipeline_bpe_marks_unseen_words(pipe: TextPipeline) -> None:
    bpe = pipe.apply_bpe("the gardeners")
    assert bpe.startswith("the ") and "@@ " in bpe
    assert remove_bpe(bpe) == "the gardeners"
    with pytest.raises(UserError) as e:
        pipe.encode("text", "fr")
    _one_line_error(e, "'fr'", "en and de")


def test_pipeline_settings_round_trip(pipe: TextPipeline, codes: str) -> None:
    d = pipe.to_dict()
    assert d == {"src_lang": "en", "tgt_lang": "de", "bpe": True, "aggressive_dash_splits": True, "escape": True}
    again = TextPipeline.from_dict(d, codes)
    assert again.to_dict() == d
    assert again.encode("the small houses", "en") == pipe.encode("the small houses", "en")
    with pytest.raises(UserError, match="field 'bpe' is true but no BPE codes"):
        TextPipeline.from_dict(d)
    with pytest.raises(UserError, match="field 'escape' missing"):
        TextPipeline.from_dict({k: v for k, v in d.items() if k != "escape"}, codes)


@pytest.mark.parametrize(
    "text,where",
    [
        ("#version: 0.2\nt h\nth e</w>\nbroken\n", "codes.txt:4:"),
        ("t h\na b c\n", "codes.txt:2:"),
        ("t h\n\na b\n", "codes.txt:2:"),
        ("t  h\n", "codes.txt:1:"),
        ("#version: zwei\nt h\n", "codes.txt:1:"),
        ("#version: 0.2\n", "codes.txt:2:"),
        ("t h\n#version: 0.2\na b\n", "codes.txt:2:"),
    ],
)
def test_bad_codes_refused_with_line_number(text: str, where: str) -> None:
    with pytest.raises(UserError) as e:
        TextPipeline("en", "de", text, source="codes.txt")
    _one_line_error(e, where)


def test_pipeline_load_codes_file(tmp_path: Path, codes: str) -> None:
    path = tmp_path / "code"
    path.write_text(codes, encoding="utf-8")
    assert TextPipeline.load("en", "de", path).apply_bpe("the gardeners") == \
        TextPipeline("en", "de", codes).apply_bpe("the gardeners")
    path.write_text("a b\nc\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        TextPipeline.load("en", "de", path)
    _one_line_error(e, f"{path}:2:")


# ---------------------------------------------------------------------------------------------
# Splits in a data directory
# ---------------------------------------------------------------------------------------------
def _dicts() -> tuple[Dictionary, Dictionary]:
    src = Dictionary([f"e{i}" for i in range(10)], source="dict.en.txt")  # ids 0..13
    tgt = Dictionary([f"d{i}" for i in range(20)], source="dict.de.txt")  # ids 0..23
    return src, tgt


def test_load_binarized_both_formats_and_pair_orders(tmp_path: Path) -> None:
    src_dict, tgt_dict = _dicts()
    write_legacy(tmp_path / "train.en-de.en", [[4, 5, 2], [6, 2]])
    write_legacy(tmp_path / "train.en-de.de", [[20, 2], [21, 22, 2]])
    write_mmap(tmp_path / "valid.de-en.en", [[13, 2]])
    write_mmap(tmp_path / "valid.de-en.de", [[23, 4, 2]])
    src, tgt = load_binarized(tmp_path, "train", "en", "de", src_dict, tgt_dict)
    assert [a.tolist() for a in src] == [[4, 5, 2], [6, 2]]
    assert [a.tolist() for a in tgt] == [[20, 2], [21, 22, 2]]
    src, tgt = load_binarized(tmp_path, "valid", "en", "de", src_dict, tgt_dict)
    assert [a.tolist() for a in src] == [[13, 2]] and [a.tolist() for a in tgt] == [[23, 4, 2]]
    assert find_split(tmp_path, "valid", "en", "de") == (tmp_path / "valid.de-en.en", tmp_path / "valid.de-en.de")
    assert languages_in(tmp_path) == [("de", "en"), ("en", "de")]
    assert split_names(tmp_path) == ["train", "valid"]
    assert split_names(tmp_path, "de", "en") == ["train", "valid"]
    assert split_names(tmp_path, "en", "fr") == []


def test_load_binarized_refusals(tmp_path: Path) -> None:
    src_dict, tgt_dict = _dicts()
    write_mmap(tmp_path / "train.en-de.en", [[4, 2], [5, 2], [6, 2]])
    write_mmap(tmp_path / "train.en-de.de", [[4, 2], [5, 2]])
    with pytest.raises(UserError) as e:
        load_binarized(tmp_path, "train", "en", "de", src_dict, tgt_dict)
    _one_line_error(e, "train.en-de.en.idx has 3 items", "train.en-de.de.idx has 2")

    write_legacy(tmp_path / "test.en-de.en", [[4, 2], [5, 14, 2]])  # 14 = len(src_dict)
    write_legacy(tmp_path / "test.en-de.de", [[4, 2], [5, 2]])
    with pytest.raises(UserError) as e:
        load_binarized(tmp_path, "test", "en", "de", src_dict, tgt_dict)
    _one_line_error(e, "test.en-de.en.bin", "item 1", "id 14", "dict.en.txt", "0..13")

    with pytest.raises(UserError) as e:
        load_binarized(tmp_path, "valid", "en", "de", src_dict, tgt_dict)
    _one_line_error(e, "no binarized split 'valid' for en-de", "valid.en-de.en.idx/.bin", "valid.de-en.de.idx/.bin",
                    "train.en-de")
    with pytest.raises(UserError) as e:
        find_split(tmp_path / "absent", "train", "en", "de")
    _one_line_error(e, "absent", "no such directory")
    with pytest.raises(UserError):
        find_split(tmp_path, "../train", "en", "de")
