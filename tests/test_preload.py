"""The simulator's preload is a shortcut, not another protocol: a preloaded simulation holds
exactly what a cold start of the same grid converges to, on every node."""

from __future__ import annotations

import random

import pytest

from zgrid.sim import Simulator, build_graph, cold_start, preload_converged


@pytest.mark.parametrize(("topology", "nodes", "seed"), [
    ("random-regular", 60, 3), ("line", 12, 1), ("scale-free", 40, 5)])
def test_a_preloaded_and_a_cold_started_simulation_hold_the_same_tables(
        topology: str, nodes: int, seed: int) -> None:
    names, edges = build_graph(topology, nodes, 4, seed)
    rng = random.Random(seed)
    values = [(rng.uniform(0, 9), rng.uniform(0, 4)) if k % 7 else (0.0, 0.0)
              for k in range(nodes)]
    preloaded = Simulator(names, seed=seed)
    preload_converged(preloaded, edges, values)
    cold = Simulator(names, seed=seed + 1)
    assert cold_start(cold, edges, values, limit_s=30.0) is not None
    cold.run_until(cold.now + 0.01)
    for i, name in enumerate(names):
        a, b = preloaded.cores[i], cold.cores[i]
        assert a is not None and b is not None
        assert a.table.hash == b.table.hash, f"{name}: table hash"
        assert a.totals(preloaded.now) == b.totals(cold.now), f"{name}: totals"
        assert a.island(preloaded.now) == b.island(cold.now), f"{name}: island"
        assert a.own_advert.links == b.own_advert.links


def test_a_preloaded_simulation_runs_the_real_protocol_afterwards() -> None:
    names, edges = build_graph("random-regular", 30, 4, 2)
    sim = Simulator(names, seed=2)
    preload_converged(sim, edges, [(1.0, 0.5)] * 30)
    sim.set_value(4, 11.0, 0.25, track=True)
    sim.unlink(0, sorted(sim.adjacency[0])[0])
    assert sim.run_until_agreed(5.0).agreed
