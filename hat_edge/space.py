"""The design space (`SearchSpace`) and one point in it (`Arch`), as HAT defines them.

An `Arch` is one SubTransformer, described with HAT's per-layer lists:

    encoder_embed_dim, decoder_embed_dim          one width for every layer of that side
    encoder_layer_num, decoder_layer_num          depth (HAT keeps the encoder at its maximum)
    encoder_ffn_embed_dim[i], *_heads[i]          one entry per active layer
    decoder_arbitrary_ende_attn[i] in {-1, 1, 2}  decoder layer i attends to the last 1, 2 or 3
                                                  encoder layers, concatenated along the sequence
    qkv_dim                                       fixed q/k/v width (head dim = qkv_dim / heads)

Files: HAT's `*-subtransformer` YAML keys are read and written unchanged; a SearchSpace reads HAT's
`*-choice` YAML. hat-edge's own formats carry `format` and `version` fields.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import yaml

from hat_edge.errors import UserError

ARCH_FORMAT = "hat-edge-arch"
SPACE_FORMAT = "hat-edge-space"
FORMAT_VERSION = 1

# HAT's 10 latency-predictor features, in HAT's order, and HAT's normalisation for them.
FEATURE_NAMES = (
    "encoder_embed_dim",
    "encoder_layer_num",
    "encoder_ffn_embed_dim_avg",
    "encoder_self_attention_heads_avg",
    "decoder_embed_dim",
    "decoder_layer_num",
    "decoder_ffn_embed_dim_avg",
    "decoder_self_attention_heads_avg",
    "decoder_ende_attention_heads_avg",
    "decoder_arbitrary_ende_attn_avg",
)
HAT_FEATURE_NORM = (640, 6, 2048, 6, 640, 6, 2048, 6, 6, 2)

ENDE_CHOICES = (-1, 1, 2)

# Arch fields that are per-layer lists, and which depth field gives their length.
_ENCODER_LISTS = ("encoder_ffn_embed_dim", "encoder_self_attention_heads")
_DECODER_LISTS = (
    "decoder_ffn_embed_dim",
    "decoder_self_attention_heads",
    "decoder_ende_attention_heads",
    "decoder_arbitrary_ende_attn",
)
_SCALARS = ("encoder_embed_dim", "decoder_embed_dim", "encoder_layer_num", "decoder_layer_num")


class SpaceError(UserError, ValueError):
    """A user-facing problem with an arch or space: the message is one line, ready to print."""


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def n_ende_layers(choice: int) -> int:
    """How many encoder layers a decoder layer attends to for HAT's choice -1, 1 or 2."""
    return 1 if choice == -1 else choice + 1


# --------------------------------------------------------------------------------------------
# Arch
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    encoder_embed_dim: int
    decoder_embed_dim: int
    encoder_layer_num: int
    decoder_layer_num: int
    encoder_ffn_embed_dim: tuple[int, ...]
    encoder_self_attention_heads: tuple[int, ...]
    decoder_ffn_embed_dim: tuple[int, ...]
    decoder_self_attention_heads: tuple[int, ...]
    decoder_ende_attention_heads: tuple[int, ...]
    decoder_arbitrary_ende_attn: tuple[int, ...]
    qkv_dim: int = 512

    def __post_init__(self) -> None:
        for name in _ENCODER_LISTS + _DECODER_LISTS:
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        self.check()

    # ---- structural checks (independent of any space) ----
    def check(self, source: str | None = None) -> None:
        w = _where(source)
        for name in _SCALARS + ("qkv_dim",):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SpaceError(f"{w}field '{name}' must be a positive integer, got {v!r}")
        for side, names in (("encoder", _ENCODER_LISTS), ("decoder", _DECODER_LISTS)):
            depth = getattr(self, f"{side}_layer_num")
            for name in names:
                vals = getattr(self, name)
                if len(vals) != depth:
                    raise SpaceError(
                        f"{w}field '{name}' has {len(vals)} entries but {side}_layer_num is {depth}"
                    )
        heads = (
            self.encoder_self_attention_heads
            + self.decoder_self_attention_heads
            + self.decoder_ende_attention_heads
        )
        for h in heads:
            if h <= 0 or self.qkv_dim % h:
                raise SpaceError(f"{w}attention heads {h} must divide qkv_dim {self.qkv_dim}")
        for v in self.encoder_ffn_embed_dim + self.decoder_ffn_embed_dim:
            if v <= 0:
                raise SpaceError(f"{w}ffn dims must be positive, got {v}")
        for i, c in enumerate(self.decoder_arbitrary_ende_attn):
            if c not in ENDE_CHOICES:
                raise SpaceError(
                    f"{w}field 'decoder_arbitrary_ende_attn[{i}]' is {c}, allowed: -1, 1, 2"
                )
            if n_ende_layers(c) > self.encoder_layer_num:
                raise SpaceError(
                    f"{w}decoder layer {i} attends to the last {n_ende_layers(c)} encoder layers "
                    f"but the encoder has {self.encoder_layer_num}"
                )

    # ---- derived numbers ----
    def ende_layers(self, i: int) -> int:
        """Number of (last) encoder layers decoder layer i attends to."""
        return n_ende_layers(self.decoder_arbitrary_ende_attn[i])

    def features(self) -> list[float]:
        """HAT's 10-number feature vector (averages over the active layers)."""
        mean = lambda xs: float(sum(xs)) / len(xs)  # noqa: E731
        return [
            float(self.encoder_embed_dim),
            float(self.encoder_layer_num),
            mean(self.encoder_ffn_embed_dim),
            mean(self.encoder_self_attention_heads),
            float(self.decoder_embed_dim),
            float(self.decoder_layer_num),
            mean(self.decoder_ffn_embed_dim),
            mean(self.decoder_self_attention_heads),
            mean(self.decoder_ende_attention_heads),
            mean([n_ende_layers(c) for c in self.decoder_arbitrary_ende_attn]),
        ]

    def params(self) -> int:
        """Parameter count with HAT's convention: embedding tables and output projection excluded.

        Counted: q/k/v/out projections (with biases), FFN linears (with biases), and the layer
        norms of every active layer; positions are sinusoidal (no parameters).
        """
        e, d, q = self.encoder_embed_dim, self.decoder_embed_dim, self.qkv_dim
        total = 0
        for f in self.encoder_ffn_embed_dim:
            total += _attn_params(e, e, q) + _ffn_params(e, f) + 2 * _ln_params(e)
        for f in self.decoder_ffn_embed_dim:
            total += _attn_params(d, d, q)  # self-attention
            total += _attn_params(d, e, q)  # encoder-decoder attention (k, v read encoder dim)
            total += _ffn_params(d, f) + 3 * _ln_params(d)
        return total

    def flops(self, src_len: int = 30, tgt_len: int = 30) -> int:
        """FLOPs (2 x multiply-adds) of one teacher-forced forward pass, HAT's convention.

        Linear layers count 2 * in * out per token; attention counts q.k and attn.v products
        (2 * 2 * len_q * len_k * qkv_dim per layer). Embeddings and output projection excluded.
        """
        e, d, q = self.encoder_embed_dim, self.decoder_embed_dim, self.qkv_dim
        S, T = src_len, tgt_len
        macs = 0
        for f in self.encoder_ffn_embed_dim:
            macs += S * (4 * e * q + 2 * e * f)  # q,k,v,out + fc1,fc2
            macs += 2 * S * S * q
        for i, f in enumerate(self.decoder_ffn_embed_dim):
            kv_len = S * self.ende_layers(i)
            macs += T * (4 * d * q + 2 * d * f)  # self-attn projections + ffn
            macs += 2 * T * T * q
            macs += T * (2 * d * q) + kv_len * (2 * e * q)  # cross q/out, cross k/v over sources
            macs += 2 * T * kv_len * q
        return 2 * macs

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): stable key for caches and the latency store."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "Arch":
        w = _where(source)
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n != "qkv_dim"]
        if missing:
            raise SpaceError(f"{w}missing field '{missing[0]}'")
        kw: dict[str, Any] = {}
        for n in names:
            if n not in data:
                continue
            v = data[n]
            if n in _ENCODER_LISTS + _DECODER_LISTS:
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    v = [v]
                if not isinstance(v, (list, tuple)):
                    raise SpaceError(f"{w}field '{n}' must be a list of integers, got {v!r}")
                kw[n] = tuple(_as_int(x, n, w) for x in v)
            else:
                kw[n] = _as_int(v, n, w)
        # HAT files may carry lists longer than the depth (the unused tail); keep the active part.
        for side, lists in (("encoder", _ENCODER_LISTS), ("decoder", _DECODER_LISTS)):
            depth = kw[f"{side}_layer_num"]
            for n in lists:
                if len(kw[n]) > depth:
                    kw[n] = kw[n][:depth]
        try:
            return cls(**kw)
        except SpaceError as e:
            if source and not str(e).startswith(w):
                raise SpaceError(f"{w}{e}") from None
            raise

    def to_hat_yaml(self) -> str:
        """HAT's `*-subtransformer` YAML, key for key as in HAT's published configs."""
        fl = lambda xs: "[" + ", ".join(str(x) for x in xs) + "]"  # noqa: E731
        return (
            f"encoder-embed-dim-subtransformer: {self.encoder_embed_dim}\n"
            f"decoder-embed-dim-subtransformer: {self.decoder_embed_dim}\n\n"
            f"encoder-ffn-embed-dim-all-subtransformer: {fl(self.encoder_ffn_embed_dim)}\n"
            f"decoder-ffn-embed-dim-all-subtransformer: {fl(self.decoder_ffn_embed_dim)}\n\n"
            f"encoder-layer-num-subtransformer: {self.encoder_layer_num}\n"
            f"decoder-layer-num-subtransformer: {self.decoder_layer_num}\n\n"
            "encoder-self-attention-heads-all-subtransformer: "
            f"{fl(self.encoder_self_attention_heads)}\n"
            "decoder-self-attention-heads-all-subtransformer: "
            f"{fl(self.decoder_self_attention_heads)}\n"
            "decoder-ende-attention-heads-all-subtransformer: "
            f"{fl(self.decoder_ende_attention_heads)}\n\n"
            "# for arbitrary encoder decoder attention. -1 means attending to last one encoder layer\n"
            "# 1 means last two encoder layers, 2 means last three encoder layers\n"
            "decoder-arbitrary-ende-attn-all-subtransformer: "
            f"{fl(self.decoder_arbitrary_ende_attn)}\n"
            + (f"\nqkv-dim: {self.qkv_dim}\n" if self.qkv_dim != 512 else "")
        )

    @classmethod
    def from_hat_dict(cls, data: dict[str, Any], source: str | None = None) -> "Arch":
        w = _where(source)
        out: dict[str, Any] = {}
        for ours, theirs in _HAT_ARCH_KEYS.items():
            if theirs not in data:
                raise SpaceError(f"{w}missing key '{theirs}'")
            out[ours] = data[theirs]
        if "qkv-dim" in data:
            out["qkv_dim"] = data["qkv-dim"]
        return cls.from_dict(out, source)

    def save(self, path: str | Path, fmt: str | None = None) -> Path:
        """Write as HAT YAML (`.yml`/`.yaml`, default) or hat-edge JSON (`.json`)."""
        path = Path(path)
        fmt = fmt or ("json" if path.suffix == ".json" else "hat")
        if fmt == "json":
            doc = {"format": ARCH_FORMAT, "version": FORMAT_VERSION, "arch": self.to_dict()}
            path.write_text(json.dumps(doc, indent=2) + "\n")
        else:
            path.write_text(self.to_hat_yaml())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Arch":
        """Read an arch file: HAT `*-subtransformer` YAML, or hat-edge JSON/YAML."""
        path = Path(path)
        data = _read_mapping(path)
        return cls.from_any(data, str(path))

    @classmethod
    def from_any(cls, data: dict[str, Any], source: str | None = None) -> "Arch":
        w = _where(source)
        if "format" in data:
            if data.get("format") != ARCH_FORMAT:
                raise SpaceError(f"{w}field 'format' is {data.get('format')!r}, expected '{ARCH_FORMAT}'")
            _check_version(data, source)
            if not isinstance(data.get("arch"), dict):
                raise SpaceError(f"{w}missing field 'arch'")
            return cls.from_dict(data["arch"], source)
        if any(k.endswith("-subtransformer") for k in data):
            return cls.from_hat_dict(data, source)
        return cls.from_dict(data, source)

    # ---- convenient constructors ----
    @classmethod
    def uniform(
        cls,
        embed_dim: int,
        ffn_dim: int,
        heads: int,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        qkv_dim: int | None = None,
        ende: int = -1,
    ) -> "Arch":
        """A classic homogeneous Transformer (e.g. Transformer-Base: 512, 2048, 8)."""
        return cls(
            encoder_embed_dim=embed_dim,
            decoder_embed_dim=embed_dim,
            encoder_layer_num=encoder_layers,
            decoder_layer_num=decoder_layers,
            encoder_ffn_embed_dim=(ffn_dim,) * encoder_layers,
            encoder_self_attention_heads=(heads,) * encoder_layers,
            decoder_ffn_embed_dim=(ffn_dim,) * decoder_layers,
            decoder_self_attention_heads=(heads,) * decoder_layers,
            decoder_ende_attention_heads=(heads,) * decoder_layers,
            decoder_arbitrary_ende_attn=(ende,) * decoder_layers,
            qkv_dim=qkv_dim or embed_dim,
        )

    def describe(self) -> str:
        return (
            f"enc {self.encoder_embed_dim}x{self.encoder_layer_num} "
            f"ffn{list(self.encoder_ffn_embed_dim)} h{list(self.encoder_self_attention_heads)} | "
            f"dec {self.decoder_embed_dim}x{self.decoder_layer_num} "
            f"ffn{list(self.decoder_ffn_embed_dim)} h{list(self.decoder_self_attention_heads)} "
            f"ende-h{list(self.decoder_ende_attention_heads)} "
            f"ende{list(self.decoder_arbitrary_ende_attn)}"
        )


TRANSFORMER_BASE = Arch.uniform(512, 2048, 8)
TRANSFORMER_BIG = Arch.uniform(1024, 4096, 16)
BASELINES = {"transformer-base": TRANSFORMER_BASE, "transformer-big": TRANSFORMER_BIG}


def _attn_params(embed: int, kv_embed: int, qkv: int) -> int:
    # q: embed->qkv, k,v: kv_embed->qkv, out: qkv->embed, all with bias
    return (embed * qkv + qkv) + 2 * (kv_embed * qkv + qkv) + (qkv * embed + embed)


def _ffn_params(embed: int, ffn: int) -> int:
    return (embed * ffn + ffn) + (ffn * embed + embed)


def _ln_params(embed: int) -> int:
    return 2 * embed


def _as_int(v: Any, name: str, w: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise SpaceError(f"{w}field '{name}' must be an integer, got {v!r}")
    return int(v)


def _check_version(data: dict[str, Any], source: str | None) -> None:
    v = data.get("version")
    if v != FORMAT_VERSION:
        raise SpaceError(
            f"{_where(source)}field 'version' is {v!r}; this hat-edge reads version {FORMAT_VERSION}"
        )


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpaceError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise SpaceError(f"{path}: cannot read ({e.__class__.__name__})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, RecursionError, yaml.YAMLError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise SpaceError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}{where}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: expected a mapping of keys to values")
    return data


_HAT_ARCH_KEYS = {
    "encoder_embed_dim": "encoder-embed-dim-subtransformer",
    "decoder_embed_dim": "decoder-embed-dim-subtransformer",
    "encoder_layer_num": "encoder-layer-num-subtransformer",
    "decoder_layer_num": "decoder-layer-num-subtransformer",
    "encoder_ffn_embed_dim": "encoder-ffn-embed-dim-all-subtransformer",
    "encoder_self_attention_heads": "encoder-self-attention-heads-all-subtransformer",
    "decoder_ffn_embed_dim": "decoder-ffn-embed-dim-all-subtransformer",
    "decoder_self_attention_heads": "decoder-self-attention-heads-all-subtransformer",
    "decoder_ende_attention_heads": "decoder-ende-attention-heads-all-subtransformer",
    "decoder_arbitrary_ende_attn": "decoder-arbitrary-ende-attn-all-subtransformer",
}

# --------------------------------------------------------------------------------------------
# SearchSpace
# --------------------------------------------------------------------------------------------
_CHOICE_FIELDS = (
    "encoder_embed_choice",
    "decoder_embed_choice",
    "encoder_ffn_embed_dim_choice",
    "decoder_ffn_embed_dim_choice",
    "encoder_layer_num_choice",
    "decoder_layer_num_choice",
    "encoder_self_attention_heads_choice",
    "decoder_self_attention_heads_choice",
    "decoder_ende_attention_heads_choice",
    "decoder_arbitrary_ende_attn_choice",
)
CHOICE_FIELDS = _CHOICE_FIELDS  # public: the importer reads the same names from HAT's args
# Which choice list governs which Arch field.
_GOVERNS = {
    "encoder_embed_dim": "encoder_embed_choice",
    "decoder_embed_dim": "decoder_embed_choice",
    "encoder_layer_num": "encoder_layer_num_choice",
    "decoder_layer_num": "decoder_layer_num_choice",
    "encoder_ffn_embed_dim": "encoder_ffn_embed_dim_choice",
    "encoder_self_attention_heads": "encoder_self_attention_heads_choice",
    "decoder_ffn_embed_dim": "decoder_ffn_embed_dim_choice",
    "decoder_self_attention_heads": "decoder_self_attention_heads_choice",
    "decoder_ende_attention_heads": "decoder_ende_attention_heads_choice",
    "decoder_arbitrary_ende_attn": "decoder_arbitrary_ende_attn_choice",
}


@dataclass(frozen=True)
class SearchSpace:
    """The choices a SubTransformer draws from; the SuperTransformer has the largest of each."""

    name: str
    encoder_embed_choice: tuple[int, ...]
    decoder_embed_choice: tuple[int, ...]
    encoder_ffn_embed_dim_choice: tuple[int, ...]
    decoder_ffn_embed_dim_choice: tuple[int, ...]
    encoder_layer_num_choice: tuple[int, ...]
    decoder_layer_num_choice: tuple[int, ...]
    encoder_self_attention_heads_choice: tuple[int, ...]
    decoder_self_attention_heads_choice: tuple[int, ...]
    decoder_ende_attention_heads_choice: tuple[int, ...]
    decoder_arbitrary_ende_attn_choice: tuple[int, ...] = ENDE_CHOICES
    qkv_dim: int = 512
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for n in _CHOICE_FIELDS:
            vals = getattr(self, n)
            if isinstance(vals, int):
                vals = (vals,)
            object.__setattr__(self, n, tuple(int(v) for v in vals))
            if not getattr(self, n):
                raise SpaceError(f"space '{self.name}': field '{n}' has no choices")
        for n in _CHOICE_FIELDS[:-1]:
            if any(v <= 0 for v in getattr(self, n)):
                raise SpaceError(f"space '{self.name}': field '{n}' must hold positive integers")
        for c in self.decoder_arbitrary_ende_attn_choice:
            if c not in ENDE_CHOICES:
                raise SpaceError(
                    f"space '{self.name}': decoder_arbitrary_ende_attn_choice has {c}, allowed: -1, 1, 2"
                )
        for n in ("encoder_self_attention_heads_choice", "decoder_self_attention_heads_choice",
                  "decoder_ende_attention_heads_choice"):
            for h in getattr(self, n):
                if self.qkv_dim % h:
                    raise SpaceError(f"space '{self.name}': {n} has {h}, which does not divide qkv_dim {self.qkv_dim}")

    # ---- the SuperTransformer's sizes ----
    @property
    def max_encoder_embed(self) -> int:
        return max(self.encoder_embed_choice)

    @property
    def max_decoder_embed(self) -> int:
        return max(self.decoder_embed_choice)

    @property
    def max_encoder_layers(self) -> int:
        return max(self.encoder_layer_num_choice)

    @property
    def max_decoder_layers(self) -> int:
        return max(self.decoder_layer_num_choice)

    @property
    def max_encoder_ffn(self) -> int:
        return max(self.encoder_ffn_embed_dim_choice)

    @property
    def max_decoder_ffn(self) -> int:
        return max(self.decoder_ffn_embed_dim_choice)

    @property
    def max_heads(self) -> int:
        return max(
            self.encoder_self_attention_heads_choice
            + self.decoder_self_attention_heads_choice
            + self.decoder_ende_attention_heads_choice
        )

    def choices(self, arch_field: str) -> tuple[int, ...]:
        return getattr(self, _GOVERNS[arch_field])

    # ---- validation ----
    def validate(self, arch: Arch, source: str | None = None) -> None:
        """Raise SpaceError naming the first field of `arch` outside this space."""
        w = _where(source)
        if arch.qkv_dim != self.qkv_dim:
            raise SpaceError(f"{w}field 'qkv_dim' is {arch.qkv_dim}, allowed: [{self.qkv_dim}] (space '{self.name}')")
        for af, cf in _GOVERNS.items():
            allowed = getattr(self, cf)
            v = getattr(arch, af)
            for i, x in enumerate(v if isinstance(v, tuple) else (v,)):
                if x not in allowed:
                    idx = f"[{i}]" if isinstance(v, tuple) else ""
                    raise SpaceError(
                        f"{w}field '{af}{idx}' is {x}, allowed: {sorted(allowed)} (space '{self.name}')"
                    )

    def contains(self, arch: Arch) -> bool:
        try:
            self.validate(arch)
        except SpaceError:
            return False
        return True

    # ---- sampling and evolution operators (HAT's evolution) ----
    def sample(self, rng: random.Random) -> Arch:
        """One arch drawn uniformly per gene, as HAT's `random_sample_config`."""
        enc_n = rng.choice(self.encoder_layer_num_choice)
        dec_n = rng.choice(self.decoder_layer_num_choice)
        return Arch(
            encoder_embed_dim=rng.choice(self.encoder_embed_choice),
            decoder_embed_dim=rng.choice(self.decoder_embed_choice),
            encoder_layer_num=enc_n,
            decoder_layer_num=dec_n,
            encoder_ffn_embed_dim=tuple(rng.choice(self.encoder_ffn_embed_dim_choice) for _ in range(enc_n)),
            encoder_self_attention_heads=tuple(
                rng.choice(self.encoder_self_attention_heads_choice) for _ in range(enc_n)
            ),
            decoder_ffn_embed_dim=tuple(rng.choice(self.decoder_ffn_embed_dim_choice) for _ in range(dec_n)),
            decoder_self_attention_heads=tuple(
                rng.choice(self.decoder_self_attention_heads_choice) for _ in range(dec_n)
            ),
            decoder_ende_attention_heads=tuple(
                rng.choice(self.decoder_ende_attention_heads_choice) for _ in range(dec_n)
            ),
            decoder_arbitrary_ende_attn=tuple(
                rng.choice(self._ende_allowed(enc_n)) for _ in range(dec_n)
            ),
            qkv_dim=self.qkv_dim,
        )

    def sample_n(self, n: int, seed: int = 0, unique: bool = True) -> list[Arch]:
        rng = random.Random(seed)
        out: list[Arch] = []
        seen: set[Arch] = set()
        tries = 0
        while len(out) < n:
            a = self.sample(rng)
            tries += 1
            if unique and a in seen and tries < 100 * n:
                continue
            seen.add(a)
            out.append(a)
        return out

    def _ende_allowed(self, enc_n: int) -> tuple[int, ...]:
        ok = tuple(c for c in self.decoder_arbitrary_ende_attn_choice if n_ende_layers(c) <= enc_n)
        return ok or (-1,)

    def mutate(self, arch: Arch, rng: random.Random, prob: float = 0.3) -> Arch:
        """Each gene is redrawn from its choices with probability `prob` (HAT's mutation)."""
        g = self._genes(arch, rng)
        for key in ("encoder_embed_dim", "decoder_embed_dim", "encoder_layer_num", "decoder_layer_num"):
            if rng.random() < prob:
                g[key] = rng.choice(self.choices(key))
        for key in _ENCODER_LISTS + _DECODER_LISTS:
            g[key] = [rng.choice(self.choices(key)) if rng.random() < prob else v for v in g[key]]
        return self._from_genes(g)

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        """Each gene taken from either parent with equal chance (HAT's crossover)."""
        ga, gb = self._genes(a, rng), self._genes(b, rng)
        child: dict[str, Any] = {}
        for key in ga:
            if isinstance(ga[key], list):
                child[key] = [x if rng.random() < 0.5 else y for x, y in zip(ga[key], gb[key])]
            else:
                child[key] = ga[key] if rng.random() < 0.5 else gb[key]
        return self._from_genes(child)

    def _genes(self, arch: Arch, rng: random.Random) -> dict[str, Any]:
        """Full-depth gene lists, as HAT keeps them: inactive layers get random values."""
        g: dict[str, Any] = {k: getattr(arch, k) for k in _SCALARS}
        for side, lists in (("encoder", _ENCODER_LISTS), ("decoder", _DECODER_LISTS)):
            depth = self.max_encoder_layers if side == "encoder" else self.max_decoder_layers
            for key in lists:
                vals = list(getattr(arch, key))
                while len(vals) < depth:
                    vals.append(rng.choice(self.choices(key)))
                g[key] = vals[:depth] if len(vals) > depth else vals
        return g

    def _from_genes(self, g: dict[str, Any]) -> Arch:
        enc_n, dec_n = g["encoder_layer_num"], g["decoder_layer_num"]
        kw = dict(g)
        for key in _ENCODER_LISTS:
            kw[key] = tuple(g[key][:enc_n])
        for key in _DECODER_LISTS:
            kw[key] = tuple(g[key][:dec_n])
        allowed = self._ende_allowed(enc_n)
        kw["decoder_arbitrary_ende_attn"] = tuple(
            c if c in allowed else max(allowed, key=n_ende_layers) for c in kw["decoder_arbitrary_ende_attn"]
        )
        return Arch(qkv_dim=self.qkv_dim, **kw)

    # ---- named extremes ----
    def largest(self) -> Arch:
        return self._extreme(max)

    def smallest(self) -> Arch:
        return self._extreme(min)

    def _extreme(self, pick) -> Arch:
        enc_n = max(self.encoder_layer_num_choice) if pick is max else min(self.encoder_layer_num_choice)
        dec_n = pick(self.decoder_layer_num_choice)
        ende = pick(self._ende_allowed(enc_n), key=n_ende_layers)
        return Arch(
            encoder_embed_dim=pick(self.encoder_embed_choice),
            decoder_embed_dim=pick(self.decoder_embed_choice),
            encoder_layer_num=enc_n,
            decoder_layer_num=dec_n,
            encoder_ffn_embed_dim=(pick(self.encoder_ffn_embed_dim_choice),) * enc_n,
            encoder_self_attention_heads=(pick(self.encoder_self_attention_heads_choice),) * enc_n,
            decoder_ffn_embed_dim=(pick(self.decoder_ffn_embed_dim_choice),) * dec_n,
            decoder_self_attention_heads=(pick(self.decoder_self_attention_heads_choice),) * dec_n,
            decoder_ende_attention_heads=(pick(self.decoder_ende_attention_heads_choice),) * dec_n,
            decoder_arbitrary_ende_attn=(ende,) * dec_n,
            qkv_dim=self.qkv_dim,
        )

    def size(self) -> int:
        """Number of distinct archs in the space."""
        total = 0
        for enc_n in self.encoder_layer_num_choice:
            enc = (len(self.encoder_ffn_embed_dim_choice) * len(self.encoder_self_attention_heads_choice)) ** enc_n
            per_dec_layer = (
                len(self.decoder_ffn_embed_dim_choice)
                * len(self.decoder_self_attention_heads_choice)
                * len(self.decoder_ende_attention_heads_choice)
                * len(self._ende_allowed(enc_n))
            )
            dec = sum(per_dec_layer**n for n in self.decoder_layer_num_choice)
            total += enc * dec
        return total * len(self.encoder_embed_choice) * len(self.decoder_embed_choice)

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        for n in _CHOICE_FIELDS:
            d[n] = list(getattr(self, n))
        d["qkv_dim"] = self.qkv_dim
        if self.description:
            d["description"] = self.description
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        doc = {"format": SPACE_FORMAT, "version": FORMAT_VERSION, "space": self.to_dict()}
        path.write_text(json.dumps(doc, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(doc, sort_keys=False))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> "SearchSpace":
        w = _where(source)
        kw: dict[str, Any] = {"name": str(data.get("name") or (Path(source).stem if source else "custom"))}
        for n in _CHOICE_FIELDS:
            if n not in data:
                if n == "decoder_arbitrary_ende_attn_choice":
                    continue
                raise SpaceError(f"{w}missing field '{n}'")
            v = data[n]
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = [v]
            if not isinstance(v, list):
                raise SpaceError(f"{w}field '{n}' must be a list of integers, got {v!r}")
            kw[n] = tuple(_as_int(x, n, w) for x in v)
        if "qkv_dim" in data:
            kw["qkv_dim"] = _as_int(data["qkv_dim"], "qkv_dim", w)
        kw["description"] = str(data.get("description", ""))
        try:
            return cls(**kw)
        except SpaceError as e:
            raise SpaceError(f"{w}{e}") from None

    @classmethod
    def from_hat_dict(cls, data: dict[str, Any], source: str | None = None) -> "SearchSpace":
        mapped: dict[str, Any] = {}
        for n in _CHOICE_FIELDS:
            key = n.replace("_", "-")
            if key in data:
                mapped[n] = data[key]
        if "qkv-dim" in data:
            mapped["qkv_dim"] = data["qkv-dim"]
        mapped["name"] = Path(source).stem if source else "hat"
        return cls.from_dict(mapped, source)

    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        path = Path(path)
        data = _read_mapping(path)
        src = str(path)
        if "format" in data:
            if data["format"] != SPACE_FORMAT:
                raise SpaceError(f"{src}: field 'format' is {data['format']!r}, expected '{SPACE_FORMAT}'")
            _check_version(data, src)
            if not isinstance(data.get("space"), dict):
                raise SpaceError(f"{src}: missing field 'space'")
            return cls.from_dict(data["space"], src)
        if any(k.endswith("-choice") for k in data):
            return cls.from_hat_dict(data, src)
        return cls.from_dict(data, src)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
PRESETS: dict[str, SearchSpace] = {
    # HAT's WMT'14 En-De space ("space0"), SuperTransformer 640 / FFN 3072 / 8 heads / 6+6 layers.
    "hat-wmt": SearchSpace(
        name="hat-wmt",
        encoder_embed_choice=(640, 512),
        decoder_embed_choice=(640, 512),
        encoder_ffn_embed_dim_choice=(3072, 2048, 1024),
        decoder_ffn_embed_dim_choice=(3072, 2048, 1024),
        encoder_layer_num_choice=(6,),
        decoder_layer_num_choice=(6, 5, 4, 3, 2, 1),
        encoder_self_attention_heads_choice=(8, 4),
        decoder_self_attention_heads_choice=(8, 4),
        decoder_ende_attention_heads_choice=(8, 4),
        decoder_arbitrary_ende_attn_choice=(-1, 1, 2),
        qkv_dim=512,
        description="HAT space0 (WMT'14 En-De, WMT'14 En-Fr, WMT'19 En-De)",
    ),
    # HAT's IWSLT'14 De-En space ("space1").
    "hat-iwslt": SearchSpace(
        name="hat-iwslt",
        encoder_embed_choice=(640, 512),
        decoder_embed_choice=(640, 512),
        encoder_ffn_embed_dim_choice=(2048, 1024, 512),
        decoder_ffn_embed_dim_choice=(2048, 1024, 512),
        encoder_layer_num_choice=(6,),
        decoder_layer_num_choice=(6, 5, 4, 3, 2, 1),
        encoder_self_attention_heads_choice=(4, 2),
        decoder_self_attention_heads_choice=(4, 2),
        decoder_ende_attention_heads_choice=(4, 2),
        decoder_arbitrary_ende_attn_choice=(-1, 1, 2),
        qkv_dim=512,
        description="HAT space1 (IWSLT'14 De-En)",
    ),
    # Small enough to train and search on 2 CPU cores; the bundled demo model covers it.
    "demo": SearchSpace(
        name="demo",
        encoder_embed_choice=(256, 192),
        decoder_embed_choice=(256, 192),
        encoder_ffn_embed_dim_choice=(768, 512, 256),
        decoder_ffn_embed_dim_choice=(768, 512, 256),
        encoder_layer_num_choice=(3,),
        decoder_layer_num_choice=(3, 2, 1),
        encoder_self_attention_heads_choice=(4, 2),
        decoder_self_attention_heads_choice=(4, 2),
        decoder_ende_attention_heads_choice=(4, 2),
        decoder_arbitrary_ende_attn_choice=(-1, 1, 2),
        qkv_dim=256,
        description="CPU-sized space for the bundled demo SuperTransformer (En-De LibreOffice help)",
    ),
}


def get_space(name_or_path: str | Path) -> SearchSpace:
    """A preset by name, or a space file (hat-edge YAML/JSON or HAT `*-choice` YAML)."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    p = Path(key)
    if p.suffix in (".yml", ".yaml", ".json") or p.exists():
        return SearchSpace.load(p)
    raise SpaceError(f"unknown space '{key}': use one of {', '.join(PRESETS)} or a space file")


def load_arch(spec: str | Path, space: SearchSpace | None = None) -> Arch:
    """An arch file, or `smallest`/`largest` of a space, or a baseline name."""
    key = str(spec)
    if key in ("smallest", "largest"):
        if space is None:
            raise SpaceError(f"'{key}' needs a space")
        return space.smallest() if key == "smallest" else space.largest()
    if key in BASELINES:
        return BASELINES[key]
    return Arch.load(key)


def iter_feature_rows(archs: Iterable[Arch]) -> list[list[float]]:
    return [a.features() for a in archs]


def arch_key(arch: Arch) -> str:
    return arch.to_json()


def arch_id(arch: Arch) -> str:
    """A short name for an arch on screen: 8 hex digits of the sha256 of its JSON."""
    return hashlib.sha256(arch.to_json().encode()).hexdigest()[:8]


def with_depth(arch: Arch, decoder_layer_num: int, space: SearchSpace) -> Arch:
    """`arch` with its decoder cut or grown (new layers from the space's largest) to a depth."""
    g = space._genes(arch, random.Random(0))
    g["decoder_layer_num"] = decoder_layer_num
    return space._from_genes(g)


__all__ = [
    "Arch",
    "SearchSpace",
    "SpaceError",
    "PRESETS",
    "FEATURE_NAMES",
    "HAT_FEATURE_NORM",
    "BASELINES",
    "TRANSFORMER_BASE",
    "TRANSFORMER_BIG",
    "get_space",
    "load_arch",
    "n_ende_layers",
]


