"""Scenarios: a whole run from its arguments to its summary, in four steps.

What this file is for
=====================

- inputs: topologies (networkx generators, or an edge list file) and node values (a CSV, or
  a seeded distribution);
- warm-up: `cold_start` (the protocol path: every node starts and is linked by `link`
  requests) and `converged_sim`, a cold-started simulator for tests and notebooks;
- `run_scenario`, in separate steps: `build` (graph, values, simulator, warm-up), `schedule`
  (the changes and the fault windows), `settle` (run until every change is accounted for,
  then check agreement) and `report` (the summary dict printed by zgrid-sim).

What it must never do
=====================

- Make a random choice outside the scenario's own generator (seeded by `Scenario.seed`) or
  the simulator's, or in an order that depends on anything but the arguments: the order of
  the draws is build_graph's seed, the values, the simulator's seed, then the change times,
  nodes and values. Changes are scheduled before faults (heap ties follow that order).
- Change the protocol's parameters to make a figure look better: it only reports.
- Read the wall clock except for the `wall_s` it reports.
"""

from __future__ import annotations

import csv
import math
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import networkx as nx

from zgrid import wire
from zgrid.sim.engine import Simulator, cyclic_gc_off
from zgrid.sim.errors import SimError
from zgrid.sim.faults import Fault, parse_fault, schedule_faults
from zgrid.sim.measurement import Agreement, Convergence, percentile
from zgrid.sim.network import Latency, LinkModel
from zgrid.sim.preload import preload_converged

TOPOLOGIES = ("line", "ring", "grid", "random-regular", "small-world", "scale-free", "edges")
EXACT_DIAMETER_MAX_NODES = 2000  # above this, nx.diameter (all-pairs BFS) costs minutes
COLD_START_MAX_NODES = 2000  # --start auto: above this, preload an agreed state instead
SETTLE_STEP_S = 0.05  # settle in small steps so the run stops soon after the last change
ANTI_ENTROPY_S = 3.0  # after heal: pings must mismatch twice, HELLO retries back off to 1 s
CHANGE_MAX_PRODUCTION_KW = 20.0
CHANGE_MAX_CONSUMPTION_KW = 8.0
# Keys of the summary that differ between runs of the same scenario (wall time, memory).
NONDETERMINISTIC_KEYS = ("memory_peak_mb", "wall_s", "loop_wall_s", "events_per_s",
                         "messages_per_s")


@dataclass(slots=True)
class Scenario:
    nodes: int = 100
    topology: str = "random-regular"
    degree: int = 4
    seed: int = 1
    changes: int = 100
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    latency: Latency = field(default_factory=Latency)
    faults: list[tuple[str, str]] = field(default_factory=list)  # (kind, START[-END]:TARGETS)
    edges_file: str | None = None
    values_file: str | None = None
    start: str = "auto"  # cold | preload | auto (cold up to COLD_START_MAX_NODES)
    wire_mode: str = "full"
    change_spacing_s: float = 0.005
    settle_s: float = 10.0
    cold_start_limit_s: float = 120.0
    strict: bool = False


# --------------------------------------------------------------------------------- inputs


def build_graph(topology: str, nodes: int, degree: int, seed: int,
                edges_file: str | None = None) -> tuple[list[str], list[tuple[int, int]]]:
    """Node ids and edges (index pairs) of a networkx-generated topology, or an edge list."""
    if topology not in TOPOLOGIES:
        raise SimError(f"unknown topology {topology!r}; one of {', '.join(TOPOLOGIES)}")
    if topology == "edges":
        if edges_file is None:
            raise SimError("--topology edges needs --edges FILE")
        return read_edge_list(edges_file)
    if nodes < 1:
        raise SimError("--nodes must be at least 1")
    graph: Any
    if topology == "line":
        graph = nx.path_graph(nodes)
    elif topology == "ring":
        graph = nx.cycle_graph(nodes)
    elif topology == "grid":
        rows = max(1, math.isqrt(nodes))
        grid = nx.grid_2d_graph(rows, -(-nodes // rows))
        keep = sorted(grid.nodes())[:nodes]  # row-major: trimming the last row keeps it connected
        graph = nx.convert_node_labels_to_integers(grid.subgraph(keep), ordering="sorted")
    elif topology == "random-regular":
        if degree >= nodes or (degree * nodes) % 2:
            raise SimError(f"random-regular needs degree < nodes and degree x nodes even "
                           f"(got degree {degree}, nodes {nodes})")
        graph = nx.random_regular_graph(degree, nodes, seed=seed)
    elif topology == "small-world":
        if not 2 <= degree < nodes:
            raise SimError(f"small-world needs 2 <= degree < nodes (got {degree}, {nodes})")
        graph = nx.connected_watts_strogatz_graph(nodes, degree, 0.1, seed=seed)
    else:
        m = max(1, degree // 2)
        if m >= nodes:
            raise SimError(f"scale-free needs degree/2 < nodes (got {degree}, {nodes})")
        graph = nx.barabasi_albert_graph(nodes, m, seed=seed)
    edges = sorted((min(u, v), max(u, v)) for u, v in graph.edges())
    return [f"n{i}" for i in range(nodes)], edges


def read_edge_list(path: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Lines `A B` (node ids; `#` comments). Ids are kept if valid, in order of appearance."""
    names: dict[str, int] = {}
    edges: set[tuple[int, int]] = set()
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split("#", 1)[0].split()
                if not parts:
                    continue
                if len(parts) != 2 or parts[0] == parts[1]:
                    raise SimError(f"{path}:{lineno}: expected two different node ids")
                ids = []
                for part in parts:
                    wire.check_node_id(part, lambda why, n=lineno: SimError(f"{path}:{n}: {why}"))
                    ids.append(names.setdefault(part, len(names)))
                edges.add((min(ids), max(ids)))
    except OSError as exc:
        raise SimError(f"cannot read edge list {path}: {exc.strerror}") from None
    if not names:
        raise SimError(f"{path}: no edges")
    return list(names), sorted(edges)


def read_values(path: str, names: Sequence[str]) -> list[tuple[float, float]]:
    """CSV `id,production,consumption` (header optional); unlisted nodes get 0, 0."""
    index = {name: i for i, name in enumerate(names)}
    out = [(0.0, 0.0)] * len(names)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or row[0].startswith("#") or (lineno == 1 and row[0] == "id"):
                    continue
                if len(row) != 3:
                    raise SimError(f"{path}:{lineno}: expected id,production,consumption")
                if row[0] not in index:
                    raise SimError(f"{path}:{lineno}: unknown node id {row[0]!r}")
                try:
                    values = [float(row[1]), float(row[2])]
                except ValueError:
                    raise SimError(f"{path}:{lineno}: numbers expected") from None
                checked = tuple(wire.check_power(v, lambda why, n=lineno: SimError(
                    f"{path}:{n}: {why}")) for v in values)
                out[index[row[0]]] = (checked[0], checked[1])
    except OSError as exc:
        raise SimError(f"cannot read values {path}: {exc.strerror}") from None
    return out


def random_values(rng: random.Random, n: int) -> list[tuple[float, float]]:
    """A few producers, many consumers; raw floats so exact summation is really exercised."""
    out = []
    for _ in range(n):
        production = rng.uniform(5.0, 50.0) if rng.random() < 0.2 else rng.uniform(0.0, 3.0)
        out.append((production, rng.uniform(0.2, 6.0)))
    return out


def graph_diameter(n: int, edges: Sequence[tuple[int, int]]) -> tuple[int, bool]:
    """Diameter of the largest component; exact up to EXACT_DIAMETER_MAX_NODES, else the
    2-sweep lower bound of networkx.algorithms.approximation (flagged as not exact)."""
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(edges)
    largest = max(nx.connected_components(graph), key=len)
    sub = graph.subgraph(largest)
    if len(largest) <= 1:
        return 0, True
    if len(largest) <= EXACT_DIAMETER_MAX_NODES:
        return int(nx.diameter(sub, usebounds=True)), True
    return int(nx.approximation.diameter(sub, seed=0)), False


# --------------------------------------------------------------------------------- warm-up


def cold_start(sim: Simulator, edges: Sequence[tuple[int, int]],
               values: Sequence[tuple[float, float]], limit_s: float = 60.0) -> float | None:
    """The protocol path: start every node at t=0 with its values, feed each edge (u, v) to u
    as a LinkRequest, and run until agreement (virtual seconds) or limit_s (None)."""
    convergence = _convergence(sim)
    for i in range(sim.n):
        sim.start_node(i, *values[i])
    for u, v in edges:
        sim.link(u, v)
    convergence.watch_for_cold_start()
    if convergence.cold_start_converged_s is None:
        sim.run_until(sim.now + limit_s, stop_when_converged=True)
    return convergence.cold_start_converged_s


def converged_sim(edges: Sequence[tuple[int, int]], values: Sequence[tuple[float, float]],
                  seed: int = 1, limit_s: float = 10.0, **options: Any) -> Simulator:
    """A simulator of len(values) nodes n0.. cold-started over `edges` until they agree
    (raises SimError if they do not within limit_s virtual seconds). For tests and notebooks."""
    sim = Simulator([f"n{i}" for i in range(len(values))], seed=seed, **options)
    if cold_start(sim, edges, values, limit_s) is None:
        raise SimError(f"no agreement within {limit_s} virtual seconds")
    sim.run_until(sim.now + 1e-3)  # let the last batch land everywhere
    return sim


def _convergence(sim: Simulator) -> Convergence:
    if sim.convergence is None:
        raise SimError("a cold start is watched by the simulator's Convergence observer: "
                       "build it with measure=True")
    return sim.convergence


# --------------------------------------------------------------------------------- the run


@dataclass(slots=True)
class Run:
    """One scenario once built: its inputs, the simulator, and what the steps found."""

    scenario: Scenario
    rng: random.Random  # the scenario's generator: topology seed, values, changes
    names: list[str]
    edges: list[tuple[int, int]]
    faults: list[Fault]
    diameter: int
    diameter_exact: bool
    start_mode: str
    sim: Simulator
    cold_start_s: float | None = None


def build(sc: Scenario, progress: Callable[[float, float], None] | None = None) -> Run:
    """The graph, the values, the faults (parsed), the simulator, and its warm-up: a cold
    start, or an agreed state preloaded."""
    rng = random.Random(sc.seed)
    names, edges = build_graph(sc.topology, sc.nodes, sc.degree, rng.randrange(2**32),
                               sc.edges_file)
    n = len(names)
    faults = [parse_fault(kind, text, names, edges) for kind, text in sc.faults]
    values = read_values(sc.values_file, names) if sc.values_file else random_values(rng, n)
    diameter, diameter_exact = graph_diameter(n, edges)
    start_mode = sc.start if sc.start != "auto" else (
        "cold" if n <= COLD_START_MAX_NODES else "preload")
    sim = Simulator(names, seed=rng.randrange(2**32), wire_mode=sc.wire_mode,
                    link=LinkModel(sc.latency, sc.loss, sc.duplicate, sc.reorder))
    if progress is not None:
        sim.progress = lambda now: progress(now, now)
    run = Run(sc, rng, names, edges, faults, diameter, diameter_exact, start_mode, sim)
    if start_mode == "cold":
        run.cold_start_s = cold_start(sim, edges, values, sc.cold_start_limit_s)
    elif start_mode == "preload":
        preload_converged(sim, edges, values)
    else:
        raise SimError("start must be cold, preload or auto")
    return run


def schedule(run: Run) -> float:
    """The changes (SetRequests at random nodes and times) and the fault windows, on the
    engine's clock from just after the warm-up; returns when the last of them happens."""
    sc, sim, rng = run.scenario, run.sim, run.rng
    n = len(run.names)
    t0 = sim.now + 0.01
    change_times = sorted(t0 + rng.uniform(0, sc.changes * sc.change_spacing_s)
                          for _ in range(sc.changes))
    for t in change_times:
        node = rng.randrange(n)
        production = rng.uniform(0.0, CHANGE_MAX_PRODUCTION_KW)
        consumption = rng.uniform(0.0, CHANGE_MAX_CONSUMPTION_KW)
        sim.at(t, partial(sim.set_value, node, production, consumption, True), node)
    last_fault = schedule_faults(sim, run.faults, t0)
    t_changes_end = change_times[-1] if change_times else t0
    return max(t_changes_end, last_fault)


def settle(run: Run, horizon: float) -> Agreement:
    """Run to the horizon, then (faults healed) until every change is accounted for, in
    small steps, plus anti-entropy time after faults or loss; then check agreement."""
    sc, sim = run.scenario, run.sim
    sim.run_until(horizon)
    deadline = horizon + sc.settle_s
    while sim.now < deadline and not sim.all_changes_settled():
        sim.run_until(min(deadline, sim.now + SETTLE_STEP_S))
    if sc.faults or sc.loss or sc.reorder:
        sim.run_until(min(deadline, sim.now + ANTI_ENTROPY_S))
    return sim.check_agreement(strict=sc.strict)


def report(run: Run, agreement: Agreement, wall_s: float) -> dict[str, Any]:
    """The summary of a run (docs/simulator.md describes every field)."""
    sc, sim = run.scenario, run.sim
    changes = sim.changes
    done = [c for c in changes if c.converged_at_s is not None and not c.superseded]
    conv = [c.converge_s for c in done if c.converge_s is not None]
    hops = [float(c.max_hops) for c in done]
    messages = [c.messages for c in done]
    byte_counts = [c.bytes for c in done]
    stats = sim.stats
    memory_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    loop_wall_s = sim.loop_wall_s
    return {
        "nodes": len(run.names),
        "edges": len(run.edges),
        "topology": sc.topology,
        "degree": sc.degree,
        "seed": sc.seed,
        "diameter": run.diameter,
        "diameter_exact": run.diameter_exact,
        "start": run.start_mode,
        "wire": sc.wire_mode,
        "cold_start_converge_s": run.cold_start_s,
        "changes": len(changes),
        "changes_converged": len(done),
        "changes_superseded": sum(c.superseded for c in changes),
        "converge_s_p50": percentile(conv, 50),
        "converge_s_p99": percentile(conv, 99),
        "converge_s_max": max(conv) if conv else None,
        "hops_p50": percentile(hops, 50),
        "hops_p99": percentile(hops, 99),
        "hops_max": max(hops) if hops else None,
        "changes_within_eccentricity_hops": sum(c.max_hops <= c.eccentricity for c in done),
        "messages_per_change": sum(messages) / len(messages) if messages else None,
        "messages_per_change_max": max(messages) if messages else None,
        "bytes_per_change": sum(byte_counts) / len(byte_counts) if byte_counts else None,
        "bytes_estimated": sc.wire_mode != "full",
        "delivered": stats.delivered,
        "lost": stats.lost,
        "duplicated": stats.duplicated,
        "reordered": stats.reordered,
        "dropped_cut": stats.dropped_cut,
        "events": stats.events,
        "virtual_s": sim.now,
        "agreed": agreement.agreed,
        "islands": agreement.islands,
        "problems": agreement.problems,
        "trace_hash": sim.trace_hash(),
        "memory_peak_mb": round(memory_peak_mb, 1),
        "wall_s": round(wall_s, 3),
        "loop_wall_s": round(loop_wall_s, 3),
        "events_per_s": round(stats.events / loop_wall_s) if loop_wall_s else None,
        "messages_per_s": round(stats.delivered / loop_wall_s) if loop_wall_s else None,
    }


def run_scenario(sc: Scenario, progress: Callable[[float, float], None] | None = None
                 ) -> dict[str, Any]:
    """Build, warm up (cold start or preload), make the changes under the faults, heal, check.

    progress(now, now) is called every few thousand events with the virtual time.
    """
    with cyclic_gc_off():
        wall_start = time.perf_counter()  # wall clock: measurement only
        run = build(sc, progress)
        agreement = settle(run, schedule(run))
        wall_s = time.perf_counter() - wall_start
        return report(run, agreement, wall_s)
