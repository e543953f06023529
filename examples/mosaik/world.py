"""A day of a village in mosaik, balanced by zgrid.

    python examples/mosaik/world.py --out mosaik-results            # or: make mosaik-demo
    python examples/mosaik/world.py --out /tmp/m --households 3 --pv-households 1 --hours 1

The mosaik world has three simulators:

- ``Profiles`` (`ProfileSim`, below): one entity per household, whose outputs `production`
  and `consumption` (kW) follow a day of profiles at 15-minute steps: BDEW's household
  standard load profile H25 (demandlib) and, for PV households, pvlib's PV output, both
  through zgrid/sim/profiles.py, each household varied from --seed.
- ``Zgrid`` (zgrid/cosim.py): one zgrid node per household, the battery of
  examples/devices/battery.toml and a dispatchable plant. With --mode nodes (the default)
  they are real zgrid-node processes on 127.0.0.1; with --mode sim, the in-process simulator.
- ``Recorder`` (`Recorder`, below): collects zgrid's outputs at every step.

It writes into --out: ``island.csv`` (per step: the island's net before balancing, the net
the grid agreed on after balancing, the net once the devices did what they could, the
clearing price, the battery's charge, what the battery, plant and PV did), ``nodes.csv`` (per
step and node: every output of the adapter) and ``island.png`` (the day, plotted).

`run_world` is the whole scenario as a function; its `after_run` hook is called while the
simulators (and the zgrid nodes) are still running, which is how tests/test_cosim.py compares
what the adapter returned with what the nodes report.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mosaik
import mosaik_api_v3

from zgrid.cosim import OUTPUTS
from zgrid.sim import profiles

STEP_S = 900  # the profiles' quarter hour; one mosaik step (time_resolution 1 s)
STEPS_PER_DAY = 96
ANNUAL_KWH = 3500.0  # a household's yearly consumption
SCALE_SIGMA = 0.3  # households vary by a lognormal factor (median 1) ...
SHIFT_MAX_STEPS = 4  # ... and a time shift of up to +-1 h
PV_KWP = (3.0, 8.0)  # a PV household's panels, drawn uniformly
PLANT_PRICE = 0.12  # per kWh: dearer than the battery when it is half full
PLANT_HEADROOM = 1.2  # the plant's maximum over the day's peak residual load
BATTERY_FILE = Path(__file__).resolve().parents[1] / "devices" / "battery.toml"
ISLAND_COLUMNS = ("time_s", "hour", "imbalance_kw", "balanced_net_kw", "net_after_devices_kw",
                  "clearing_price", "shortfall_kw", "battery_soc_kwh", "battery_kw", "plant_kw",
                  "pv_kw", "island_size")

SIM_CONFIG: dict[str, Any] = {
    "Profiles": {"python": f"{__name__}:ProfileSim"},
    "Zgrid": {"python": "zgrid.cosim:ZgridSim"},
    "Recorder": {"python": f"{__name__}:Recorder"},
}


@dataclass(frozen=True, slots=True)
class Options:
    out: Path
    households: int = 12
    pv_households: int = 8
    hours: float = 24.0
    start_hour: float = 0.0
    mode: str = "nodes"
    seed: int = 1
    date: datetime.date = datetime.date(2026, 6, 21)
    topology: str = "ring"

    @property
    def steps(self) -> int:
        return max(1, round(self.hours * 3600 / STEP_S))

    @property
    def first_step(self) -> int:
        return round(self.start_hour * 3600 / STEP_S)


# ----------------------------------------------------------------------------- simulators


class ProfileSim(mosaik_api_v3.Simulator):
    """Households playing a day of profiles: `production` and `consumption` in kW, one value
    per 15-minute step (params: the two series, 96 values each, and the first step)."""

    def __init__(self) -> None:
        super().__init__({  # type: ignore[no-untyped-call]  # mosaik_api_v3's is untyped
            "api_version": "3.0", "type": "time-based", "models": {
                "House": {"public": True, "params": ["production", "consumption", "first_step"],
                          "attrs": ["production", "consumption"]}}})
        self.series: dict[str, tuple[Sequence[float], Sequence[float], int]] = {}
        self.time = 0

    def init(self, sid: str, time_resolution: float = 1.0, **sim_params: Any) -> Any:
        if time_resolution != 1.0:
            raise ValueError(f"ProfileSim counts seconds: time_resolution 1, got {time_resolution}")
        return self.meta

    def create(self, num: int, model: str, **params: Any) -> list[Any]:
        out = []
        for _ in range(num):
            eid = f"house{len(self.series) + 1}"
            self.series[eid] = (params["production"], params["consumption"],
                                params.get("first_step", 0))
            out.append({"eid": eid, "type": model})
        return out

    def step(self, time: int, inputs: Any, max_advance: int) -> int:
        self.time = time
        return time + STEP_S

    def get_data(self, outputs: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
        data = {}
        for eid, attrs in outputs.items():
            production, consumption, first = self.series[eid]
            k = (first + self.time // STEP_S) % STEPS_PER_DAY
            values = {"production": production[k], "consumption": consumption[k]}
            data[eid] = {attr: values[attr] for attr in attrs}
        return data


class Recorder(mosaik_api_v3.Simulator):
    """Collects every input at every step and writes them as CSV in `finalize` (params: the
    output directory, each zgrid entity's role (household, pv, battery or plant) and the hour
    of the day mosaik's time 0 is)."""

    def __init__(self) -> None:
        super().__init__({  # type: ignore[no-untyped-call]  # mosaik_api_v3's is untyped
            "api_version": "3.0", "type": "time-based", "models": {
                "Recorder": {"public": True, "params": ["out", "roles", "start_hour"],
                             "attrs": [], "any_inputs": True}}})
        self.out = Path(".")
        self.roles: dict[str, str] = {}
        self.start_hour = 0.0
        self.rows: list[dict[str, Any]] = []  # one per step and node

    def init(self, sid: str, time_resolution: float = 1.0, **sim_params: Any) -> Any:
        return self.meta

    def create(self, num: int, model: str, **params: Any) -> list[Any]:
        if num != 1 or self.rows:
            raise ValueError("one Recorder per world")
        self.out, self.roles = Path(params["out"]), dict(params["roles"])
        self.start_hour = float(params.get("start_hour", 0.0))
        return [{"eid": "recorder", "type": model}]

    def step(self, time: int, inputs: Mapping[str, Any], max_advance: int) -> int:
        by_node: dict[str, dict[str, Any]] = {}
        for attrs in inputs.values():
            for attr, sources in attrs.items():
                for source, value in sources.items():
                    by_node.setdefault(source.split(".", 1)[1], {})[attr] = value
        for node, values in sorted(by_node.items()):
            self.rows.append({"time_s": time, "node": node, "role": self.roles.get(node, ""),
                              **values})
        return time + STEP_S

    def get_data(self, outputs: Any) -> dict[str, Any]:
        return {}

    def finalize(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_csv(self.out / "nodes.csv", ("time_s", "node", "role", *OUTPUTS), self.rows)
        write_csv(self.out / "island.csv", ISLAND_COLUMNS,
                  island_rows(self.rows, self.start_hour))


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


def island_rows(rows: Sequence[Mapping[str, Any]], start_hour: float) -> list[dict[str, Any]]:
    """Per step: sums over every node (the physics of one copper grid), and the island's
    agreed figures as its first node reports them (every member reports the same); `hour` is
    the hour of the day."""
    steps: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        steps.setdefault(row["time_s"], []).append(row)
    out = []
    for t, nodes in sorted(steps.items()):
        first = nodes[0]

        def total(key: str, role: str | None = None,
                  nodes: Sequence[Mapping[str, Any]] = nodes) -> float:
            return math.fsum(n[key] or 0.0 for n in nodes if role in (None, n["role"]))

        net = total("net")
        out.append({
            "time_s": t, "hour": round(start_hour + t / 3600, 4), "imbalance_kw": net,
            "balanced_net_kw": first["balanced_net_kw"],
            "net_after_devices_kw": net + total("applied_kw"),
            "clearing_price": first["clearing_price"], "shortfall_kw": first["shortfall_kw"],
            "battery_soc_kwh": total("soc_kwh", "battery"), "battery_kw": total("applied_kw",
                                                                                "battery"),
            "plant_kw": total("applied_kw", "plant"), "pv_kw": total("applied_kw", "pv"),
            "island_size": first["island_size"]})
    return out


# ----------------------------------------------------------------------------- the world


@dataclass(frozen=True, slots=True)
class House:
    node_id: str
    role: str  # household or pv
    production: tuple[float, ...]
    consumption: tuple[float, ...]
    kwp: float = 0.0


def make_houses(options: Options) -> list[House]:
    """Every household's day, drawn from one generator seeded by --seed."""
    rng = random.Random(options.seed)
    base = profiles.household_kw(options.date, ANNUAL_KWH, STEP_S)
    pv = profiles.pv_kw_per_kwp(options.date, STEP_S) if options.pv_households else ()
    houses = []
    for n in range(options.households + options.pv_households):
        load = profiles.vary(rng, base, scale_sigma=SCALE_SIGMA, shift_max_steps=SHIFT_MAX_STEPS)
        if n < options.households:
            houses.append(House(f"house{n + 1}", "household", (0.0,) * STEPS_PER_DAY, load))
        else:
            kwp = rng.uniform(*PV_KWP)
            houses.append(House(f"pv{n + 1 - options.households}", "pv",
                                tuple(kwp * x for x in pv), load, kwp))
    return houses


def plant_schedule(houses: Sequence[House]) -> tuple[float, float]:
    """(output_kw, max_kw): the plant runs flat at the day's mean residual load (a perfect
    forecast of the day's energy, none of its shape); its maximum covers the peak."""
    residual = [math.fsum(h.consumption[k] - h.production[k] for h in houses)
                for k in range(STEPS_PER_DAY)]
    flat = max(math.fsum(residual) / STEPS_PER_DAY, 0.0)
    return round(flat, 3), round(max(max(residual), flat, 1.0) * PLANT_HEADROOM, 3)


AfterRun = Callable[[mosaik.World, Mapping[str, Any]], None]


def run_world(options: Options, after_run: AfterRun | None = None) -> dict[str, Any]:
    """Build the world, run it, write the CSVs and the plot; a summary of the run.

    after_run(world, entities): called after the run while every simulator (and every zgrid
    node) is still up; `entities` maps node ids to their zgrid entities."""
    started = time.perf_counter()
    houses = make_houses(options)
    output_kw, max_kw = plant_schedule(houses)
    roles = {h.node_id: h.role for h in houses} | {"battery": "battery", "plant": "plant"}
    with mosaik.World(SIM_CONFIG, skip_greetings=True) as world:
        source = world.start("Profiles")
        zgrid = world.start("Zgrid", mode=options.mode, step_size=STEP_S,
                            topology=options.topology)
        recorder = world.start("Recorder").Recorder(out=str(options.out), roles=roles,
                                                    start_hour=options.start_hour)
        entities: dict[str, Any] = {}
        for house in houses:
            profile = source.House(production=list(house.production),
                                   consumption=list(house.consumption),
                                   first_step=options.first_step)
            if house.role == "pv":  # panels that can be curtailed (for free) in a surplus
                node = zgrid.Node(node_id=house.node_id,
                                  device={"kind": "pv", "output_kw": 0.0, "peak_kw": house.kwp})
            else:
                node = zgrid.Node(node_id=house.node_id)
            world.connect(profile, node, "production", "consumption")
            entities[house.node_id] = node
        entities["battery"] = zgrid.Node(node_id="battery", device_file=str(BATTERY_FILE))
        entities["plant"] = zgrid.Plant(node_id="plant", min_kw=0.0, max_kw=max_kw,
                                        price=PLANT_PRICE, output_kw=output_kw)
        for node in entities.values():
            world.connect(node, recorder, *OUTPUTS)
        world.run(until=options.steps * STEP_S, print_progress=False)
        if after_run is not None:
            after_run(world, entities)
    rows = read_island(options.out / "island.csv")
    plot(rows, options.out / "island.png", options)
    before = math.fsum(abs(r["imbalance_kw"]) for r in rows) * STEP_S / 3600
    after = math.fsum(abs(r["net_after_devices_kw"]) for r in rows) * STEP_S / 3600
    return {"nodes": len(entities), "steps": len(rows), "imbalance_kwh_before": before,
            "imbalance_kwh_after": after, "wall_s": time.perf_counter() - started}


def read_island(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{k: float(v) if v != "" else math.nan for k, v in row.items()}
                for row in csv.DictReader(f)]


def plot(rows: Sequence[Mapping[str, float]], path: Path, options: Options) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    hours = [r["hour"] for r in rows]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    top.step(hours, [r["imbalance_kw"] for r in rows], where="post", label="before balancing")
    top.step(hours, [r["net_after_devices_kw"] for r in rows], where="post",
             label="after balancing")
    top.axhline(0.0, color="grey", linewidth=0.5)
    top.set_ylabel("island net (kW)")
    top.set_title(f"{options.households} households, {options.pv_households} with PV, a battery "
                  f"and a plant ({options.mode} mode, {options.date})")
    top.legend(loc="upper right")
    for key, label in (("battery_kw", "battery"), ("plant_kw", "plant"), ("pv_kw", "PV")):
        middle.step(hours, [r[key] for r in rows], where="post", label=label)
    middle.set_ylabel("activation (kW)")
    middle.legend(loc="upper right")
    soc = middle.twinx()
    soc.plot(hours, [r["battery_soc_kwh"] for r in rows], color="black", linestyle=":",
             label="battery charge")
    soc.set_ylabel("charge (kWh)")
    bottom.step(hours, [r["clearing_price"] for r in rows], where="post")
    bottom.set_ylabel("clearing price (per kWh)")
    bottom.set_xlabel("hour of the day")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the results")
    parser.add_argument("--households", type=int, default=12, help="households without PV")
    parser.add_argument("--pv-households", type=int, default=8, help="households with PV")
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours")
    parser.add_argument("--start-hour", type=float, default=0.0, help="hour of day to start at")
    parser.add_argument("--mode", choices=("nodes", "sim"), default="nodes",
                        help="real zgrid-node processes, or the in-process simulator")
    parser.add_argument("--seed", type=int, default=1, help="varies the households")
    parser.add_argument("--date", type=datetime.date.fromisoformat,
                        default=datetime.date(2026, 6, 21), help="the profiles' day")
    parser.add_argument("--topology", choices=("ring", "line", "star", "full"), default="ring")
    args = parser.parse_args(argv)
    if args.households < 0 or args.pv_households < 0 or args.households + args.pv_households < 1:
        parser.error("at least one household is needed")
    if not 0 < args.hours <= 24 * 7:
        parser.error("--hours must be in (0, 168]")
    if not 0 <= args.start_hour < 24:
        parser.error("--start-hour must be in [0, 24)")
    return Options(out=args.out, households=args.households, pv_households=args.pv_households,
                   hours=args.hours, start_hour=args.start_hour, mode=args.mode, seed=args.seed,
                   date=args.date, topology=args.topology)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    summary = run_world(options)
    print(f"{summary['nodes']} nodes, {summary['steps']} steps of {STEP_S // 60} min in "
          f"{summary['wall_s']:.1f} s: island imbalance {summary['imbalance_kwh_before']:.2f} kWh "
          f"before balancing, {summary['imbalance_kwh_after']:.2f} kWh after; results in "
          f"{options.out}/ (island.csv, nodes.csv, island.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
