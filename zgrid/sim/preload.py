"""Preload: start a simulation from the state a converged cold start leaves, without running it.

What this file is for: `preload_converged`, the shortcut that lets a 10,000-node scenario
begin where a cold start would have ended (a cold start is quadratic: about 4 x 10^8 advert
deliveries at 10,000 nodes). It builds that state with the public constructors
`AdvertTable.converged` and `Core.converged`, so every core holds exactly what flooding would
have given it; tests/test_sim.py checks that a preloaded and a cold-started simulation of the
same grid hold the same table hash, totals and islands on every node.

What it must never do: be mistaken for the protocol path (everything after it, changes,
flooding, pings, faults, runs the real protocol), or reach into a core's private state.
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx

from zgrid.core import Core
from zgrid.sim.engine import Simulator
from zgrid.sim.errors import SimError
from zgrid.table import AdvertTable
from zgrid.wire import Advert

# A cold start (scenario.cold_start) makes one version of each node's advert when the Core is
# created, one more if its values are set, and one per link that comes up.
_SEQ_AT_BIRTH = 1


def cold_start_seq(values: tuple[float, float], degree: int) -> int:
    """The seq a node's advert has once a clean cold start has converged."""
    return _SEQ_AT_BIRTH + (1 if any(values) else 0) + degree


def preload_converged(sim: Simulator, edges: Sequence[tuple[int, int]],
                      values: Sequence[tuple[float, float]]) -> None:
    """Install, in fresh cores, the agreed state a cold start of `edges` with `values` leaves:
    every link UP, every core holding its island's current adverts (the same immutable
    `Advert` objects, shared, as with `--wire fast`), then `start` every core."""
    if sim.signed:
        raise SimError("a preloaded grid is not signed: run a signed simulation from a cold "
                       "start")
    n = sim.n
    neighbors: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges:
        neighbors[u].append(v)
        neighbors[v].append(u)
        sim.adjacency[u].add(v)
        sim.adjacency[v].add(u)
    configs = [sim._config(i) for i in range(n)]
    adverts = [Advert(sim.names[i], 1, cold_start_seq(values[i], len(neighbors[i])),
                      values[i][0], values[i][1],
                      tuple(sorted(sim.names[j] for j in neighbors[i])), sim.endpoints[i],
                      configs[i].nonce) for i in range(n)]
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(edges)
    for members in sorted((sorted(c) for c in nx.connected_components(graph)), key=lambda c: c[0]):
        # A node holds only what it could have heard: its own island's adverts.
        first = AdvertTable.converged(sim.names[members[0]],
                                      {sim.names[i]: adverts[i] for i in members},
                                      configs[members[0]].max_nodes)
        first.island(sim.now)  # computed once, shared by every copy below
        for i in members:
            table = first if i == members[0] else first.copy_for(sim.names[i])
            siblings = [(sim.names[j], sim.endpoints[j], configs[j].nonce)
                        for j in neighbors[i]]
            sim.cores[i] = Core.converged(configs[i], table, siblings, sim.now)
            sim.values[i] = values[i]
            sim.own[i] = adverts[i]  # so that start() is not mistaken for a bump
            if sim.convergence is not None:  # every member holds every member's advert
                sim.held_count[i] = len(members)
        if sim.convergence is not None:
            sim.held_total += len(members) ** 2
    for i in range(n):
        core = sim.cores[i]
        assert core is not None
        sim._handle(i, core.start(sim.now))
