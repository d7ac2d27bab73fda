"""HAT's data directories as an imported model reads them (hat_edge/data/hat_data.py, DataSpec
kind "fairseq"): binarized splits in either index format and Moses-tokenized BPE text alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from fairseq_files import write_legacy, write_mmap

from hat_edge.data.fairseq import Dictionary
from hat_edge.errors import UserError


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
    with pytest.raises(UserError, match="no binarized split 'test' for en-de.*nor text files test.en and test.de"):
        DataSpec(str(binary), kind="fairseq", src_lang="en", tgt_lang="de").load_split("test")
