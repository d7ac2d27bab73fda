"""The set-up every device job shares (`hat-edge run`, `hat-edge loop`, bench/search.py).

`prepare_job` does it once, in this order: host threads; the device profile; the device check
(connect + `runner.py env`: an unreachable device fails here, before any file is written); the
checkpoint; the profile's measurement settings matched to it; the output directory; the latency
store. The fitness is built on demand (`JobContext.fitness`): it reads the validation split.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

from hat_edge.errors import UserError
from hat_edge.search.evolution import CachedFitness
from hat_edge.search.fitness_store import FitnessStore
from hat_edge.search.loop import ProfileDevice

if TYPE_CHECKING:
    from hat_edge.checkpoint import Checkpoint
    from hat_edge.devices.profiles import DeviceProfile
    from hat_edge.latency.store import LatencyStore
    from hat_edge.space import SearchSpace

# Validation batches of at most this many tokens (padding included): length-sorted small batches
# waste little on padding. On CPU 1000 made the fitness 2.2x faster than 6000-token batches
# (100 demo sentences: 1.76 s vs 3.87 s per arch on a loaded 2-core machine), and 400 is 1.2x
# faster again at the search's 60 sentences (4 batches, 74% of the decoder's positions real tokens
# against 2 and 58%): 181 vs 230 ms per demo arch on 1 thread, 115 vs 137 on 2; the losses agree to
# 2e-7 (`bench/fitness_threads.py --max-tokens 1000,600,400,300,200 --sentences 60 --rounds 4`).
FITNESS_MAX_TOKENS = 400

Threads = Union[int, str, None]  # host torch threads: a count, "auto" (timed: TimedThreads) or None (torch's default)


def make_fitness(ckpt: Checkpoint, sentences: int, persist: FitnessStore | None = None,
                 threads: Threads = None) -> CachedFitness:
    """The search's fitness: validation loss of an arch inside the checkpoint's SuperTransformer.
    `persist`: losses computed before with the same fingerprint are read from it, new ones written.
    `threads="auto"`: the host's torch threads are chosen by timing (`TimedThreads`); else they are
    whatever `set_host_threads` set."""
    from hat_edge.evaluate import ValidLoss

    device = fitness_device()
    vl = ValidLoss(_on_fitness_device(ckpt), split="valid", max_sentences=sentences, max_tokens=FITNESS_MAX_TOKENS,
                   device=device)
    fn = TimedThreads(vl.compute, thread_choices()) if threads == "auto" and device == "cpu" else vl.compute
    return CachedFitness(fn, persist=persist.bind(vl.fingerprint()) if persist is not None else None)


def thread_choices() -> tuple[int, ...]:
    """What `--threads auto` chooses between: one thread, or every usable core (at most 4: the
    fitness's matmuls are small, more threads only wait on each other)."""
    import os

    try:
        usable = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    n = max(1, min(usable, 4))
    return (1,) if n == 1 else (1, n)


class TimedThreads:
    """The fitness on as many host threads as is fastest *now* (`--threads auto`), by timing.

    Every `probe_every`-th evaluation (from the second on: the first pays one-time costs) runs
    once with each choice, in alternating order, and the faster is used until the next probe. On
    this project's 2-core VM two threads made a demo arch's loss 1.8-2x faster on a quiet machine
    (115 vs 226 ms at 60 sentences, bench/fitness_threads.py) and 2.2x slower with one core busy
    (503 vs 233 ms), so neither fixed count is right for both; a probe costs one extra evaluation
    in `probe_every`. The value of each evaluation is the loss (thread counts change only the
    float summation order)."""

    def __init__(self, fn: Callable[[Any], float], choices: tuple[int, ...], probe_every: int = 32) -> None:
        if not choices or any(c < 1 for c in choices):
            raise ValueError(f"thread choices must be counts >= 1, got {choices}")
        self.fn, self.choices, self.probe_every = fn, tuple(choices), max(2, int(probe_every))
        self.current = self.choices[0]
        self.evaluations = 0
        self.probes: list[dict[int, float]] = []  # seconds per choice, one dict per probe

    def __call__(self, arch: Any) -> float:
        import torch

        self.evaluations += 1
        if len(self.choices) > 1 and self.evaluations % self.probe_every == 2 % self.probe_every:
            order = self.choices if len(self.probes) % 2 == 0 else self.choices[::-1]
            took: dict[int, float] = {}
            for n in order:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                v = self.fn(arch)
                took[n] = time.perf_counter() - t0
            self.probes.append(took)
            self.current = min(took, key=took.__getitem__)
        else:
            v = None
        torch.set_num_threads(self.current)
        return self.fn(arch) if v is None else v

    def describe(self) -> str:
        if not self.probes:
            return f"{self.current} thread(s)"
        last = ", ".join(f"{n} thread(s) {1000 * t:.0f} ms" for n, t in sorted(self.probes[-1].items()))
        return f"{self.current} thread(s), chosen by timing ({len(self.probes)} probe(s); last: {last})"


def fitness_device() -> str:
    """Where the fitness runs: CUDA when this host has it (HAT_EDGE_FITNESS_DEVICE=cpu keeps it on
    the CPU), else the CPU."""
    import os

    import torch

    want = os.environ.get("HAT_EDGE_FITNESS_DEVICE", "auto")
    if want not in ("auto", "cpu", "cuda"):
        raise UserError(f"HAT_EDGE_FITNESS_DEVICE={want!r}: allowed auto, cpu, cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("HAT_EDGE_FITNESS_DEVICE=cuda, but torch sees no CUDA device here")
    return "cuda" if want != "cpu" and torch.cuda.is_available() else "cpu"


def _on_fitness_device(ckpt: Checkpoint) -> Checkpoint:
    """On CUDA the fitness gets its own copy of the SuperTransformer, so the checkpoint's model (the
    one export and deploy cut SubTransformers from) stays on the CPU."""
    if fitness_device() == "cpu":
        return ckpt
    import copy

    return dataclasses.replace(ckpt, model=copy.deepcopy(ckpt.model).to("cuda"))


def set_host_threads(threads: Threads) -> None:
    """Torch threads on the host. On a busy 2-core machine one thread evaluated the fitness 3x
    faster than two (0.35 vs 0.99 s per arch), since oversubscribed threads wait on each other; on a
    quiet one two were 1.8x faster. "auto": left to the fitness (`TimedThreads`), which times both."""
    if threads == "auto":
        return
    if isinstance(threads, str) or (threads is not None and (isinstance(threads, bool) or threads < 0)):
        raise UserError(f"threads: expected 'auto' or a whole number >= 0, got {threads!r}")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def prepare_profile(profile: DeviceProfile, vocab_size: int | None, min_time_s: float | None = None,
                    min_repeats: int | None = None) -> DeviceProfile:
    """The profile with measurement settings matched to the model that will be deployed: the
    output projection and softmax grow with the vocabulary, so measurements of random-weight
    models use the checkpoint's vocabulary size, not the profile's default."""
    m = profile.measurement
    new = dataclasses.replace(
        m,
        vocab_size=m.vocab_size if vocab_size is None else int(vocab_size),
        min_time_s=m.min_time_s if min_time_s is None else float(min_time_s),
        min_repeats=m.min_repeats if min_repeats is None else int(min_repeats),
    )
    return profile if new == m else dataclasses.replace(profile, measurement=new)


@dataclass
class JobContext:
    """What `prepare_job` set up. Close it (or use it as a context manager) to close the store."""

    profile: DeviceProfile  # with the checkpoint's vocabulary and any measurement overrides
    env: Mapping[str, Any]  # the device's `runner.py env` JSON, from the check
    checkpoint: Checkpoint
    store: LatencyStore
    device: ProfileDevice  # the profile and the store, as the loop's Device
    check_s: float  # seconds until the device answered (profile loaded, device checked)
    load_s: float  # seconds loading the checkpoint and opening the store
    threads: Threads = 1  # host torch threads as asked ("auto": the fitness times its choices)
    _fitness_stores: list[FitnessStore] = dataclasses.field(default_factory=list, repr=False)

    @property
    def space(self) -> SearchSpace:
        return self.checkpoint.space

    def fitness(self, sentences: int, persist: str | Path | None = None) -> CachedFitness:
        """The search's fitness on `sentences` validation sentences (`make_fitness`); `persist`: a
        fitness cache file (`search.fitness_store`) whose losses a rerun reads instead of computing."""
        store = None
        if persist is not None:
            store = FitnessStore(persist)
            self._fitness_stores.append(store)
        return make_fitness(self.checkpoint, sentences, store, threads=self.threads)

    def close(self) -> None:
        self.device.close()  # the exports the job kept to time archs again
        self.store.close()
        for f in self._fitness_stores:
            f.close()
        self._fitness_stores.clear()

    def __enter__(self) -> JobContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare_job(
    profile: str | Path,
    checkpoint: str | Path,
    *,
    store: str | Path | None = None,
    out_dir: str | Path | None = None,
    threads: Threads = 1,
    trust_new_host: bool = False,
    min_time_s: float | None = None,
    min_repeats: int | None = None,
    announce: Callable[[DeviceProfile], None] | None = None,
    quantize: str | None = None,
) -> JobContext:
    """Set up a job on a device; see the module's docstring for the order.

    profile: a profile name or .toml file; checkpoint: a file or "demo". store: the latency store
    (default: `<out_dir>/latency.sqlite` with `out_dir`, else `DEFAULT_STORE_PATH`). out_dir:
    created (with its parents) before the store is opened. threads: host torch threads (None:
    torch's default). min_time_s / min_repeats override the profile's measurement settings.
    announce: called with the loaded profile just before the device is checked (a progress line).
    quantize: "int8" measures int8 bundles (the device's latencies are then int8 latencies).
    """
    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.devices.measure import device_env
    from hat_edge.devices.profiles import load_profile
    from hat_edge.latency.store import DEFAULT_STORE_PATH, LatencyStore

    t0 = time.perf_counter()
    set_host_threads(threads)
    prof = load_profile(profile)
    if announce is not None:
        announce(prof)
    env = device_env(prof, trust_new_host=trust_new_host)  # before any other work
    t1 = time.perf_counter()

    ckpt = load_checkpoint(checkpoint)
    prof = prepare_profile(prof, int(ckpt.model.cfg.vocab_size), min_time_s, min_repeats)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out-dir {out}: cannot create it ({e.strerror or e.__class__.__name__})") from None
    path = store if store is not None else (out / "latency.sqlite" if out is not None else DEFAULT_STORE_PATH)
    st = LatencyStore(path)
    return JobContext(profile=prof, env=env, checkpoint=ckpt, store=st, device=ProfileDevice(prof, st, quantize),
                      check_s=t1 - t0, load_s=time.perf_counter() - t1, threads=threads)


__all__ = ["FITNESS_MAX_TOKENS", "JobContext", "Threads", "TimedThreads", "make_fitness", "prepare_job",
           "prepare_profile", "set_host_threads", "thread_choices"]
