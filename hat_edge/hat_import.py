"""Import HAT's own checkpoints: a fairseq `TransformerSuperModel` file -> a hat-edge checkpoint.

HAT (mit-han-lab/hardware-aware-transformers, MIT) publishes its SuperTransformers
(`HAT_wmt14ende_super_space0.pt`, ...) and trained SubTransformers
(`HAT_wmt14ende_raspberrypi@6.9s_bleu@28.4.pt`, ...) as fairseq checkpoints: a pickled dict with
`args` (an `argparse.Namespace` holding the design space and the super sizes) and `model` (the
SuperTransformer-shaped state dict; a SubTransformer file has the same shapes, its arch given by
HAT's subtransformer YAML).

Where each key comes from in HAT's code:
- `fairseq/models/transformer_super.py`: `encoder.embed_tokens.weight` and `decoder.embed_tokens.weight`
  (`EmbeddingSuper`, `fairseq/modules/embedding_super.py`; one tensor saved twice with
  `--share-all-embeddings`), `decoder.embed_out` (without shared decoder input/output embeddings),
  `{encoder,decoder}.layers.N.{self_attn_layer_norm,final_layer_norm,fc1,fc2}.{weight,bias}`,
  `decoder.layers.N.encoder_attn_layer_norm.*`, the `version` buffers and
  `embed_positions._float_tensor` (sinusoids are rebuilt, never stored);
- `fairseq/modules/multihead_attention_super.py`: `*.self_attn.in_proj_weight` (3 x qkv_dim rows:
  q, k, v, over the super embed width), `in_proj_bias`, `out_proj.{weight,bias}` (`LinearSuper`);
  `encoder_attn` has the same fused layout when the encoder and decoder super widths are equal
  (HAT's spaces), else `q_proj_weight`, `k_proj_weight`, `v_proj_weight` + `in_proj_bias`.

The math matches hat-edge's SuperTransformer already (post-norm, sqrt(sampled dim) embedding
scale, super-width sinusoids sliced, arbitrary encoder-decoder attention, fairseq's positions at
pad + 1); import only renames and splits tensors, and checks every one. Ids stay fairseq's
(`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, `</s>` first in the decoder), the dictionaries, BPE codes
and Moses settings go inside the checkpoint (`FairseqTokenizer`).

Checkpoints are untrusted pickles: they are read with `torch.load(weights_only=True)` allowing one
class, `argparse.Namespace`; any other global (a function, a class, numpy objects) is refused
before anything of the file is used.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from hat_edge.checkpoint import save_checkpoint
from hat_edge.data.corpus import DataSpec
from hat_edge.data.fairseq import Dictionary
from hat_edge.data.fairseq_tokenizer import FairseqTokenizer
from hat_edge.errors import UserError
from hat_edge.model import ModelConfig, SuperTransformer
from hat_edge.space import CHOICE_FIELDS, Arch, SearchSpace

HAT_SOURCE = "fairseq TransformerSuperModel (HAT)"

# args -> our SearchSpace fields: HAT's argparse names (`add_args` in transformer_super.py) are ours
_SPACE_ARGS = CHOICE_FIELDS
# (arg, value hat-edge's model computes): anything else changes the math, so it is refused
_REQUIRED_ARGS = (
    ("encoder_normalize_before", False),
    ("decoder_normalize_before", False),
    ("encoder_learned_pos", False),
    ("decoder_learned_pos", False),
    ("no_token_positional_embeddings", False),
    ("vocab_original_scaling", False),
    ("adaptive_softmax_cutoff", None),
    ("activation_fn", "relu"),
)
_IGNORED_KEY = re.compile(r"^(encoder|decoder)\.(version|embed_positions\._float_tensor|embed_positions\.weights)$")


# ------------------------------------------------------------------------------------------------
# reading the file
# ------------------------------------------------------------------------------------------------
def read_fairseq_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, loaded without running any code: only argparse.Namespace is allowed."""
    p = Path(path)
    if p.is_symlink():
        raise UserError(f"{p}: is a symbolic link; pass the checkpoint file itself")
    if not p.is_file():
        raise UserError(f"{p}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            doc = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"global[^`'\"]*[`'\"]([\w.]+)", str(e))
        what = f"'{m.group(1)}'" if m else "a global object"
        raise UserError(f"{p}: refused: the pickle asks for {what}; a HAT checkpoint may hold only tensors, plain "
                        "data and argparse.Namespace (hat-edge never runs code from a checkpoint)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{p}: not a readable PyTorch checkpoint (corrupt or truncated: {e.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{p}: expected a fairseq checkpoint (a dict with 'args' and 'model'), got {type(doc).__name__}")
    for key in ("args", "model"):
        if key not in doc:
            raise UserError(f"{p}: missing field '{key}' (not a fairseq checkpoint)")
    if not isinstance(doc["args"], argparse.Namespace):
        raise UserError(f"{p}: field 'args' must be an argparse.Namespace, got {type(doc['args']).__name__}")
    state = doc["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{p}: field 'model' must map parameter names to tensors")
    return doc


def _arg(args: argparse.Namespace, name: str, where: str) -> Any:
    if not hasattr(args, name):
        raise UserError(f"{where}: args has no '{name}' (not a HAT TransformerSuperModel checkpoint?)")
    return getattr(args, name)


def _int_arg(args: argparse.Namespace, name: str, where: str) -> int:
    v = _arg(args, name, where)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise UserError(f"{where}: args.{name} must be a positive integer, got {v!r}")
    return v


def space_from_args(args: argparse.Namespace, where: str, name: str = "hat-import") -> tuple[SearchSpace, dict[str, int]]:
    """The design space (every choice list and qkv_dim) and HAT's super sizes, from `args`."""
    kw: dict[str, Any] = {}
    for n in _SPACE_ARGS:
        v = _arg(args, n, where)
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise UserError(f"{where}: args.{n} must be a non-empty list of integers, got {v!r}")
        kw[n] = tuple(v)
    for n, want in _REQUIRED_ARGS:
        got = getattr(args, n, want)
        if got != want:
            raise UserError(f"{where}: args.{n} is {got!r}; hat-edge's SuperTransformer computes {want!r} only")
    sup = {n: _int_arg(args, n, where) for n in (
        "encoder_embed_dim", "decoder_embed_dim", "encoder_ffn_embed_dim", "decoder_ffn_embed_dim",
        "encoder_layers", "decoder_layers")}
    qkv = getattr(args, "qkv_dim", None)
    if qkv is None:
        qkv = sup["decoder_embed_dim"]  # MultiheadAttentionSuper's default: the super embed width
        if sup["encoder_embed_dim"] != sup["decoder_embed_dim"]:
            raise UserError(f"{where}: args.qkv_dim is unset and the encoder/decoder widths differ; HAT needs qkv_dim")
    if isinstance(qkv, bool) or not isinstance(qkv, int) or qkv <= 0:
        raise UserError(f"{where}: args.qkv_dim must be a positive integer, got {qkv!r}")
    out_dim = getattr(args, "decoder_output_dim", sup["decoder_embed_dim"])
    if out_dim != sup["decoder_embed_dim"]:
        raise UserError(f"{where}: args.decoder_output_dim {out_dim} differs from decoder_embed_dim (a projection "
                        "hat-edge does not model)")
    for side, choices, big in (("encoder_embed_choice", kw["encoder_embed_choice"], sup["encoder_embed_dim"]),
                               ("decoder_embed_choice", kw["decoder_embed_choice"], sup["decoder_embed_dim"]),
                               ("encoder_ffn_embed_dim_choice", kw["encoder_ffn_embed_dim_choice"], sup["encoder_ffn_embed_dim"]),
                               ("decoder_ffn_embed_dim_choice", kw["decoder_ffn_embed_dim_choice"], sup["decoder_ffn_embed_dim"]),
                               ("encoder_layer_num_choice", kw["encoder_layer_num_choice"], sup["encoder_layers"]),
                               ("decoder_layer_num_choice", kw["decoder_layer_num_choice"], sup["decoder_layers"])):
        if max(choices) > big:
            raise UserError(f"{where}: args.{side} has {max(choices)}, more than the SuperTransformer's {big}")
    if kw["encoder_layer_num_choice"] != (sup["encoder_layers"],):
        # HAT keeps the skipped encoder layers as identities in `encoder_out_all`, so its
        # encoder-decoder attention over "the last 2-3 layers" would repeat the last active one.
        raise UserError(f"{where}: args.encoder_layer_num_choice is {list(kw['encoder_layer_num_choice'])}; hat-edge imports "
                        f"spaces with a fixed encoder depth (HAT's: [{sup['encoder_layers']}]) only")
    for n in ("encoder_attention_heads", "decoder_attention_heads"):
        _int_arg(args, n, where)  # the super head counts: checked (SearchSpace checks the choices against qkv_dim)
    space = SearchSpace(name=name, qkv_dim=qkv, description=f"imported from {HAT_SOURCE}", **kw)
    return space, sup


# ------------------------------------------------------------------------------------------------
# the state dict: HAT's keys -> hat-edge's
# ------------------------------------------------------------------------------------------------
def _expected_shapes(sup: dict[str, int], qkv: int, src_v: int, tgt_v: int, shared_all: bool,
                     shared_dec: bool, fused_ende: bool) -> dict[str, tuple[int, ...]]:
    E, D = sup["encoder_embed_dim"], sup["decoder_embed_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.embed_tokens.weight": (src_v, E),
        "decoder.embed_tokens.weight": (tgt_v, D),
    }
    if not (shared_all or shared_dec):
        shapes["decoder.embed_out"] = (tgt_v, D)

    def attn(prefix: str, q_in: int, kv_in: int, fused: bool) -> None:
        if fused:
            shapes[f"{prefix}.in_proj_weight"] = (3 * qkv, q_in)
        else:
            shapes[f"{prefix}.q_proj_weight"] = (qkv, q_in)
            shapes[f"{prefix}.k_proj_weight"] = (qkv, kv_in)
            shapes[f"{prefix}.v_proj_weight"] = (qkv, kv_in)
        shapes[f"{prefix}.in_proj_bias"] = (3 * qkv,)
        shapes[f"{prefix}.out_proj.weight"] = (q_in, qkv)
        shapes[f"{prefix}.out_proj.bias"] = (q_in,)

    def block(prefix: str, dim: int, ffn: int, norms: tuple[str, ...]) -> None:
        shapes[f"{prefix}.fc1.weight"] = (ffn, dim)
        shapes[f"{prefix}.fc1.bias"] = (ffn,)
        shapes[f"{prefix}.fc2.weight"] = (dim, ffn)
        shapes[f"{prefix}.fc2.bias"] = (dim,)
        for n in norms:
            shapes[f"{prefix}.{n}.weight"] = (dim,)
            shapes[f"{prefix}.{n}.bias"] = (dim,)

    for i in range(sup["encoder_layers"]):
        attn(f"encoder.layers.{i}.self_attn", E, E, True)
        block(f"encoder.layers.{i}", E, sup["encoder_ffn_embed_dim"], ("self_attn_layer_norm", "final_layer_norm"))
    for i in range(sup["decoder_layers"]):
        attn(f"decoder.layers.{i}.self_attn", D, D, True)
        attn(f"decoder.layers.{i}.encoder_attn", D, E, fused_ende)
        block(f"decoder.layers.{i}", D, sup["decoder_ffn_embed_dim"],
              ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"))
    return shapes


def convert_state(state: dict[str, torch.Tensor], model: SuperTransformer, sup: dict[str, int], qkv: int,
                  src_v: int, tgt_v: int, where: str) -> dict[str, torch.Tensor]:
    """HAT's state dict as hat-edge SuperTransformer weights; every key and shape checked."""
    cfg = model.cfg
    fused_ende = sup["encoder_embed_dim"] == sup["decoder_embed_dim"]
    want = _expected_shapes(sup, qkv, src_v, tgt_v, cfg.share_all_embeddings,
                            cfg.share_decoder_input_output_embed, fused_ende)
    keys = [k for k in state if not _IGNORED_KEY.match(k)]
    extra = sorted(set(keys) - set(want))
    if extra:
        raise UserError(f"{where}: unexpected key '{extra[0]}' in the state dict (not HAT's TransformerSuperModel "
                        f"with these args; {len(extra)} unexpected)")
    missing = [k for k in want if k not in state]
    if missing:
        raise UserError(f"{where}: missing key '{missing[0]}' in the state dict ({len(missing)} missing)")
    for k, shape in want.items():
        got = tuple(state[k].shape)
        if got != shape:
            hint = ""
            if k.endswith("embed_tokens.weight") or k == "decoder.embed_out":
                hint = " (the dictionary's size is the first number)"
            raise UserError(f"{where}: key '{k}' has shape {list(got)}, expected {list(shape)} from args{hint}")
        if not state[k].is_floating_point():
            raise UserError(f"{where}: key '{k}' is {state[k].dtype}, expected floating-point weights")
    f32 = {k: state[k].detach().to(torch.float32) for k in want}
    if cfg.share_all_embeddings and not torch.equal(f32["encoder.embed_tokens.weight"], f32["decoder.embed_tokens.weight"]):
        raise UserError(f"{where}: args.share_all_embeddings is set but encoder.embed_tokens and decoder.embed_tokens differ")

    E, D = model.super_dims
    ours: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        ours[name] = t.clone()

    if cfg.share_all_embeddings:
        put("embed_tokens.weight", f32["encoder.embed_tokens.weight"][:, : max(E, D)])
    else:
        put("encoder_embed_tokens.weight", f32["encoder.embed_tokens.weight"][:, :E])
        put("decoder_embed_tokens.weight", f32["decoder.embed_tokens.weight"][:, :D])
        if not cfg.share_decoder_input_output_embed:
            put("output_projection.weight", f32["decoder.embed_out"][:, :D])

    def attn(theirs: str, mine: str, q_in: int, kv_in: int, fused: bool) -> None:
        if fused:
            w = f32[f"{theirs}.in_proj_weight"]
            wq, wk, wv = w[:qkv], w[qkv : 2 * qkv], w[2 * qkv :]
        else:
            wq, wk, wv = (f32[f"{theirs}.{n}_proj_weight"] for n in "qkv")
        b = f32[f"{theirs}.in_proj_bias"]
        put(f"{mine}.q_proj.weight", wq[:, :q_in])
        put(f"{mine}.k_proj.weight", wk[:, :kv_in])
        put(f"{mine}.v_proj.weight", wv[:, :kv_in])
        put(f"{mine}.q_proj.bias", b[:qkv])
        put(f"{mine}.k_proj.bias", b[qkv : 2 * qkv])
        put(f"{mine}.v_proj.bias", b[2 * qkv :])
        put(f"{mine}.out_proj.weight", f32[f"{theirs}.out_proj.weight"][:q_in])
        put(f"{mine}.out_proj.bias", f32[f"{theirs}.out_proj.bias"][:q_in])

    def block(theirs: str, mine: str, dim: int, ffn: int, norms: tuple[str, ...]) -> None:
        put(f"{mine}.ffn.fc1.weight", f32[f"{theirs}.fc1.weight"][:ffn, :dim])
        put(f"{mine}.ffn.fc1.bias", f32[f"{theirs}.fc1.bias"][:ffn])
        put(f"{mine}.ffn.fc2.weight", f32[f"{theirs}.fc2.weight"][:dim, :ffn])
        put(f"{mine}.ffn.fc2.bias", f32[f"{theirs}.fc2.bias"][:dim])
        for n in norms:
            put(f"{mine}.{n}.weight", f32[f"{theirs}.{n}.weight"][:dim])
            put(f"{mine}.{n}.bias", f32[f"{theirs}.{n}.bias"][:dim])

    sp = model.space
    for i in range(sp.max_encoder_layers):
        attn(f"encoder.layers.{i}.self_attn", f"encoder_layers.{i}.self_attn", E, E, True)
        block(f"encoder.layers.{i}", f"encoder_layers.{i}", E, sp.max_encoder_ffn,
              ("self_attn_layer_norm", "final_layer_norm"))
    for i in range(sp.max_decoder_layers):
        attn(f"decoder.layers.{i}.self_attn", f"decoder_layers.{i}.self_attn", D, D, True)
        attn(f"decoder.layers.{i}.encoder_attn", f"decoder_layers.{i}.encoder_attn", D, E, fused_ende)
        block(f"decoder.layers.{i}", f"decoder_layers.{i}", D, sp.max_decoder_ffn,
              ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"))
    return ours


# ------------------------------------------------------------------------------------------------
# the whole import
# ------------------------------------------------------------------------------------------------
def import_hat(
    ckpt: str | Path,
    out: str | Path,
    *,
    src_dict: str | Path,
    tgt_dict: Optional[str | Path] = None,
    arch: Optional[str | Path] = None,
    bpe_codes: Optional[str | Path] = None,
    src_lang: str = "en",
    tgt_lang: str = "de",
    data: Optional[str | Path] = None,
    text_level: str = "bpe",
    moses: Optional[dict[str, bool]] = None,
    half: bool = False,
) -> dict[str, Any]:
    """Read a HAT checkpoint and its dictionaries (+ BPE codes, + a SubTransformer YAML), check
    everything, and write a hat-edge checkpoint at `out`. Returns a summary (the CLI's --json)."""
    p = Path(ckpt)
    doc = read_fairseq_checkpoint(p)
    args = doc["args"]
    where = str(p)
    space, sup = space_from_args(args, where, name=p.stem)
    shared_all = bool(getattr(args, "share_all_embeddings", False))
    shared_dec = shared_all or bool(getattr(args, "share_decoder_input_output_embed", False))

    sd = Dictionary.load(src_dict)
    td = Dictionary.load(tgt_dict) if tgt_dict is not None else None
    if shared_all and td is not None and td != sd:
        raise UserError(f"{tgt_dict}: args.share_all_embeddings needs one joint dictionary, but it differs from {src_dict}")
    tgt_v = len(td) if td is not None else len(sd)
    state = doc["model"]
    for key, d_path, n in (("encoder.embed_tokens.weight", src_dict, len(sd)),
                           ("decoder.embed_tokens.weight", tgt_dict if td is not None else src_dict, tgt_v)):
        t = state.get(key)
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] != n:
            raise UserError(f"{d_path}: the dictionary has {n} symbols (4 specials + {n - 4} lines), but {key} in "
                            f"{p} has {t.shape[0]} rows: not the dictionary this model was trained with")
    codes = None
    if bpe_codes is not None:
        from hat_edge.runtime.files import read_text

        codes = read_text(Path(bpe_codes), "no such BPE codes file", UserError)
    tokenizer = FairseqTokenizer(sd, td, src_lang, tgt_lang, codes, moses)
    if codes is not None:
        _ = tokenizer.pipeline  # validates the codes text now (one line naming its line)

    max_pos = min(int(getattr(args, "max_source_positions", 1024)), int(getattr(args, "max_target_positions", 1024)))
    cfg = ModelConfig(
        vocab_size=tgt_v,
        src_vocab_size=len(sd) if len(sd) != tgt_v else None,
        pad_id=Dictionary.pad_id,
        bos_id=Dictionary.eos_id,  # fairseq's decoder starts with </s>
        eos_id=Dictionary.eos_id,
        share_all_embeddings=shared_all,
        share_decoder_input_output_embed=shared_dec and not shared_all,
        dropout=float(getattr(args, "dropout", 0.1)),
        attention_dropout=float(getattr(args, "attention_dropout", 0.0)),
        max_positions=max_pos,
    )
    model = SuperTransformer(cfg, space)
    ours = convert_state(state, model, sup, space.qkv_dim, len(sd), tgt_v, where)
    model.load_state_dict(ours)
    sub_arch = None
    if arch is not None:
        sub_arch = Arch.load(arch)
        space.validate(sub_arch, str(arch))
    meta: dict[str, Any] = {
        "imported_from": {
            "file": p.name,
            "sha256": _sha256(p),
            "format": HAT_SOURCE,
            "src_dict": Path(src_dict).name,
            "tgt_dict": Path(tgt_dict).name if tgt_dict is not None else None,
            "bpe_codes": Path(bpe_codes).name if bpe_codes is not None else None,
            "arch": Path(arch).name if arch is not None else None,
            "args": {k: _plain(getattr(args, k)) for k in sorted(vars(args)) if _plain(getattr(args, k)) is not None},
        },
    }
    if data is not None:
        spec = DataSpec(str(Path(data).resolve()), kind="fairseq", src_lang=src_lang, tgt_lang=tgt_lang,
                        text_level=text_level)
        meta["data"] = spec.to_dict()
    path = save_checkpoint(out, model, tokenizer, space, arch=sub_arch, meta=meta, half=half)
    return {
        "version": 1,
        "out": str(path),
        "source": str(p),
        "space": space.to_dict(),
        "arch": sub_arch.to_dict() if sub_arch is not None else None,
        "vocab": {"src": len(sd), "tgt": tgt_v, "joint": td is None or td == sd},
        "share_all_embeddings": shared_all,
        "bpe": codes is not None,
        "data": meta.get("data"),
        "params": sum(t.numel() for t in ours.values()),
    }


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(v: Any) -> Any:
    """An args value as JSON-able plain data, or None (dropped) for anything else."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
        return list(v)
    return None


__all__ = ["import_hat", "read_fairseq_checkpoint", "space_from_args", "convert_state", "HAT_SOURCE"]
