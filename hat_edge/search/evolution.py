"""HAT's evolutionary search, plus random search and a Pareto (loss vs latency) mode.

HAT's search (Wang et al., 2020, section 3.3): keep a population of SubTransformers that satisfy
the hardware constraint; each iteration keeps the `parents` with the lowest validation loss, then
refills the population with `mutations` children (each gene redrawn with probability
`mutation_prob`) and `crossovers` children (each gene from either of two parents), every child
resampled until it satisfies the constraint. The fitness is the validation loss a SubTransformer
inherits from the SuperTransformer; the constraint is the *predicted* latency (one predictor call
per batch of archs: predictors take lists).

Here the fitness and the latency are plain callables, so the search knows nothing about models or
devices:

    fitness:    Arch -> float            (lower is better; cached per arch)
    latency_fn: list[Arch] -> array ms   (vectorised; cached per arch)

The Pareto mode ranks the population by non-dominated sorting on (loss, latency) with crowding
distance (as NSGA-II) instead of loss alone, and returns the front of everything it evaluated.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from hat_edge.errors import UserError
from hat_edge.space import Arch, SearchSpace

FitnessFn = Callable[[Arch], float]
LatencyFn = Callable[[Sequence[Arch]], Any]  # list of archs -> (n,) latencies in ms
MemoryFn = Callable[[Arch], float]

SEARCH_FORMAT = "hat-edge-search"
SEARCH_VERSION = 1


# --------------------------------------------------------------------------------------------
# Settings and value objects
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvolutionSettings:
    """HAT's defaults (population 125 = 25 parents + 50 mutations + 50 crossovers, 30 iterations)."""

    population: int = 125
    parents: int = 25
    mutations: int = 50
    mutation_prob: float = 0.3
    crossovers: int = 50
    iterations: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("population", "parents", "iterations"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"search setting '{name}' must be an integer >= 1, got {v!r}")
        for name in ("mutations", "crossovers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise UserError(f"search setting '{name}' must be an integer >= 0, got {v!r}")
        if self.parents > self.population:
            raise UserError(
                f"search setting 'parents' ({self.parents}) must be <= 'population' ({self.population})"
            )
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise UserError(f"search setting 'mutation_prob' must be in [0, 1], got {self.mutation_prob}")

    @classmethod
    def small(cls, seed: int = 0) -> "EvolutionSettings":
        """A CPU-sized search for the demo space: the same shape as HAT's at about 1/5 the size."""
        return cls(population=40, parents=10, mutations=15, crossovers=15, iterations=10, seed=seed)

    @classmethod
    def quick(cls, seed: int = 0) -> "EvolutionSettings":
        """The main job's search on 2 CPU cores: HAT's shape at about 1/25 of its evaluations."""
        return cls(population=24, parents=6, mutations=9, crossovers=9, iterations=6, seed=seed)

    def evaluations_upper_bound(self) -> int:
        """Most fitness evaluations this search can make (fewer when archs repeat)."""
        return self.population + (self.iterations - 1) * (self.mutations + self.crossovers)


@dataclass(frozen=True)
class Constraints:
    """Hardware constraints; None means unconstrained."""

    latency_ms: float | None = None
    max_params: int | None = None
    max_memory_mb: float | None = None

    def __post_init__(self) -> None:
        for name in ("latency_ms", "max_params", "max_memory_mb"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise UserError(f"constraint '{name}' must be a positive number, got {v!r}")

    def describe(self) -> str:
        parts = []
        if self.latency_ms is not None:
            parts.append(f"latency <= {self.latency_ms:.1f} ms")
        if self.max_params is not None:
            parts.append(f"params <= {self.max_params / 1e6:.2f} M")
        if self.max_memory_mb is not None:
            parts.append(f"memory <= {self.max_memory_mb:.0f} MB")
        return ", ".join(parts) or "unconstrained"


@dataclass(frozen=True)
class Candidate:
    """One evaluated SubTransformer."""

    arch: Arch
    loss: float
    latency_ms: float
    params: int
    memory_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch.to_dict(),
            "loss": self.loss,
            "latency_ms": self.latency_ms,
            "params": self.params,
            "memory_mb": self.memory_mb,
        }


@dataclass(frozen=True)
class IterationStats:
    """The state after one iteration (evolution) or one batch of samples (random search)."""

    iteration: int
    evaluations: int  # distinct archs whose loss was asked for, so far
    best_loss: float  # best feasible loss so far
    best_latency_ms: float
    parents_mean_loss: float
    population: int


@dataclass(frozen=True)
class SearchResult:
    method: str  # "evolution" | "pareto" | "random"
    best: Candidate
    population: tuple[Candidate, ...]  # the final population, best first
    evaluated: tuple[Candidate, ...]  # every feasible arch evaluated, in order of first evaluation
    front: tuple[Candidate, ...]  # non-dominated (loss, latency) among `evaluated`, by latency
    history: tuple[IterationStats, ...]
    evaluations: int  # distinct fitness evaluations this search asked for
    latency_queries: int  # distinct archs whose latency was asked for
    wall_ms: float
    constraints: Constraints
    settings: EvolutionSettings | None = None

    def top(self, k: int) -> list[Candidate]:
        """The k lowest-loss feasible archs this search evaluated (distinct)."""
        return sorted(self.evaluated, key=_rank_key)[:k]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SEARCH_FORMAT,
            "version": SEARCH_VERSION,
            "method": self.method,
            "best": self.best.to_dict(),
            "front": [c.to_dict() for c in self.front],
            "history": [asdict(h) for h in self.history],
            "evaluations": self.evaluations,
            "latency_queries": self.latency_queries,
            "wall_ms": self.wall_ms,
            "constraints": asdict(self.constraints),
            "settings": asdict(self.settings) if self.settings else None,
        }


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------
class CachedFitness:
    """Caches a fitness callable per arch; share one across searches (the loss never changes).

    `calls` counts real evaluations (cache misses), the costly part of a search. `persist`: an
    object with `get(arch) -> float | None` and `put(arch, loss)` (`fitness_store.FitnessStore.bind`)
    that keeps the losses across runs; `reused` counts the archs it answered.
    """

    def __init__(self, fn: FitnessFn, persist: Any = None):
        self.fn = fn
        self.cache: dict[Arch, float] = {}
        self.calls = 0
        self.reused = 0
        self.persist = persist

    def __call__(self, arch: Arch) -> float:
        v = self.cache.get(arch)
        if v is None:
            v = self.persist.get(arch) if self.persist is not None else None
            if v is not None:
                self.reused += 1
            else:
                v = float(self.fn(arch))
                if not math.isfinite(v):
                    raise ValueError(f"fitness returned {v} for {arch.describe()}")
                self.calls += 1
                if self.persist is not None:
                    self.persist.put(arch, v)
            self.cache[arch] = v
        return v


class CachedLatency:
    """Caches a vectorised latency callable per arch; unknown archs go to it in one call."""

    def __init__(self, fn: LatencyFn):
        self.fn = fn
        self.cache: dict[Arch, float] = {}
        self.calls = 0

    def __call__(self, archs: Sequence[Arch]) -> np.ndarray:
        todo = list(dict.fromkeys(a for a in archs if a not in self.cache))
        if todo:
            ms = np.asarray(self.fn(todo), dtype=float).reshape(-1)
            if ms.shape[0] != len(todo):
                raise ValueError(f"latency function returned {ms.shape[0]} values for {len(todo)} archs")
            for a, v in zip(todo, ms):
                self.cache[a] = float(v)
            self.calls += 1
        return np.array([self.cache[a] for a in archs], dtype=float)


def estimate_memory_mb(
    arch: Arch,
    vocab_size: int,
    beam: int = 5,
    src_len: int = 30,
    steps: int = 30,
    bytes_per_value: int = 4,
) -> float:
    """Model memory while translating one sentence: weights + key/value caches + logits, in MB.

    An estimate of what the model itself holds (not the runtime's own footprint, which adds a
    roughly constant tens of MB). Embeddings are shared between encoder and decoder when their
    widths match, as in the SuperTransformer; the output projection is tied to the decoder's.
    """
    e, d, q = arch.encoder_embed_dim, arch.decoder_embed_dim, arch.qkv_dim
    emb = vocab_size * e if e == d else vocab_size * (e + d)
    weights = arch.params() + emb
    self_kv = arch.decoder_layer_num * 2 * beam * steps * q  # (beam, H, t, hd) per layer, k and v
    cross_kv = sum(2 * beam * src_len * arch.ende_layers(i) * q for i in range(arch.decoder_layer_num))
    acts = beam * vocab_size + src_len * max(e, max(arch.encoder_ffn_embed_dim))
    return (weights + self_kv + cross_kv + acts) * bytes_per_value / 2**20


# --------------------------------------------------------------------------------------------
# Feasibility
# --------------------------------------------------------------------------------------------
class _Judge:
    """Answers 'does this arch satisfy the constraints?' for batches, with the numbers behind it."""

    def __init__(self, latency: CachedLatency, constraints: Constraints, memory_fn: MemoryFn | None):
        if constraints.max_memory_mb is not None and memory_fn is None:
            raise UserError("a memory constraint needs a memory estimate (memory_fn); none was given")
        self.latency = latency
        self.c = constraints
        self.memory_fn = memory_fn
        self.asked: set[Arch] = set()

    def feasible(self, archs: Sequence[Arch]) -> list[bool]:
        if not archs:
            return []
        ok = [True] * len(archs)
        c = self.c
        # Cheap checks first so the (possibly costly) latency call sees only what survives.
        if c.max_params is not None:
            ok = [o and a.params() <= c.max_params for o, a in zip(ok, archs)]
        if c.max_memory_mb is not None:
            ok = [o and self.memory_fn(a) <= c.max_memory_mb for o, a in zip(ok, archs)]  # type: ignore[misc]
        if c.latency_ms is not None:
            idx = [i for i, o in enumerate(ok) if o]
            if idx:
                sub = [archs[i] for i in idx]
                self.asked.update(sub)
                ms = self.latency(sub)
                for i, v in zip(idx, ms):
                    ok[i] = bool(v <= c.latency_ms)
        return ok

    def latency_of(self, archs: Sequence[Arch]) -> np.ndarray:
        self.asked.update(archs)
        return self.latency(archs)

    def memory_of(self, arch: Arch) -> float | None:
        return float(self.memory_fn(arch)) if self.memory_fn is not None else None


def fastest_latency(
    space: SearchSpace, latency_fn: LatencyFn, n: int = 1000, seed: int = 0
) -> tuple[Arch, float]:
    """The fastest predicted SubTransformer: min over `space.smallest()` and n random samples."""
    archs = [space.smallest()] + space.sample_n(n, seed=seed + 7919)
    ms = np.asarray(latency_fn(archs), dtype=float).reshape(-1)
    i = int(np.argmin(ms))
    return archs[i], float(ms[i])


def check_constraints(
    space: SearchSpace,
    latency_fn: LatencyFn | None,
    constraints: Constraints,
    memory_fn: MemoryFn | None = None,
    n: int = 1000,
) -> None:
    """Raise UserError when no SubTransformer of `space` can meet a constraint."""
    small = space.smallest()
    if constraints.max_params is not None and small.params() > constraints.max_params:
        raise UserError(
            f"params limit {constraints.max_params / 1e6:.3f} M is below the smallest SubTransformer of "
            f"space '{space.name}' ({small.params() / 1e6:.3f} M); raise --max-params"
        )
    if constraints.max_memory_mb is not None and memory_fn is not None:
        m = memory_fn(small)
        if m > constraints.max_memory_mb:
            raise UserError(
                f"memory limit {constraints.max_memory_mb:.1f} MB is below the smallest SubTransformer of "
                f"space '{space.name}' ({m:.1f} MB); raise --max-memory-mb"
            )
    if constraints.latency_ms is not None and latency_fn is not None:
        arch, ms = fastest_latency(space, latency_fn, n=n)
        if ms > constraints.latency_ms:
            raise UserError(
                f"latency budget {constraints.latency_ms:.2f} ms is below the fastest SubTransformer of "
                f"space '{space.name}': predicted {ms:.2f} ms ({arch.describe()}); "
                f"use a budget of at least {math.ceil(ms * 100) / 100:.2f} ms"
            )


# --------------------------------------------------------------------------------------------
# Ranking helpers
# --------------------------------------------------------------------------------------------
def _rank_key(c: Candidate) -> tuple:
    # Loss first; ties by latency, then the canonical arch key, so that sorting is deterministic.
    return (c.loss, c.latency_ms, c.arch.to_json())


def dominates(a: Candidate, b: Candidate) -> bool:
    return a.loss <= b.loss and a.latency_ms <= b.latency_ms and (a.loss < b.loss or a.latency_ms < b.latency_ms)


def pareto_front(cands: Iterable[Candidate]) -> list[Candidate]:
    """Non-dominated candidates on (loss, latency), both minimised, sorted by latency.

    Sort by latency (then loss); a candidate is on the front iff its loss is strictly below every
    loss seen at lower latency. O(n log n).
    """
    uniq = {c.arch: c for c in cands}.values()
    out: list[Candidate] = []
    best = math.inf
    for c in sorted(uniq, key=lambda c: (c.latency_ms, c.loss, c.arch.to_json())):
        if c.loss < best:
            out.append(c)
            best = c.loss
    return out


def hypervolume(front: Iterable[Candidate], ref_loss: float, ref_latency_ms: float) -> float:
    """Area (loss x ms) dominated by a front and bounded by a reference point: larger is better."""
    area, prev = 0.0, ref_loss
    for c in pareto_front(front):
        if c.latency_ms < ref_latency_ms and c.loss < prev:
            area += (ref_latency_ms - c.latency_ms) * (prev - c.loss)
            prev = c.loss
    return area


def _nondominated_sort(cands: list[Candidate]) -> list[list[int]]:
    """Fronts of indices: front 0 is non-dominated, front 1 is non-dominated once 0 is removed..."""
    n = len(cands)
    dominated_by = [0] * n
    dominating: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(cands[i], cands[j]):
                dominating[i].append(j)
                dominated_by[j] += 1
            elif dominates(cands[j], cands[i]):
                dominating[j].append(i)
                dominated_by[i] += 1
    fronts: list[list[int]] = []
    cur = [i for i in range(n) if dominated_by[i] == 0]
    while cur:
        fronts.append(cur)
        nxt = []
        for i in cur:
            for j in dominating[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    nxt.append(j)
        cur = sorted(nxt)
    return fronts


def _crowding(cands: list[Candidate], idx: list[int]) -> dict[int, float]:
    """NSGA-II crowding distance inside one front: larger = more isolated = kept first."""
    dist = {i: 0.0 for i in idx}
    for key in (lambda c: c.loss, lambda c: c.latency_ms):
        order = sorted(idx, key=lambda i: key(cands[i]))
        lo, hi = key(cands[order[0]]), key(cands[order[-1]])
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi - lo <= 0:
            continue
        for k in range(1, len(order) - 1):
            dist[order[k]] += (key(cands[order[k + 1]]) - key(cands[order[k - 1]])) / (hi - lo)
    return dist


def _pareto_order(cands: list[Candidate]) -> list[Candidate]:
    out: list[Candidate] = []
    for front in _nondominated_sort(cands):
        crowd = _crowding(cands, front)
        out += [cands[i] for i in sorted(front, key=lambda i: (-crowd[i], _rank_key(cands[i])))]
    return out


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------
class _Run:
    """State shared by one search: caches, the feasibility judge, the archive of evaluated archs."""

    def __init__(
        self,
        space: SearchSpace,
        fitness: FitnessFn,
        latency_fn: LatencyFn | None,
        constraints: Constraints,
        memory_fn: MemoryFn | None,
        rng: random.Random,
    ):
        self.space = space
        self.fitness = fitness if isinstance(fitness, CachedFitness) else CachedFitness(fitness)
        if latency_fn is None:
            if constraints.latency_ms is not None:
                raise UserError("a latency budget needs a latency predictor; none was given")
            latency_fn = lambda archs: [math.nan] * len(archs)  # noqa: E731
        self.latency = latency_fn if isinstance(latency_fn, CachedLatency) else CachedLatency(latency_fn)
        self.judge = _Judge(self.latency, constraints, memory_fn)
        self.constraints = constraints
        self.rng = rng
        self.archive: dict[Arch, Candidate] = {}

    def evaluate(self, archs: Sequence[Arch]) -> list[Candidate]:
        """Loss (the costly part), latency and size of each arch; adds them to the archive."""
        new = [a for a in dict.fromkeys(archs) if a not in self.archive]
        if new:
            ms = self.judge.latency_of(new)
            for a, m in zip(new, ms):
                self.archive[a] = Candidate(
                    arch=a,
                    loss=self.fitness(a),
                    latency_ms=float(m),
                    params=a.params(),
                    memory_mb=self.judge.memory_of(a),
                )
        return [self.archive[a] for a in archs]

    def draw_feasible(
        self, make: Callable[[], Arch], n: int, exclude: set[Arch], max_tries: int
    ) -> list[Arch]:
        """Up to n distinct feasible archs from `make`, checked in batches (one predictor call each).

        HAT resamples each child until it satisfies the constraint; drawing a batch and keeping
        the feasible ones gives the same distribution with far fewer predictor calls.
        """
        out: list[Arch] = []
        seen = set(exclude)
        tries = 0
        while len(out) < n and tries < max_tries:
            batch_n = min(max(2 * (n - len(out)), 16), max_tries - tries)
            batch = [make() for _ in range(batch_n)]
            tries += batch_n
            fresh = []
            for a in batch:
                if a not in seen:
                    seen.add(a)
                    fresh.append(a)
            for a, ok in zip(fresh, self.judge.feasible(fresh)):
                if ok and len(out) < n:
                    out.append(a)
        return out

    def stats(self, iteration: int, parents: list[Candidate], population: int) -> IterationStats:
        best = min(self.archive.values(), key=_rank_key)
        return IterationStats(
            iteration=iteration,
            evaluations=len(self.archive),
            best_loss=best.loss,
            best_latency_ms=best.latency_ms,
            parents_mean_loss=float(np.mean([c.loss for c in parents])) if parents else math.nan,
            population=population,
        )


def _initial_population(run: _Run, n: int, seeds: Sequence[Arch] = ()) -> list[Arch]:
    space, rng = run.space, run.rng
    # Seeds first (e.g. the best archs a previous round measured), if they satisfy the constraints.
    seeds = [a for a in dict.fromkeys(seeds) if space.contains(a)][:n]
    pop = [a for a, ok in zip(seeds, run.judge.feasible(seeds)) if ok]
    pop += run.draw_feasible(lambda: space.sample(rng), n - len(pop), set(pop), max_tries=200 * n)
    if len(pop) < n:
        # A tight budget leaves few feasible archs: random samples rarely hit them. Grow the
        # population from what is feasible (the smallest arch always is, once checked) by mutation.
        seeds = pop or [a for a in [space.smallest()] if run.judge.feasible([a])[0]]
        if not seeds:
            raise UserError(
                f"no SubTransformer of space '{space.name}' satisfies {run.constraints.describe()}"
            )
        pop = list(dict.fromkeys(pop + seeds))
        pop += run.draw_feasible(
            lambda: space.mutate(rng.choice(pop), rng, 0.3), n - len(pop), set(pop), max_tries=200 * n
        )
    return pop


def evolution_search(
    space: SearchSpace,
    fitness: FitnessFn,
    latency_fn: LatencyFn | None,
    constraints: Constraints = Constraints(),
    settings: EvolutionSettings = EvolutionSettings(),
    *,
    pareto: bool = False,
    memory_fn: MemoryFn | None = None,
    progress: bool = False,
    check: bool = True,
    seeds: Sequence[Arch] = (),
) -> SearchResult:
    """HAT's evolutionary search; `pareto=True` ranks by (loss, latency) fronts instead of loss.

    seeds: archs placed in the first population (when they satisfy the constraints), the rest
    sampled; the loop passes the best archs measured so far, so a round never loses them.
    Raises UserError when the constraints exclude every SubTransformer (checked before any
    fitness evaluation), quoting the fastest predicted latency.
    """
    t0 = time.perf_counter()
    s = settings
    rng = random.Random(s.seed)
    run = _Run(space, fitness, latency_fn, constraints, memory_fn, rng)
    if check:
        check_constraints(space, run.latency, constraints, memory_fn)

    pop = run.evaluate(_initial_population(run, s.population, seeds))
    history: list[IterationStats] = []
    bar = _progress(s.iterations, "evolution", progress)
    for it in range(s.iterations):
        ranked = _pareto_order(pop) if pareto else sorted(pop, key=_rank_key)
        parents = ranked[: s.parents]
        history.append(run.stats(it, parents, len(pop)))
        bar.update(1)
        bar.set_postfix(best_loss=f"{history[-1].best_loss:.4f}", evals=history[-1].evaluations)
        if it == s.iterations - 1:
            pop = ranked
            break
        parent_archs = [c.arch for c in parents]
        taken = set(parent_archs)
        muts = run.draw_feasible(
            lambda parents=parent_archs: space.mutate(rng.choice(parents), rng, s.mutation_prob),
            s.mutations, taken, max_tries=100 * max(s.mutations, 1),
        )
        taken.update(muts)
        cross = run.draw_feasible(
            lambda parents=parent_archs: space.crossover(rng.choice(parents), rng.choice(parents), rng),
            s.crossovers, taken, max_tries=100 * max(s.crossovers, 1),
        )
        pop = run.evaluate(parent_archs + muts + cross)
    bar.close()
    evaluated = tuple(run.archive.values())
    best = min(evaluated, key=_rank_key)
    return SearchResult(
        method="pareto" if pareto else "evolution",
        best=best,
        population=tuple(pop),
        evaluated=evaluated,
        front=tuple(pareto_front(evaluated)),
        history=tuple(history),
        evaluations=len(run.archive),
        latency_queries=len(run.judge.asked),
        wall_ms=(time.perf_counter() - t0) * 1e3,
        constraints=constraints,
        settings=settings,
    )


def random_search(
    space: SearchSpace,
    fitness: FitnessFn,
    latency_fn: LatencyFn | None,
    constraints: Constraints = Constraints(),
    evaluations: int = 100,
    seed: int = 0,
    *,
    memory_fn: MemoryFn | None = None,
    record_every: int | None = None,
    check: bool = True,
) -> SearchResult:
    """Uniform samples that satisfy the constraints, `evaluations` distinct fitness evaluations.

    The baseline for the evolution at an equal number of fitness evaluations.
    """
    if evaluations < 1:
        raise UserError(f"random search needs at least 1 evaluation, got {evaluations}")
    t0 = time.perf_counter()
    rng = random.Random(seed)
    run = _Run(space, fitness, latency_fn, constraints, memory_fn, rng)
    if check:
        check_constraints(space, run.latency, constraints, memory_fn)
    archs = _initial_population(run, evaluations)
    step = record_every or max(1, evaluations // 30)
    history: list[IterationStats] = []
    for i in range(0, len(archs), step):
        chunk = run.evaluate(archs[i : i + step])
        history.append(run.stats(len(history), chunk, len(chunk)))
    evaluated = tuple(run.archive.values())
    best = min(evaluated, key=_rank_key)
    return SearchResult(
        method="random",
        best=best,
        population=tuple(sorted(evaluated, key=_rank_key)),
        evaluated=evaluated,
        front=tuple(pareto_front(evaluated)),
        history=tuple(history),
        evaluations=len(run.archive),
        latency_queries=len(run.judge.asked),
        wall_ms=(time.perf_counter() - t0) * 1e3,
        constraints=constraints,
        settings=None,
    )


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, leave=False)


__all__ = [
    "Candidate",
    "CachedFitness",
    "CachedLatency",
    "Constraints",
    "EvolutionSettings",
    "IterationStats",
    "SearchResult",
    "check_constraints",
    "dominates",
    "estimate_memory_mb",
    "evolution_search",
    "fastest_latency",
    "hypervolume",
    "pareto_front",
    "random_search",
]
