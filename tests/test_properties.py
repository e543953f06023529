"""Property-based tests (hypothesis) of the protocol under the deterministic simulator.

Random topology, random sequences of sets, links, unlinks, lossy links, partitions, crashes,
restarts and freezes; then everything is healed and the grid runs to quiescence. Then:

- every node of each connected component reports the bit-identical total, equal to the true
  `math.fsum` over that component (and its island is exactly that component: no node counts a
  node it cannot reach);
- nothing persisted is lost across a crash (a restarted node has the values it acknowledged);
- messages per change never exceed what flooding needs: each advert version crosses each link
  direction at most once (when no anti-entropy repair ran), so at most 2 x edges per change;
- once the topology has settled, the flood is pruned to a tree: a change that reaches every
  node reaches each one exactly once (N - 1 messages), along a shortest path.

Profiles: "default" is fast (this whole file well under a minute on 2 cores, run by `make
test`); "soak" searches much deeper (`make soak` sets HYPOTHESIS_PROFILE=soak). These tests must
never open a socket or read the wall clock.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import networkx as nx
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from zgrid.core import PRUNED_FLOOD_SETTLE_S
from zgrid.sim import Latency, LinkModel, Simulator, cold_start

settings.register_profile("default", max_examples=120, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("soak", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

MAX_NODES = 7
HEAL_LIMIT_S = 40.0  # HELLO backoff tops out at 1 s; dead_after is 1 s: generous on purpose
# Until the pruned flood is on everywhere: a node notices that its topology moved at its next
# timer (one ping interval, 0.25 s, at most) and waits PRUNED_FLOOD_SETTLE_S from then.
SETTLE_S = PRUNED_FLOOD_SETTLE_S + 0.25 + 0.1

powers = st.one_of(
    st.sampled_from([0.0, 0.1, 0.2, 0.3, 1e-300, 5e-324, 1e9, 999999999.9999999, 123.456]),
    st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False),
)


@dataclass(frozen=True)
class Grid:
    n: int
    edges: tuple[tuple[int, int], ...]
    values: tuple[tuple[float, float], ...]
    seed: int


@st.composite
def grids(draw: st.DrawFn, min_nodes: int = 2, connected: bool = False) -> Grid:
    n = draw(st.integers(min_nodes, MAX_NODES))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    edges = set(draw(st.lists(st.sampled_from(pairs), max_size=2 * n)))
    if connected:  # a random spanning tree first, then the extra edges
        for j in range(1, n):
            edges.add((draw(st.integers(0, j - 1)), j))
    values = tuple(draw(st.tuples(powers, powers)) for _ in range(n))
    return Grid(n, tuple(sorted(edges)), values, draw(st.integers(0, 2**32 - 1)))


def node(n: int) -> st.SearchStrategy[int]:
    return st.integers(0, n - 1)


def operations(n: int) -> st.SearchStrategy[list[tuple[object, ...]]]:
    pair = st.tuples(node(n), node(n)).filter(lambda p: p[0] != p[1])
    op = st.one_of(
        st.tuples(st.just("set"), node(n), powers, powers),
        st.tuples(st.just("link"), pair),
        st.tuples(st.just("unlink"), pair),
        st.tuples(st.just("cut"), pair),
        st.tuples(st.just("restore"), pair),
        st.tuples(st.just("lossy"), pair, st.sampled_from([0.0, 0.1, 0.5, 1.0]),
                  st.sampled_from([0.0, 0.5])),
        st.tuples(st.just("crash"), node(n)),
        st.tuples(st.just("restart"), node(n)),
        st.tuples(st.just("freeze"), node(n)),
        st.tuples(st.just("thaw"), node(n)),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 1e-4, 0.01, 0.3, 1.5])),
    )
    return st.lists(op, max_size=25)


def link_up(sim: Simulator, i: int, j: int) -> bool:
    core = sim.cores[i]
    return core is not None and any(
        row["id"] == sim.names[j] and row["up"] for row in core.status(sim.now)["siblings"])


def start(grid: Grid, **options: object) -> Simulator:
    sim = Simulator([f"n{i}" for i in range(grid.n)], seed=grid.seed,
                    link=LinkModel(Latency("uniform", 20e-6, 200e-6)), **options)  # type: ignore[arg-type]
    converged = cold_start(sim, grid.edges, grid.values, limit_s=20.0)
    assert converged is not None, "cold start did not converge"
    return sim


@given(st.data())
def test_after_any_faults_and_healing_every_component_agrees_on_the_exact_total(
        data: st.DataObject) -> None:
    grid = data.draw(grids())
    sim = start(grid)
    if data.draw(st.booleans(), label="settle first"):  # the faults then hit a pruned flood
        sim.run_until(sim.now + SETTLE_S)
    ops = data.draw(operations(grid.n))
    acknowledged = {i: grid.values[i] for i in range(grid.n)}
    persisted_at_crash: dict[int, tuple[float, float, int]] = {}
    for op in ops:
        note(f"t={sim.now:.6f} {op}")
        kind = op[0]
        if kind == "set":
            _, i, p, c = op
            reply = sim.set_value(i, p, c)  # type: ignore[arg-type]
            if reply is not None and reply.ok:
                acknowledged[i] = (p, c)  # type: ignore[assignment]
        elif kind == "link":
            i, j = op[1]  # type: ignore[misc]
            sim.link(i, j)
        elif kind == "unlink":
            i, j = op[1]  # type: ignore[misc]
            # Operators unlink both ends, and only a link that is up: a knock (HELLO) still in
            # flight is, by design, a request to link.
            if (j in sim.adjacency[i] and sim.alive(i) and sim.alive(j)
                    and link_up(sim, i, j) and link_up(sim, j, i)):
                sim.unlink(i, j)
                sim.unlink(j, i)
        elif kind == "cut":
            sim.cut_links([op[1]])  # type: ignore[list-item]
        elif kind == "restore":
            sim.restore_links([op[1]])  # type: ignore[list-item]
        elif kind == "lossy":
            i, j = op[1]  # type: ignore[misc]
            sim.set_link_model(i, j, LinkModel(sim.default_link.latency, loss=op[2],  # type: ignore[arg-type]
                                               duplicate=0.2, reorder=op[3]))  # type: ignore[arg-type]
        elif kind == "crash":
            i = op[1]  # type: ignore[assignment]
            core = sim.cores[i]
            if core is not None:
                state = sim.persisted[i]
                assert state is not None
                assert (state.production, state.consumption) == acknowledged[i], \
                    "an acknowledged set was not persisted"
                persisted_at_crash[i] = (state.production, state.consumption, state.incarnation)
            sim.crash(i)
        elif kind == "restart":
            i = op[1]  # type: ignore[assignment]
            if sim.cores[i] is None:
                sim.restart(i)
                restarted = sim.cores[i]
                assert restarted is not None
                p, c, incarnation = persisted_at_crash[i]
                assert (restarted.production, restarted.consumption) == (p, c)
                assert restarted.incarnation > incarnation
        elif kind == "freeze":
            sim.freeze(op[1])  # type: ignore[arg-type]
        elif kind == "thaw":
            sim.thaw(op[1])  # type: ignore[arg-type]
        else:
            sim.run_until(sim.now + op[1])  # type: ignore[operator]
        sim.run_until(sim.now + 1e-4)

    sim.heal()
    agreement = sim.run_until_agreed(HEAL_LIMIT_S, strict=True)
    assert agreement.agreed, agreement.problems
    # Quiescent means it stays agreed, and nothing acknowledged was lost.
    sim.run_until(sim.now + 2.0)
    assert sim.check_agreement(strict=True).agreed
    for i, (p, c) in acknowledged.items():
        core = sim.cores[i]
        assert core is not None and (core.production, core.consumption) == (p, c)
    for comp in sim.components():
        expected = math.fsum(v for i in comp for v in (acknowledged[i][0], -acknowledged[i][1]))
        for i in comp:
            core = sim.cores[i]
            assert core is not None
            assert core.totals(sim.now)[0].hex() == expected.hex()


# (node, production, virtual seconds to the next set): changes close enough to overlap.
change_sets = st.lists(st.tuples(st.integers(0, MAX_NODES - 1), powers,
                                 st.sampled_from([0.0, 1e-5, 1e-4, 1e-3])),
                       min_size=1, max_size=12)


def make_changes(sim: Simulator, grid: Grid, sets: list[tuple[int, float, float]]) -> int:
    """Make the changes, tracked, and let them settle; the digests sent meanwhile."""
    def digests() -> int:
        return sum(c.counters["digests_sent"] for c in sim.cores if c is not None)

    before = digests()
    for i, p, gap in sets:
        sim.set_value(i % grid.n, p, None, track=True)
        sim.run_until(sim.now + gap)
    sim.run_until(sim.now + 0.05)
    assert sim.all_changes_settled()
    return digests() - before


@given(grid=grids(min_nodes=2, connected=True), sets=change_sets)
def test_each_change_crosses_each_link_direction_at_most_once(
        grid: Grid, sets: list[tuple[int, float, float]]) -> None:
    sim = start(grid, track_crossings=True)
    digests = make_changes(sim, grid, sets)
    edges = len(grid.edges)
    repairs_allowed = 0 if digests == 0 else 2 * edges * digests
    for change in sim.changes:
        assert change.messages <= 2 * edges + repairs_allowed, change
        if change.converged_at_s is not None:
            # Every member got it, and no faster path than the shortest one exists in hops
            # terms only when latency is constant; here it is jittered, so: at most n-1 hops.
            assert change.max_hops <= grid.n - 1
    if digests == 0:
        assert all(count == 1 for count in sim.crossings.values()), sim.crossings
    assert sim.check_agreement(strict=True).agreed


@given(grid=grids(min_nodes=2, connected=True), sets=change_sets)
def test_in_a_settled_grid_a_change_reaches_each_node_once_along_a_shortest_path(
        grid: Grid, sets: list[tuple[int, float, float]]) -> None:
    sim = start(grid)
    sim.run_until(sim.now + SETTLE_S)
    digests = make_changes(sim, grid, sets)
    assert sim.check_agreement(strict=True).agreed
    if digests:
        return  # a repair ran: its adverts are counted too
    graph = nx.Graph(grid.edges)
    graph.add_nodes_from(range(grid.n))
    for change in sim.changes:
        assert change.messages <= grid.n - 1, change
        if change.converged_at_s is not None:
            assert change.messages == grid.n - 1, change
            assert change.hops == nx.single_source_shortest_path_length(graph, change.origin)
