"""A simulated day: Phase II on real load and PV profiles, in virtual time.

What this file is for
=====================

`load_day` reads a scenario file (TOML, below) into a `DayScenario`; `run_day` builds the grid
(households on the BDEW standard load profile, PV households on pvlib's irradiance, batteries,
dispatchable plants, factories), starts it from an agreed state, and steps through the day:

1. at the start of every step each node's base values follow its profile (a `SetRequest` when
   they moved by at least `deadband_kw` from what it advertises, as a meter that reports at a
   resolution would), and each device's offer goes to its core (`Simulator.device_changed`,
   as node.py's device step does);
2. the engine runs the step in virtual time: the changes flood, every core clears its island
   and applies its own activation (zgrid/core.py, unmodified);
3. at the end of the step every device carries out the activation its core asks for over the
   step (clamped to what it can do: a battery empties), and the step is recorded.

Physics is one copper grid: the net that counts is the sum over *every* node of its actual
base values plus what its device actually did, whatever the protocol's islands are (a crashed
node's load is still there, its controller is not). While a change floods, nodes apply
activations from different clearings; `NetMeter` integrates |net| between every activation
change, so the transient cost of flooding is in the energy figure, not estimated.

What it must never do
=====================

- Decide anything a node decides: who is activated comes from the cores' own clearing.
- Draw a random number outside the scenario's generator (seeded by `seed`), or read the wall
  clock except for the `wall_s` it reports.
- Hide a miss: steps without enough flexibility, steps where the islands did not agree at the
  end of the step, and the device clamping are all counted and reported.

The scenario file
=================

::

    [scenario]
    seed = 1
    date = 2026-06-21          # the profiles' calendar day
    step_s = 60                # 60 s steps; a divisor of 900 (the profiles' quarter hour)
    start_h = 0                # the hour of the day the run starts at
    duration_h = 24            # up to a week: the day's profiles repeat
    deadband_kw = 0.001        # a node re-advertises its base values once they moved this much
    pv_resolution_s = 900      # PV (hourly irradiance) as quarter-hour means, as metered;
                               # 60 interpolates to minutes (many more adverts)
    ping_interval_s = 20       # liveness is not what a day measures (docs/balancing.md)
    dead_after_s = 60
    latency = "60e-6"          # as zgrid-sim --latency

    [topology]                 # as zgrid-sim: line, ring, grid, random-regular, small-world,
    kind = "random-regular"    # scale-free, or edges (with file = "edges.txt")
    degree = 4

    [[group]]                  # kinds: household, pv_household, battery, plant, factory
    kind = "household"
    count = 600
    annual_kwh = 3500          # BDEW H25, scaled to this yearly energy
    scale_sigma = 0.3          # per household: a lognormal scale factor (median 1) ...
    shift_max_h = 1.0          # ... and a time shift of up to +-1 h, whole quarter hours

Each kind's keys are in `GROUP_KEYS` (with their defaults); a `[faults]` table takes
``partition``, ``crash`` and ``freeze`` lists of ``"HH:MM[-HH:MM]:TARGETS"`` (targets as in
zgrid-sim). A key that is unknown, missing or out of range is a `SimError` naming it.
"""

from __future__ import annotations

import datetime
import math
import random
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zgrid.devices import Battery, CurtailablePV, Device, DispatchablePlant
from zgrid.sim import profiles
from zgrid.sim.engine import Simulator, cyclic_gc_off
from zgrid.sim.errors import SimError
from zgrid.sim.faults import Fault, parse_fault, schedule_faults
from zgrid.sim.measurement import Observer, percentile
from zgrid.sim.network import Latency, LinkModel
from zgrid.sim.preload import preload_converged
from zgrid.sim.scenario import TOPOLOGIES, build_graph
from zgrid.wire import Advert

QUARTER_HOUR_S = 900  # the BDEW profiles' resolution
SECONDS_PER_HOUR = 3600.0
BALANCED_FRACTION_OF_LOAD = 0.01  # a step is "balanced" when |net| <= 1% of the load
KINDS = ("household", "pv_household", "battery", "plant", "factory")

# Every key a group may have, with its default (None: required). Ranges are [low, high] lists
# drawn uniformly per node from the scenario's generator.
GROUP_KEYS: dict[str, dict[str, Any]] = {
    "household": {"count": None, "annual_kwh": 3500.0, "scale_sigma": 0.3, "shift_max_h": 1.0},
    "pv_household": {"count": None, "annual_kwh": 3500.0, "scale_sigma": 0.3,
                     "shift_max_h": 1.0, "pv_kwp": [3.0, 8.0], "curtail_price": 0.0},
    "battery": {"count": None, "capacity_kwh": 13.5, "power_kw": 5.0, "soc": [0.3, 0.7],
                "efficiency": 0.9, "price_empty": 0.40, "price_full": 0.05},
    "plant": {"count": None, "min_kw": 0.0, "max_kw": None, "price": [0.10, 0.20],
              "output_kw": "flat"},
    "factory": {"count": None, "annual_kwh": 500_000.0, "profile": "g25", "scale_sigma": 0.1},
}
SCENARIO_KEYS: dict[str, Any] = {"seed": 1, "date": datetime.date(2026, 6, 21), "step_s": 60,
                                 "start_h": 0.0, "duration_h": 24.0, "deadband_kw": 0.001,
                                 "pv_resolution_s": QUARTER_HOUR_S,
                                 "ping_interval_s": 20.0, "dead_after_s": 60.0,
                                 "latency": "60e-6"}
TOPOLOGY_KEYS: dict[str, Any] = {"kind": "random-regular", "degree": 4, "file": None}


@dataclass(frozen=True, slots=True)
class Group:
    """`count` nodes of one kind, with that kind's keys (defaults filled in)."""

    kind: str
    count: int
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class DayScenario:
    groups: tuple[Group, ...]
    seed: int = 1
    date: datetime.date = datetime.date(2026, 6, 21)
    step_s: int = 60
    start_h: float = 0.0
    duration_h: float = 24.0
    deadband_kw: float = 0.001
    pv_resolution_s: int = QUARTER_HOUR_S
    ping_interval_s: float = 20.0
    dead_after_s: float = 60.0
    latency: str = "60e-6"
    topology: str = "random-regular"
    degree: int = 4
    edges_file: str | None = None
    faults: tuple[tuple[str, str], ...] = ()  # (kind, "HH:MM[-HH:MM]:TARGETS")
    name: str = "day"

    @property
    def nodes(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def steps(self) -> int:
        return round(self.duration_h * SECONDS_PER_HOUR / self.step_s)

    @property
    def first_step(self) -> int:
        """The profile step the run starts at (step 0 is midnight)."""
        return round(self.start_h * SECONDS_PER_HOUR / self.step_s)


# ----------------------------------------------------------------------------- reading it


def load_day(path: str) -> DayScenario:
    """Read and check a scenario file (module docstring); every mistake is a SimError."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise SimError(f"cannot read scenario {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SimError(f"{path}: not valid TOML: {exc}") from None
    name = path.rsplit("/", 1)[-1].removesuffix(".toml")
    return parse_day(data, name, where=path)


def _table(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise SimError(f"{where}: [{key}] must be a table")
    return value


def _keys(table: Mapping[str, Any], allowed: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise SimError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(allowed)}")
    out = dict(allowed)
    out.update(table)
    missing = [k for k, v in out.items() if v is None and k != "file"]
    if missing:
        raise SimError(f"{where}: missing key {missing[0]!r}")
    return out


def _number(where: str, value: Any, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and low <= value <= high):
        raise SimError(f"{where}: must be a number in {low:g}..{high:g}, got {value!r}")
    return float(value)


def _range(where: str, value: Any, low: float, high: float = math.inf) -> tuple[float, float]:
    """A number, or a [low, high] list to draw from."""
    if isinstance(value, list):
        if len(value) != 2:
            raise SimError(f"{where}: a range is [low, high], got {value!r}")
        a, b = (_number(where, v, low, high) for v in value)
        if a > b:
            raise SimError(f"{where}: low above high in {value!r}")
        return a, b
    a = _number(where, value, low, high)
    return a, a


def parse_day(data: Mapping[str, Any], name: str = "day", where: str = "scenario"
              ) -> DayScenario:
    """A `DayScenario` from parsed TOML (what `load_day` does after reading the file)."""
    unknown = sorted(set(data) - {"scenario", "topology", "group", "faults"})
    if unknown:
        raise SimError(f"{where}: unknown table [{unknown[0]}]; known: scenario, topology, "
                       f"group, faults")
    sc = _keys(_table(data, "scenario", where), SCENARIO_KEYS, f"{where} [scenario]")
    top = _keys(_table(data, "topology", where), TOPOLOGY_KEYS, f"{where} [topology]")
    at = f"{where} [scenario]"
    if isinstance(sc["seed"], bool) or not isinstance(sc["seed"], int):
        raise SimError(f"{at} seed: must be an integer, got {sc['seed']!r}")
    if not isinstance(sc["date"], datetime.date) or isinstance(sc["date"], datetime.datetime):
        raise SimError(f"{at} date: must be a TOML date such as 2026-06-21, got {sc['date']!r}")
    step_s = sc["step_s"]
    if isinstance(step_s, bool) or not isinstance(step_s, int) or step_s <= 0 or \
            QUARTER_HOUR_S % step_s:
        raise SimError(f"{at} step_s: must be a whole divisor of {QUARTER_HOUR_S} s "
                       f"(60, 300, 900 ...), got {step_s!r}")
    pv_res = sc["pv_resolution_s"]
    if isinstance(pv_res, bool) or not isinstance(pv_res, int) or pv_res < step_s or \
            pv_res % step_s or QUARTER_HOUR_S % pv_res:
        raise SimError(f"{at} pv_resolution_s: a multiple of step_s ({step_s}) that divides "
                       f"{QUARTER_HOUR_S}, got {pv_res!r}")
    duration_h = _number(f"{at} duration_h", sc["duration_h"], step_s / SECONDS_PER_HOUR,
                         24 * 7)
    ping = _number(f"{at} ping_interval_s", sc["ping_interval_s"], 0.01, 3600)
    dead = _number(f"{at} dead_after_s", sc["dead_after_s"], 2 * ping, 36_000)
    if not isinstance(sc["latency"], str):
        raise SimError(f"{at} latency: a string as zgrid-sim --latency, e.g. \"60e-6\"")
    try:
        Latency.parse(sc["latency"])
    except ValueError as exc:
        raise SimError(f"{at} latency: {exc}") from None
    if top["kind"] not in TOPOLOGIES:
        raise SimError(f"{where} [topology] kind: one of {', '.join(TOPOLOGIES)}, "
                       f"got {top['kind']!r}")
    degree = top["degree"]
    if isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree <= 64:
        raise SimError(f"{where} [topology] degree: an integer in 1..64, got {degree!r}")
    groups = []
    raw_groups = data.get("group", [])
    if not isinstance(raw_groups, list) or not raw_groups:
        raise SimError(f"{where}: at least one [[group]] of nodes is needed")
    for n, raw in enumerate(raw_groups):
        gat = f"{where} group[{n}]"
        if not isinstance(raw, Mapping) or raw.get("kind") not in KINDS:
            raise SimError(f"{gat} kind: one of {', '.join(KINDS)}, got "
                           f"{raw.get('kind') if isinstance(raw, Mapping) else raw!r}")
        kind = raw["kind"]
        params = _keys({k: v for k, v in raw.items() if k != "kind"}, GROUP_KEYS[kind], gat)
        count = params["count"]
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 100_000:
            raise SimError(f"{gat} count: an integer in 0..100000, got {count!r}")
        _check_group(kind, params, gat)
        groups.append(Group(kind, count, params))
    faults: list[tuple[str, str]] = []
    for kind, texts in _table(data, "faults", where).items():
        if kind not in ("partition", "crash", "freeze") or not isinstance(texts, list):
            raise SimError(f"{where} [faults]: partition, crash or freeze = [\"HH:MM-HH:MM:"
                           f"TARGETS\", ...], got {kind!r}")
        faults.extend((kind, str(text)) for text in texts)
    scenario = DayScenario(
        groups=tuple(groups), seed=sc["seed"], date=sc["date"], step_s=step_s,
        duration_h=duration_h,
        start_h=_number(f"{at} start_h", sc["start_h"], 0.0, 24.0 - step_s / SECONDS_PER_HOUR),
        deadband_kw=_number(f"{at} deadband_kw", sc["deadband_kw"], 0.0, 1000.0),
        pv_resolution_s=pv_res,
        ping_interval_s=ping, dead_after_s=dead, latency=sc["latency"], topology=top["kind"],
        degree=degree, edges_file=top["file"], faults=tuple(faults), name=name)
    if scenario.nodes < 2:
        raise SimError(f"{where}: a grid needs at least 2 nodes, got {scenario.nodes}")
    return scenario


def _check_group(kind: str, p: Mapping[str, Any], at: str) -> None:
    """Range-check a group's keys once, so that building its nodes cannot fail later."""
    for key in ("annual_kwh", "capacity_kwh", "power_kw", "min_kw", "max_kw"):
        if key in p:
            _number(f"{at} {key}", p[key], 0.0, 1e9)
    for key in ("scale_sigma", "shift_max_h"):
        if key in p:
            _number(f"{at} {key}", p[key], 0.0, 12.0)
    if "pv_kwp" in p:
        _range(f"{at} pv_kwp", p["pv_kwp"], 0.0, 1e6)
    if "soc" in p:
        _range(f"{at} soc", p["soc"], 0.0, 1.0)
    for key in ("price", "curtail_price"):
        if key in p:
            _range(f"{at} {key}", p[key], -1e6, 1e6)
    if kind == "plant":
        if p["min_kw"] > p["max_kw"]:
            raise SimError(f"{at} min_kw: must be at most max_kw ({p['max_kw']:g})")
        if p["output_kw"] != "flat":
            _number(f"{at} output_kw", p["output_kw"], p["min_kw"], p["max_kw"])
    if kind == "battery":
        try:  # the model's own checks, with its own messages
            Battery(p["capacity_kwh"], p["power_kw"], 0.0, p["efficiency"], p["price_empty"],
                    p["price_full"])
        except ValueError as exc:
            raise SimError(f"{at} {exc}") from None


def _time_of_day_s(text: str, where: str) -> float:
    hours, sep, minutes = text.partition(":")
    try:
        h, m = int(hours), int(minutes) if sep else 0
    except ValueError:
        raise SimError(f"{where}: times are HH:MM, got {text!r}") from None
    if not (0 <= h <= 24 * 7 and 0 <= m < 60):
        raise SimError(f"{where}: times are HH:MM, got {text!r}")
    return h * SECONDS_PER_HOUR + m * 60.0


def parse_day_fault(kind: str, text: str, names: Sequence[str],
                    edges: Sequence[tuple[int, int]]) -> Fault:
    """`HH:MM[-HH:MM]:TARGETS` into a Fault (times from the start of the day)."""
    where = f"[faults] {kind} {text!r}"
    parts = text.split(":")
    if len(parts) < 3:
        raise SimError(f"{where}: expected HH:MM[-HH:MM]:TARGETS, e.g. 12:00-12:30:half")
    when, targets = ":".join(parts[:-1]), parts[-1]
    start_text, dash, end_text = when.partition("-")
    start = _time_of_day_s(start_text, where)
    end = f"-{_time_of_day_s(end_text, where)!r}" if dash else ""
    return parse_fault(kind, f"{start!r}{end}:{targets}", names, edges)


# ----------------------------------------------------------------------------- the nodes


@dataclass(slots=True)
class DayNode:
    """One node's day: its base profile (kW per step) and its device, if it has one."""

    kind: str
    production: Callable[[int], float]
    consumption: Callable[[int], float]
    device: Device | None = None


def _held(series: Sequence[float], steps_per_value: int) -> Callable[[int], float]:
    """Step k's value of a series each of whose values holds for `steps_per_value` steps."""
    values = tuple(series)
    return lambda k: values[(k // steps_per_value) % len(values)]


def _quarter_hourly(series: Sequence[float], step_s: int) -> Callable[[int], float]:
    return _held(series, QUARTER_HOUR_S // step_s)


def _zero(_k: int) -> float:
    return 0.0


def _draw(rng: random.Random, value: Any) -> float:
    low, high = _range("", value, -math.inf)
    return low if low == high else rng.uniform(low, high)


def build_nodes(sc: DayScenario, rng: random.Random) -> list[DayNode]:
    """Every node's profile and device, group by group, in file order (draws in that order)."""
    day = sc.date
    nodes: list[DayNode] = []
    pv_shape = profiles.pv_kw_per_kwp(day, sc.pv_resolution_s) if any(
        g.kind == "pv_household" and g.count for g in sc.groups) else ()
    plants: list[tuple[DayNode, Group]] = []
    for g in sc.groups:
        p = g.params
        for _ in range(g.count):
            if g.kind in ("household", "pv_household"):
                base = profiles.household_kw(day, p["annual_kwh"], QUARTER_HOUR_S)
                load = profiles.vary(rng, base, scale_sigma=p["scale_sigma"],
                                     shift_max_steps=round(p["shift_max_h"] * 4))
                node = DayNode(g.kind, _zero, _quarter_hourly(load, sc.step_s))
                if g.kind == "pv_household":
                    kwp = _draw(rng, p["pv_kwp"])
                    node.production = _held([kwp * x for x in pv_shape],
                                            sc.pv_resolution_s // sc.step_s)
                    node.device = CurtailablePV(output_kw=0.0,
                                                price_down=_draw(rng, p["curtail_price"]),
                                                peak_kw=kwp)
            elif g.kind == "battery":
                capacity = p["capacity_kwh"]
                node = DayNode(g.kind, _zero, _zero, Battery(
                    capacity, p["power_kw"], capacity * _draw(rng, p["soc"]), p["efficiency"],
                    p["price_empty"], p["price_full"]))
            elif g.kind == "factory":
                base = profiles.commercial_kw(day, p["annual_kwh"], QUARTER_HOUR_S,
                                              profile=p["profile"])
                load = profiles.vary(rng, base, scale_sigma=p["scale_sigma"], shift_max_steps=0)
                node = DayNode(g.kind, _zero, _quarter_hourly(load, sc.step_s))
            else:
                node = DayNode(g.kind, _zero, _zero)
                plants.append((node, g))
            nodes.append(node)
    _schedule_plants(sc, nodes, plants, rng)
    return nodes


def _schedule_plants(sc: DayScenario, nodes: Sequence[DayNode],
                     plants: Sequence[tuple[DayNode, Group]], rng: random.Random) -> None:
    """A day-ahead schedule: each plant runs flat at its share of the day's mean residual load
    (consumption minus PV, from the same profiles: a perfect forecast of the day's energy,
    none of its shape), or at its `output_kw`. Balancing covers the rest."""
    if not plants:
        return
    steps = range(round(24 * SECONDS_PER_HOUR / sc.step_s))  # the whole day, whatever runs
    residual = sum(sum(n.consumption(k) - n.production(k) for n in nodes) for k in steps)
    share = max(residual / len(steps), 0.0) / len(plants)
    for node, g in plants:
        p = g.params
        output = share if p["output_kw"] == "flat" else float(p["output_kw"])
        output = min(max(output, p["min_kw"]), p["max_kw"])
        node.device = DispatchablePlant(p["min_kw"], p["max_kw"], _draw(rng, p["price"]), output)
        node.production = _held((output,), 1)


# ----------------------------------------------------------------------------- measuring


class NetMeter(Observer):
    """Integrates |grid net| over virtual time, the net changing at every activation change
    (a core's new own advert) and at every step's new base values (`set_base`)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.activation: list[float] = [0.0] * sim.n
        self.activation_sum = 0.0
        self.base_kw = 0.0
        self.at = sim.now
        self.energy_kws = 0.0  # integral of |base + commanded activations| dt

    def _advance(self, t: float) -> None:
        self.energy_kws += abs(self.base_kw + self.activation_sum) * (t - self.at)
        self.at = t

    def set_base(self, base_kw: float) -> None:
        self._advance(self.sim.now)
        self.base_kw = base_kw

    def own_bumped(self, i: int, advert: Advert) -> None:
        if advert.activation_kw != self.activation[i]:
            self._advance(self.sim.now)
            self.activation_sum += advert.activation_kw - self.activation[i]
            self.activation[i] = advert.activation_kw

    def crashed(self, i: int, core: Any) -> None:
        self.own_bumped(i, _NO_ACTIVATION)  # a dead controller activates nothing

    def read(self) -> float:
        self._advance(self.sim.now)
        return self.energy_kws


_NO_ACTIVATION = Advert("-", 1, 0, 0.0, 0.0, (), "", 0)


@dataclass(slots=True)
class DayResult:
    scenario: DayScenario
    summary: dict[str, Any]
    series: dict[str, list[Any]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- running it


def run_day(sc: DayScenario, progress: Callable[[int], None] | None = None) -> DayResult:
    """Build the grid, run the day step by step, and report (module docstring)."""
    with cyclic_gc_off():
        return _run_day(sc, progress)


def _run_day(sc: DayScenario, progress: Callable[[int], None] | None) -> DayResult:
    wall_started = time.perf_counter()
    rng = random.Random(sc.seed)
    names, edges = build_graph(sc.topology, sc.nodes, sc.degree, sc.seed, sc.edges_file)
    if len(names) != sc.nodes:
        raise SimError(f"the edge list has {len(names)} nodes, the groups {sc.nodes}")
    nodes = build_nodes(sc, rng)
    # Place the kinds at random across the graph, and name each node after its kind.
    order = list(range(sc.nodes))
    rng.shuffle(order)
    placed: list[DayNode] = [nodes[0]] * sc.nodes
    counters: dict[str, int] = {}
    for slot, node in zip(order, nodes, strict=True):
        placed[slot] = node
        counters[node.kind] = counters.get(node.kind, 0) + 1
        names[slot] = f"{node.kind.replace('_', '-')}{counters[node.kind]}"
    nodes = placed
    faults = [parse_day_fault(kind, text, names, edges) for kind, text in sc.faults]
    first = sc.first_step
    for fault in faults:
        if fault.start_s < first * sc.step_s:
            raise SimError(f"[faults] {fault.kind} at {fault.start_s / SECONDS_PER_HOUR:g} h "
                           f"is before the run starts (start_h = {sc.start_h:g})")

    sim = Simulator(names, seed=sc.seed, link=LinkModel(latency=Latency.parse(sc.latency)),
                    wire_mode="fast", ping_interval_s=sc.ping_interval_s,
                    dead_after_s=sc.dead_after_s, forget_after_s=max(600.0, 10 * sc.dead_after_s),
                    measure=False)
    advertised = [(n.production(first), n.consumption(first)) for n in nodes]
    preload_converged(sim, edges, advertised)
    meter = sim.attach(NetMeter(sim))
    t0 = sim.now
    schedule_faults(sim, faults, t0 - first * sc.step_s)  # fault times count from midnight
    devices = [(i, n.device) for i, n in enumerate(nodes) if n.device is not None]
    step_h = sc.step_s / SECONDS_PER_HOUR
    rec = _Recorder(sc, nodes)
    started_delivered = sim.stats.delivered
    loop_started = time.perf_counter()
    for k in range(first, first + sc.steps):
        now = t0 + (k - first) * sc.step_s
        sim.run_until(now)  # events of the instant before the step (faults at the boundary)
        production = consumption = 0.0
        for i, node in enumerate(nodes):
            p, c = node.production(k), node.consumption(k)
            production += p
            consumption += c
            adv_p, adv_c = advertised[i]
            moved = abs(p - adv_p) >= sc.deadband_kw or abs(c - adv_c) >= sc.deadband_kw or (
                (p == 0.0) != (adv_p == 0.0)) or ((c == 0.0) != (adv_c == 0.0))
            if moved and sim.cores[i] is not None and not sim.frozen[i]:
                sim.set_value(i, p, c)
                advertised[i] = (p, c)
            if node.device is not None:
                node.device.follow(p, c)
        for i, device in devices:
            sim.device_changed(i, device.offer(), device.rating_kw, device.state())
        base = production - consumption
        meter.set_base(base)
        delivered_before = sim.stats.delivered
        sim.run_until(now + sc.step_s - 1e-9)
        # The step ends: every device does what its core asks, as far as it can.
        commanded = applied = 0.0
        for i, device in devices:
            core = sim.cores[i]
            ask = core.activation_kw if core is not None and not sim.frozen[i] else 0.0
            device.apply(ask, sc.step_s)
            commanded += ask
            applied += device.applied_kw
        rec.step(sim, k, production, consumption, commanded, applied,
                 sim.stats.delivered - delivered_before, step_h)
        if progress is not None:
            progress(k - first + 1)
    sim.run_until(t0 + sc.steps * sc.step_s)
    loop_wall_s = time.perf_counter() - loop_started
    summary = rec.summary(meter.read() / SECONDS_PER_HOUR, sim.stats.delivered - started_delivered)
    summary["wall_s"] = round(time.perf_counter() - wall_started, 3)
    summary["loop_wall_s"] = round(loop_wall_s, 3)
    return DayResult(sc, summary, rec.series)


class _Recorder:
    """The per-step series and the day's figures."""

    def __init__(self, sc: DayScenario, nodes: Sequence[DayNode]) -> None:
        self.sc = sc
        self.series: dict[str, list[Any]] = {key: [] for key in (
            "hour", "load_kw", "production_kw", "imbalance_kw", "net_kw", "clamped_kw",
            "advertised_imbalance_kw", "shortfall_kw", "clearing_price", "soc_fraction",
            "battery_kw", "plant_kw", "pv_kw", "messages", "islands", "agreed")}
        self.device_nodes = [n for n in nodes if n.device is not None]
        self.batteries = [n.device for n in nodes if isinstance(n.device, Battery)]
        self.capacity = sum(b.capacity_kwh for b in self.batteries)
        self.energy_in_batteries_start = sum(b.soc_kwh for b in self.batteries)

    def step(self, sim: Simulator, k: int, production: float, load: float, commanded: float,
             applied: float, messages: int, step_h: float) -> None:
        s = self.series
        base = production - load
        by_kind = {"battery": 0.0, "plant": 0.0, "pv_household": 0.0}
        for device_node in self.device_nodes:
            assert device_node.device is not None
            by_kind[device_node.kind] += device_node.device.applied_kw
        # One clearing per protocol island, read off its first live member; islands agree
        # when every live member holds the same table at the end of the step.
        shortfall, advertised, price, agreed = 0.0, 0.0, None, True
        islands = 0
        for comp in sim.components():
            cores = [c for i in comp if (c := sim.cores[i]) is not None]
            if not cores:
                continue
            islands += 1
            clearing = cores[0].clearing(sim.now)
            shortfall += clearing.shortfall_kw
            advertised += clearing.imbalance_kw
            price = clearing.clearing_price if price is None else price
            agreed = agreed and len({c.table.hash for c in cores}) == 1
        s["hour"].append(round(k * step_h, 6))
        s["load_kw"].append(load)
        s["production_kw"].append(production)
        s["imbalance_kw"].append(base)
        s["net_kw"].append(base + applied)
        s["clamped_kw"].append(commanded - applied)
        s["advertised_imbalance_kw"].append(advertised)
        s["shortfall_kw"].append(shortfall)
        s["clearing_price"].append(price)
        s["soc_fraction"].append(sum(b.soc_kwh for b in self.batteries) / self.capacity
                                 if self.capacity else None)
        s["battery_kw"].append(by_kind["battery"])
        s["plant_kw"].append(by_kind["plant"])
        s["pv_kw"].append(by_kind["pv_household"])
        s["messages"].append(messages)
        s["islands"].append(islands)
        s["agreed"].append(agreed)

    def summary(self, transient_kwh: float, delivered: int) -> dict[str, Any]:
        s, sc = self.series, self.sc
        step_h = sc.step_s / SECONDS_PER_HOUR
        steps = len(s["hour"])
        sufficed = [k for k in range(steps) if s["shortfall_kw"][k] == 0.0]
        balanced = [k for k in sufficed
                    if abs(s["net_kw"][k]) <= BALANCED_FRACTION_OF_LOAD * s["load_kw"][k]]
        without = sum(abs(x) for x in s["imbalance_kw"]) * step_h
        with_end = sum(abs(x) for x in s["net_kw"]) * step_h
        clamped = sum(abs(x) for x in s["clamped_kw"]) * step_h
        # The meter integrates |net| with the commanded activations through every flood; what
        # devices could not do is added on top (an upper bound: |a + b| <= |a| + |b|).
        with_total = transient_kwh + clamped
        abs_net = [abs(x) for x in s["net_kw"]]
        batteries_end = sum(b.soc_kwh for b in self.batteries)
        ledger = sum(b.charged_kwh - b.discharged_kwh - b.losses_kwh for b in self.batteries)
        return {
            "scenario": sc.name,
            "nodes": sc.nodes,
            "date": sc.date.isoformat(),
            "steps": steps,
            "step_s": sc.step_s,
            "steps_flex_sufficed": len(sufficed),
            "steps_balanced_within_1pct": len(balanced),
            "balanced_fraction": round(len(balanced) / len(sufficed), 6) if sufficed else None,
            "steps_not_agreed_at_end": s["agreed"].count(False),
            "imbalance_kwh_without_balancing": round(without, 6),
            "imbalance_kwh_with_balancing": round(with_total, 6),
            "imbalance_kwh_at_step_ends": round(with_end, 6),
            "imbalance_kwh_clamped_by_devices": round(clamped, 6),
            # What the floods cost: |net| integrated through them, less what the step ends
            # would give if each step's final activations had held from its first instant.
            "imbalance_kwh_while_flooding": round(transient_kwh - with_end + clamped, 6),
            "imbalance_reduction": round(1 - with_total / without, 6) if without else None,
            "net_kw_p50": percentile(abs_net, 50),
            "net_kw_p99": percentile(abs_net, 99),
            "net_kw_max": max(abs_net, default=0.0),
            "load_kwh": round(sum(s["load_kw"]) * step_h, 3),
            "production_kwh": round(sum(s["production_kw"]) * step_h, 3),
            "shortfall_kwh": round(sum(s["shortfall_kw"]) * step_h, 6),
            "battery_soc_start_kwh": round(self.energy_in_batteries_start, 6),
            "battery_soc_end_kwh": round(batteries_end, 6),
            "battery_ledger_error_kwh": abs(self.energy_in_batteries_start + ledger
                                            - batteries_end),
            "messages": delivered,
            "messages_per_simulated_minute": round(delivered / (steps * sc.step_s / 60.0), 1),
        }
