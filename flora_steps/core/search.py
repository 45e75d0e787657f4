"""Evolutionary search over a filtered search space under a budget of MACs or of predicted latency.

A *genome* is one index per block into that block's allowed choices. A genome is
*legal* when its cost (``CostTable``: MACs, or milliseconds a latency table predicts)
lies in the budget band ``[low, high]``. The search follows
the paper (and AutoFormer, whose search it reuses): a stratified random initial
population, then per generation the ``top_k`` best genomes seen so far, new genomes
by mutation (each block resampled with probability ``mutation_prob``, by the
supernet's sampling probabilities as the released code does) and by crossover (each
layer's rank taken from one of two top-k parents, as released; a child whose mixed
tuple is not in its block's filtered choices is drawn again), and random legal
genomes to fill the population. Every genome is evaluated once (a cache of visited
genomes); fitness is any comparable score, higher is better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from .macs import CostModel
from .space import Choice, SearchSpace

Genome = tuple[int, ...]
Score = TypeVar("Score")


@dataclass(frozen=True)
class EvolutionSettings:
    """The search's knobs; the defaults are the paper's."""

    population: int = 50
    top_k: int = 10
    mutations: int = 25
    mutation_prob: float = 0.2
    crossovers: int = 25
    generations: int = 20
    tries: int = 50  # attempts at producing one new legal genome before giving up


#: A layer's cost at a rank (``None``: dense): its MACs (``CostModel.layer_macs``) or its predicted milliseconds
#: (``LatencyTable.layer_ms``).
LayerPrice = Callable[[str, int | None], float]


@dataclass(frozen=True)
class CostTable:
    """A genome's cost as a sum: a fixed part plus one entry per block's chosen tuple.

    The cost is MACs or predicted latency: whatever ``LayerPrice`` prices each layer at,
    with ``dense`` the dense model's total.
    """

    fixed: float
    blocks: tuple[np.ndarray, ...]

    @classmethod
    def from_space(cls, space: SearchSpace, price: LayerPrice, dense: float) -> CostTable:
        per_block = [
            np.array(
                [sum(price(name, rank) for name, rank in zip(block.layers, c, strict=True)) for c in block.choices]
            )
            for block in space.blocks
        ]
        searched = sum(price(name, None) for block in space.blocks for name in block.layers)
        return cls(dense - searched, tuple(per_block))

    @classmethod
    def of_macs(cls, space: SearchSpace, costs: CostModel) -> CostTable:
        """The MACs of the space's genomes."""
        return cls.from_space(space, costs.layer_macs, costs.dense_macs)

    def cost(self, genome: Genome) -> float:
        return float(self.fixed + sum(table[i] for table, i in zip(self.blocks, genome, strict=True)))

    @property
    def smallest(self) -> float:
        return float(self.fixed + sum(table.min() for table in self.blocks))

    @property
    def largest(self) -> float:
        return float(self.fixed + sum(table.max() for table in self.blocks))


@dataclass
class SearchResult(Generic[Score]):
    """The best genome, its score and cost, the ``top_k`` best genomes seen (best first), and one summary row per
    generation."""

    best: Genome
    score: Score
    cost: float
    evaluations: int
    top: list[Genome] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def genome_choices(space: SearchSpace, genome: Genome) -> list[Choice]:
    """The rank tuple of every block that a genome picks."""
    return [block.choices[i] for block, i in zip(space.blocks, genome, strict=True)]


def random_legal(rng: np.random.Generator, table: CostTable, low: float, high: float) -> Genome | None:
    """A random genome costing in ``[low, high]``, or ``None`` when this draw finds none.

    Blocks are visited in random order; each picks uniformly among its choices that
    leave the remaining blocks able to land in the window (by their min and max cost).
    """
    tables = table.blocks
    order = rng.permutation(len(tables))
    rest_min = np.concatenate([np.cumsum([tables[b].min() for b in order[::-1]])[::-1][1:], [0]])
    rest_max = np.concatenate([np.cumsum([tables[b].max() for b in order[::-1]])[::-1][1:], [0]])
    genome = [0] * len(tables)
    total = table.fixed
    for position, b in enumerate(order):
        after = total + tables[b]
        feasible = np.flatnonzero((after + rest_min[position] <= high) & (after + rest_max[position] >= low))
        if len(feasible) == 0:
            return None
        genome[b] = int(rng.choice(feasible))
        total += tables[b][genome[b]]
    return tuple(genome)


def stratified_population(
    rng: np.random.Generator, table: CostTable, low: float, high: float, size: int, tries: int
) -> list[Genome]:
    """``size`` distinct legal genomes, the i-th aimed at the i-th of ``size`` equal slices of the band.

    Plain random sampling piles up around the space's mean size; aiming each genome
    at its own slice spreads the population over the whole legal band.
    """
    edges = np.linspace(low, high, size + 1)
    population: list[Genome] = []
    seen: set[Genome] = set()
    for i in range(size):
        for attempt in range(tries):
            window = (edges[i], edges[i + 1]) if attempt < tries // 2 else (low, high)
            genome = random_legal(rng, table, *window)
            if genome is not None and genome not in seen:
                population.append(genome)
                seen.add(genome)
                break
    return population


def mutate(rng: np.random.Generator, genome: Genome, weights: Sequence[np.ndarray], probability: float) -> Genome:
    """Each block resampled with ``probability``, its choice drawn by that block's ``weights`` (probabilities)."""
    return tuple(
        int(rng.choice(len(p), p=p)) if rng.random() < probability else gene
        for gene, p in zip(genome, weights, strict=True)
    )


def crossover(rng: np.random.Generator, first: Genome, second: Genome) -> Genome:
    """Each block taken from either parent with equal probability."""
    return tuple(a if rng.random() < 0.5 else b for a, b in zip(first, second, strict=True))


def layer_crossover(
    rng: np.random.Generator, first: Genome, second: Genome, choices: Sequence[Sequence[Choice]]
) -> Genome | None:
    """Each layer's rank taken from either parent with equal probability (the released code's crossover);
    ``None`` when a block's mixed rank tuple is not one of its ``choices``."""
    child = []
    for a, b, block in zip(first, second, choices, strict=True):
        mixed = tuple(x if rng.random() < 0.5 else y for x, y in zip(block[a], block[b], strict=True))
        try:
            child.append(block.index(mixed))
        except ValueError:
            return None
    return tuple(child)


@dataclass(frozen=True)
class Operators:
    """What mutation and crossover draw from: each block's choice probabilities (mutation) and rank tuples
    (crossover per layer). ``None``: uniform mutation, crossover per block."""

    weights: tuple[np.ndarray, ...] | None = None
    choices: tuple[tuple[Choice, ...], ...] | None = None

    @classmethod
    def from_space(cls, space: SearchSpace, weights: Sequence[np.ndarray]) -> Operators:
        return cls(tuple(weights), tuple(tuple(block.choices) for block in space.blocks))


def evolve(
    table: CostTable,
    fitness: Callable[[Genome], Score],
    low: float,
    high: float,
    settings: EvolutionSettings,
    rng: np.random.Generator,
    on_generation: Callable[[dict], None] | None = None,
    operators: Operators = Operators(),
) -> SearchResult[Score]:
    """Search the genome with the highest ``fitness`` among those costing in ``[low, high]``.

    Raises ``ValueError`` when no genome of the space is legal.
    """
    if table.smallest > high or table.largest < low:
        raise ValueError(
            f"no subnet lies in the band [{low:.6g}, {high:.6g}]; "
            f"the space spans [{table.smallest:.6g}, {table.largest:.6g}]"
        )
    weights = operators.weights or tuple(np.full(len(t), 1 / len(t)) for t in table.blocks)
    cache: dict[Genome, Score] = {}

    def legal(genome: Genome) -> bool:
        return low <= table.cost(genome) <= high

    def add_new(candidates: list[Genome], count: int, make: Callable[[], Genome | None]) -> None:
        """Append up to ``count`` legal genomes from ``make``, each new to the cache and to ``candidates``."""
        for _ in range(count):
            for _ in range(settings.tries):
                genome = make()
                if genome is not None and genome not in cache and genome not in candidates and legal(genome):
                    candidates.append(genome)
                    break

    def cross(parents: list[Genome]) -> Genome | None:
        first, second = (parents[i] for i in rng.choice(len(parents), 2, replace=False))
        if operators.choices is None:
            return crossover(rng, first, second)
        return layer_crossover(rng, first, second, operators.choices)

    candidates = stratified_population(rng, table, low, high, settings.population, settings.tries)
    if not candidates:
        raise ValueError(f"found no legal subnet in the band [{low:.6g}, {high:.6g}]")
    top: list[Genome] = []
    history: list[dict] = []
    for generation in range(1, settings.generations + 1):
        for genome in candidates:
            if genome not in cache:
                cache[genome] = fitness(genome)
        top = sorted(set(top) | set(candidates), key=lambda g: cache[g], reverse=True)[: settings.top_k]
        history.append(
            {
                "generation": generation,
                "evaluations": len(cache),
                "best_cost": table.cost(top[0]),
                "best_genome": top[0],
            }
            | {"best": cache[top[0]], "top_k": [cache[g] for g in top]}
        )
        if on_generation is not None:
            on_generation(history[-1])
        if generation == settings.generations:
            break
        candidates = []  # one generation's new genomes: distinct from each other and from every earlier one
        add_new(
            candidates,
            settings.mutations,
            lambda parents=top: mutate(rng, parents[rng.integers(len(parents))], weights, settings.mutation_prob),
        )
        if len(top) > 1:
            add_new(candidates, settings.crossovers, lambda parents=top: cross(parents))
        add_new(
            candidates,
            settings.population - len(candidates),
            lambda best=top[0]: random_legal(rng, table, low, high) or best,
        )
    best = top[0]
    return SearchResult(best, cache[best], table.cost(best), len(cache), top, history)
