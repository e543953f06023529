"""The deterministic simulator: many unmodified `Core`s, one event heap, one virtual clock.

What this package is for
========================

The core (zgrid/core.py) is sans-IO: events and the current time go in, effects come out.
This package plays the part of the network and the clock for thousands of cores in one
process, so the protocol can be tested under faults no loopback test can produce, and a grid
of 5,000 houses can be run on a laptop. One seed and the arguments fix the whole run: every
random choice (latency, loss, duplication, nonces, values, topology) comes from seeded
`random.Random` generators.

Which module holds what
=======================

- engine.py: `Simulator`: the event heap and virtual clock, node lifecycle (start, crash,
  restart, freeze, thaw), effect execution, the per-instant flush of the nodes that handled
  something, timers, and the observer hooks measurement is built on;
- network.py: `Latency`, `LinkModel`, `Network`: loss, duplication, reordering, per-link FIFO
  arrival and cut links: everything that decides if and when a sent message arrives;
- faults.py: `Fault`, `parse_fault`, and putting fault windows on a simulator's schedule;
- measurement.py: observers (`TraceHash`, `Convergence`: per-change and cold-start
  convergence, crossings), `check_agreement`, `percentile`;
- scenario.py: `Scenario`, topologies and input files, `cold_start`, `converged_sim`, and
  `run_scenario` (build, schedule, settle, report);
- preload.py: `preload_converged`, the one shortcut: start from an agreed state;
- day.py: Phase II's simulated day on real profiles (`load_day`, `run_day`), with
  profiles.py (demandlib and pvlib profile sources) and plots.py (the day's PNG);
- cli.py: the zgrid-sim command;
- errors.py: `SimError`.

What it must never do
=====================

- Duplicate protocol logic: it only moves messages and time. Links are made by feeding cores
  `LinkRequest`s; values change by `SetRequest`s. The one shortcut is `preload_converged`,
  which builds, with the public constructors `AdvertTable.converged` and `Core.converged`,
  the state a converged cold start leaves, so a 10,000-node run need not spend its budget on
  a cold start (see docs/simulator.md). Nothing here touches private names of zgrid.core.
- Read the wall clock inside the simulation logic (only `wall_s` and `loop_wall_s` are
  measured with it).
- Order events by iterating a set or dict of strings in a way that depends on PYTHONHASHSEED:
  events due at the same instant run in scheduling order, node order is the integer index.
- Let measurement change the run: observers only read, and with none attached the engine
  does no measurement work.
"""

from zgrid.sim.cli import format_table, sim_command
from zgrid.sim.engine import (
    CONTROL_CLIENT,
    ENDPOINT_PORT,
    SAMPLE_EVERY_MESSAGES,
    WIRE_MODES,
    Simulator,
    Stats,
)
from zgrid.sim.errors import SimError
from zgrid.sim.faults import Fault, parse_fault, schedule_faults
from zgrid.sim.measurement import (
    Agreement,
    Change,
    Convergence,
    Observer,
    TraceHash,
    check_agreement,
    percentile,
)
from zgrid.sim.network import DEFAULT_LATENCY_S, Latency, LinkModel, LinkStats, Network
from zgrid.sim.preload import preload_converged
from zgrid.sim.scenario import (
    COLD_START_MAX_NODES,
    EXACT_DIAMETER_MAX_NODES,
    NONDETERMINISTIC_KEYS,
    TOPOLOGIES,
    Scenario,
    build_graph,
    cold_start,
    converged_sim,
    graph_diameter,
    random_values,
    read_edge_list,
    read_values,
    run_scenario,
)

__all__ = [
    "COLD_START_MAX_NODES",
    "CONTROL_CLIENT",
    "DEFAULT_LATENCY_S",
    "ENDPOINT_PORT",
    "EXACT_DIAMETER_MAX_NODES",
    "NONDETERMINISTIC_KEYS",
    "SAMPLE_EVERY_MESSAGES",
    "TOPOLOGIES",
    "WIRE_MODES",
    "Agreement",
    "Change",
    "Convergence",
    "Fault",
    "Latency",
    "LinkModel",
    "LinkStats",
    "Network",
    "Observer",
    "Scenario",
    "SimError",
    "Simulator",
    "Stats",
    "TraceHash",
    "build_graph",
    "check_agreement",
    "cold_start",
    "converged_sim",
    "format_table",
    "graph_diameter",
    "parse_fault",
    "percentile",
    "preload_converged",
    "random_values",
    "read_edge_list",
    "read_values",
    "run_scenario",
    "schedule_faults",
    "sim_command",
]
