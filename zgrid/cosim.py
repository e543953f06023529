"""zgrid in mosaik co-simulations: a mosaik simulator (mosaik-api-v3) whose entities are nodes.

What this file is for
=====================

`ZgridSim` puts a zgrid grid into a mosaik scenario next to the scenario's other simulators
(load profiles, PV, a power-flow model ...). Each entity is one zgrid node. At every step the
adapter gives each node the `production` and `consumption` (kW) the other simulators computed
for it, waits until the grid has agreed on them, and answers `get_data` with the grid's
agreed decision for that step: the island's `total_net`, `imbalance_kw`, `balanced_net_kw`
(the net once every activation is applied), `clearing_price`, `shortfall_kw` and each node's
own `activation_kw`.

Two modes, chosen by the `mode` sim parameter:

- ``"nodes"``: real zgrid-node processes, driven over the control protocol (zgrid/client.py).
  Either the adapter starts them itself (on 127.0.0.1, free ports, linked in the `topology`
  given, with each entity's offer or device, stopped in `finalize`), or each entity names an
  existing node by `endpoint`. After a step's inputs are set the adapter polls every node's
  `status` until all agree (same island, same `total_net`, same `clearing_hash`, the total
  the inputs add up to, the activations flooded) or `agree_timeout_s` (wall seconds) passes.
- ``"sim"``: the in-process simulator (zgrid/sim/engine.py): the same unmodified cores under
  a virtual clock that follows mosaik's (mosaik second t is virtual second t0 + t, t0 being
  where the cold start ended). Deterministic from `seed`, no processes, fast.

Device entities (`Battery`, `Plant`, `PV`, `Load`, or `Node` with a `device` table; the models
of zgrid/devices.py) make the offers. By default (``device_clock="mosaik"``) the adapter runs
the model itself on mosaik's clock: each step it advertises the device's offer as the node's
plain offer (`flex`, when it moved enough to be worth a flood, as a node's own device step
decides), and once the grid has agreed it integrates the node's activation over the step (a
battery's charge moves by what a 15-minute step at that power moves it). Both modes take
exactly the same requests, so they decide the same, to the bit. With ``device_clock="node"``
(started nodes only) each node gets the device file (`zgrid-node --device`) and runs it on its
own wall clock, as in the field.

The agreement test is `disagreement`, a pure function of the nodes' statuses, shared by both
modes. README.md ("Using zgrid in a mosaik scenario") lists the parameters and attributes.

What it must never do
=====================

- Decide anything a node decides: the totals, the clearing and the activations are read from
  the nodes' own status; the adapter adds numbers up only to check that the grid holds them.
- Answer `get_data` with a view the grid has not agreed on: missing the deadline is a
  `CosimError` that says what still differed, never stale or mixed outputs.
- Wait without a bound or leave a process behind: every wait has a deadline and a round
  count; the nodes it starts are stopped in `finalize`, at interpreter exit, and (Linux) by the
  kernel if this process dies.
- Start a node anywhere but 127.0.0.1, or read the wall clock in "sim" mode.
"""

from __future__ import annotations

import atexit
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias

try:
    import mosaik_api_v3
    from mosaik_api_v3.types import (
        CreateResult,
        InputData,
        Meta,
        ModelDescription,
        ModelName,
        OutputData,
        OutputRequest,
        SimId,
        Time,
    )
except ImportError as exc:  # the optional extra: say how to get it
    raise ImportError("zgrid.cosim needs mosaik-api-v3: pip install 'zgrid[mosaik]'") from exc

import zmq

from zgrid.client import Client
from zgrid.devices import (
    DEVICE_KINDS,
    Battery,
    Device,
    base_values,
    load_devices,
    meaningful_change,
)
from zgrid.errors import ControlError, NoReply, ZgridError
from zgrid.harness import HOST, ControlFleet, NodeProc, free_port
from zgrid.wire import (
    NO_FLEX,
    ControlRequest,
    Flex,
    FlexRequest,
    NodesRequest,
    Reply,
    SetRequest,
    StatusRequest,
    check_node_id,
    check_power,
    check_price,
    parse_sibling_address,
)

if TYPE_CHECKING:
    from zgrid.sim.engine import Simulator

MODES = ("nodes", "sim")
DEVICE_CLOCKS = ("mosaik", "node")
TOPOLOGIES = ("ring", "line", "star", "full")
DEFAULT_STEP_S = 900  # a quarter hour, the resolution of the standard load profiles
AGREE_TIMEOUT_S = 10.0  # "nodes": wall seconds a step may wait for the grid to agree
# "nodes": pause between two rounds of status requests. Not shorter: every round is a status
# reply from every node, and asking 22 nodes every 5 ms took the CPU their floods needed (the
# demo's steps agreed in 80 ms median; every 20 ms, in 40 ms).
AGREE_POLL_S = 0.02
START_TIMEOUT_S = 30.0  # "nodes": wall seconds for started nodes to answer and form islands
STARTING_REPLY_S = 0.2  # one round of asking nodes that are still starting
STATUS_TIMEOUT_S = 2.0  # one control request
STOP_TIMEOUT_S = 5.0  # a node's clean stop (SIGTERM) before it is killed
AGREE_TOLERANCE_KW = 1e-6  # float rounding of summed activations; anything larger is real
SIM_PING_INTERVAL_S = 20.0  # "sim": liveness is not what a co-simulation measures (as day.py)
SIM_DEAD_AFTER_S = 60.0
DEAD_AFTER_PINGS = 4  # a sibling silent for this many ping intervals is down (if not given)
SIM_LATENCY = "60e-6"  # "sim": one hop on a LAN, as zgrid-sim --latency
SIM_SLICE_S = 0.001  # "sim": virtual seconds run between two agreement checks
SIM_START_LIMIT_S = 60.0  # "sim": virtual seconds the cold start may take
NODE_LOG_LEVEL = "info"  # started nodes log events, not every message
NODE_LOG_TAIL_CHARS = 600  # how much of a failed node's log an error quotes

POWER_INPUTS = ("production", "consumption", "flex_up_kw", "flex_down_kw")
PRICE_INPUTS = ("price_up", "price_down")
FLEX_INPUTS = ("flex_up_kw", "price_up", "flex_down_kw", "price_down")
INPUTS = ("production", "consumption", *FLEX_INPUTS)
OUTPUTS = ("production", "consumption", "net", "total_net", "island_size", "activation_kw",
           "balanced_net_kw", "imbalance_kw", "clearing_price", "shortfall_kw", "applied_kw",
           "soc_kwh")
# Island keys every member reports identically once the grid agrees.
AGREED_KEYS = ("island_size", "total_net", "clearing_hash", "imbalance_kw", "balanced_net_kw",
               "clearing_price", "shortfall_kw")

NODE_MODEL = "Node"
DEVICE_MODELS: Mapping[str, str] = {"Battery": "battery", "Plant": "plant", "PV": "pv",
                                    "Load": "load"}
COMMON_PARAMS = ("node_id", "endpoint", "production", "consumption")
NODE_PARAMS = (*COMMON_PARAMS, *FLEX_INPUTS, "device", "device_file")
SIM_PARAMS = ("mode", "step_size", "topology", "device_clock", "agree_timeout_s", "data_dir",
              "keys_dir", "ping_interval_s", "dead_after_s", "seed", "latency")


class CosimError(ZgridError):
    """The co-simulation cannot go on as set up: a bad parameter or input, a node that does not
    answer, a grid that did not agree in time. The message says what to change."""

    code = "cosim"


def _device_params(kind: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(DEVICE_KINDS[kind])  # type: ignore[arg-type]
                 if f.init)


def _model(params: Sequence[str]) -> ModelDescription:
    return {"public": True, "params": list(params), "attrs": list(dict.fromkeys(INPUTS + OUTPUTS))}


META: Meta = {
    "api_version": "3.0",
    "type": "time-based",
    "models": {NODE_MODEL: _model(NODE_PARAMS),
               **{name: _model((*COMMON_PARAMS, *_device_params(kind)))
                  for name, kind in DEVICE_MODELS.items()}},
}


# ----------------------------------------------------------------------------- agreement


def disagreement(statuses: Sequence[Mapping[str, Any]],
                 expected: Mapping[str, tuple[float, float]],
                 held: Callable[[str], Mapping[str, tuple[float, float]]] | None = None,
                 islands: Mapping[str, Sequence[str]] | None = None,
                 tolerance_kw: float = AGREE_TOLERANCE_KW) -> str | None:
    """None when the grid has agreed on `expected`, else what still differs, in a few words.

    statuses: the `status` of every driven node; expected: node id -> (production,
    consumption) each was given; held: node id -> the values of the adverts that node holds;
    islands: node id -> the sorted ids of the island it must be in (the nodes the adapter
    linked), if known.

    Agreed means: every node holds its own values (and is in its island); every member of an
    island reports the same island, total and clearing (`AGREED_KEYS`); an island made only of
    driven nodes has exactly the total their values add up to (`math.fsum`, as the nodes'
    exact sums give it) and a balanced net equal to that total plus the activations its
    members say they apply; an island with other nodes in it holds our values in its adverts
    (`held`, asked of one member); and the balanced net is what the clearing leaves (0, or the
    shortfall), so every activation has flooded.
    """
    by_id = {s["id"]: s for s in statuses}
    for node_id, (production, consumption) in expected.items():
        s = by_id.get(node_id)
        if s is None:
            return f"{node_id} did not report its status"
        if (s["production"], s["consumption"]) != (production, consumption):
            return (f"{node_id} holds production {s['production']!r} consumption "
                    f"{s['consumption']!r}, not the {production!r} {consumption!r} it was given")
        if islands is not None and list(s["island"]) != list(islands[node_id]):
            return (f"{node_id} is in an island of {len(s['island'])} "
                    f"({' '.join(s['island'][:8])}{' ...' if len(s['island']) > 8 else ''}), "
                    f"not of the {len(islands[node_id])} it was linked to (a link still coming "
                    f"up, or a node gone)")
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for s in statuses:
        groups.setdefault(tuple(s["island"]), []).append(s)
    for island, members in groups.items():
        first = members[0]
        where = f"the island of {first['id']} ({len(island)} nodes)"
        for other in members[1:]:
            for key in AGREED_KEYS:
                if other[key] != first[key]:
                    return (f"{first['id']} and {other['id']} disagree on {key} "
                            f"({first[key]!r} vs {other[key]!r})")
        ids = {m["id"] for m in members}
        for x in island:
            if x in by_id and x not in ids:
                return f"{first['id']} counts {x} in its island, but {x} sees another island"
        if set(island) <= expected.keys():
            total = math.fsum([expected[x][0] for x in island] + [-expected[x][1] for x in island])
            if first["total_net"] != total:
                return (f"{where}: total_net {first['total_net']!r}, but its members' values add "
                        f"up to {total!r} (a change still flooding)")
            applied = math.fsum(by_id[x]["activation_kw"] for x in island)
            if abs(total + applied - first["balanced_net_kw"]) > tolerance_kw:
                return (f"{where}: balanced_net_kw {first['balanced_net_kw']!r}, but total plus "
                        f"the activations its members apply is {total + applied!r} "
                        f"(an activation still flooding)")
        elif held is not None:
            adverts = held(first["id"])
            for x in island:
                if x in expected and adverts.get(x) != expected[x]:
                    return (f"{first['id']} holds {x} at {adverts.get(x)!r}, not at "
                            f"{expected[x]!r} (a change still flooding)")
        if abs(abs(first["balanced_net_kw"]) - first["shortfall_kw"]) > tolerance_kw:
            return (f"{where}: balanced_net_kw {first['balanced_net_kw']!r}, but the clearing "
                    f"leaves {first['shortfall_kw']!r} kW of shortfall (activations still "
                    f"flooding)")
    return None


# ----------------------------------------------------------------------------- the entities


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One entity as `create` was given it, checked.

    endpoint: the node's address (an existing node's, or the one the adapter will start it
    on); production/consumption: initial kW (None: an existing node keeps its own);
    device: the device table ({"kind": ..., parameters}), or None.
    """

    eid: str
    model: str
    node_id: str
    endpoint: str
    spawned: bool
    production: float | None
    consumption: float | None
    flex: Flex
    device: Mapping[str, Any] | None


@dataclass(slots=True)
class _Node:
    """An entity at run time: what its node advertises, and its outputs of the last step."""

    spec: NodeSpec
    device: Device | None
    production: float = 0.0
    consumption: float = 0.0
    offer: Flex = NO_FLEX  # the plain offer, or the device offer last advertised
    wanted: dict[str, float] = field(default_factory=dict)  # this step's inputs
    outputs: dict[str, Any] = field(default_factory=dict)


def make_device(table: Mapping[str, Any], where: str) -> Device:
    """The device model a table {"kind": KIND, parameters} describes (zgrid/devices.py)."""
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in DEVICE_KINDS:
        raise CosimError(f"{where}: device kind must be one of {', '.join(sorted(DEVICE_KINDS))}, "
                         f"got {kind!r}")
    try:
        (device,) = load_devices({kind: [{k: v for k, v in table.items() if k != "kind"}]})
    except ValueError as exc:
        raise CosimError(f"{where}: {exc}") from None
    return device


def _device_file(path: Any, where: str) -> dict[str, Any]:
    """The one device of a TOML device file (as zgrid-node --device reads it), as a table."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CosimError(f"{where}: cannot read device_file {path}: {exc}") from None
    tables = [(kind, entry) for kind, entries in data.items()
              for entry in (entries if isinstance(entries, list) else [entries])]
    if len(tables) != 1 or not isinstance(tables[0][1], Mapping):
        raise CosimError(f"{where}: device_file {path} must describe exactly one device "
                         f"([[battery]], [[plant]], [[pv]] or [[load]]), got {len(tables)}")
    kind, entry = tables[0]
    return {"kind": kind, **entry}


def _device_toml(table: Mapping[str, Any]) -> str:
    """A device table as zgrid-node's --device file (numbers only: every parameter is one)."""
    lines = [f"[[{table['kind']}]]"]
    lines += [f"{key} = {float(value)!r}" for key, value in table.items() if key != "kind"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the grids


class _ProcessGrid:
    """"nodes" mode: real zgrid-node processes, over their control interface.

    The nodes the adapter starts (plain TCP on 127.0.0.1) are asked all at once over one
    multiplexed `ControlFleet`: a step's `set`s are each saved to disk before they are
    acknowledged, and the saves overlap. Existing nodes, which may want CURVE keys or live on
    another host, get one `Client` each, asked in turn."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], params: _Params) -> None:
        self.context = context
        self.params = params
        self.ids: list[str] = []
        self.fleet: ControlFleet | None = None
        self.clients: list[Client] = []
        self.procs: list[NodeProc] = []
        self.own_dir: Path | None = None  # a temporary data dir, removed at close

    def start(self, nodes: Sequence[_Node], edges: Sequence[tuple[int, int]]) -> None:
        self.ids = [n.spec.node_id for n in nodes]
        if nodes[0].spec.spawned:  # all or none (ZgridSim._start)
            self._spawn(nodes, edges)
            self.fleet = ControlFleet(self.context)
            for node in nodes:
                self.fleet.connect(node.spec.node_id, node.spec.endpoint)
            self._wait_answering(time.monotonic() + START_TIMEOUT_S)
            return
        self.clients = [Client(n.spec.endpoint, STATUS_TIMEOUT_S, keys_dir=self.params.keys_dir,
                               context=self.context) for n in nodes]
        values: dict[int, tuple[float, float]] = {}
        offers: dict[int, Flex] = {}
        for i, (node, status) in enumerate(zip(nodes, self.statuses(), strict=True)):
            # An existing node keeps the values it has unless the entity gives its own.
            node.production, node.consumption = status["production"], status["consumption"]
            wanted = (status["production"] if node.spec.production is None
                      else node.spec.production,
                      status["consumption"] if node.spec.consumption is None
                      else node.spec.consumption)
            if wanted != (node.production, node.consumption):
                values[i] = wanted
            if node.device is not None:  # the adapter's device replaces the node's own offer
                offers[i] = node.device.offer()
            elif node.spec.flex != NO_FLEX:
                offers[i] = node.spec.flex
        self.update(values, offers)
        for i, (production, consumption) in values.items():
            nodes[i].production, nodes[i].consumption = production, consumption
        for i, offer in offers.items():
            nodes[i].offer = offer

    def _spawn(self, nodes: Sequence[_Node], edges: Sequence[tuple[int, int]]) -> None:
        p = self.params
        if p.data_dir is None:
            self.own_dir = Path(tempfile.mkdtemp(prefix="zgrid-cosim-"))
        base = p.data_dir or self.own_dir
        assert base is not None
        base.mkdir(parents=True, exist_ok=True)
        for node in nodes:
            kept = base / node.spec.node_id
            if kept.exists() and any(kept.iterdir()):
                raise CosimError(f"{kept} holds the saved state of a node from an earlier run, "
                                 f"which it would resume (values, links to old ports): the "
                                 f"adapter starts fresh nodes; remove it or give another data_dir")
        siblings: dict[int, list[str]] = {}
        for a, b in edges:  # the later node dials the earlier one; links are undirected
            siblings.setdefault(max(a, b), []).append(nodes[min(a, b)].spec.endpoint)
        timing: tuple[str, ...] = ()
        if p.ping_interval_s is not None:
            timing += ("--ping-interval", repr(p.ping_interval_s))
        if p.dead_after_s is not None:
            timing += ("--dead-after", repr(p.dead_after_s))
        linux = sys.platform.startswith("linux")
        for i, node in enumerate(nodes):
            spec = node.spec
            port = int(spec.endpoint.rsplit(":", 1)[1])
            proc = NodeProc(spec.node_id, port, base / spec.node_id, base / f"{spec.node_id}.log",
                            timing, log_level=NODE_LOG_LEVEL)
            args = [arg for sib in siblings.get(i, []) for arg in ("--sibling", sib)]
            given: dict[str, float] = {}
            if spec.device is not None and p.device_clock == "node":
                device_file = base / f"{spec.node_id}.device.toml"
                device_file.write_text(_device_toml(spec.device))
                args += ["--device", str(device_file)]
                assert node.device is not None
                given = base_values(node.device)  # the device's flag, not --production
            for name, value in (("production", node.production),
                                ("consumption", node.consumption)):
                if name not in given:
                    args += [f"--{name}", repr(value)]
            offer = spec.flex
            if offer.offered:
                args += ["--flex-up", repr(offer.flex_up_kw), "--price-up", repr(offer.price_up),
                         "--flex-down", repr(offer.flex_down_kw),
                         "--price-down", repr(offer.price_down)]
            # die_with_parent: the kernel kills the node if this process dies, even by kill -9.
            self.procs.append(proc.start(*args, die_with_parent=linux))

    def _wait_answering(self, deadline: float) -> None:
        """Until every started node answers; one that exits is an error quoting its log."""
        assert self.fleet is not None
        waiting = set(self.ids)
        rounds = math.ceil(START_TIMEOUT_S / AGREE_POLL_S) + 1
        for _ in range(rounds):
            for proc in self.procs:
                if not proc.alive:
                    tail = proc.log_text()[-NODE_LOG_TAIL_CHARS:].strip()
                    raise CosimError(f"node {proc.id} exited at start: {tail} (a port taken "
                                     f"meanwhile? run again)")
            waiting -= set(self.fleet.statuses(sorted(waiting), STARTING_REPLY_S))
            if not waiting or time.monotonic() >= deadline:
                break
        if waiting:
            raise CosimError(f"started nodes did not answer within {START_TIMEOUT_S:g}s: "
                             f"{', '.join(sorted(waiting))}")

    def _exchange(self, requests: Sequence[tuple[int, ControlRequest]]) -> list[dict[str, Any]]:
        """Each request to its node; the reply bodies, in order. A refusal or a node that does
        not answer within STATUS_TIMEOUT_S is a CosimError."""
        replies: list[Reply | None] = []
        if self.fleet is None:
            for i, req in requests:
                try:
                    replies.append(Reply(None, True, body=self.clients[i].request(req)))
                except ControlError as exc:
                    replies.append(Reply(None, False, message=exc.message, code=exc.code))
                except NoReply:
                    replies.append(None)
        else:
            fleet = self.fleet
            try:
                rids = [fleet.send(self.ids[i], req) for i, req in requests]
            except zmq.Again:  # a queue full of requests the node has not read
                raise CosimError("a node stopped reading its control requests (frozen?)"
                                 ) from None
            fleet.wait(lambda: all(r in fleet.replies for r in rids), STATUS_TIMEOUT_S)
            for rid in rids:
                got = fleet.replies.pop(rid, None)
                fleet.pending.pop(rid, None)
                replies.append(None if got is None else got[0])
        out = []
        for (i, req), reply in zip(requests, replies, strict=True):
            what = f"{type(req).__name__.removesuffix('Request').lower()} to {self.ids[i]}"
            if reply is None:
                raise CosimError(f"no reply to {what} within {STATUS_TIMEOUT_S:g}s (is the node "
                                 f"still running?)")
            if not reply.ok:
                raise CosimError(f"{self.ids[i]} refused {what}: {reply.message}")
            out.append(dict(reply.body))
        return out

    def update(self, values: Mapping[int, tuple[float, float]], offers: Mapping[int, Flex]
               ) -> None:
        """New base values and offers, to every node concerned at once."""
        requests: list[tuple[int, ControlRequest]] = [
            (i, SetRequest(p, c)) for i, (p, c) in values.items()]
        requests += [(i, FlexRequest(f.flex_up_kw, f.price_up, f.flex_down_kw, f.price_down))
                     for i, f in offers.items()]
        if requests:
            self._exchange(requests)

    def statuses(self) -> list[dict[str, Any]]:
        return self._exchange([(i, StatusRequest()) for i in range(len(self.ids))])

    def held(self, node_id: str) -> dict[str, tuple[float, float]]:
        (body,) = self._exchange([(self.ids.index(node_id), NodesRequest())])
        return {row["id"]: (row["production"], row["consumption"]) for row in body["nodes"]}

    def advance(self, t_s: float) -> None:
        return None  # real nodes live in wall time

    def settle(self, done: Callable[[list[dict[str, Any]]], str | None], timeout_s: float,
               what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        rounds = math.ceil(timeout_s / AGREE_POLL_S) + 1  # the deadline comes first; a bound
        problem = "never asked"
        for _ in range(rounds):
            statuses = self.statuses()
            problem = done(statuses) or ""
            if not problem:
                return statuses
            if time.monotonic() >= deadline:
                break
            time.sleep(AGREE_POLL_S)
        raise CosimError(f"the grid did not agree {what} within {timeout_s:g}s: {problem}")

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.close()
            self.fleet = None
        for client in self.clients:
            client.close()
        self.clients = []
        for proc in self.procs:  # all at once: each says goodbye while the others do
            if proc.alive:
                proc.send(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.stop(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []
        if self.own_dir is not None:
            shutil.rmtree(self.own_dir, ignore_errors=True)
            self.own_dir = None


class _SimGrid:
    """"sim" mode: the simulator's cores (zgrid/sim/engine.py) under mosaik's clock."""

    def __init__(self, params: _Params, names: Sequence[str]) -> None:
        from zgrid.sim.engine import Simulator
        from zgrid.sim.network import Latency, LinkModel

        try:
            latency = Latency.parse(params.latency)
        except ValueError as exc:
            raise CosimError(f"latency: {exc}") from None
        ping = params.ping_interval_s or SIM_PING_INTERVAL_S
        dead = params.dead_after_s or SIM_DEAD_AFTER_S
        self.sim: Simulator = Simulator(
            names, seed=params.seed, link=LinkModel(latency=latency), wire_mode="fast",
            ping_interval_s=ping, dead_after_s=dead, forget_after_s=max(600.0, 10 * dead),
            measure=False)
        self.t0 = 0.0  # virtual time of mosaik's time 0: where the cold start ended

    def start(self, nodes: Sequence[_Node], edges: Sequence[tuple[int, int]]) -> None:
        sim = self.sim
        for i, node in enumerate(nodes):
            sim.start_node(i, node.production, node.consumption)
        self.update({}, {i: n.spec.flex for i, n in enumerate(nodes) if n.spec.flex.offered})
        for a, b in edges:
            self._check(sim.link(max(a, b), min(a, b)), max(a, b), "link")

    def _check(self, reply: Reply | None, i: int, what: str) -> None:
        if reply is None or not reply.ok:
            raise CosimError(f"{self.sim.names[i]} refused {what}: "
                             f"{reply.message if reply else 'no reply'}")

    def update(self, values: Mapping[int, tuple[float, float]], offers: Mapping[int, Flex]
               ) -> None:
        for i, (production, consumption) in values.items():
            self._check(self.sim.set_value(i, production, consumption), i, "set")
        for i, f in offers.items():
            self._check(self.sim.control(i, FlexRequest(f.flex_up_kw, f.price_up,
                                                        f.flex_down_kw, f.price_down)), i, "flex")

    def statuses(self) -> list[dict[str, Any]]:
        now = self.sim.now
        out = []
        for i, core in enumerate(self.sim.cores):
            if core is None:
                raise CosimError(f"{self.sim.names[i]} is not running")
            out.append(core.status(now))
        return out

    def held(self, node_id: str) -> dict[str, tuple[float, float]]:
        core = self.sim.cores[self.sim.index[node_id]]
        assert core is not None
        return {row["id"]: (row["production"], row["consumption"])
                for row in core.nodes(self.sim.now)}

    def advance(self, t_s: float) -> None:
        """Mosaik reached second t_s: run the grid's virtual time up to it (pings, timers)."""
        at = self.t0 + t_s
        if at > self.sim.now:
            self.sim.run_until(at)

    def settle(self, done: Callable[[list[dict[str, Any]]], str | None], timeout_s: float,
               what: str) -> list[dict[str, Any]]:
        deadline = self.sim.now + timeout_s
        rounds = math.ceil(timeout_s / SIM_SLICE_S) + 1
        problem = "never asked"
        for _ in range(rounds):
            statuses = self.statuses()
            problem = done(statuses) or ""
            if not problem:
                return statuses
            if self.sim.now >= deadline:
                break
            self.sim.run_until(min(deadline, self.sim.now + SIM_SLICE_S))
        raise CosimError(f"the simulated grid did not agree {what} within {timeout_s:g} virtual "
                         f"seconds: {problem}")

    def close(self) -> None:
        return None


_Grid: TypeAlias = _ProcessGrid | _SimGrid


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class _Params:
    """The sim parameters of `init`, checked."""

    mode: str = "nodes"
    step_size: int = DEFAULT_STEP_S
    topology: str | tuple[tuple[str, str], ...] = "ring"
    topology_given: bool = False
    device_clock: str = "mosaik"
    agree_timeout_s: float = AGREE_TIMEOUT_S
    data_dir: Path | None = None
    keys_dir: Path | None = None
    ping_interval_s: float | None = None
    dead_after_s: float | None = None
    seed: int = 1
    latency: str = SIM_LATENCY


def _fail(where: str) -> Callable[[str], CosimError]:
    return lambda why: CosimError(f"{where}: {why}")


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise CosimError(f"{name}: must be a number > 0, got {value!r}")
    return float(value)


def _parse_params(time_resolution: float, sim_params: Mapping[str, Any]) -> _Params:
    unknown = sorted(set(sim_params) - set(SIM_PARAMS))
    if unknown:
        raise CosimError(f"unknown sim parameter {unknown[0]!r}; known: {', '.join(SIM_PARAMS)}")
    p = dict(sim_params)
    mode = p.get("mode", "nodes")
    if mode not in MODES:
        raise CosimError(f"mode: one of {', '.join(MODES)}, got {mode!r}")
    default_step = max(1, round(DEFAULT_STEP_S / time_resolution))
    step_size = p.get("step_size", default_step)
    if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
        raise CosimError(f"step_size: a whole number of mosaik time steps >= 1 (each "
                         f"{time_resolution:g} s), got {step_size!r}")
    topology = p.get("topology", "ring")
    if isinstance(topology, str):
        if topology not in TOPOLOGIES:
            raise CosimError(f"topology: one of {', '.join(TOPOLOGIES)} or a list of [eid, eid] "
                             f"pairs, got {topology!r}")
    elif isinstance(topology, list | tuple) and all(
            isinstance(e, list | tuple) and len(e) == 2 and all(isinstance(x, str) for x in e)
            for e in topology):
        topology = tuple((str(a), str(b)) for a, b in topology)
    else:
        raise CosimError(f"topology: one of {', '.join(TOPOLOGIES)} or a list of [eid, eid] "
                         f"pairs, got {topology!r}")
    clock = p.get("device_clock", "mosaik")
    if clock not in DEVICE_CLOCKS:
        raise CosimError(f"device_clock: one of {', '.join(DEVICE_CLOCKS)}, got {clock!r}")
    if clock == "node" and mode == "sim":
        raise CosimError("device_clock='node' needs mode='nodes': in 'sim' mode the adapter "
                         "runs the devices on mosaik's clock")
    seed = p.get("seed", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CosimError(f"seed: an integer, got {seed!r}")
    latency = p.get("latency", SIM_LATENCY)
    if not isinstance(latency, str):
        raise CosimError(f"latency: a string as zgrid-sim --latency takes, e.g. \"60e-6\", "
                         f"got {latency!r}")
    if mode == "nodes" and ("seed" in p or "latency" in p):
        raise CosimError("seed and latency are 'sim' mode parameters: real nodes have real "
                         "latency")
    ping = (_positive("ping_interval_s", p["ping_interval_s"])
            if p.get("ping_interval_s") is not None else None)
    dead = (_positive("dead_after_s", p["dead_after_s"])
            if p.get("dead_after_s") is not None else None)
    if ping is not None and dead is None:
        dead = DEAD_AFTER_PINGS * ping  # the node's default (1 s) may be shorter than a ping
    if ping is not None and dead is not None and dead < 2 * ping:
        raise CosimError(f"dead_after_s: at least twice ping_interval_s ({2 * ping:g} s), or "
                         f"every link flaps; got {dead:g}")
    return _Params(
        mode=mode, step_size=step_size, topology=topology, topology_given="topology" in p,
        device_clock=clock,
        agree_timeout_s=_positive("agree_timeout_s", p.get("agree_timeout_s", AGREE_TIMEOUT_S)),
        data_dir=Path(p["data_dir"]) if p.get("data_dir") is not None else None,
        keys_dir=Path(p["keys_dir"]) if p.get("keys_dir") is not None else None,
        ping_interval_s=ping, dead_after_s=dead,
        seed=seed, latency=latency)


def edges_of(topology: str | Sequence[tuple[str, str]], eids: Sequence[str]
             ) -> list[tuple[int, int]]:
    """The links between entities (indices into `eids`) a topology gives."""
    n = len(eids)
    if isinstance(topology, str):
        if topology == "line":
            return [(i, i + 1) for i in range(n - 1)]
        if topology == "ring":
            return [(i, i + 1) for i in range(n - 1)] + ([(n - 1, 0)] if n > 2 else [])
        if topology == "star":
            return [(0, i) for i in range(1, n)]
        if topology == "full":
            return [(i, j) for i in range(n) for j in range(i + 1, n)]
        raise CosimError(f"topology: one of {', '.join(TOPOLOGIES)}, got {topology!r}")
    index = {eid: i for i, eid in enumerate(eids)}
    edges: list[tuple[int, int]] = []
    for a, b in topology:
        for x in (a, b):
            if x not in index:
                raise CosimError(f"topology: {x!r} is not an entity of this simulator "
                                 f"(entities: {', '.join(eids)})")
        if a == b:
            raise CosimError(f"topology: {a!r} cannot be linked to itself")
        edges.append((index[a], index[b]))
    return edges


def components(ids: Sequence[str], edges: Sequence[tuple[int, int]]
               ) -> dict[str, tuple[str, ...]]:
    """Each node's island in the graph `edges` makes: node id -> the island's sorted ids."""
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:  # halving: each pass shortens the path, so this ends
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        parent[root(a)] = root(b)
    groups: dict[int, list[str]] = {}
    for i, node_id in enumerate(ids):
        groups.setdefault(root(i), []).append(node_id)
    return {node_id: tuple(sorted(group)) for group in groups.values() for node_id in group}


# ----------------------------------------------------------------------------- the simulator


class ZgridSim(mosaik_api_v3.Simulator):
    """The mosaik simulator: one entity per zgrid node (module docstring)."""

    def __init__(self) -> None:
        super().__init__(META)  # type: ignore[no-untyped-call]  # mosaik_api_v3 is untyped here
        self.sid = ""
        self.time_resolution = 1.0
        self.params = _Params()
        self.nodes: dict[str, _Node] = {}
        self.grid: _Grid | None = None
        self.context: zmq.Context[zmq.Socket[bytes]] | None = None
        self.counters: dict[str, int] = {}
        # node id -> its island's sorted ids, for the nodes the adapter linked (None: existing
        # nodes, whose links are their own).
        self.islands: dict[str, tuple[str, ...]] | None = None

    # ------------------------------------------------------------------ the mosaik API

    def init(self, sid: SimId, time_resolution: float = 1.0, **sim_params: Any) -> Meta:
        self.sid = sid
        self.time_resolution = _positive("time_resolution", time_resolution)
        self.params = _parse_params(self.time_resolution, sim_params)
        if self.params.mode == "nodes":
            self.context = zmq.Context()
        return self.meta

    def create(self, num: int, model: ModelName, **model_params: Any) -> list[CreateResult]:
        if self.grid is not None:
            raise CosimError("create: entities must be created before the simulation starts")
        if model != NODE_MODEL and model not in DEVICE_MODELS:
            raise CosimError(f"unknown model {model!r}; models: {', '.join(META['models'])}")
        if num > 1 and model_params.get("node_id") is not None:
            raise CosimError(f"create {num} {model}: node_id names one node; create them one by "
                             f"one, or leave node_id out")
        created: list[CreateResult] = []
        for _ in range(num):
            spec = self._spec(model, dict(model_params))
            device = make_device(spec.device, spec.eid) if spec.device is not None else None
            self.nodes[spec.eid] = _Node(spec, device, spec.production or 0.0,
                                         spec.consumption or 0.0, spec.flex)
            created.append({"eid": spec.eid, "type": model,
                            "extra_info": {"node_id": spec.node_id, "endpoint": spec.endpoint}})
        return created

    def setup_done(self) -> None:
        self._start()

    def step(self, time: Time, inputs: InputData, max_advance: Time) -> Time:
        grid = self._start()
        t_s = time * self.time_resolution
        grid.advance(t_s)
        for eid, attrs in inputs.items():
            node = self._node(eid)
            for attr, sources in attrs.items():
                node.wanted[attr] = _input(eid, attr, sources, node.spec)
        values: dict[int, tuple[float, float]] = {}
        offers: dict[int, Flex] = {}
        nodes = list(self.nodes.values())
        for i, node in enumerate(nodes):
            new_values, new_offer = self._changes(node)
            if new_values is not None:
                values[i] = new_values
            if new_offer is not None:
                offers[i] = new_offer
        grid.update(values, offers)  # acknowledged: the nodes hold them
        for i, (production, consumption) in values.items():
            nodes[i].production, nodes[i].consumption = production, consumption
        for i, offer in offers.items():
            nodes[i].offer = offer
        expected = {n.spec.node_id: (n.production, n.consumption) for n in self.nodes.values()}
        statuses = grid.settle(lambda s: disagreement(s, expected, grid.held, self.islands),
                               self._agree_timeout_s(),
                               f"on step {time} (t = {t_s:g} s; in 'nodes' mode a slow machine "
                               f"may need a larger agree_timeout_s)")
        dt_s = self.params.step_size * self.time_resolution
        for node, status in zip(self.nodes.values(), statuses, strict=True):
            node.outputs = self._outputs(node, status)
            if node.device is not None and self.params.device_clock == "mosaik":
                # The step's decision holds until the next step: carry it out over dt_s.
                node.device.apply(status["activation_kw"], dt_s)
                node.outputs["applied_kw"] = node.device.applied_kw
        return time + self.params.step_size

    def get_data(self, outputs: OutputRequest) -> OutputData:
        data: OutputData = {}
        for eid, attrs in outputs.items():
            node = self._node(eid)
            if not node.outputs:
                raise CosimError(f"{eid}: no outputs before its first step")
            for attr in attrs:
                if attr not in OUTPUTS:
                    raise CosimError(f"{eid}: {attr!r} is an input, not an output; outputs: "
                                     f"{', '.join(OUTPUTS)}")
            data[eid] = {attr: node.outputs[attr] for attr in attrs}
        return data

    def finalize(self) -> None:
        self._stop_grid()

    # ------------------------------------------------------------------ the parts

    def _spec(self, model: str, params: dict[str, Any]) -> NodeSpec:
        kind = DEVICE_MODELS.get(model)
        allowed = NODE_PARAMS if kind is None else (*COMMON_PARAMS, *_device_params(kind))
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise CosimError(f"{model}: unknown parameter {unknown[0]!r}; known: "
                             f"{', '.join(allowed)}")
        endpoint, node_id = self._address(model, params.get("endpoint"), params.get("node_id"))
        if node_id in self.nodes:
            raise CosimError(f"{model}: node_id {node_id!r} is taken by another entity")
        where = f"{model} {node_id}"
        spawned = endpoint is None
        values: dict[str, float | None] = {}
        for name in ("production", "consumption"):
            value = params.get(name)
            values[name] = None if value is None else check_power(value, _fail(f"{where} {name}"))
        flex, device = self._offer_and_device(kind, params, where)
        if device is not None:
            if not spawned and self.params.device_clock == "node":
                raise CosimError(f"{where}: cannot give a running node a device; start it with "
                                 f"zgrid-node --device FILE and create a plain Node, or use "
                                 f"device_clock='mosaik'")
            for name, value in base_values(make_device(device, where)).items():
                if values[name] is not None:
                    raise CosimError(f"{where}: the {device['kind']} gives this node's {name}; "
                                     f"leave {name} out")
                values[name] = value
        if spawned:  # a new node starts from 0 kW unless told otherwise
            values = {k: 0.0 if v is None else v for k, v in values.items()}
        if endpoint is None:
            endpoint = (f"sim:{node_id}" if self.params.mode == "sim"
                        else f"tcp://{HOST}:{free_port()}")
        return NodeSpec(node_id, model, node_id, endpoint, spawned, values["production"],
                        values["consumption"], flex,
                        MappingProxyType(device) if device is not None else None)

    def _address(self, model: str, endpoint: Any, node_id: Any) -> tuple[str | None, str]:
        """(endpoint of an existing node or None, node id): an existing node's id is the one
        it reports; a node the adapter starts is `node_id` or named after its model."""
        if endpoint is None:
            if node_id is None:  # the model's next number that no entity has taken
                for _ in range(len(self.nodes) + 1):  # at most every entity is in the way
                    n = self.counters[model] = self.counters.get(model, 0) + 1
                    node_id = f"{model.lower()}{n}"
                    if node_id not in self.nodes:
                        break
            return None, check_node_id(node_id, _fail(f"{model} node_id"))
        if self.params.mode == "sim":
            raise CosimError(f"{model}: endpoint is for mode 'nodes'; in 'sim' mode every node "
                             f"is simulated")
        if not isinstance(endpoint, str):
            raise CosimError(f"{model} endpoint: [ID@]tcp://HOST:PORT, got {endpoint!r}")
        parse_sibling_address(endpoint, _fail(f"{model} endpoint"))  # ID@ is checked by Client
        assert self.context is not None
        try:  # ask now, so that a wrong endpoint fails where it was written
            with Client(endpoint, STATUS_TIMEOUT_S, keys_dir=self.params.keys_dir,
                        context=self.context) as client:
                reported = str(client.status()["id"])
        except ZgridError as exc:
            raise CosimError(f"{model} endpoint {endpoint}: {exc.message}") from None
        if node_id is not None and node_id != reported:
            raise CosimError(f"{model}: {endpoint} is node {reported}, not {node_id}")
        return endpoint, reported

    @staticmethod
    def _offer_and_device(kind: str | None, params: Mapping[str, Any], where: str
                          ) -> tuple[Flex, dict[str, Any] | None]:
        """An entity's plain offer and its device table (a device model's, or a Node's
        `device` / `device_file`), checked."""
        if kind is not None:
            return NO_FLEX, {"kind": kind,
                             **{k: v for k, v in params.items() if k not in COMMON_PARAMS}}
        offer = {k: (check_power if k in POWER_INPUTS else check_price)(
            params.get(k, 0.0), _fail(f"{where} {k}")) for k in FLEX_INPUTS}
        flex = Flex(**offer)
        table, path = params.get("device"), params.get("device_file")
        if table is not None and path is not None:
            raise CosimError(f"{where}: give device or device_file, not both")
        device: dict[str, Any] | None = None
        if table is not None:
            if not isinstance(table, Mapping):
                raise CosimError(f"{where} device: a table {{'kind': 'battery', ...}}, got "
                                 f"{table!r}")
            device = dict(table)
        elif path is not None:
            device = _device_file(path, where)
        if device is not None and flex.offered:
            raise CosimError(f"{where}: the device makes the offers; leave out flex_up_kw and "
                             f"flex_down_kw")
        return flex, device

    def _start(self) -> _Grid:
        if self.grid is not None:
            return self.grid
        nodes = list(self.nodes.values())
        if not nodes:
            raise CosimError(f"{self.sid}: no entities: create at least one node")
        p = self.params
        spawned = {n.spec.spawned for n in nodes}
        if p.mode == "nodes" and len(spawned) > 1:
            raise CosimError("give every entity an endpoint (existing nodes) or none (the "
                             "adapter starts them), not a mix")
        existing = p.mode == "nodes" and spawned == {False}
        if existing and p.topology_given:
            raise CosimError("topology is for nodes the adapter starts: existing nodes keep "
                             "the links they have")
        edges = [] if existing else edges_of(p.topology, list(self.nodes))
        ids = [n.spec.node_id for n in nodes]
        self.islands = None if existing else components(ids, edges)
        grid: _Grid
        if p.mode == "sim":
            grid = _SimGrid(p, [n.spec.node_id for n in nodes])
        else:
            assert self.context is not None
            grid = _ProcessGrid(self.context, p)
            atexit.register(self._stop_grid)  # an interpreter that exits without finalize
        self.grid = grid
        grid.start(nodes, edges)  # existing nodes: now the values they keep are known
        expected = {n.spec.node_id: (n.production, n.consumption) for n in nodes}
        grid.settle(lambda s: disagreement(s, expected, grid.held, self.islands),
                    START_TIMEOUT_S if p.mode == "nodes" else SIM_START_LIMIT_S,
                    "at the start (the nodes, their links and their values)")
        if isinstance(grid, _SimGrid):
            grid.t0 = grid.sim.now
        return grid

    def _changes(self, node: _Node) -> tuple[tuple[float, float] | None, Flex | None]:
        """This step's new base values and new offer for a node (None: unchanged)."""
        wanted = node.wanted
        production = wanted.get("production", node.production)
        consumption = wanted.get("consumption", node.consumption)
        device = node.device
        offer: Flex | None = None
        if device is not None:
            device.follow(production, consumption)
            given = base_values(device)  # what the device makes of them (clamped to its range)
            production = given.get("production", production)
            consumption = given.get("consumption", consumption)
            if self.params.device_clock == "mosaik":
                # As a node's own device step: advertised only if worth a flood.
                new = device.offer()
                if meaningful_change(node.offer, new, device.rating_kw):
                    offer = new
        elif any(k in wanted for k in FLEX_INPUTS):
            new = Flex(*(wanted.get(k, getattr(node.offer, k)) for k in FLEX_INPUTS))
            offer = new if new != node.offer else None
        values = (production, consumption)
        return (values if values != (node.production, node.consumption) else None), offer

    def _outputs(self, node: _Node, status: Mapping[str, Any]) -> dict[str, Any]:
        out = {key: status[key] for key in OUTPUTS
               if key not in ("applied_kw", "soc_kwh")}
        device = node.device
        state = status.get("device") or {}
        if device is None:  # a plain node's entity is taken to do what it is asked
            out["applied_kw"], out["soc_kwh"] = status["activation_kw"], None
        elif self.params.device_clock == "node":  # the node's own device, on its clock
            out["applied_kw"], out["soc_kwh"] = state.get("applied_kw"), state.get("soc_kwh")
        else:  # the state at the start of the step; applied_kw is set once it is carried out
            out["applied_kw"] = None
            out["soc_kwh"] = device.soc_kwh if isinstance(device, Battery) else None
        return out

    def _agree_timeout_s(self) -> float:
        if self.params.mode == "sim":  # virtual: the step's own duration
            return self.params.step_size * self.time_resolution
        return self.params.agree_timeout_s

    def _node(self, eid: str) -> _Node:
        node = self.nodes.get(eid)
        if node is None:
            raise CosimError(f"{self.sid}: no entity {eid!r}")
        return node

    def _stop_grid(self) -> None:
        atexit.unregister(self._stop_grid)
        if self.grid is not None:
            self.grid.close()
        if self.context is not None:
            self.context.term()
            self.context = None


def _input(eid: str, attr: str, sources: Mapping[str, Any], spec: NodeSpec) -> float:
    """One input of this step, checked: kW from several sources add up; a price has one."""
    where = f"{eid}.{attr}"
    if attr not in INPUTS:
        raise CosimError(f"{where}: not an input; inputs: {', '.join(INPUTS)}")
    if attr in FLEX_INPUTS and spec.device is not None:
        raise CosimError(f"{where}: the {spec.model}'s device makes its offers; connect offers "
                         f"only to a plain Node")
    checked = []
    for source, value in sources.items():
        fail = _fail(f"{where} from {source}")
        checked.append(check_price(value, fail) if attr in PRICE_INPUTS
                       else check_power(value, fail))
    if attr in PRICE_INPUTS and len(checked) != 1:
        raise CosimError(f"{where}: a price has one source, got {len(checked)}: "
                         f"{', '.join(sources)}")
    return math.fsum(checked)


def main() -> int:
    """Run as a separate process a mosaik scenario starts ("cmd": "%(python)s -m zgrid.cosim
    %(addr)s") or connects to."""
    return int(mosaik_api_v3.start_simulation(ZgridSim(), "zgrid nodes for mosaik"))


if __name__ == "__main__":
    sys.exit(main())
