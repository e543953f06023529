"""The pruned flood (zgrid/flood.py): once a grid's topology has settled, a change reaches
every node once, along a shortest-path tree of its origin; wherever the nodes' views may
differ, it goes over every link."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import networkx as nx

from zgrid.core import PRUNED_FLOOD_AFTER_REPAIR_S, PRUNED_FLOOD_SETTLE_S, Core, Send
from zgrid.flood import FloodPruner
from zgrid.sim import LinkModel, Simulator, converged_sim
from zgrid.table import AdvertTable
from zgrid.wire import Advert, Adverts, UnlinkRequest

PING_INTERVAL_S = 0.25  # the simulator's default
# Changes are made this far from a ping round, so that no digest repair (whose adverts would
# be counted too) overlaps the few virtual milliseconds a change takes.
OFF_PING_S = 0.1


def settled_grid(edges: list[tuple[int, int]], seed: int = 1) -> Simulator:
    rng = random.Random(seed)
    n = 1 + max(max(e) for e in edges)
    sim = converged_sim(edges, [(rng.uniform(0, 10), rng.uniform(0, 10)) for _ in range(n)])
    sim.run_until(_off_ping(sim.now + PRUNED_FLOOD_SETTLE_S + PING_INTERVAL_S))
    return sim


def _off_ping(t: float) -> float:
    """The first instant at or after `t` that is OFF_PING_S past a ping round."""
    return math.ceil((t - OFF_PING_S) / PING_INTERVAL_S) * PING_INTERVAL_S + OFF_PING_S


def adverts_for_change(sim: Simulator, i: int, production: float) -> int:
    """Set node i's production; the adverts all nodes received until every node agrees."""
    def received() -> int:
        return sum(c.counters["adverts_received"] for c in sim.cores if c is not None)

    before = received()
    sim.set_value(i, production=production)
    assert sim.run_until_agreed(1.0, step_s=0.0005).agreed
    return received() - before


def test_in_a_settled_grid_a_change_reaches_every_node_once() -> None:
    graph = nx.random_regular_graph(4, 40, seed=5)
    sim = settled_grid(list(graph.edges))
    rng = random.Random(2)
    for _ in range(5):
        assert adverts_for_change(sim, rng.randrange(40), rng.uniform(0, 10)) == 40 - 1
        assert sim.check_agreement(strict=True).agreed
        sim.run_until(_off_ping(sim.now + PING_INTERVAL_S))


def test_in_a_settled_grid_a_change_reaches_each_node_along_a_shortest_path() -> None:
    graph = nx.random_regular_graph(4, 60, seed=8)
    sim = settled_grid(list(graph.edges))
    rng = random.Random(3)
    for origin in rng.sample(range(60), 5):
        sim.set_value(origin, production=rng.uniform(0, 10), track=True)
        assert sim.run_until_agreed(1.0, step_s=0.0005).agreed
        change = sim.changes[-1]
        assert change.converged_at_s is not None
        hops = nx.single_source_shortest_path_length(graph, origin)
        assert change.hops == dict(hops)
        sim.run_until(_off_ping(sim.now + PING_INTERVAL_S))


def test_a_change_right_after_a_link_went_away_goes_over_every_link() -> None:
    graph = nx.random_regular_graph(4, 40, seed=5)
    sim = settled_grid(list(graph.edges))
    a, b = next(iter(graph.edges))
    reply = sim.control(a, UnlinkRequest(sim.names[b]))
    assert reply is not None and reply.ok
    sim.run_until(sim.now + 0.01)  # the new topology is known everywhere, and not settled
    graph.remove_edge(a, b)
    assert adverts_for_change(sim, 7, 3.5) >= graph.number_of_edges()
    assert sim.check_agreement(strict=True).agreed


def test_after_a_repair_the_nodes_around_it_flood_in_full_for_a_while() -> None:
    graph = nx.random_regular_graph(4, 40, seed=5)
    sim = settled_grid(list(graph.edges))
    origin = 3
    lost_to = next(iter(graph[origin]))
    sim.set_link_model(origin, lost_to, LinkModel(sim.default_link.latency, loss=1.0))
    sim.set_value(origin, production=1.5)
    sim.run_until(sim.now + 0.002)  # everywhere but in the subtree of the lost copy
    sim.set_link_model(origin, lost_to, sim.default_link)
    assert not sim.check_agreement(strict=True).agreed
    assert sim.run_until_agreed(2.0).agreed  # pings, then a digest, repaired it
    sim.run_until(_off_ping(sim.now + PING_INTERVAL_S))
    assert adverts_for_change(sim, origin, 2.5) > 40 - 1  # the repair's neighbours flood
    sim.run_until(_off_ping(sim.now + PRUNED_FLOOD_AFTER_REPAIR_S + PING_INTERVAL_S))
    assert adverts_for_change(sim, origin, 3.5) == 40 - 1  # and then prune again


def _ring_of_five() -> tuple[Simulator, Core, Advert]:
    """n0 - n1 - n2 - n3 - n4 - n0, settled; node n1, and a newer version of n3's advert
    (n1's sibling n2 is one hop from n3, n1 and its sibling n0 are two)."""
    sim = settled_grid([(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)])
    one = sim.cores[1]
    assert one is not None
    held = one.table.get("n3")
    assert held is not None
    return sim, one, replace(held, seq=held.seq + 1, production=held.production + 1.0)


def _adverts_sent(core: Core, now: float) -> list[str]:
    return sorted(e.endpoint for e in core.flush(now)
                  if isinstance(e, Send) and isinstance(e.message, Adverts))


def test_a_version_from_the_sibling_nearer_its_origin_goes_only_farther() -> None:
    sim, one, newer = _ring_of_five()
    two = sim.cores[2]
    assert two is not None
    one.handle((b"n2",), Adverts("n2", two.config.nonce, (newer,)), sim.now)
    assert _adverts_sent(one, sim.now) == []  # n0 is as far from n3 as n1: n4 tells it


def test_a_version_from_a_sibling_no_nearer_its_origin_is_flooded_in_full() -> None:
    sim, one, newer = _ring_of_five()
    zero = sim.cores[0]
    assert zero is not None
    # In n1's view n0 would not have sent it (their views differ): n1 floods.
    one.handle((b"n0",), Adverts("n0", zero.config.nonce, (newer,)), sim.now)
    assert _adverts_sent(one, sim.now) == ["tcp://n2:7000"]


def _line_table(owner: str, ids: list[str]) -> AdvertTable:
    """The table of `owner` in a line of `ids`, every advert listing its neighbours."""
    table = AdvertTable(owner, 100)
    for k, origin in enumerate(ids):
        links = tuple(ids[j] for j in (k - 1, k + 1) if 0 <= j < len(ids))
        table.put(Advert(origin, 1, 1, 0.0, 0.0, links, f"tcp://{origin}:7000", 1))
    return table


def test_the_pruner_plans_only_once_the_topology_has_settled_and_the_island_is_small() -> None:
    table = _line_table("b", ["a", "b", "c", "d"])
    pruner = FloodPruner(max_nodes=4, settle_s=1.0)
    assert pruner.plan(table, ("a", "c"), now=0.0) is None  # it just moved
    plan = pruner.plan(table, ("a", "c"), now=1.0)
    assert plan is not None
    assert plan.children["d"] == 0b01 and plan.nearer["d"] == 0b10  # a hears d from b only
    assert plan.children["a"] == 0b10 and plan.nearer["a"] == 0b01
    assert plan.sender_is_nearer("c", "d") and not plan.sender_is_nearer("a", "d")
    table.put(Advert("e", 1, 1, 0.0, 0.0, ("d",), "tcp://e:7000", 1))
    table.put(Advert("d", 1, 2, 0.0, 0.0, ("c", "e"), "tcp://d:7000", 1))
    assert pruner.plan(table, ("a", "c"), now=1.5) is None  # moved again
    assert pruner.plan(table, ("a", "c"), now=2.5) is None  # settled, but 5 nodes > 4


def test_the_pruner_floods_in_full_for_the_hold_after_a_repair() -> None:
    table = _line_table("b", ["a", "b", "c", "d"])
    pruner = FloodPruner(max_nodes=4, settle_s=1.0)
    pruner.note(table, now=0.0)
    assert pruner.settled(table, now=1.0)
    pruner.stand_down(now=1.0, hold_s=10.0)
    assert not pruner.settled(table, now=10.9)
    assert pruner.settled(table, now=11.0)


def test_a_node_with_two_candidate_parents_hears_from_the_one_with_the_smaller_id() -> None:
    # a - b - d and a - c - d: d is two hops from a through b and through c.
    square = {"a": ("b", "c"), "b": ("a", "d"), "c": ("a", "d"), "d": ("b", "c")}
    plans = {}
    for owner in ("b", "c"):
        table = AdvertTable(owner, 100)
        for origin, links in square.items():
            table.put(Advert(origin, 1, 1, 0.0, 0.0, links, f"tcp://{origin}:7000", 1))
        pruner = FloodPruner(max_nodes=4, settle_s=1.0)
        pruner.note(table, now=0.0)
        plans[owner] = pruner.plan(table, ("a", "d"), now=1.0)
    assert plans["b"] is not None and plans["c"] is not None
    assert plans["b"].children["a"] == 0b10  # b is d's parent for a's adverts
    assert plans["c"].children["a"] == 0b00  # c is not: b's id is smaller
