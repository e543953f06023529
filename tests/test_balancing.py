"""Phase II: the grid balances itself. Every member runs the same clearing over the same table
and applies only its own activation; no coordinator, no extra round of messages.

Simulator tests (virtual time, unmodified cores) and real processes driven by zgrid-ctl.
"""

from __future__ import annotations

import math
import random
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from zgrid.clearing import Clearing, Offer, clear
from zgrid.core import BALANCE_HOLDOFF_S, Core
from zgrid.sim import Simulator, converged_sim
from zgrid.table import AdvertTable
from zgrid.wire import Advert, Adverts, Flex, FlexRequest, SetRequest

from conftest import BIN, Grid, NodeProc, ctl, wait_until

SETTLE_S = 1.0  # virtual seconds: far longer than a flood across these grids


def flex(sim: Simulator, i: int, up: float = 0.0, price_up: float = 0.0, down: float = 0.0,
         price_down: float = 0.0) -> None:
    reply = sim.control(i, FlexRequest(up, price_up, down, price_down))
    assert reply is not None and reply.ok, reply


def cores(sim: Simulator) -> list[Core]:
    return [core for core in sim.cores if core is not None]


def balance(core: Core, now: float) -> dict[str, Any]:
    return core.balance_view(now)


# ------------------------------------------------------------------------ the simulator


def test_a_deficit_is_covered_cheapest_first_and_every_node_sees_the_island_balanced() -> None:
    # n0 produces 10, n1 consumes 13: 3 kW short. n3 offers up-flex cheaper than n2.
    sim = converged_sim([(0, 1), (1, 2), (2, 3)], [(10.0, 0.0), (0.0, 13.0), (0.0, 0.0),
                                                   (0.0, 0.0)])
    flex(sim, 2, up=5.0, price_up=0.3)
    flex(sim, 3, up=5.0, price_up=0.1)
    sim.run_until(sim.now + SETTLE_S)
    n2, n3 = sim.cores[2], sim.cores[3]
    assert n2 is not None and n3 is not None
    assert (n2.activation_kw, n3.activation_kw) == (0.0, 3.0)
    for core in cores(sim):
        view = balance(core, sim.now)
        assert view["imbalance_kw"] == -3.0 and view["balanced_net_kw"] == 0.0, core.id
        assert view["clearing_price"] == 0.1 and view["shortfall_kw"] == 0.0
    assert len({balance(c, sim.now)["clearing_hash"] for c in cores(sim)}) == 1


def test_a_surplus_charges_the_battery_that_pays_to_charge_first() -> None:
    sim = converged_sim([(0, 1), (1, 2)], [(10.0, 6.0), (0.0, 0.0), (0.0, 0.0)])
    flex(sim, 1, down=3.0, price_down=0.05)
    flex(sim, 2, down=3.0, price_down=-0.2)  # a battery that wants to charge
    sim.run_until(sim.now + SETTLE_S)
    assert [c.activation_kw for c in cores(sim)] == [0.0, -1.0, -3.0]
    assert all(balance(c, sim.now)["balanced_net_kw"] == 0.0 for c in cores(sim))


def test_too_little_flexibility_uses_all_of_it_and_reports_the_shortfall() -> None:
    sim = converged_sim([(0, 1)], [(0.0, 10.0), (0.0, 0.0)])
    flex(sim, 1, up=4.0, price_up=0.2)
    sim.run_until(sim.now + SETTLE_S)
    for core in cores(sim):
        view = balance(core, sim.now)
        assert view["shortfall_kw"] == 6.0 and view["shortfall"] == "shed_load"
        assert view["balanced_net_kw"] == -6.0
    assert sim.cores[1] is not None and sim.cores[1].activation_kw == 4.0


def test_a_split_island_rebalances_with_its_own_members_and_a_merge_clears_as_one() -> None:
    # n0 - n1 | n2 - n3: each half has a deficit and its own flexible node.
    sim = converged_sim([(0, 1), (1, 2), (2, 3)], [(0.0, 2.0), (0.0, 0.0), (0.0, 1.0),
                                                   (0.0, 0.0)], dead_after_s=0.5)
    flex(sim, 1, up=5.0, price_up=0.1)
    flex(sim, 3, up=5.0, price_up=0.2)
    sim.run_until(sim.now + SETTLE_S)
    assert [c.activation_kw for c in cores(sim)] == [0.0, 3.0, 0.0, 0.0], "one island: cheapest"
    sim.cut_links([(1, 2)])
    sim.run_until(sim.now + 3.0)
    assert [c.activation_kw for c in cores(sim)] == [0.0, 2.0, 0.0, 1.0], "each half on its own"
    assert all(balance(c, sim.now)["balanced_net_kw"] == 0.0 for c in cores(sim))
    sim.restore_links([(1, 2)])
    sim.run_until(sim.now + 3.0)
    assert [c.activation_kw for c in cores(sim)] == [0.0, 3.0, 0.0, 0.0], "merged: one clearing"
    assert len({balance(c, sim.now)["clearing_hash"] for c in cores(sim)}) == 1


def test_the_clearing_does_not_depend_on_the_order_adverts_arrived_in() -> None:
    sim = converged_sim([(0, 1), (1, 2), (2, 3), (3, 0)],
                        [(3.0, 1.0), (0.0, 7.5), (1.25, 0.0), (0.0, 0.5)])
    for i, (up, price) in enumerate([(1.0, 0.2), (2.0, 0.2), (0.5, 0.1), (4.0, 0.3)]):
        flex(sim, i, up=up, price_up=price)
    sim.run_until(sim.now + SETTLE_S)
    first = cores(sim)[0]
    adverts = dict(first.table.by_origin)
    reversed_table = AdvertTable.converged(
        first.id, dict(reversed(list(adverts.items()))), first.config.max_nodes)
    other = Core.converged(first.config, reversed_table, [], sim.now)
    assert other.clearing(sim.now).hash == first.clearing(sim.now).hash
    assert len({c.clearing(sim.now).hash for c in cores(sim)}) == 1


def fresh_clearing(core: Core, now: float) -> Clearing:
    """The clearing of `core`'s island computed afresh from its table, with no offer book."""
    adverts = core.table.by_origin
    return clear([Offer(a.origin, a.production, a.consumption,
                        *((a.flex.flex_up_kw, a.flex.price_up, a.flex.flex_down_kw,
                           a.flex.price_down) if a.flex else (0.0, 0.0, 0.0, 0.0)))
                  for x in core.table.island(now) if (a := adverts.get(x)) is not None])


def test_the_kept_offer_book_clears_as_the_table_read_afresh_through_changes_and_splits() -> None:
    rng = random.Random(7)
    sim = converged_sim([(i, i + 1) for i in range(7)], [(1.0, 2.0)] * 8)
    for step in range(60):
        i = rng.randrange(8)
        if step % 3:
            flex(sim, i, up=rng.choice([0.0, 1.0, 2.5]), price_up=rng.choice([0.1, 0.2]),
                 down=rng.choice([0.0, 1.5]), price_down=rng.choice([-0.1, 0.1]))
        else:
            assert sim.set_value(i, rng.uniform(0, 5), rng.uniform(0, 5)) is not None
        if step == 20:
            sim.unlink(3, 4)  # two islands, each with its own clearing
        if step == 40:
            sim.link(3, 4)
        sim.run_until(sim.now + SETTLE_S)
        for core in cores(sim):
            expected = fresh_clearing(core, sim.now)
            assert core.clearing(sim.now) == expected, (step, core.id)
            assert core.activation_kw == expected.activation_kw(core.id), (step, core.id)


def test_the_table_tells_the_book_of_offers_that_moved_and_of_nothing_else() -> None:
    """A cold start stores every advert once: recording each new origin without an offer held
    one set entry per advert until a clearing read them (a third of a cold start's memory)."""
    def version(origin: str, seq: int, offer: Flex | None = None) -> Advert:
        return Advert(origin, 1, seq, 1.0, 0.0, (), f"tcp://{origin}:7000", 1, flex=offer)

    table = AdvertTable("a", max_nodes=10)
    table.merge(version("b", 1))
    table.merge(version("c", 1, Flex(1.0, 0.2)))
    assert table.take_offers_changed() == {"c"}
    table.merge(version("b", 2))
    table.merge(version("c", 2, Flex(1.0, 0.2)))
    assert table.take_offers_changed() == set(), "values moved, offers did not"
    table.merge(version("b", 3, Flex(0.5, 0.1)))
    table.discard("c")
    assert table.take_offers_changed() == {"b", "c"}
    # Dropped and learned again without an offer: the drop was recorded, so the book forgets it.
    table.discard("b")
    table.merge(version("b", 4))
    assert table.take_offers_changed() == {"b"}


def test_a_status_read_before_the_flush_does_not_hide_an_offer_change_from_balancing() -> None:
    """A node computes its share a hold-off after its view moved. A status read in between
    reads the table's changed offers into the book, and the node must still see that the
    book moved (core and runtime: a status request and an advert in one mailbox drain)."""
    sim = converged_sim([(0, 1)], [(0.0, 2.0), (0.0, 0.0)])
    flex(sim, 1, up=5.0, price_up=0.2)
    sim.run_until(sim.now + SETTLE_S)
    a, b = cores(sim)
    assert b.activation_kw == 2.0
    now = sim.now
    cheaper = replace(a.own_advert, seq=a.own_advert.seq + 1, flex=Flex(5.0, 0.1))
    b.handle(sim.envelopes[0], Adverts(a.id, a.config.nonce, (cheaper,)), now)
    assert b.clearing(now).activation_kw(a.id) == 2.0  # the status read, before the flush
    b.flush(now)
    later = now + 2 * BALANCE_HOLDOFF_S
    b.timer(later)
    b.flush(later)
    assert b.activation_kw == 0.0, "the cheaper offer covers the deficit"


def test_a_nodes_offer_is_kept_across_a_restart() -> None:
    sim = converged_sim([(0, 1)], [(0.0, 2.0), (0.0, 0.0)])
    flex(sim, 1, up=5.0, price_up=0.1)
    sim.crash(1)
    sim.restart(1)
    sim.run_until(sim.now + 2.0)
    n1 = sim.cores[1]
    assert n1 is not None and n1.flex.flex_up_kw == 5.0 and n1.activation_kw == 2.0


@pytest.mark.parametrize("request_", [
    FlexRequest(flex_up_kw=-1.0), FlexRequest(price_up=math.nan),
    FlexRequest(flex_down_kw=math.inf), FlexRequest(price_down=1e7),
])
def test_bad_flexibility_is_refused_and_changes_nothing(request_: FlexRequest) -> None:
    sim = converged_sim([(0, 1)], [(0.0, 2.0), (0.0, 0.0)])
    flex(sim, 1, up=5.0, price_up=0.1)
    n1 = sim.cores[1]
    assert n1 is not None
    before = (n1.flex, n1.own_advert.version)
    reply = sim.control(1, request_)
    assert reply is not None and not reply.ok and reply.code == "bad_value", reply
    assert (n1.flex, n1.own_advert.version) == before


def test_a_node_without_an_offer_sends_the_same_advert_as_before_phase_two() -> None:
    sim = converged_sim([(0, 1)], [(1.0, 0.0), (0.0, 3.0)])
    assert all(c.own_advert.flex is None for c in cores(sim))
    sim.control(0, SetRequest(2.0, None))
    sim.run_until(sim.now + SETTLE_S)
    assert all(c.own_advert.flex is None and c.activation_kw == 0.0 for c in cores(sim))


# ------------------------------------------------------------------------ real processes


@pytest.fixture
def house_grid(grid: Grid) -> tuple[NodeProc, ...]:
    """plant (10 kW) - house (3 kW) - factory (5 kW) - battery (5 kW each way)."""
    plant = grid.add("plant", "--production", "10")
    house = grid.add("house", "--consumption", "3", "--sibling", plant.endpoint)
    factory = grid.add("factory", "--consumption", "5", "--sibling", house.endpoint)
    battery = grid.add("battery", "--flex-up", "5", "--price-up", "0.2", "--flex-down", "5",
                       "--price-down", "-0.1", "--sibling", factory.endpoint)
    grid.wait_island([plant, house, factory, battery])
    return plant, house, factory, battery


def balanced(nodes: tuple[NodeProc, ...], imbalance: float) -> list[dict[str, Any]] | None:
    statuses = [node.status() for node in nodes]
    if all(s["imbalance_kw"] == imbalance and s["balanced_net_kw"] == 0.0 for s in statuses) \
            and len({s["clearing_hash"] for s in statuses}) == 1:
        return statuses
    return None


def test_a_battery_balances_a_real_grid_and_every_node_reports_it(
        house_grid: tuple[NodeProc, ...]) -> None:
    plant, house, factory, _battery = house_grid
    statuses = wait_until(lambda: balanced(house_grid, 2.0), what="the surplus to be charged")
    assert statuses[3]["activation_kw"] == -2.0
    factory.ctl("set", "--consumption", "9", check=True)  # now 2 kW short
    statuses = wait_until(lambda: balanced(house_grid, -2.0), what="the battery to discharge")
    assert statuses[3]["activation_kw"] == 2.0 and statuses[0]["clearing_price"] == 0.2
    rows = {row["id"]: row for row in plant.ctl_json("nodes")}
    assert rows["battery"]["activation_kw"] == 2.0 and rows["plant"]["activation_kw"] == 0.0
    with house.client() as client:
        view = next(iter(client.watch()))
    assert view["balanced_net_kw"] == 0.0 and view["imbalance_kw"] == -2.0


def test_flex_changes_an_offer_at_run_time_and_bad_values_are_refused(
        house_grid: tuple[NodeProc, ...]) -> None:
    plant, _, _, battery = house_grid
    wait_until(lambda: balanced(house_grid, 2.0), what="the first balance")
    battery.ctl("flex", "--down", "1", check=True)  # it can now take only 1 of the 2 kW
    wait_until(lambda: plant.status()["shortfall_kw"] == 1.0, what="the shortfall reported")
    refused = ctl("flex", "--up", "-1", node=battery.endpoint)
    assert refused.returncode == 1 and "flex_up" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert battery.status()["flex_up"] == 5.0


def test_a_device_offer_is_advertised_without_being_persisted() -> None:
    sim = converged_sim([(0, 1)], [(0.0, 2.0), (0.0, 0.0)])
    n1 = sim.cores[1]
    assert n1 is not None
    effects = n1.device_changed(Flex(5.0, 0.3, 5.0, -0.1), 5.0,
                                {"kind": "battery", "soc_kwh": 1.0})
    assert effects == [] and n1.own_advert.flex == Flex(5.0, 0.3, 5.0, -0.1)
    sim.run_until(sim.now + SETTLE_S)
    assert n1.activation_kw == 2.0
    assert n1.status(sim.now)["device"] == {"kind": "battery", "soc_kwh": 1.0}


def test_a_device_offer_that_barely_moved_is_not_advertised_again() -> None:
    sim = converged_sim([(0, 1)], [(0.0, 2.0), (0.0, 0.0)])
    n1 = sim.cores[1]
    assert n1 is not None
    n1.device_changed(Flex(5.0, 0.3, 5.0, -0.1), 5.0, {"kind": "battery"})
    version = n1.own_advert.version
    n1.device_changed(Flex(4.99, 0.3, 5.0, -0.1), 5.0, {"kind": "battery"})  # 0.2% of rating
    assert n1.own_advert.version == version and n1.flex.flex_up_kw == 5.0
    n1.device_changed(Flex(4.9, 0.3, 5.0, -0.1), 5.0, {"kind": "battery"})  # 2%
    assert n1.own_advert.version > version and n1.flex.flex_up_kw == 4.9


def test_a_battery_device_discharges_into_a_real_deficit_and_its_charge_falls(
        grid: Grid, tmp_path: Path) -> None:
    device = tmp_path / "battery.toml"
    device.write_text("[[battery]]\ncapacity_kwh = 1.0\npower_kw = 5.0\nsoc_kwh = 0.5\n")
    house = grid.add("house", "--consumption", "2")
    battery = grid.add("battery", "--device", str(device), "--sibling", house.endpoint)
    grid.wait_island([house, battery])
    status = wait_until(lambda: (lambda s: s if s["activation_kw"] == 2.0 and s["device"]
                                 and s["device"]["soc_kwh"] < 0.5 else None)(battery.status()),
                        what="the battery to discharge 2 kW")
    assert status["device"]["kind"] == "battery" and status["flex_up"] > 0
    assert house.status()["balanced_net_kw"] == 0.0


def test_a_device_file_with_a_bad_value_is_a_clear_usage_error(tmp_path: Path) -> None:
    device = tmp_path / "bad.toml"
    device.write_text("[[battery]]\ncapacity_kwh = 1.0\npower_kw = 5.0\nsoc_kwh = 2.0\n")
    proc = subprocess.run([str(BIN / "zgrid-node"), "--id", "b", "--bind",
                           "tcp://127.0.0.1:1", "--device", str(device), "--data-dir",
                           str(tmp_path / "d")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "soc_kwh" in proc.stderr
    assert "Traceback" not in proc.stderr
