"""zgrid in mosaik: the adapter (zgrid/cosim.py) and the example world (examples/mosaik/world.py).

- The example world on real zgrid-node processes the adapter starts (a shortened horizon, few
  households): what the adapter returned for the last step is what `zgrid-ctl --json status`
  reports on every node; at every step the outputs are one agreed view whose total is the sum
  of the nodes' values; balancing reduced the imbalance; the nodes are gone after the run;
  and the same world in "sim" mode gives byte-identical outputs.
- The same world in "sim" mode: the same checks on the series, the battery's charge follows
  what it did, and two runs are identical.
- Existing nodes given by endpoint: driven, and left running; devices on the nodes' own clock
  (`zgrid-node --device`); a data dir holding an earlier run's nodes is refused.
- `disagreement` (the agreement test) and the parameter checks, without mosaik running.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import HOST, Grid, ctl

mosaik = pytest.importorskip("mosaik")
cosim = pytest.importorskip("zgrid.cosim")

WORLD_FILE = Path(__file__).resolve().parents[1] / "examples" / "mosaik" / "world.py"
WORLD_MODULE = "zgrid_example_mosaik_world"  # mosaik imports the world's simulators by name
# What the adapter returns that the node's status reports under the same name.
COMPARED = ("production", "consumption", "net", "total_net", "island_size", "activation_kw",
            "balanced_net_kw", "imbalance_kw", "clearing_price", "shortfall_kw")
TOLERANCE_KW = 1e-6
CONNECT_TIMEOUT_S = 1.0  # a TCP connect to a port nobody listens on is refused at once
QUARTER_H = 0.25


def world() -> ModuleType:
    if WORLD_MODULE in sys.modules:
        return sys.modules[WORLD_MODULE]
    spec = importlib.util.spec_from_file_location(WORLD_MODULE, WORLD_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[WORLD_MODULE] = module
    spec.loader.exec_module(module)
    return module


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def number(text: str) -> float | None:
    return None if text == "" else float(text)


def check_series(out: Path, steps: int, nodes: int) -> list[dict[str, str]]:
    """Every step of nodes.csv is one agreed view: all nodes report the same island figures,
    the total is the sum of their nets, the balanced net is what the activations make of it;
    and balancing reduced the imbalance. Returns island.csv's rows."""
    rows = read_csv(out / "nodes.csv")
    by_step: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_step.setdefault(row["time_s"], []).append(row)
    assert len(by_step) == steps
    for t, members in by_step.items():
        assert len(members) == nodes, t
        for key in ("total_net", "imbalance_kw", "balanced_net_kw", "clearing_price",
                    "island_size"):
            assert len({m[key] for m in members}) == 1, (t, key)
        # Exactly the sum of every node's values (each node's own net is rounded already).
        total = math.fsum([float(m["production"]) for m in members]
                          + [-float(m["consumption"]) for m in members])
        assert float(members[0]["total_net"]) == total, t
        assert float(members[0]["island_size"]) == nodes
        balanced = total + math.fsum(float(m["activation_kw"]) for m in members)
        assert abs(balanced - float(members[0]["balanced_net_kw"])) < TOLERANCE_KW, t
    island = read_csv(out / "island.csv")
    assert len(island) == steps
    before = math.fsum(abs(float(r["imbalance_kw"])) for r in island)
    after = math.fsum(abs(float(r["net_after_devices_kw"])) for r in island)
    assert before > 1.0, "the horizon should need balancing"
    assert after < 0.5 * before, (before, after)
    assert (out / "island.png").stat().st_size > 10_000
    return island


# ----------------------------------------------------------------------------- real nodes


def test_example_world_on_real_nodes_agrees_with_zgrid_ctl(tmp_path: Path) -> None:
    w = world()
    options = w.Options(out=tmp_path / "nodes", households=2, pv_households=1, hours=1.0,
                        start_hour=12.0, mode="nodes")
    endpoints: dict[str, str] = {}

    def compare(mosaik_world: Any, entities: dict[str, Any]) -> None:
        outputs = mosaik_world.get_data(list(entities.values()), *COMPARED)
        for node_id, entity in entities.items():
            endpoint = entity.extra_info["endpoint"]
            endpoints[node_id] = endpoint
            status = json.loads(ctl("--json", "status", node=endpoint, check=True).stdout)
            assert status["id"] == node_id
            got = outputs[entity]
            for key in COMPARED:
                assert got[key] == status[key], (node_id, key, got[key], status[key])

    summary = w.run_world(options, after_run=compare)
    assert sorted(endpoints) == ["battery", "house1", "house2", "plant", "pv1"]
    assert summary["steps"] == 4
    check_series(tmp_path / "nodes", 4, 5)
    # The same world in the simulator: the same unmodified cores decide the same, to the bit.
    w.run_world(dataclasses.replace(options, out=tmp_path / "sim", mode="sim"))
    assert (tmp_path / "sim" / "nodes.csv").read_bytes() == \
        (tmp_path / "nodes" / "nodes.csv").read_bytes()
    for node_id, endpoint in endpoints.items():  # finalize stopped every node it started
        port = int(endpoint.rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT_S).close()
            pytest.fail(f"{node_id} still listens on {endpoint} after the run")


def test_existing_nodes_are_driven_and_left_running(grid: Grid, tmp_path: Path) -> None:
    a, b = grid.line(("a", 1.0, 0.0), ("b", 0.0, 0.0))
    grid.wait_island([a, b])
    assert a.ctl("flex", "--down", "10", "--price-down", "-0.05").returncode == 0
    steps = 3
    w = world()
    config = {"Zgrid": {"python": "zgrid.cosim:ZgridSim"},
              "Profiles": {"python": f"{WORLD_MODULE}:ProfileSim"}}
    with mosaik.World(config, skip_greetings=True) as mosaik_world:
        zg = mosaik_world.start("Zgrid", mode="nodes", step_size=w.STEP_S)
        house = mosaik_world.start("Profiles").House(
            production=[0.0] * w.STEPS_PER_DAY,
            consumption=[3.0 + k for k in range(w.STEPS_PER_DAY)])
        node_a = zg.Node(endpoint=a.endpoint)  # keeps its own values
        node_b = zg.Node(endpoint=f"b@{b.endpoint}", consumption=2.0)
        mosaik_world.connect(house, node_b, "consumption")
        mosaik_world.run(until=steps * w.STEP_S, print_progress=False)
        out = mosaik_world.get_data([node_a, node_b], *COMPARED)
    assert (node_a.eid, node_b.eid) == ("a", "b")
    for proc, entity in ((a, node_a), (b, node_b)):
        now = proc.status()  # still running: the adapter stops only the nodes it started
        assert {k: out[entity][k] for k in COMPARED} == {k: now[k] for k in COMPARED}
    # The last step: b draws 5 kW, a makes 1 and can only go down: 4 kW to shed.
    assert out[node_a]["total_net"] == -4.0
    assert out[node_a]["balanced_net_kw"] == -4.0
    assert out[node_a]["shortfall_kw"] == 4.0


def test_devices_on_the_nodes_own_clock(tmp_path: Path) -> None:
    """device_clock="node": each started node runs its device from the file it is given."""
    config = {"Zgrid": {"python": "zgrid.cosim:ZgridSim"},
              "Profiles": {"python": f"{WORLD_MODULE}:ProfileSim"}}
    w = world()
    with mosaik.World(config, skip_greetings=True) as mosaik_world:
        zg = mosaik_world.start("Zgrid", mode="nodes", device_clock="node", topology="star")
        house = mosaik_world.start("Profiles").House(production=[0.0] * w.STEPS_PER_DAY,
                                                      consumption=[4.0] * w.STEPS_PER_DAY)
        home = zg.Node(node_id="home")
        battery = zg.Node(node_id="battery", device_file=str(w.BATTERY_FILE))
        plant = zg.Plant(min_kw=0.0, max_kw=10.0, price=0.12, output_kw=1.0)
        mosaik_world.connect(house, home, "consumption")
        mosaik_world.run(until=2 * w.STEP_S, print_progress=False)
        out = mosaik_world.get_data([home, battery, plant], *COMPARED, "soc_kwh")
        statuses = {e: json.loads(ctl("--json", "status", node=e.extra_info["endpoint"],
                                      check=True).stdout) for e in (battery, plant)}
    assert plant.eid == "plant1"  # named after its model
    assert statuses[battery]["device"]["kind"] == "battery"
    assert statuses[plant]["device"]["kind"] == "plant"
    assert out[plant]["production"] == 1.0 and out[home]["total_net"] == -3.0
    assert out[home]["balanced_net_kw"] == 0.0  # the battery (cheaper) covers the 3 kW
    assert out[battery]["activation_kw"] == 3.0
    assert 0.0 < out[battery]["soc_kwh"] <= 5.0  # the node's own, on its wall clock


def test_a_data_dir_with_an_earlier_runs_nodes_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node1").mkdir()
    (tmp_path / "node1" / "state.db").write_bytes(b"an earlier run")
    sim = cosim.ZgridSim()
    sim.init("Zgrid-0", 1.0, mode="nodes", data_dir=str(tmp_path))
    sim.create(2, "Node")
    try:
        with pytest.raises(cosim.CosimError, match="saved state of a node from an earlier run"):
            sim.setup_done()
    finally:
        sim.finalize()


# ----------------------------------------------------------------------------- sim mode


@pytest.fixture
def sim_runs(tmp_path: Path) -> Iterator[list[Path]]:
    w = world()
    outs = []
    for n in range(2):
        out = tmp_path / f"run{n}"
        w.run_world(w.Options(out=out, households=4, pv_households=2, hours=6.0,
                              start_hour=9.0, mode="sim"))
        outs.append(out)
    yield outs


def test_example_world_in_sim_mode(sim_runs: list[Path]) -> None:
    first, second = sim_runs
    island = check_series(first, 24, 8)
    assert (first / "nodes.csv").read_bytes() == (second / "nodes.csv").read_bytes()
    # The battery (mosaik's clock): its charge moves by what it did over each 15 minutes.
    eta = math.sqrt(0.9)  # examples/devices/battery.toml's round trip, split evenly
    moved = False
    for now, after in itertools.pairwise(island):
        kw = float(now["battery_kw"])
        stored = -kw * QUARTER_H * eta if kw < 0 else -kw * QUARTER_H / eta
        assert float(after["battery_soc_kwh"]) - float(now["battery_soc_kwh"]) == \
            pytest.approx(stored, abs=1e-9)
        moved = moved or kw != 0.0
    assert moved, "the battery should have been used"


# ----------------------------------------------------------------------------- the parts


def status(node_id: str, island: list[str], total: float, production: float,
           consumption: float, activation: float = 0.0, balanced: float = 0.0,
           shortfall: float = 0.0, clearing: int = 7) -> dict[str, Any]:
    return {"id": node_id, "island": island, "island_size": len(island), "total_net": total,
            "production": production, "consumption": consumption,
            "activation_kw": activation, "imbalance_kw": total, "balanced_net_kw": balanced,
            "clearing_hash": clearing, "clearing_price": 0.1, "shortfall_kw": shortfall}


def test_disagreement_says_what_still_differs() -> None:
    expected = {"a": (3.0, 0.0), "b": (0.0, 1.0)}
    agreed = [status("a", ["a", "b"], 2.0, 3.0, 0.0, activation=-2.0),
              status("b", ["a", "b"], 2.0, 0.0, 1.0)]
    assert cosim.disagreement(agreed, expected) is None
    flooding = [agreed[0], status("b", ["a", "b"], 3.0, 0.0, 1.0)]
    assert "disagree on total_net" in (cosim.disagreement(flooding, expected) or "")
    stale = [status(x, ["a", "b"], 1.0, *expected[x]) for x in "ab"]
    assert "add up to 2.0" in (cosim.disagreement(stale, expected) or "")
    unapplied = [status(x, ["a", "b"], 2.0, *expected[x], balanced=2.0) for x in "ab"]
    assert "still flooding" in (cosim.disagreement(unapplied, expected) or "")
    one_way = [status("a", ["a", "b"], 2.0, 3.0, 0.0), status("b", ["b"], -1.0, 0.0, 1.0,
                                                               balanced=-1.0, shortfall=1.0)]
    assert "sees another island" in (cosim.disagreement(one_way, expected) or "")
    assert "did not report" in (cosim.disagreement(agreed[:1], expected) or "")
    # Two nodes each alone agree with themselves; linked, they must be one island.
    alone = [status("a", ["a"], 3.0, 3.0, 0.0, balanced=3.0, shortfall=3.0),
             status("b", ["b"], -1.0, 0.0, 1.0, balanced=-1.0, shortfall=1.0)]
    assert cosim.disagreement(alone, expected) is None
    linked = {"a": ("a", "b"), "b": ("a", "b")}
    assert "not of the 2 it was linked to" in (
        cosim.disagreement(alone, expected, islands=linked) or "")


@pytest.mark.parametrize(("params", "message"), [
    ({"mode": "cloud"}, "mode: one of nodes, sim"),
    ({"topology": "torus"}, "topology: one of ring"),
    ({"mode": "sim", "device_clock": "node"}, "needs mode='nodes'"),
    ({"colour": "red"}, "unknown sim parameter 'colour'"),
    ({"ping_interval_s": 1.0, "dead_after_s": 1.0}, "at least twice"),
])
def test_bad_sim_parameters_are_refused_with_a_reason(params: dict[str, Any], message: str
                                                      ) -> None:
    with pytest.raises(cosim.CosimError, match=message):
        cosim.ZgridSim().init("Zgrid-0", 1.0, **params)


@pytest.mark.parametrize(("model", "params", "message"), [
    ("Node", {"production": -1}, "production: must be a finite number of kW"),
    ("Node", {"flex_up_kw": 1, "device": {"kind": "pv", "output_kw": 1}}, "device makes"),
    ("Plant", {"min_kw": 0, "max_kw": 5, "price": 0.1, "output_kw": 9}, "output_kw"),
    ("Plant", {"min_kw": 0, "max_kw": 5, "price": 0.1, "output_kw": 1, "production": 2},
     "leave production out"),
    ("Node", {"device": {"kind": "fridge"}}, "device kind must be one of"),
    ("Node", {"endpoint": "tcp://127.0.0.1:1"}, "endpoint is for mode 'nodes'"),
    ("Battery", {"capacity_kwh": 1, "power_kw": 1, "soc_kwh": 0, "colour": 1}, "'colour'"),
])
def test_bad_entities_are_refused_with_a_reason(model: str, params: dict[str, Any],
                                               message: str) -> None:
    sim = cosim.ZgridSim()
    sim.init("Zgrid-0", 1.0, mode="sim")
    with pytest.raises(cosim.CosimError, match=message):
        sim.create(1, model, **params)
