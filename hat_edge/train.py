"""SuperTransformer training, as HAT does it, with resume and DDP.

Every optimizer step trains one SubTransformer drawn at random from the space (HAT's weight-sharing
training): all ranks draw the same arch, because the draw is seeded by (seed, step) alone. The loss
is label-smoothed cross-entropy; Adam with betas (0.9, 0.98); linear warm-up then cosine or
inverse-sqrt decay; dropout scaled to the sampled embedding width (HAT: p * dim / max_dim, applied
by `SuperTransformer.set_arch`).

Determinism and resume: batches are a pure function of (seed, epoch, step in epoch) and the
dropout RNG is re-seeded from (seed, step, rank) at every step, so a run killed at any point and
resumed from its last checkpoint continues exactly as if never stopped (same batches, same arches,
same dropout masks). Checkpoints also store the RNG states, optimizer and scaler.

Distributed: launch with `torchrun --nproc-per-node N -m hat_edge.cli train ...`; the backend is
nccl on GPUs and gloo on CPU. Each rank takes its own micro-batches of the same epoch list;
gradients are summed across ranks and divided by the total target tokens of the step, so N ranks
compute exactly the gradient of one process on the combined batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from hat_edge.checkpoint import read_checkpoint, save_checkpoint
from hat_edge.data.batching import Batch, EncodedPairs, EpochBatches
from hat_edge.data.tokenizer import Tokenizer, train_tokenizer
from hat_edge.errors import UserError
from hat_edge.evaluate import fixed_batches, loss_sums, mean_loss
from hat_edge.space import Arch, SearchSpace, get_space
from hat_edge.train_config import _IDENTITY_FIELDS, TrainConfig  # TrainConfig: re-exported

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
LOG = "train_log.jsonl"


# ------------------------------------------------------------------------------------------------
# small pure pieces
# ------------------------------------------------------------------------------------------------
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """lr for optimizer step `step` (0-based): linear warm-up, then cosine or inverse-sqrt decay."""
    if step < cfg.warmup_steps:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "inverse-sqrt":
        return max(cfg.lr * math.sqrt(max(cfg.warmup_steps, 1) / (step + 1)), cfg.min_lr)
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))


def sample_arch(space: SearchSpace, seed: int, step: int) -> Arch:
    """The SubTransformer of step `step`: a function of (seed, step) only, so every rank and every
    resumed run draws the same one."""
    return space.sample(random.Random(seed * 1_000_003 + step))


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + rank * 7_919) % (2**63 - 1)


# ------------------------------------------------------------------------------------------------
# distributed helpers
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (no-op without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ------------------------------------------------------------------------------------------------
# the step
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepResult:
    loss: float  # label-smoothed loss per target token (all ranks, all micro-batches)
    nll: float  # cross-entropy per target token
    ntokens: int
    nsentences: int
    grad_norm: float = 0.0
    lr: float = 0.0


def forward_backward(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    arch: Arch,
    label_smoothing: float,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    scaler: Any = None,
) -> StepResult:
    """Accumulate the gradient of the step's mean per-token loss into `.grad`.

    Each micro-batch backpropagates its *summed* loss; afterwards the gradients are multiplied by
    world_size / total_tokens (DDP has already averaged over ranks, i.e. divided by world_size), so
    the result is the gradient of (sum of losses over all ranks' tokens) / (all ranks' tokens):
    the same as one process on the combined batch, whatever the per-rank token counts.
    `model` may be wrapped in DistributedDataParallel; the forward signature is (src, prev, arch).
    """
    sums = torch.zeros(4, dtype=torch.float64)  # loss, nll, ntokens, nsentences
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for i, b in enumerate(batches):
        b = b.to(device)
        sync = not ddp or i == len(batches) - 1
        ctx = contextlib.nullcontext() if sync else model.no_sync()
        with ctx:
            with autocast or contextlib.nullcontext():
                logits = model(b.src, b.prev, arch)  # (B, T, V)
            loss, nll = loss_sums(logits, b.target, label_smoothing)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        sums += torch.tensor([float(loss.detach()), float(nll), b.ntokens, b.nsentences], dtype=torch.float64)
    _all_reduce_sum(sums)
    ntok = max(float(sums[2]), 1.0)
    factor = (world_size if ddp else 1) / ntok
    params = model.parameters()
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)
    return StepResult(loss=float(sums[0]) / ntok, nll=float(sums[1]) / ntok, ntokens=int(sums[2]), nsentences=int(sums[3]))


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------
@dataclass
class Position:
    """Where training stands: the next optimizer step and where its data comes from."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in this epoch


class Trainer:
    """Holds model, optimizer and data for one run; `step()` does one optimizer step.

    Build with `Trainer.create(cfg)` (reads the corpus, trains or loads the tokenizer, resumes from
    `out_dir/checkpoint_last.pt` when asked). Tests build small ones the same way.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        space: SearchSpace,
        tokenizer: Tokenizer,
        train_pairs: EncodedPairs,
        valid_batches: list[Batch],
        fixed_arch: Arch | None = None,
        dist_info: DistInfo = DistInfo(),
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.space = space
        self.tokenizer = tokenizer
        self.fixed_arch = fixed_arch
        self.dist = dist_info
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.model.train()
        if dist_info.enabled:
            # find_unused_parameters: a shallow SubTransformer leaves the deeper layers without
            # gradients; DDP must not wait for them.
            self.ddp: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        else:
            self.ddp = self.model
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=cfg.weight_decay
        )
        self.autocast_dtype = _amp_dtype(cfg.amp, self.device)
        self.scaler = (
            torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 and self.device.type == "cuda" else None
        )
        self.batches = EpochBatches(
            train_pairs, cfg.max_tokens, cfg.max_sentences, cfg.seed, cfg.update_freq, dist_info.world_size, dist_info.rank
        )
        self.valid_batches = valid_batches
        self.pos = Position()
        self.best_valid = math.inf
        self.elapsed_ms_before = 0.0  # training time of earlier (resumed-from) runs
        self.last_valid_step = -1
        self.meta_extra: dict[str, Any] = {}

    # ---- what each step uses ----
    def arch_for(self, step: int) -> Arch:
        return self.fixed_arch if self.fixed_arch is not None else sample_arch(self.space, self.cfg.seed, step)

    def next_indices(self) -> list[tuple[int, ...]]:
        """The index batches the next `step()` will use on this rank (tests compare these)."""
        epoch, k = self._data_position()
        return self.batches.step_indices(epoch, k)

    def _data_position(self) -> tuple[int, int]:
        epoch, k = self.pos.epoch, self.pos.step_in_epoch
        while k >= self.batches.steps_in_epoch(epoch):
            epoch, k = epoch + 1, 0
        return epoch, k

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ---- one optimizer step ----
    def step(self) -> StepResult:
        cfg = self.cfg
        epoch, k = self._data_position()
        step = self.pos.step
        arch = self.arch_for(step)
        # set_arch also scales dropout to the sampled widths (HAT's rule, inside the model).
        self.model.set_arch(arch)
        # Dropout masks from (seed, step, rank): resume reproduces them without replaying RNG.
        torch.manual_seed(_step_seed(cfg.seed, step, self.dist.rank))
        lr = learning_rate(step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batches = self.batches.step_batches(epoch, k)
        self.optimizer.zero_grad(set_to_none=True)
        res = forward_backward(
            self.ddp, batches, arch, cfg.label_smoothing, self.dist.world_size, self.device, self._autocast(), self.scaler
        )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        gnorm = _grad_norm(self.model, cfg.clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif math.isfinite(gnorm):
            self.optimizer.step()
        self.pos = Position(step + 1, epoch, k + 1)
        return replace(res, grad_norm=gnorm, lr=lr)

    # ---- validation ----
    def validate(self) -> dict[str, float]:
        """Validation loss (nats/token) of the largest and smallest SubTransformer (or the fixed arch)."""
        archs = {"arch": self.fixed_arch} if self.fixed_arch is not None else {
            "largest": self.space.largest(),
            "smallest": self.space.smallest(),
        }
        out = {name: mean_loss(self.model, self.valid_batches, a, self.device) for name, a in archs.items()}
        self.model.train()
        return out

    # ---- state ----
    def train_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": self.cfg.schedule, "step": self.pos.step},
            "position": asdict(self.pos),
            "best_valid": self.best_valid,
            "elapsed_ms": self.elapsed_ms(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
            },
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": self.dist.world_size,
        }

    def load_train_state(self, st: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(st["optimizer"])
        self.pos = Position(**st["position"])
        self.best_valid = float(st.get("best_valid", math.inf))
        self.elapsed_ms_before = float(st.get("elapsed_ms", 0.0))
        rng = st.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "python" in rng:
            random.setstate(_as_tuple(rng["python"]))
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])

    def elapsed_ms(self) -> float:
        """Training wall time so far, over this run and the runs it resumed from."""
        t0 = getattr(self, "_t_start", None)
        return self.elapsed_ms_before + ((time.perf_counter() - t0) * 1000.0 if t0 is not None else 0.0)

    def meta(self) -> dict[str, Any]:
        return {
            "data": self.cfg.data_spec().to_dict(),
            "train_config": self.cfg.to_dict(),
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "best_valid": self.best_valid,
            "elapsed_ms": self.elapsed_ms(),
            **self.meta_extra,
        }

    def save(self, path: str | Path, with_state: bool = True) -> Path:
        return save_checkpoint(
            path,
            self.model,
            self.tokenizer,
            self.space,
            arch=self.fixed_arch,
            meta=self.meta(),
            train_state=self.train_state() if with_state else None,
        )

    def resume(self, path: str | Path) -> None:
        doc = read_checkpoint(path)
        self.model.load_state_dict(doc["state_dict"])
        if not doc.get("train_state"):
            raise UserError(f"{path}: has no training state to resume from (a shipped or best checkpoint?)")
        self.load_train_state(doc["train_state"])

    # ---- construction from a config ----
    @classmethod
    def create(cls, cfg: TrainConfig, dist_info: DistInfo | None = None, resume: bool = True, log=print) -> "Trainer":
        cfg.check()
        device = _pick_device(cfg.device)
        dist_info = dist_info or init_distributed(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
            torch.cuda.set_device(device)
        out = Path(cfg.out_dir)
        last = out / LAST
        space = get_space(cfg.space)
        fixed_arch = Arch.load(cfg.arch) if cfg.arch else None
        if fixed_arch is not None:
            space.validate(fixed_arch, cfg.arch)
        resume_doc = read_checkpoint(last) if (resume and last.exists()) else None
        if resume_doc is not None:
            _check_resume_compatible(resume_doc, cfg, last)

        splits = cfg.data_spec().load()
        # The tokenizer: from the checkpoint being resumed, a given file, an --init checkpoint, or
        # trained on the training split (rank 0 trains, the others read it back).
        if resume_doc is not None:
            tok = Tokenizer(resume_doc["tokenizer"], f"{last} (tokenizer)")
        elif cfg.tokenizer:
            tok = Tokenizer.load(cfg.tokenizer)
        elif cfg.init:
            tok = Tokenizer(read_checkpoint(cfg.init)["tokenizer"], f"{cfg.init} (tokenizer)")
        else:
            tok_path = out / "tokenizer.model"
            if dist_info.is_main:
                log(f"training a {cfg.vocab_size}-piece SentencePiece model on {len(splits.train)} pairs")
                train_tokenizer(list(splits.train.src) + list(splits.train.tgt), cfg.vocab_size).save(out)
            if dist_info.enabled:
                dist.barrier()
            tok = Tokenizer.load(tok_path)

        train_pairs = EncodedPairs.from_corpus(splits.train, tok).filter_max_len(cfg.max_len)
        valid_pairs = EncodedPairs.from_corpus(splits.valid.head(cfg.valid_sentences), tok)
        valid_batches = fixed_batches(valid_pairs, max_tokens=max(cfg.max_tokens, 2048), max_len=cfg.max_positions)

        from hat_edge.model import ModelConfig, SuperTransformer

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        mcfg = ModelConfig(
            vocab_size=tok.vocab_size, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
            max_positions=cfg.max_positions,
        )
        model = SuperTransformer(mcfg, space)
        if cfg.init and resume_doc is None:
            init_doc = read_checkpoint(cfg.init)
            try:
                model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in init_doc["state_dict"].items()})
            except RuntimeError as e:
                raise UserError(f"{cfg.init}: weights do not fit space '{space.name}' / vocab {tok.vocab_size} ({str(e).splitlines()[0]})") from None
        trainer = cls(cfg, model, space, tok, train_pairs, valid_batches, fixed_arch, dist_info, device)
        if resume_doc is not None:
            trainer.model.load_state_dict(resume_doc["state_dict"])
            if not resume_doc.get("train_state"):
                raise UserError(f"{last}: has no training state to resume from")
            trainer.load_train_state(resume_doc["train_state"])
            log(f"resumed from {last} at step {trainer.pos.step} (epoch {trainer.pos.epoch})")
        trainer.meta_extra = {"n_train_pairs": len(train_pairs)}
        return trainer


def _as_tuple(x: Any) -> Any:
    """random.setstate needs tuples; a checkpoint round-trip may give lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _check_resume_compatible(doc: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    old = (doc.get("meta") or {}).get("train_config") or {}
    for name in _IDENTITY_FIELDS:
        if name in old and old[name] != getattr(cfg, name):
            raise UserError(
                f"{path}: was trained with {name}={old[name]!r} but this run has {getattr(cfg, name)!r}; "
                "use the same setting, another --out-dir, or --no-resume to start over"
            )
    ws = (doc.get("train_state") or {}).get("world_size")
    if ws is not None and int(os.environ.get("WORLD_SIZE", "1")) != ws:
        raise UserError(
            f"{path}: was trained on {ws} processes; resume with the same number (the data order depends on it)"
        )


def _pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 where the GPU supports it, else fp16 (with loss scaling).

    None (fp32) on CPU whatever --amp says: CPU autocast is slower than fp32 on CPUs without
    native bf16 units, and the demo is trained on such a CPU.
    """
    if amp == "off" or device.type != "cuda":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _grad_norm(model: torch.nn.Module, clip: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSummary:
    out_dir: str
    steps: int
    epochs: float
    elapsed_ms: float
    last_loss: float
    valid: dict[str, float] = field(default_factory=dict)
    best_checkpoint: str = ""
    last_checkpoint: str = ""
    stopped_by: str = ""


def train(cfg: TrainConfig, resume: bool = True, log=None) -> TrainSummary:
    """Run (or resume) training until max_steps / max_epochs / max_time_min; returns a summary.

    Writes into cfg.out_dir: checkpoint_last.pt (with training state, for resume),
    checkpoint_best.pt (best mean validation loss, weights only), tokenizer.model, train_log.jsonl
    (one JSON object per log interval and per validation).
    """
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    trainer = Trainer.create(cfg, resume=resume, log=log if _rank_env() == 0 else (lambda m: None))
    main = trainer.dist.is_main
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        trainer.tokenizer.save(out)
    log_fh = open(out / LOG, "a") if main else None

    stop = {"signal": None}

    def _on_term(signum, frame):  # finish the current step, save, exit
        stop["signal"] = signum

    # SIGTERM (a scheduler's kill) ends the run cleanly after the current step, with a checkpoint.
    old_handler = signal.signal(signal.SIGTERM, _on_term) if threading.current_thread() is threading.main_thread() else None
    t_start = time.perf_counter()
    trainer._t_start = t_start
    t_saved = t_start
    start_step = trainer.pos.step
    # Redrawn often on a terminal; every 30 s into a log file (nohup), which would otherwise grow
    # by a line per step.
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", disable=not (main and cfg.progress),
               dynamic_ncols=True, file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 30.0)
    acc = {"loss": 0.0, "nll": 0.0, "tok": 0, "n": 0, "t": time.perf_counter()}
    last = StepResult(math.nan, math.nan, 0, 0)
    valid: dict[str, float] = {}
    stopped_by = "max_steps"
    try:
        while trainer.pos.step < cfg.max_steps:
            if cfg.max_epochs is not None and trainer._data_position()[0] >= cfg.max_epochs:
                stopped_by = "max_epochs"
                break
            # Time and signals differ between ranks: stop only when all agree, or a rank that
            # stopped alone would leave the others waiting in the next all-reduce forever.
            reason = _agreed_stop(
                timed_out=cfg.max_time_min is not None and (time.perf_counter() - t_start) / 60.0 >= cfg.max_time_min,
                signalled=stop["signal"] is not None,
            )
            if reason:
                stopped_by = reason
                break
            last = trainer.step()
            step = trainer.pos.step
            acc["loss"] += last.loss * last.ntokens
            acc["nll"] += last.nll * last.ntokens
            acc["tok"] += last.ntokens
            acc["n"] += 1
            bar.update(1)
            if step % cfg.log_every_steps == 0 or step == cfg.max_steps:
                dt = time.perf_counter() - acc["t"]
                rec = {
                    "version": 1, "kind": "train", "step": step, "epoch": trainer.pos.epoch,
                    "loss": acc["loss"] / max(acc["tok"], 1), "nll": acc["nll"] / max(acc["tok"], 1),
                    "lr": last.lr, "grad_norm": last.grad_norm, "tokens_per_s": acc["tok"] / max(dt, 1e-9),
                    "elapsed_ms": trainer.elapsed_ms(),
                }
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{last.lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if log_fh:
                    log_fh.write(json.dumps(rec) + "\n")
                    log_fh.flush()
                acc = {"loss": 0.0, "nll": 0.0, "tok": 0, "n": 0, "t": time.perf_counter()}
            if cfg.valid_every_steps > 0 and step % cfg.valid_every_steps == 0:
                valid = _validate_and_save_best(trainer, out, log_fh, t_start, log)
            if main and (step % cfg.save_every_steps == 0 or (time.perf_counter() - t_saved) / 60.0 >= cfg.save_every_min):
                trainer.save(out / LAST)
                t_saved = time.perf_counter()
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    if trainer.pos.step > start_step or not (out / LAST).exists():
        if trainer.last_valid_step != trainer.pos.step:
            valid = _validate_and_save_best(trainer, out, log_fh, t_start, log)
        if main:
            trainer.save(out / LAST)
    if log_fh:
        log_fh.close()
    steps_per_epoch = trainer.batches.steps_in_epoch(trainer.pos.epoch)
    return TrainSummary(
        out_dir=str(out),
        steps=trainer.pos.step,
        epochs=trainer.pos.epoch + trainer.pos.step_in_epoch / steps_per_epoch,
        elapsed_ms=(time.perf_counter() - t_start) * 1000.0,
        last_loss=last.loss,
        valid=valid,
        best_checkpoint=str(out / BEST),
        last_checkpoint=str(out / LAST),
        stopped_by=stopped_by,
    )


def _agreed_stop(timed_out: bool, signalled: bool) -> str:
    """'' to go on, else why to stop; with DDP, a stop on any rank stops every rank (same step)."""
    flags = torch.tensor([float(timed_out), float(signalled)])
    _all_reduce_sum(flags)
    if flags[1] > 0:
        return "signal"
    if flags[0] > 0:
        return "max_time_min"
    return ""


def _validate_and_save_best(trainer: Trainer, out: Path, log_fh, t_start: float, log) -> dict[str, float]:
    if not trainer.dist.is_main:
        # Only rank 0 validates and saves (no collectives inside); the others wait at the next
        # all-reduce instead of repeating the same computation.
        trainer.last_valid_step = trainer.pos.step
        return {}
    valid = trainer.validate()
    trainer.last_valid_step = trainer.pos.step
    score = sum(valid.values()) / len(valid)
    if trainer.dist.is_main:
        rec = {"version": 1, "kind": "valid", "step": trainer.pos.step, "epoch": trainer.pos.epoch,
               "valid_loss": valid, "elapsed_ms": trainer.elapsed_ms()}
        if log_fh:
            log_fh.write(json.dumps(rec) + "\n")
            log_fh.flush()
        log(f"step {trainer.pos.step}: valid loss " + ", ".join(f"{k} {v:.3f}" for k, v in valid.items()))
        if score < trainer.best_valid:
            trainer.best_valid = score
            trainer.save(out / BEST, with_state=False)
    return valid


def _rank_env() -> int:
    return int(os.environ.get("RANK", "0"))


__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainSummary",
    "StepResult",
    "Position",
    "DistInfo",
    "train",
    "forward_backward",
    "learning_rate",
    "sample_arch",
    "init_distributed",
]
