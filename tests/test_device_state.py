"""Device models as their node runs them: which fields are state (saved and restored after a
restart), which base values a model gives its node, and a plant's merit order in a surplus.

Unit tests only; tests/test_device_nodes.py runs the same with real zgrid-node processes.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import pytest

from zgrid.clearing import Offer, clear
from zgrid.devices import (
    DEVICE_KINDS,
    SAVE_FRACTION,
    Battery,
    CurtailablePV,
    Device,
    DispatchablePlant,
    SheddableLoad,
    base_values,
    device_record,
    restore_state,
    worth_saving,
)

ALL = [Battery(10.0, 5.0, 5.0), DispatchablePlant(0.0, 50.0, 0.12, 20.0), CurtailablePV(6.0),
       SheddableLoad(3.0, 0.5)]


def _json(record: dict[str, Any]) -> dict[str, Any]:
    """`record` as the store gives it back: through JSON text."""
    loaded: dict[str, Any] = json.loads(json.dumps(record, allow_nan=False))
    return loaded


# ------------------------------------------------------------------------ state fields


@pytest.mark.parametrize("cls", list(DEVICE_KINDS.values()), ids=lambda c: c.kind)
def test_every_state_field_is_a_field_and_applied_kw_is_not_state(cls: type[Device]) -> None:
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    assert cls.state_fields and set(cls.state_fields) <= names
    assert "applied_kw" not in cls.state_fields  # what the clearing asks now: never restored


def test_a_battery_comes_back_with_its_charge_and_ledger_not_the_files() -> None:
    running = Battery(capacity_kwh=10.0, power_kw=5.0, soc_kwh=5.0)
    running.apply(5.0, 1800.0)  # discharges for half an hour
    record = _json(device_record(running))
    assert record["kind"] == "battery" and "soc_kwh" not in record["parameters"]
    fresh = Battery(capacity_kwh=10.0, power_kw=5.0, soc_kwh=5.0)  # the same file again
    restore_state(fresh, record)
    assert fresh.soc_kwh == running.soc_kwh < 5.0
    assert fresh.state() == running.state() and fresh.discharged_kwh == 2.5
    assert fresh.applied_kw == 0.0


@pytest.mark.parametrize("changed, why", [
    (Battery(capacity_kwh=20.0, power_kw=5.0, soc_kwh=5.0), r"capacity_kwh \(10\.0 -> 20\.0\)"),
    (Battery(capacity_kwh=10.0, power_kw=5.0, soc_kwh=5.0, efficiency=1.0),
     r"efficiency \(0\.9 -> 1\.0\)"),
    (DispatchablePlant(0.0, 50.0, 0.12, 20.0), "the saved device is a battery, the file "
                                               "describes a plant"),
])
def test_another_device_starts_from_its_file_and_says_why(changed: Device, why: str) -> None:
    running = Battery(capacity_kwh=10.0, power_kw=5.0, soc_kwh=5.0)
    running.apply(5.0, 600.0)
    before = changed.state()
    with pytest.raises(ValueError, match=why):
        restore_state(changed, _json(device_record(running)))
    assert changed.state() == before  # nothing changed


@pytest.mark.parametrize("state, why", [
    ({"soc_kwh": 12.0, "charged_kwh": 0.0, "discharged_kwh": 0.0, "losses_kwh": 0.0},
     "soc_kwh: must be at most capacity_kwh"),
    ({"soc_kwh": 1.0, "charged_kwh": "lots", "discharged_kwh": 0.0, "losses_kwh": 0.0},
     "charged_kwh: must be a number"),
    ({"soc_kwh": 1.0}, "the saved state has the fields soc_kwh"),
])
def test_a_saved_state_that_does_not_fit_the_device_is_not_restored(state: dict[str, Any],
                                                                   why: str) -> None:
    battery = Battery(capacity_kwh=10.0, power_kw=5.0, soc_kwh=5.0)
    record = {**device_record(battery), "state": state}
    with pytest.raises(ValueError, match=why):
        restore_state(battery, record)
    assert battery.soc_kwh == 5.0 and battery.charged_kwh == 0.0


def test_the_state_is_worth_saving_once_it_moved_by_one_percent_of_the_capacity() -> None:
    battery = Battery(capacity_kwh=10.0, power_kw=5.0, soc_kwh=5.0, efficiency=1.0)
    assert worth_saving(battery, None)  # never saved
    saved = battery.state()
    assert not worth_saving(battery, saved)
    battery.apply(1.0, 0.5 * 3600 * SAVE_FRACTION * 10.0)  # 0.05 kWh: half of 1%
    assert not worth_saving(battery, saved)
    battery.apply(1.0, 0.5 * 3600 * SAVE_FRACTION * 10.0)  # 0.1 kWh in all: 1%
    assert worth_saving(battery, saved)
    saved = battery.state()
    battery.apply(5.0, 3600.0)  # empties: reaching 0 is always worth a save
    assert battery.soc_kwh == 0.0 and worth_saving(battery, saved)


# ------------------------------------------------------------------------ base values


def test_each_model_gives_the_base_values_it_models_and_a_battery_none() -> None:
    battery, plant, pv, load = ALL
    assert base_values(battery) == {}
    assert base_values(plant) == {"production": 20.0}
    assert base_values(pv) == {"production": 6.0}
    assert base_values(load) == {"consumption": 3.0}


def test_the_base_output_follows_the_node_within_what_the_device_can_do() -> None:
    pv = CurtailablePV(6.0)
    pv.follow(2.5, 7.0)  # a `set --production 2.5`: the sun went in
    assert pv.output_kw == 2.5 and pv.offer().flex_down_kw == 2.5
    load = SheddableLoad(3.0, 0.5)
    load.follow(0.0, 4.0)
    assert load.kw == 4.0 and load.offer().flex_up_kw == 4.0
    plant = DispatchablePlant(10.0, 50.0, 0.12, 20.0)
    plant.follow(60.0, 0.0)  # beyond max_kw: its offers assume what it can do
    assert plant.output_kw == 50.0 and plant.offer().flex_up_kw == 0.0
    battery = Battery(10.0, 5.0, 5.0)
    battery.follow(3.0, 4.0)
    assert battery.state() == Battery(10.0, 5.0, 5.0).state()


def test_a_pv_that_was_set_comes_back_with_its_output_and_counter() -> None:
    pv = CurtailablePV(output_kw=6.0, peak_kw=8.0)
    pv.follow(3.0, 0.0)
    pv.apply(-1.0, 3600.0)
    fresh = CurtailablePV(output_kw=6.0, peak_kw=8.0)
    restore_state(fresh, _json(device_record(pv)))
    assert (fresh.output_kw, fresh.curtailed_kwh) == (3.0, 1.0)
    with pytest.raises(ValueError, match=r"peak_kw \(8\.0 -> 9\.0\)"):
        restore_state(CurtailablePV(output_kw=6.0, peak_kw=9.0), _json(device_record(pv)))


# ------------------------------------------------------------------------ merit order


def test_in_a_surplus_the_dearer_plant_backs_off_first() -> None:
    cheap = DispatchablePlant(min_kw=0.0, max_kw=50.0, price=0.08, output_kw=30.0)
    dear = DispatchablePlant(min_kw=0.0, max_kw=50.0, price=0.20, output_kw=30.0)
    offers = [Offer("cheap", cheap.production_kw, 0.0, *_flex(cheap)),
              Offer("dear", dear.production_kw, 0.0, *_flex(dear)),
              Offer("town", 0.0, 50.0)]  # 60 kW produced, 50 consumed: 10 kW too much
    c = clear(offers)
    assert c.imbalance_kw == 10.0 and c.balanced_net_kw == 0.0
    assert c.activations == {"dear": -10.0}  # it saves 0.20 a kWh, the other only 0.08
    assert c.clearing_price == -0.2
    # A surplus larger than the dear plant can absorb: only then does the cheap one back off.
    c = clear([*offers[:2], Offer("town", 0.0, 20.0)])
    assert c.activations == {"dear": -30.0, "cheap": -10.0}


def test_in_a_deficit_the_cheaper_plant_still_runs_up_first() -> None:
    cheap = DispatchablePlant(min_kw=0.0, max_kw=50.0, price=0.08, output_kw=30.0)
    dear = DispatchablePlant(min_kw=0.0, max_kw=50.0, price=0.20, output_kw=30.0)
    c = clear([Offer("cheap", 30.0, 0.0, *_flex(cheap)), Offer("dear", 30.0, 0.0, *_flex(dear)),
               Offer("town", 0.0, 70.0)])
    assert c.activations == {"cheap": 10.0}


def test_plants_back_off_before_pv_is_curtailed_and_after_a_battery_charges() -> None:
    plant = DispatchablePlant(min_kw=0.0, max_kw=50.0, price=0.12, output_kw=20.0)
    pv = CurtailablePV(output_kw=6.0)  # curtailing throws free energy away: price_down 0
    empty = Battery(capacity_kwh=10.0, power_kw=2.0, soc_kwh=0.0)  # pays ~0.38 to charge
    offers = [Offer("plant", 20.0, 0.0, *_flex(plant)), Offer("pv", 6.0, 0.0, *_flex(pv)),
              Offer("battery", 0.0, 0.0, *_flex(empty)), Offer("town", 0.0, 21.0)]
    assert clear(offers).activations == {"battery": -2.0, "plant": -3.0}


def _flex(device: Device) -> tuple[float, float, float, float]:
    f = device.offer()
    return f.flex_up_kw, f.price_up, f.flex_down_kw, f.price_down
