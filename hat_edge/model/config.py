"""ModelConfig: what a SuperTransformer (and a standalone SubTransformer) needs besides its arch.

Plain data with validation (UserError naming the field); imports nothing from `hat_edge.model`, so
the SubTransformer and the SuperTransformer both build on it without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from hat_edge.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    """What a SuperTransformer needs besides its design space."""

    vocab_size: int
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    share_all_embeddings: bool = True
    dropout: float = 0.3  # HAT's WMT setting
    attention_dropout: float = 0.1
    max_positions: int = 512
    # The encoder's vocabulary when it differs from the decoder's (separate source and target
    # dictionaries, e.g. HAT's IWSLT'14 De-En); None: `vocab_size`, one joint vocabulary.
    src_vocab_size: Optional[int] = None
    # Without `share_all_embeddings`: the decoder's output projection is its input table (fairseq's
    # --share-decoder-input-output-embed) instead of a separate matrix.
    share_decoder_input_output_embed: bool = False

    @property
    def encoder_vocab_size(self) -> int:
        return self.vocab_size if self.src_vocab_size is None else self.src_vocab_size

    def __post_init__(self) -> None:
        for name in ("vocab_size", "pad_id", "bos_id", "eos_id", "max_positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UserError(f"model config: field '{name}' must be a non-negative integer, got {v!r}")
        if self.vocab_size <= max(self.pad_id, self.bos_id, self.eos_id):
            raise UserError(f"model config: field 'vocab_size' is {self.vocab_size}, too small for the special ids")
        if self.src_vocab_size is not None:
            v = self.src_vocab_size
            if isinstance(v, bool) or not isinstance(v, int) or v <= max(self.pad_id, self.eos_id):
                raise UserError(f"model config: field 'src_vocab_size' must be an integer above the special ids, got {v!r}")
            if self.share_all_embeddings and v != self.vocab_size:
                raise UserError(
                    f"model config: share_all_embeddings needs one vocabulary, but src_vocab_size is {v} and "
                    f"vocab_size {self.vocab_size}"
                )
        if self.max_positions < 1:
            raise UserError("model config: field 'max_positions' must be at least 1")
        for name in ("dropout", "attention_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise UserError(f"model config: field '{name}' must be a number in [0, 1), got {v!r}")
        if not isinstance(self.share_decoder_input_output_embed, bool):
            raise UserError(
                "model config: field 'share_decoder_input_output_embed' must be true or false, got "
                f"{self.share_decoder_input_output_embed!r}"
            )
        if not isinstance(self.share_all_embeddings, bool):
            raise UserError(
                f"model config: field 'share_all_embeddings' must be true or false, got {self.share_all_embeddings!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Optional[str] = None) -> "ModelConfig":
        w = f"{source}: " if source else ""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"{w}model config: unknown field '{unknown[0]}', allowed: {sorted(names)}")
        if "vocab_size" not in data:
            raise UserError(f"{w}model config: missing field 'vocab_size'")
        try:
            return cls(**data)
        except UserError as e:
            raise UserError(f"{w}{e}") from None


__all__ = ["ModelConfig"]
