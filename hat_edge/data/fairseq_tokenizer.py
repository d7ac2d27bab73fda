"""HAT's text pipeline as one tokenizer: Moses, subword-nmt BPE and fairseq dictionaries.

A model imported from HAT (`hat-edge import hat`) was trained on Moses-tokenized, BPE'd text
looked up in fairseq dictionaries (`dict.en.txt`, joint for WMT). `FairseqTokenizer` keeps those
three parts together, inside the checkpoint and inside every exported bundle, so the imported
model never travels without the exact vocabulary and segmentation it was trained with.

Ids are fairseq's, kept exactly: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, then the dictionary's
symbols in file order. Sources end with `</s>`; fairseq starts the decoder with `</s>` too (its
generator's first token is EOS), so `decoder_start_id` is 2.

Text comes at one of three levels (`level=`):
- "raw": plain text; Moses tokenization then BPE on the way in, `@@ ` removal then Moses
  detokenization on the way out (needs the BPE codes);
- "bpe": Moses-tokenized, BPE'd text as HAT ships it (`*.tok.bpe.32000.*`): looked up as it is;
- "tok" (output only): BPE removed, still Moses-tokenized: what HAT's "normal" BLEU scores.

The serialized form is a small JSON document (format `hat-edge-fairseq-tokenizer`, version 1)
holding the dictionary texts, the BPE codes text and the Moses settings; it is untrusted input and
validated field by field when read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from hat_edge.data.fairseq import Dictionary, TextPipeline, remove_bpe
from hat_edge.errors import UserError

FAIRSEQ_TOKENIZER_FORMAT = "hat-edge-fairseq-tokenizer"
FAIRSEQ_TOKENIZER_VERSION = 1
FAIRSEQ_TOKENIZER_FILE = "tokenizer.json"
LEVELS = ("raw", "bpe")
OUTPUT_LEVELS = ("raw", "tok", "bpe")
_FIELDS = {"format", "version", "src_lang", "tgt_lang", "src_dict", "tgt_dict", "bpe_codes", "moses"}


class FairseqTokenizer:
    """fairseq dictionaries (+ Moses and BPE for raw text); see the module doc."""

    kind = "fairseq"
    bos_id = Dictionary.bos_id
    pad_id = Dictionary.pad_id
    eos_id = Dictionary.eos_id
    unk_id = Dictionary.unk_id
    decoder_start_id = Dictionary.eos_id  # fairseq's generator starts the decoder with </s>

    def __init__(self, src_dict: Dictionary, tgt_dict: Optional[Dictionary], src_lang: str, tgt_lang: str,
                 bpe_codes: Optional[str] = None, moses: Optional[dict[str, Any]] = None) -> None:
        for name, lang in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
            if not isinstance(lang, str) or not lang.isascii() or not lang.replace("_", "").isalnum() or len(lang) > 16:
                raise UserError(f"tokenizer: field '{name}' must be a short language code such as 'en', got {lang!r}")
        self.src_dict = src_dict
        self.tgt_dict = tgt_dict if tgt_dict is not None and tgt_dict != src_dict else None
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.bpe_codes = bpe_codes
        self.moses = dict(moses or {})
        self._pipeline: Optional[TextPipeline] = None

    # ---- vocabulary ----
    @property
    def target_dict(self) -> Dictionary:
        return self.tgt_dict if self.tgt_dict is not None else self.src_dict

    @property
    def joint(self) -> bool:
        return self.tgt_dict is None

    @property
    def vocab_size(self) -> int:
        """The target (decoder) vocabulary."""
        return len(self.target_dict)

    @property
    def src_vocab_size(self) -> int:
        return len(self.src_dict)

    @property
    def pipeline(self) -> TextPipeline:
        if self._pipeline is None:
            self._pipeline = TextPipeline(self.src_lang, self.tgt_lang, self.bpe_codes, **self.moses)
        return self._pipeline

    def _need_bpe(self) -> None:
        if self.bpe_codes is None:
            raise UserError("this imported model has no BPE codes, so it cannot segment raw text: re-import it with "
                            "--bpe-codes CODES, or give Moses-tokenized BPE text (--text-level bpe)")

    # ---- text -> ids ----
    def encode(self, text: str, level: str = "raw", side: str = "src") -> list[int]:
        """Ids of one sentence, ending with </s>."""
        return self.encode_batch([text], side=side, level=level)[0]

    def encode_batch(self, texts: Sequence[str], side: str = "src", level: str = "raw") -> list[list[int]]:
        if level not in LEVELS:
            raise UserError(f"text level {level!r}: allowed {', '.join(LEVELS)}")
        if side not in ("src", "tgt"):
            raise ValueError(f"side must be 'src' or 'tgt', got {side!r}")
        d = self.src_dict if side == "src" else self.target_dict
        lang = self.src_lang if side == "src" else self.tgt_lang
        if level == "raw":
            self._need_bpe()
            p = self.pipeline
            texts = [p.encode(t, lang) for t in texts]
        return [d.encode(t) for t in texts]

    # ---- ids -> text ----
    def decode(self, ids: Iterable[int], level: str = "raw") -> str:
        """Target ids (up to the first </s>) as text at `level` (module doc)."""
        if level not in OUTPUT_LEVELS:
            raise UserError(f"output level {level!r}: allowed {', '.join(OUTPUT_LEVELS)}")
        bpe = self.target_dict.string([int(i) for i in ids])
        if level == "bpe":
            return bpe
        tok = remove_bpe(bpe)
        return tok if level == "tok" else self.pipeline.detokenize(tok, self.tgt_lang)

    def reference(self, text: str, level: str, out_level: str, side: str = "tgt") -> str:
        """A sentence given at `level` ("raw" | "bpe"), at the output level `out_level` ("raw" | "tok")."""
        lang = self.tgt_lang if side == "tgt" else self.src_lang
        if level == "bpe":
            tok = remove_bpe(text)
            return tok if out_level == "tok" else self.pipeline.detokenize(tok, lang)
        if out_level == "tok":
            return self.pipeline.tokenize(text, lang)
        return text

    # ---- persistence ----
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FAIRSEQ_TOKENIZER_FORMAT,
            "version": FAIRSEQ_TOKENIZER_VERSION,
            "src_lang": self.src_lang,
            "tgt_lang": self.tgt_lang,
            "src_dict": self.src_dict.to_text(),
            "tgt_dict": None if self.tgt_dict is None else self.tgt_dict.to_text(),
            "bpe_codes": self.bpe_codes,
            "moses": dict(self.moses),
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "FairseqTokenizer":
        try:
            doc = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{source}: not a hat-edge fairseq tokenizer (not UTF-8 JSON)") from None
        if not isinstance(doc, dict):
            raise UserError(f"{source}: not a hat-edge fairseq tokenizer (expected a JSON object)")
        if doc.get("format") != FAIRSEQ_TOKENIZER_FORMAT:
            raise UserError(f"{source}: field 'format' is {doc.get('format')!r}, expected '{FAIRSEQ_TOKENIZER_FORMAT}'")
        if doc.get("version") != FAIRSEQ_TOKENIZER_VERSION:
            raise UserError(f"{source}: field 'version' is {doc.get('version')!r}; this hat-edge reads version "
                            f"{FAIRSEQ_TOKENIZER_VERSION}")
        unknown = sorted(set(doc) - _FIELDS)
        if unknown:
            raise UserError(f"{source}: unknown field '{unknown[0]}', allowed: {sorted(_FIELDS)}")
        for name in ("src_dict", "src_lang", "tgt_lang"):
            if not isinstance(doc.get(name), str):
                raise UserError(f"{source}: field '{name}' must be a string")
        for name in ("tgt_dict", "bpe_codes"):
            if doc.get(name) is not None and not isinstance(doc[name], str):
                raise UserError(f"{source}: field '{name}' must be a string or null")
        moses = doc.get("moses") or {}
        allowed_moses = {"aggressive_dash_splits", "escape"}
        if not isinstance(moses, dict) or set(moses) - allowed_moses or not all(isinstance(v, bool) for v in moses.values()):
            raise UserError(f"{source}: field 'moses' must map {sorted(allowed_moses)} to true/false")
        src = Dictionary.from_text(doc["src_dict"], f"{source} (src_dict)")
        tgt = Dictionary.from_text(doc["tgt_dict"], f"{source} (tgt_dict)") if doc.get("tgt_dict") is not None else None
        tok = cls(src, tgt, doc["src_lang"], doc["tgt_lang"], doc.get("bpe_codes"), moses)
        if tok.bpe_codes is not None:
            TextPipeline(tok.src_lang, tok.tgt_lang, tok.bpe_codes, source=f"{source} (bpe_codes)", **tok.moses)
        return tok

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` into `directory` (read back with `data.tokenizer.load_tokenizer`)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / FAIRSEQ_TOKENIZER_FILE
        path.write_bytes(self.to_bytes())
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FairseqTokenizer) and other.to_bytes() == self.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    def __repr__(self) -> str:
        return (f"FairseqTokenizer({self.src_lang}-{self.tgt_lang}, src {self.src_vocab_size}, tgt {self.vocab_size}, "
                f"bpe={'yes' if self.bpe_codes else 'no'})")


__all__ = ["FairseqTokenizer", "FAIRSEQ_TOKENIZER_FORMAT", "FAIRSEQ_TOKENIZER_FILE", "LEVELS", "OUTPUT_LEVELS"]
