"""Device models: their offers, what an activation does to them, and the device-file loader.

The battery is checked hardest: under any sequence of activations its state of charge stays in
[0, capacity] and its energy ledger closes over a simulated day; its offers follow its state of
charge and can be held for a whole control interval.
"""

from __future__ import annotations

import math
import tomllib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zgrid.clearing import Offer, clear
from zgrid.devices import (
    CONTROL_INTERVAL_S,
    DEVICE_KINDS,
    Battery,
    CurtailablePV,
    Device,
    DispatchablePlant,
    Flex,
    SheddableLoad,
    load_devices,
    meaningful_change,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DAY_S = 86_400.0
STEP_S = 60.0


@st.composite
def batteries(draw: st.DrawFn) -> Battery:
    capacity = draw(st.floats(min_value=0.01, max_value=1e4))
    return Battery(capacity_kwh=capacity,
                   power_kw=draw(st.floats(min_value=0.0, max_value=1e3)),
                   soc_kwh=capacity * draw(st.floats(min_value=0.0, max_value=1.0)),
                   efficiency=draw(st.floats(min_value=0.5, max_value=1.0)))


activations = st.one_of(st.sampled_from([0.0, 1e9, -1e9, 5e-324, -5e-324]),
                        st.floats(min_value=-2e3, max_value=2e3))
# A day of 1-minute steps as runs of one activation each (1440 draws would be slow to shrink).
days = st.lists(st.tuples(activations, st.integers(min_value=1, max_value=240)), min_size=1,
                max_size=40)


def energy_balance_error_kwh(b: Battery, soc_start: float) -> float:
    expected = b.charged_kwh * b.eta_charge - b.discharged_kwh / b.eta_discharge
    return abs((b.soc_kwh - soc_start) - expected)


def tolerance_kwh(b: Battery) -> float:
    # Each step rounds a few times at the scale of the energies involved.
    return 1e-12 * 1440 * (b.capacity_kwh + b.charged_kwh + b.discharged_kwh)


# ----------------------------------------------------------------------------- battery


@given(batteries(), days)
@PROPERTY
def test_a_battery_stays_within_0_and_capacity_and_its_ledger_closes_over_a_day(
        b: Battery, runs: list[tuple[float, int]]) -> None:
    soc_start = b.soc_kwh
    steps = 0
    while steps < DAY_S / STEP_S:
        for activation, length in runs:
            for _ in range(length):
                b.apply(activation, STEP_S)
                assert 0.0 <= b.soc_kwh <= b.capacity_kwh
                assert abs(b.applied_kw) <= b.power_kw
                assert b.applied_kw == 0.0 or math.copysign(1, b.applied_kw) == math.copysign(
                    1, activation)
                steps += 1
    assert b.losses_kwh >= 0.0
    assert energy_balance_error_kwh(b, soc_start) <= tolerance_kwh(b)
    # What the grid lost is exactly what the ledger calls losses.
    assert math.isclose(b.charged_kwh - b.discharged_kwh - (b.soc_kwh - soc_start),
                        b.losses_kwh, rel_tol=1e-9, abs_tol=tolerance_kwh(b))


@given(batteries(), st.lists(st.tuples(activations, st.floats(min_value=0.0, max_value=7200.0)),
                             max_size=60))
@PROPERTY
def test_a_battery_stays_within_0_and_capacity_for_any_step_lengths(
        b: Battery, steps: list[tuple[float, float]]) -> None:
    soc_start = b.soc_kwh
    for activation, dt_s in steps:
        b.apply(activation, dt_s)
        assert 0.0 <= b.soc_kwh <= b.capacity_kwh
    assert energy_balance_error_kwh(b, soc_start) <= tolerance_kwh(b)


def test_discharging_removes_energy_over_the_discharge_efficiency() -> None:
    b = Battery(capacity_kwh=10.0, power_kw=5.0, soc_kwh=5.0, efficiency=0.81)
    b.apply(2.0, 1800.0)  # 1 kWh delivered
    assert b.applied_kw == 2.0 and b.discharged_kwh == 1.0
    assert math.isclose(b.soc_kwh, 5.0 - 1.0 / 0.9)
    b.apply(-3.0, 1200.0)  # 1 kWh drawn
    assert b.applied_kw == -3.0 and math.isclose(b.charged_kwh, 1.0)
    assert math.isclose(b.soc_kwh, 5.0 - 1.0 / 0.9 + 0.9)
    assert math.isclose(b.losses_kwh, (1.0 / 0.9 - 1.0) + 0.1)


def test_a_battery_never_exceeds_its_power_nor_the_energy_it_holds() -> None:
    b = Battery(capacity_kwh=10.0, power_kw=5.0, soc_kwh=1.0, efficiency=1.0)
    b.apply(50.0, 360.0)  # asks for 50 kW: 5 kW for 0.1 h is 0.5 kWh
    assert b.applied_kw == 5.0 and math.isclose(b.soc_kwh, 0.5)
    b.apply(5.0, 3600.0)  # only 0.5 kWh left: it delivers 0.5 kW on average, then is empty
    assert b.soc_kwh == 0.0 and math.isclose(b.applied_kw, 0.5)
    b.apply(5.0, 60.0)
    assert b.applied_kw == 0.0 and b.soc_kwh == 0.0
    b.apply(-5.0, 3 * 3600.0)
    assert b.soc_kwh == 10.0 and math.isclose(b.applied_kw, -10.0 / 3)


@given(batteries(), st.floats(min_value=0.0, max_value=1.0),
       st.floats(min_value=0.0, max_value=1.0))
@PROPERTY
def test_battery_offers_follow_the_state_of_charge(b: Battery, f1: float, f2: float) -> None:
    low, high = sorted((f1, f2))
    b.soc_kwh = b.capacity_kwh * low
    emptier = b.offer()
    b.soc_kwh = b.capacity_kwh * high
    fuller = b.offer()
    assert emptier.flex_up_kw <= fuller.flex_up_kw  # more stored: more to discharge
    assert emptier.flex_down_kw >= fuller.flex_down_kw  # more room: more to charge
    assert emptier.price_up >= fuller.price_up  # dear to discharge when empty
    assert emptier.price_down <= fuller.price_down  # cheap (eager) to charge when empty


def test_an_empty_battery_offers_only_to_charge_and_a_full_one_only_to_discharge() -> None:
    empty = Battery(capacity_kwh=10.0, power_kw=5.0, soc_kwh=0.0).offer()
    full = Battery(capacity_kwh=10.0, power_kw=5.0, soc_kwh=10.0).offer()
    assert empty.flex_up_kw == 0.0 and empty.flex_down_kw == 5.0 and empty.price_down < 0
    assert full.flex_down_kw == 0.0 and full.flex_up_kw == 5.0
    assert full.price_up < empty.price_up


@given(batteries())
@PROPERTY
def test_what_a_battery_offers_it_can_hold_for_a_whole_control_interval(b: Battery) -> None:
    offer = b.offer()
    start = b.soc_kwh
    b.apply(offer.flex_up_kw, CONTROL_INTERVAL_S)
    assert math.isclose(b.applied_kw, offer.flex_up_kw, rel_tol=1e-9, abs_tol=1e-12)
    b.soc_kwh = start
    b.apply(-offer.flex_down_kw, CONTROL_INTERVAL_S)
    assert math.isclose(b.applied_kw, -offer.flex_down_kw, rel_tol=1e-9, abs_tol=1e-12)


# ----------------------------------------------------------------------------- the others


def test_a_plant_offers_its_headroom_both_ways_at_its_price_and_clamps_activations() -> None:
    p = DispatchablePlant(min_kw=10.0, max_kw=50.0, price=0.12, output_kw=20.0)
    assert p.offer() == Flex(30.0, 0.12, 10.0, -0.12)  # turning down saves (pays) the fuel
    assert p.production_kw == 20.0
    p.apply(100.0, 3600.0)
    assert p.applied_kw == 30.0 and p.net_kw == 50.0
    p.apply(-100.0, 1800.0)
    assert p.applied_kw == -10.0 and p.net_kw == 10.0
    assert p.activated_kwh == 30.0 - 5.0
    assert p.offer() == Flex(30.0, 0.12, 10.0, -0.12)  # the base schedule did not move


def test_pv_can_only_be_curtailed_down_to_zero() -> None:
    pv = CurtailablePV(output_kw=6.0)
    assert pv.offer() == Flex(0.0, 0.0, 6.0, 0.0)
    pv.apply(3.0, 60.0)
    assert pv.applied_kw == 0.0  # it cannot produce more than the sun gives
    pv.apply(-10.0, 3600.0)
    assert pv.applied_kw == -6.0 and pv.net_kw == 0.0 and pv.curtailed_kwh == 6.0
    pv.output_kw = 2.0  # the profile moved on
    assert pv.offer().flex_down_kw == 2.0 and pv.rating_kw == 2.0


def test_shedding_a_load_raises_the_net_by_at_most_the_load() -> None:
    load = SheddableLoad(kw=3.0, price=0.5)
    assert load.offer() == Flex(3.0, 0.5, 0.0, 0.0)
    assert load.consumption_kw == 3.0 and load.net_kw == -3.0
    load.apply(-1.0, 60.0)
    assert load.applied_kw == 0.0
    load.apply(10.0, 1800.0)
    assert load.applied_kw == 3.0 and load.net_kw == 0.0 and load.shed_kwh == 1.5


@pytest.mark.parametrize("device", [Battery(10.0, 5.0, 5.0), DispatchablePlant(0, 9, 1, 3),
                                    CurtailablePV(2.0), SheddableLoad(1.0, 1.0)],
                         ids=lambda d: d.kind)
@pytest.mark.parametrize("activation, dt_s, key", [(math.nan, 60.0, "activation_kw"),
                                                   (1.0, -1.0, "dt_s"), (1.0, math.inf, "dt_s")])
def test_apply_refuses_a_nonsense_step(device: Device, activation: float, dt_s: float, key: str
                                       ) -> None:
    with pytest.raises(ValueError, match=f"^{key}: "):
        device.apply(activation, dt_s)


def test_devices_balance_an_island_through_the_clearing() -> None:
    devices: dict[str, Device] = {
        "battery": Battery(capacity_kwh=20.0, power_kw=5.0, soc_kwh=10.0),
        "plant": DispatchablePlant(min_kw=0.0, max_kw=50.0, price=0.5, output_kw=10.0),
        "factory": SheddableLoad(kw=30.0, price=3.0),
    }
    offers = [Offer(node_id, d.production_kw, d.consumption_kw, *_fields(d.offer()))
              for node_id, d in devices.items()]
    c = clear(offers)  # 10 kW produced, 30 consumed: the battery first, then the plant
    assert c.imbalance_kw == -20.0 and c.balanced_net_kw == 0.0
    assert c.activations == {"battery": 5.0, "plant": 15.0}
    for node_id, d in devices.items():
        d.apply(c.activation_kw(node_id), STEP_S)
    assert math.fsum(d.net_kw for d in devices.values()) == 0.0


def _fields(f: Flex) -> tuple[float, float, float, float]:
    return f.flex_up_kw, f.price_up, f.flex_down_kw, f.price_down


# ----------------------------------------------------------------------------- re-advertising


def test_a_change_below_one_percent_of_the_rating_is_not_worth_advertising() -> None:
    old = Flex(50.0, 0.2, 50.0, -0.2)  # rating 100 kW: 1 kW is 1%
    assert not meaningful_change(old, Flex(49.5, 0.2, 50.0, -0.2), rating_kw=100.0)
    assert meaningful_change(old, Flex(49.0, 0.2, 50.0, -0.2), rating_kw=100.0)
    assert meaningful_change(old, Flex(50.0, 0.2, 51.0, -0.2), rating_kw=100.0)
    assert not meaningful_change(old, old, rating_kw=0.0)


def test_a_price_change_counts_once_it_reaches_a_hundredth_per_kwh() -> None:
    old = Flex(5.0, 0.2, 5.0, -0.2)
    assert not meaningful_change(old, Flex(5.0, 0.209, 5.0, -0.2), rating_kw=5.0)
    assert meaningful_change(old, Flex(5.0, 0.21, 5.0, -0.2), rating_kw=5.0)
    assert meaningful_change(old, Flex(5.0, 0.2, 5.0, -0.19), rating_kw=5.0)
    assert not meaningful_change(old, Flex(5.0, 0.2, 5.0, -0.1905), rating_kw=5.0)


def test_a_flex_that_reaches_or_leaves_zero_is_always_worth_advertising() -> None:
    assert meaningful_change(Flex(0.01, 0.2), Flex(0.0, 0.2), rating_kw=5.0)
    assert meaningful_change(Flex(0.0, 0.2), Flex(0.01, 0.2), rating_kw=5.0)


def test_a_slowly_draining_battery_re_advertises_a_few_times_not_every_step() -> None:
    b = Battery(capacity_kwh=10.0, power_kw=5.0, soc_kwh=10.0, efficiency=1.0)
    advertised = b.offer()
    adverts = 0
    for _ in range(int(DAY_S / 10)):  # 1 kW for a day in 10 s steps: empty after 10 h
        b.apply(1.0, 10.0)
        if meaningful_change(advertised, b.offer(), b.rating_kw):
            advertised = b.offer()
            adverts += 1
    assert advertised.flex_up_kw == 0.0  # the last crumb was advertised away
    assert 10 < adverts < 500  # the step is 10 s: 8640 steps


# ----------------------------------------------------------------------------- the loader

DEVICE_FILE = """
[[battery]]
capacity_kwh = 10
power_kw = 5
soc_kwh = 5
efficiency = 0.9

[[battery]]
capacity_kwh = 2.5
power_kw = 1
soc_kwh = 0

[[plant]]
min_kw = 0
max_kw = 50
price = 0.12
output_kw = 20

[[pv]]
output_kw = 6
price_down = -0.01

[[load]]
kw = 3
price = 0.5
"""


def test_a_device_file_loads_every_device_in_order() -> None:
    devices = load_devices(tomllib.loads(DEVICE_FILE))
    assert [d.kind for d in devices] == ["battery", "battery", "plant", "pv", "load"]
    assert devices[0] == Battery(10.0, 5.0, 5.0, 0.9)
    assert devices[1] == Battery(2.5, 1.0, 0.0)
    assert devices[2] == DispatchablePlant(0.0, 50.0, 0.12, 20.0)
    assert devices[3] == CurtailablePV(6.0, -0.01)
    assert devices[4] == SheddableLoad(3.0, 0.5)
    assert all(isinstance(getattr(d, "power_kw", 0.0), float) for d in devices)


def test_an_empty_device_file_has_no_devices() -> None:
    assert load_devices({}) == []


BATTERY = {"capacity_kwh": 10, "power_kw": 5, "soc_kwh": 5}
PLANT = {"min_kw": 0, "max_kw": 50, "price": 0.12, "output_kw": 20}


@pytest.mark.parametrize("data, message", [
    ({"battery": [{**BATTERY, "capacity_kwh": math.nan}]}, r"battery\[0\]\.capacity_kwh: .*nan"),
    ({"battery": [BATTERY, {**BATTERY, "power_kw": -1}]}, r"battery\[1\]\.power_kw: .*-1"),
    ({"battery": [{**BATTERY, "soc_kwh": 12}]},
     r"battery\[0\]\.soc_kwh: must be at most capacity_kwh \(10\), got 12"),
    ({"battery": [{**BATTERY, "capacity_kwh": 0}]}, r"battery\[0\]\.capacity_kwh: .*above 0"),
    ({"battery": [{**BATTERY, "efficiency": 1.5}]}, r"battery\[0\]\.efficiency"),
    ({"battery": [{**BATTERY, "efficiency": 0}]}, r"battery\[0\]\.efficiency"),
    ({"battery": [{**BATTERY, "price_full": 1.0}]}, r"battery\[0\]\.price_full"),
    ({"battery": [{**BATTERY, "capacity": 10}]}, r"battery\[0\]\.capacity: unknown key"),
    ({"battery": [{"capacity_kwh": 10, "power_kw": 5}]}, r"battery\[0\]\.soc_kwh: missing"),
    ({"battery": [{**BATTERY, "soc_kwh": "half"}]}, r"battery\[0\]\.soc_kwh: must be a number"),
    ({"battery": [{**BATTERY, "soc_kwh": True}]}, r"battery\[0\]\.soc_kwh: must be a number"),
    ({"battery": [{**BATTERY, "applied_kw": 1}]}, r"battery\[0\]\.applied_kw: unknown key"),
    ({"battery": BATTERY}, r"battery: must be an array of tables"),
    ({"battery": [5]}, r"battery\[0\]: must be a table"),
    ({"plant": [{**PLANT, "min_kw": 60}]}, r"plant\[0\]\.min_kw: must be at most max_kw"),
    ({"plant": [{**PLANT, "output_kw": 60}]}, r"plant\[0\]\.output_kw: .*0\.\.50"),
    ({"plant": [{**PLANT, "price": math.inf}]}, r"plant\[0\]\.price"),
    ({"plant": [{**PLANT, "max_kw": 1e12}]}, r"plant\[0\]\.max_kw"),
    ({"pv": [{"output_kw": -6}]}, r"pv\[0\]\.output_kw"),
    ({"load": [{"kw": 3, "price": 1e300}]}, r"load\[0\]\.price"),
    ({"wind": [{"kw": 3}]}, r"wind: unknown device kind \(known: battery, load, plant, pv\)"),
])
def test_a_bad_device_file_is_refused_naming_the_key(data: dict[str, Any], message: str
                                                     ) -> None:
    with pytest.raises(ValueError, match=message):
        load_devices(data)


def test_every_device_kind_has_its_own_name() -> None:
    assert set(DEVICE_KINDS) == {"battery", "plant", "pv", "load"}
    assert all(cls.kind == kind for kind, cls in DEVICE_KINDS.items())
