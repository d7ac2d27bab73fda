"""Backends: an exported model as `encode` + a step function, on onnxruntime or TorchScript.

Runtime modules (onnxruntime, torch) are imported lazily, after a job's environment variables are
set, so a job can set OMP_NUM_THREADS and friends before the runtime reads them, and a board needs
only the runtime it uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .bundle import materialize_generated, read_manifest
from .decoding import StepFn, decode
from .errors import RunnerError
from .formats import DEVICES, ORT_OPT_LEVELS, RUNTIMES, TOPK_IDS, TOPK_INPUT, TOPK_VALUES



class Model:
    """An exported SubTransformer: `encode` once per source, then a step function per decode.

    encode(src (B,S) int64) -> list of encoder outputs [src_bias, cross_k_0, cross_v_0, ...] in the
    runtime's own array type; stepper(enc, rows_per_sentence) -> StepFn over B*rows rows, holding
    the self-attention key/value cache (per layer (N, H_l, t, hd_l)) between calls.
    """

    runtime: str = ""

    def __init__(self, manifest: dict):
        m = manifest["model"]
        self.manifest = manifest
        self.vocab_size = int(m["vocab_size"])
        # the encoder's vocabulary (separate source dictionary); the target's when not given
        self.src_vocab_size = int(m.get("src_vocab_size", self.vocab_size))
        self.pad_id = int(m.get("pad_id", 0))
        self.bos_id = int(m.get("bos_id", 2))
        self.eos_id = int(m.get("eos_id", 3))
        # per decoder layer (heads, head_dim) of the self-attention cache
        self.cache_spec: list[tuple[int, int]] = [(int(h), int(hd)) for h, hd in m["self_cache"]]

    def encode(self, src: np.ndarray) -> list:
        raise NotImplementedError

    def stepper(self, enc: list, rows: int) -> StepFn:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for queued device work (CUDA); a no-op on CPU."""


class OrtModel(Model):
    runtime = "onnxruntime"

    def __init__(self, bundle_dir: Path, manifest: dict, threads: Optional[int] = None,
                 device: str = "cpu", opt_level: str = "all"):
        super().__init__(manifest)
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerError("onnxruntime is not installed for this python (pip install onnxruntime)") from None
        self.ort = ort
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[opt_level]
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1  # one graph at a time: parallelism within ops only
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RunnerError("device 'cuda' needs onnxruntime-gpu with CUDAExecutionProvider; "
                                  f"available: {', '.join(ort.get_available_providers())}")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        g = manifest["graphs"]
        try:
            self.enc = ort.InferenceSession(str(bundle_dir / g["encoder"]["file"]), so, providers=providers)
            self.dec = ort.InferenceSession(str(bundle_dir / g["decoder_step"]["file"]), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise RunnerError(f"onnxruntime cannot load bundle {bundle_dir}: {str(e).splitlines()[0]}") from None
        self.enc_in = [i.name for i in self.enc.get_inputs()]
        self.dec_in = [i.name for i in self.dec.get_inputs()]
        self.dec_out = [o.name for o in self.dec.get_outputs()]
        # The search splits flat top-k indices by vocab_size: the manifest's must be the graph's.
        width = self.dec.get_outputs()[0].shape[-1] if self.dec.get_outputs()[0].shape else None
        if isinstance(width, int) and width != self.vocab_size:
            raise RunnerError(f"bundle {bundle_dir}: field 'model.vocab_size' is {self.vocab_size}, but the decoder "
                              f"graph scores {width} tokens")
        # Graphs with the search's TopK (exported since issue #17) return N x k values a step
        # instead of N x V log-probs; False runs them the older way (the bench measures both).
        self.search_in_graph = True

    def encode(self, src: np.ndarray) -> list:
        return self.enc.run(None, {self.enc_in[0]: np.ascontiguousarray(src, dtype=np.int64)})

    def stepper(self, enc: list, rows: int) -> StepFn:
        # Encoder outputs are per sentence; every beam row of a sentence reads the same ones.
        fixed = [np.repeat(x, rows, axis=0) if rows > 1 else x for x in enc]
        n = fixed[0].shape[0]
        cache = [np.zeros((n, h, 0, hd), dtype=np.float32) for h, hd in self.cache_spec for _ in (0, 1)]
        names = self.dec_in
        feed: Dict[str, np.ndarray] = {names[2 + i]: x for i, x in enumerate(fixed)}
        first_cache = 2 + len(fixed)
        n_cache = len(cache)
        position = np.zeros((1,), dtype=np.int64)
        identity = np.arange(n, dtype=np.int64)
        sess = self.dec
        out_names = self.dec_out
        # outputs by name: log-probs and the new caches, or the search's top-k and the caches
        full_out = out_names[: 1 + n_cache]
        topk_out = [TOPK_VALUES, TOPK_IDS, *out_names[1 : 1 + n_cache]]
        has_topk = TOPK_INPUT in names and TOPK_IDS in out_names and TOPK_VALUES in out_names
        if has_topk:
            feed[TOPK_INPUT] = np.ones((1,), dtype=np.int64)
        k_arrays: Dict[int, np.ndarray] = {}

        def run(tokens: np.ndarray, order: Optional[np.ndarray], wanted: List[str]) -> list:
            nonlocal cache
            if order is not None and not np.array_equal(order, identity):
                cache = [np.take(c, order, axis=0) for c in cache]
            feed[names[0]] = tokens.reshape(n, 1).astype(np.int64, copy=False)
            feed[names[1]] = position
            for i, c in enumerate(cache):
                feed[names[first_cache + i]] = c
            out = sess.run(wanted, feed)
            cache = out[len(wanted) - n_cache :]
            position[0] += 1
            return out

        def step(tokens: np.ndarray, order: Optional[np.ndarray]) -> np.ndarray:
            return run(tokens, order, full_out)[0]

        def topk(tokens: np.ndarray, order: Optional[np.ndarray], k: int) -> Tuple[np.ndarray, np.ndarray]:
            if k not in k_arrays:
                k_arrays[k] = np.array([k], dtype=np.int64)
            feed[TOPK_INPUT] = k_arrays[k]
            out = run(tokens, order, topk_out)
            return out[0], out[1]

        if has_topk and self.search_in_graph:
            step.topk = topk  # type: ignore[attr-defined]
            step.vocab_size = self.vocab_size  # type: ignore[attr-defined]
        return step


class TorchScriptModel(Model):
    runtime = "torchscript"

    def __init__(self, bundle_dir: Path, manifest: dict, threads: Optional[int] = None, device: str = "cpu"):
        super().__init__(manifest)
        try:
            import torch
        except ImportError:
            raise RunnerError("torch is not installed for this python (needed for TorchScript bundles)") from None
        self.torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        if device == "cuda" and not torch.cuda.is_available():
            raise RunnerError("device 'cuda' requested but torch.cuda.is_available() is False")
        self.device = torch.device(device)
        g = manifest["graphs"]
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.* says "use torch.export"
                self.enc = torch.jit.load(str(bundle_dir / g["encoder"]["file"]), map_location=self.device).eval()
                self.dec = torch.jit.load(str(bundle_dir / g["decoder_step"]["file"]), map_location=self.device).eval()
        except Exception as e:  # torch raises RuntimeError with multi-line text
            raise RunnerError(f"torch cannot load bundle {bundle_dir}: {str(e).splitlines()[0]}") from None

    def encode(self, src: np.ndarray) -> list:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(src, dtype=np.int64)).to(self.device)
            return list(self.enc(x))

    def stepper(self, enc: list, rows: int) -> StepFn:
        torch = self.torch
        fixed = [x.repeat_interleave(rows, dim=0) if rows > 1 else x for x in enc]
        n = fixed[0].shape[0]
        dev = self.device
        cache = [torch.zeros((n, h, 0, hd), dtype=torch.float32, device=dev)
                 for h, hd in self.cache_spec for _ in (0, 1)]
        position = torch.zeros((1,), dtype=torch.long, device=dev)
        identity = np.arange(n, dtype=np.int64)
        dec = self.dec

        def step(tokens: np.ndarray, order: Optional[np.ndarray]) -> np.ndarray:
            nonlocal cache, position
            with torch.inference_mode():
                if order is not None and not np.array_equal(order, identity):
                    idx = torch.from_numpy(order).to(dev)
                    cache = [c.index_select(0, idx) for c in cache]
                tok = torch.from_numpy(tokens.reshape(n, 1).astype(np.int64)).to(dev)
                out = dec(tok, position, *fixed, *cache)
                cache = list(out[1:])
                position = position + 1
                return out[0].float().cpu().numpy()

        return step

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def open_model(bundle_dir: Union[str, Path], threads: Optional[int] = None, device: str = "cpu",
               runtime: Optional[str] = None, ort_opt_level: str = "all",
               manifest: Optional[dict] = None) -> Model:
    """Load a checked bundle into its runtime. `runtime`, when given, must match the bundle's."""
    d = Path(bundle_dir)
    if manifest is None:
        manifest = read_manifest(d)
    have = manifest["runtime"]
    if runtime is not None and runtime != have:
        raise RunnerError(f"bundle {d} is for runtime '{have}', the job asks for '{runtime}'")
    if device not in DEVICES:
        raise RunnerError(f"device '{device}' is not supported; allowed: {', '.join(DEVICES)}")
    if have == "onnxruntime":
        if ort_opt_level not in ORT_OPT_LEVELS:
            raise RunnerError(f"ort_opt_level '{ort_opt_level}' not allowed: {', '.join(ORT_OPT_LEVELS)}")
        materialize_generated(d, manifest)
        return OrtModel(d, manifest, threads=threads, device=device, opt_level=ort_opt_level)
    if have == "torchscript":
        return TorchScriptModel(d, manifest, threads=threads, device=device)
    raise RunnerError(f"bundle {d}: field 'runtime' is {have!r}, allowed: {', '.join(RUNTIMES)}")


def pad_batch(sources: Sequence[Sequence[int]], pad_id: int) -> np.ndarray:
    """(B, S) int64, right-padded with pad_id (the model masks pad keys with its src_bias)."""
    if not sources or any(len(s) == 0 for s in sources):
        raise RunnerError("every source needs at least one token")
    width = max(len(s) for s in sources)
    out = np.full((len(sources), width), pad_id, dtype=np.int64)
    for i, s in enumerate(sources):
        out[i, : len(s)] = np.asarray(s, dtype=np.int64)
    return out


def translate(model: Model, sources: Union[Sequence[Sequence[int]], np.ndarray], beam: int = 5,
              max_len: Optional[int] = None, len_penalty: float = 1.0,
              fixed_steps: bool = False, min_len: int = 0) -> list[list[int]]:
    """Decode token-id sources (each ending with EOS) into target ids (no BOS, no EOS).

    max_len defaults to 2 * longest source + 10 steps, capped at the model's max_positions (as the
    host's hat_edge.model.decode).
    """
    src = sources if isinstance(sources, np.ndarray) else pad_batch(sources, model.pad_id)
    if max_len is None:
        max_len = min(2 * src.shape[1] + 10, int(model.manifest["model"].get("max_positions", 512)))
    enc = model.encode(src)
    step = model.stepper(enc, max(1, beam))
    return decode(step, src.shape[0], beam, model.bos_id, model.eos_id, max_len, len_penalty, fixed_steps,
                  min_len=min_len)


# ------------------------------------------------------------------------------------------------
# 4. measurement
