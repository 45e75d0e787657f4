"""Evolutionary search: legality, determinism, and closeness to a known optimum."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from flora_steps.core.macs import CostModel, LinearCost
from flora_steps.core.search import (
    CostTable,
    EvolutionSettings,
    crossover,
    evolve,
    layer_crossover,
    mutate,
    random_legal,
    stratified_population,
)
from flora_steps.core.space import BlockSpace, SearchSpace, full_space


def synthetic_table(seed: int = 0, blocks: int = 5, choices: int = 8) -> tuple[CostTable, list[np.ndarray]]:
    """Per-block MACs and per-block values where bigger choices are worth more, with noise."""
    rng = np.random.default_rng(seed)
    macs = [np.sort(rng.integers(10, 100, choices)) for _ in range(blocks)]
    values = [np.sqrt(m) + rng.normal(0, 0.8, choices) for m in macs]
    return CostTable(50, tuple(macs)), values


def best_by_brute_force(table: CostTable, values: list[np.ndarray], low: float, high: float) -> float:
    best = -np.inf
    for genome in itertools.product(*(range(len(m)) for m in table.blocks)):
        if low <= table.cost(genome) <= high:
            best = max(best, sum(v[i] for v, i in zip(values, genome, strict=True)))
    return best


def test_macs_table_matches_the_cost_model() -> None:
    layers = {f"blocks.{b}.{n}": LinearCost(64, 256, 17) for b in range(3) for n in ("mlp.fc1", "mlp.fc2")}
    costs = CostModel(layers | {"head": LinearCost(64, 10, 1)}, other_macs=1000, other_params=0)
    space = full_space({name: (64, 256) for name in layers}, [0.25, 0.5, 1.0])
    table = CostTable.of_macs(space, costs)
    rng = np.random.default_rng(0)
    for _ in range(20):
        genome = tuple(int(rng.integers(len(b.choices))) for b in space.blocks)
        ranks = space.ranks([b.choices[i] for b, i in zip(space.blocks, genome, strict=True)])
        assert table.cost(genome) == costs.macs(ranks)
    assert table.largest == costs.dense_macs


def test_random_legal_and_stratified_population_stay_in_the_band() -> None:
    table, _ = synthetic_table()
    low, high = 280, 300
    rng = np.random.default_rng(1)
    population = stratified_population(rng, table, low, high, size=30, tries=50)
    assert len(population) == len(set(population)) == 30
    sizes = [table.cost(g) for g in population]
    assert all(low <= s <= high for s in sizes)
    assert max(sizes) - min(sizes) >= 15  # spread over the band, not piled up in one spot
    assert random_legal(rng, table, 10_000, 20_000) is None


def test_mutation_and_crossover_only_mix_existing_choices() -> None:
    rng = np.random.default_rng(0)
    uniform = [np.full(4, 0.25)] * 4
    child = mutate(rng, (0, 1, 2, 3), uniform, probability=1.0)
    assert all(0 <= gene < 4 for gene in child)
    assert mutate(rng, (0, 1, 2, 3), uniform, probability=0.0) == (0, 1, 2, 3)
    assert all(gene in pair for gene, pair in zip(crossover(rng, (0, 0, 0), (1, 1, 1)), [(0, 1)] * 3, strict=True))


def test_mutation_draws_by_the_sampling_probabilities() -> None:
    rng = np.random.default_rng(0)
    weights = [np.array([0.7, 0.2, 0.1, 0.0])]
    draws = np.array([mutate(rng, (3,), weights, probability=1.0)[0] for _ in range(4000)])
    assert np.allclose(np.bincount(draws, minlength=4) / 4000, weights[0], atol=0.03)


def test_layer_crossover_mixes_ranks_per_layer_within_the_filtered_choices() -> None:
    choices = [((1, 1), (1, 2), (2, 1), (2, 2))]
    rng = np.random.default_rng(0)
    children = {layer_crossover(rng, (0,), (3,), choices) for _ in range(200)}
    assert children == {(0,), (1,), (2,), (3,)}  # (1,1) x (2,2): each layer from either parent
    without_mixes = [((1, 1), (2, 2))]
    assert {layer_crossover(rng, (0,), (1,), without_mixes) for _ in range(200)} == {(0,), (1,), None}


@pytest.mark.parametrize("band", [(250, 270), (300, 330), (360, 380)])
def test_search_gets_close_to_the_known_optimum_and_stays_legal(band: tuple[int, int]) -> None:
    table, values = synthetic_table()
    low, high = band
    seen = []

    def fitness(genome: tuple[int, ...]) -> float:
        assert low <= table.cost(genome) <= high, "only legal genomes are evaluated"
        seen.append(genome)
        return float(sum(v[i] for v, i in zip(values, genome, strict=True)))

    result = evolve(table, fitness, low, high, EvolutionSettings(), np.random.default_rng(0))
    optimum = best_by_brute_force(table, values, low, high)
    assert low <= result.cost <= high
    assert result.score >= optimum - 0.02 * abs(optimum)
    assert len(seen) == len(set(seen)) == result.evaluations  # the cache evaluates every genome once
    assert [row["generation"] for row in result.history] == list(range(1, 21))
    assert all(a["best"] <= b["best"] for a, b in itertools.pairwise(result.history))


def test_every_generation_evaluates_a_full_population_of_distinct_new_genomes() -> None:
    """Mutations, crossovers and random fill of one generation never repeat each other (8^8 genomes, wide band)."""
    table, values = synthetic_table(seed=1, blocks=8, choices=8)
    low, high = 0.3 * table.largest, 0.8 * table.largest
    evaluated_per_generation: list[set] = [set()]

    def fitness(genome: tuple[int, ...]) -> float:
        evaluated_per_generation[-1].add(genome)
        return float(sum(v[i] for v, i in zip(values, genome, strict=True)))

    def next_generation(_: dict) -> None:
        evaluated_per_generation.append(set())

    settings = EvolutionSettings(population=50, mutations=25, crossovers=25, generations=20, mutation_prob=0.05)
    result = evolve(table, fitness, low, high, settings, np.random.default_rng(0), next_generation)
    assert [len(g) for g in evaluated_per_generation[:-1]] == [50] * 20
    assert result.evaluations == 1000


def test_search_is_deterministic_per_seed() -> None:
    table, values = synthetic_table(seed=3)

    def fitness(genome: tuple[int, ...]) -> float:
        return float(sum(v[i] for v, i in zip(values, genome, strict=True)))

    settings = EvolutionSettings(population=20, generations=5)
    first = evolve(table, fitness, 280, 300, settings, np.random.default_rng(7))
    second = evolve(table, fitness, 280, 300, settings, np.random.default_rng(7))
    assert first.best == second.best and first.history == second.history


def test_search_refuses_a_band_outside_the_space() -> None:
    table, _ = synthetic_table()
    with pytest.raises(ValueError, match="no subnet lies in the band"):
        evolve(table, lambda g: 0.0, 1, 10, EvolutionSettings(), np.random.default_rng(0))


def test_search_stays_inside_a_filtered_space() -> None:
    block = BlockSpace("blocks.0", ("a", "b"), (8, 8), ((2, 2), (4, 8), (8, 8)))
    space = SearchSpace((block, BlockSpace("blocks.1", ("c", "d"), (8, 8), ((2, 4), (8, 8)))))
    costs = CostModel({name: LinearCost(8, 8, 1) for name in "abcd"}, other_macs=0, other_params=0)
    table = CostTable.of_macs(space, costs)
    result = evolve(table, lambda g: -table.cost(g), 0, costs.dense_macs, EvolutionSettings(), np.random.default_rng(0))
    choices = [b.choices[i] for b, i in zip(space.blocks, result.best, strict=True)]
    assert space.contains(choices) and choices == [(2, 2), (2, 4)]
