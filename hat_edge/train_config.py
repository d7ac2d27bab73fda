"""The settings of a training run, `TrainConfig`: torch-free, so the CLI can build its flags from
them without importing torch (2+ s on a small CPU) for every command."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from hat_edge.errors import UserError

if TYPE_CHECKING:
    from hat_edge.data.corpus import DataSpec


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (the CLI flags map 1:1 onto these fields)."""

    # data
    data: str = "demo"
    tgt_data: str | None = None
    valid_size: int = 1000
    test_size: int = 1000
    split_seed: int = 0
    max_len: int = 128  # training pairs with a longer side are skipped
    tokenizer: str | None = None  # a SentencePiece .model; default: train one on the training split
    vocab_size: int = 4000
    # model
    space: str = "demo"
    arch: str | None = None  # train this one SubTransformer (HAT's final step) instead of sampling
    init: str | None = None  # start from this checkpoint's weights (fine-tuning)
    dropout: float = 0.1
    attention_dropout: float = 0.1
    max_positions: int = 512
    # optimisation
    max_tokens: int = 4096
    max_sentences: int | None = None
    update_freq: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 1000
    warmup_init_lr: float = 1e-7
    schedule: str = "cosine"  # cosine | inverse-sqrt
    max_steps: int = 20000
    max_epochs: int | None = None
    max_time_min: float | None = None
    label_smoothing: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 0.0  # 0: no clipping (HAT)
    seed: int = 1
    amp: str = "auto"  # auto | bf16 | fp16 | off
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None
    # bookkeeping
    out_dir: str = "runs/train"
    save_every_steps: int = 1000
    save_every_min: float = 10.0
    valid_every_steps: int = 1000
    valid_sentences: int = 500
    log_every_steps: int = 50
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self) -> None:
        if self.schedule not in ("cosine", "inverse-sqrt"):
            raise UserError(f"--schedule is '{self.schedule}': allowed cosine, inverse-sqrt")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise UserError(f"--amp is '{self.amp}': allowed auto, bf16, fp16, off")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device is '{self.device}': allowed auto, cpu, cuda")
        for name in ("max_tokens", "update_freq", "max_steps", "max_len", "vocab_size", "log_every_steps"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.attention_dropout < 1.0):
            raise UserError("--dropout and --attention-dropout must be in [0, 1)")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")

    def data_spec(self) -> "DataSpec":
        from hat_edge.data.corpus import DataSpec

        return DataSpec(self.data, self.tgt_data, self.valid_size, self.test_size, self.split_seed)


# Settings that define what is trained; a resumed run must not change them.
_IDENTITY_FIELDS = (
    "data", "tgt_data", "valid_size", "test_size", "split_seed", "max_len", "vocab_size",
    "space", "arch", "max_tokens", "max_sentences", "update_freq", "seed",
)
