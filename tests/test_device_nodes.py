"""Device models in real zgrid-node processes on 127.0.0.1, driven by zgrid-ctl: a device's
state survives a restart, and its base output is the node's production or consumption.

Every wait is on a condition with a deadline; every process is the `grid` fixture's.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import BIN, Grid, NodeProc, wait_until

STARTUP_TIMEOUT_S = 30.0
# 1 kWh holding 0.5, discharging 10 kW into the house's deficit: about 0.003 kWh a second.
BATTERY = "[[battery]]\ncapacity_kwh = {capacity}\npower_kw = 50.0\nsoc_kwh = 0.5\n"
DEFICIT_KW = 10.0
ETA = 0.9**0.5  # the battery's discharge efficiency (round trip 0.9, split evenly)
DISCHARGE_WAIT_S = 30.0  # 0.03 kWh takes about 10 s


def soc(node: NodeProc) -> float | None:
    device = node.status()["device"]
    return None if device is None else float(device["soc_kwh"])


def discharged_to(node: NodeProc, below: float) -> float:
    return wait_until(lambda: (lambda s: s if s is not None and s <= below else None)(
        soc(node)), timeout=DISCHARGE_WAIT_S, what=f"{node.id} to discharge to {below} kWh")


def most_discharged_kwh(seconds: float) -> float:
    """The most the battery can lose in `seconds` of covering the deficit (plus a step)."""
    return DEFICIT_KW * (seconds + 1.0) / 3600.0 / ETA


def test_a_battery_restarts_from_the_charge_it_had_not_from_its_file(
        grid: Grid, tmp_path: Path) -> None:
    device = tmp_path / "battery.toml"
    device.write_text(BATTERY.format(capacity=1.0))
    house = grid.add("house", "--consumption", str(DEFICIT_KW))
    args = ("--device", str(device), "--sibling", house.endpoint)
    battery = grid.add("battery", *args)
    grid.wait_island([house, battery])
    before = discharged_to(battery, 0.49)
    read_at = time.monotonic()
    assert battery.stop(signal.SIGTERM) == 0
    battery.start(*args)
    after = wait_until(lambda: soc(battery), what="the battery to answer again")
    # It went on discharging until it stopped and again since: never back up to the file's 0.5,
    # and down by no more than it can have discharged meanwhile.
    assert before - most_discharged_kwh(time.monotonic() - read_at) <= after <= before < 0.5
    log = battery.log_text()
    assert "battery device: resuming its saved state (soc_kwh " in log
    assert "Traceback" not in log
    # And it keeps balancing the island from there.
    grid.wait_island([house, battery])
    wait_until(lambda: house.status()["balanced_net_kw"] == 0.0 and soc(battery) < after,
               what="the restarted battery to cover the deficit again")


def test_a_battery_killed_with_9_loses_at_most_a_percent_of_its_capacity(
        grid: Grid, tmp_path: Path) -> None:
    device = tmp_path / "battery.toml"
    device.write_text(BATTERY.format(capacity=1.0))
    house = grid.add("house", "--consumption", str(DEFICIT_KW))
    args = ("--device", str(device), "--sibling", house.endpoint)
    battery = grid.add("battery", *args)
    grid.wait_island([house, battery])
    before = discharged_to(battery, 0.47)  # the state was saved at least twice on the way
    battery.kill()
    battery.start(*args)
    after = wait_until(lambda: soc(battery), what="the battery to answer again")
    # Back to its last save, at most 1% of its capacity (and a step) above where it was.
    assert before - most_discharged_kwh(4.0) <= after <= before + 0.01 + most_discharged_kwh(
        1.0) < 0.5, (before, after)


def test_a_changed_device_file_starts_from_the_file_and_the_log_says_why(
        grid: Grid, tmp_path: Path) -> None:
    device = tmp_path / "battery.toml"
    device.write_text(BATTERY.format(capacity=1.0))
    house = grid.add("house", "--consumption", str(DEFICIT_KW))
    args = ("--device", str(device), "--sibling", house.endpoint)
    battery = grid.add("battery", *args)
    grid.wait_island([house, battery])
    before = discharged_to(battery, 0.485)
    assert battery.stop(signal.SIGTERM) == 0
    device.write_text(BATTERY.format(capacity=2.0))  # another battery now
    battery.start(*args)
    after = wait_until(lambda: soc(battery), what="the battery to answer again")
    assert after > before  # back near the file's 0.5 kWh
    assert "battery device: starting from the device file" in battery.log_text()
    assert "capacity_kwh (1.0 -> 2.0)" in battery.log_text()


def test_a_device_state_that_cannot_be_saved_is_reported_like_any_failed_save(
        grid: Grid, tmp_path: Path) -> None:
    device = tmp_path / "battery.toml"
    device.write_text(BATTERY.format(capacity=1.0))
    disk_full = tmp_path / "disk-full"
    house = grid.add("house", "--consumption", str(DEFICIT_KW))
    args = ("--device", str(device), "--sibling", house.endpoint,
            "--fail-saves-while", str(disk_full))
    battery = grid.add("battery", *args)
    grid.wait_island([house, battery])
    disk_full.touch()
    status = wait_until(lambda: (lambda s: s if s["storage"] != "ok" else None)(
        battery.status()), what="the battery's charge to move 1% and fail to be saved")
    assert status["storage"].startswith("failing: disk full")
    assert battery.alive and status["activation_kw"] > 0  # it keeps balancing
    disk_full.unlink()
    wait_until(lambda: battery.status()["storage"] == "ok", what="saving to work again")
    disk_full.touch()  # full again at the stop: what it discharged since is lost, and it says so
    assert battery.stop(signal.SIGTERM) == 1
    log = battery.log_text()
    assert "cannot save the battery device's state at stop" in log
    assert "saving works again" in log and "Traceback" not in log


# ------------------------------------------------------------------------ base values


def nodes_row(observer: NodeProc, origin: str) -> dict[str, Any]:
    (row,) = [r for r in observer.ctl_json("nodes") if r["id"] == origin]
    return row


def test_a_pv_device_is_its_nodes_production_and_follows_a_set(grid: Grid, tmp_path: Path
                                                               ) -> None:
    device = tmp_path / "pv.toml"
    device.write_text("[[pv]]\noutput_kw = 6.0\npeak_kw = 8.0\n")
    house = grid.add("house", "--consumption", "2")
    args = ("--device", str(device), "--sibling", house.endpoint)
    pv = grid.add("pv", *args)
    statuses = grid.wait_island([house, pv])
    assert {s["total_production"] for s in statuses} == {6.0}
    assert pv.status()["production"] == 6.0 and nodes_row(house, "pv")["production"] == 6.0
    # 4 kW too much, and the PV is the only one that can go down: it curtails 4 of its 6.
    wait_until(lambda: house.status()["balanced_net_kw"] == 0.0 and pv.status()[
        "activation_kw"] == -4.0, what="the PV to curtail the surplus")

    pv.ctl("set", "--production", "3", check=True)  # a cloud (or a profile player)
    wait_until(lambda: (lambda s: s["flex_down"] == 3.0 and s["device"]["output_kw"] == 3.0)(
        pv.status()), what="the PV's offer to follow its new output")
    assert pv.stop(signal.SIGTERM) == 0
    pv.start(*args)  # the acknowledged 3 kW, not the file's 6
    wait_until(lambda: (lambda s: s["production"] == 3.0 and s["device"]
                        and s["device"]["output_kw"] == 3.0)(pv.status()),
               what="the PV to come back with 3 kW")


def test_a_load_device_is_its_nodes_consumption_and_a_battery_leaves_the_flags_alone(
        grid: Grid, tmp_path: Path) -> None:
    load_file = tmp_path / "load.toml"
    load_file.write_text("[[load]]\nkw = 3.0\nprice = 0.5\n")
    battery_file = tmp_path / "battery.toml"
    battery_file.write_text(BATTERY.format(capacity=1.0))
    plant = grid.add("plant", "--production", "5")
    load = grid.add("load", "--device", str(load_file), "--production", "1",
                    "--sibling", plant.endpoint)
    home = grid.add("home", "--device", str(battery_file), "--consumption", "0.5",
                    "--sibling", plant.endpoint)
    statuses = grid.wait_island([plant, load, home])
    assert {s["total_consumption"] for s in statuses} == {3.5}
    row = nodes_row(plant, "load")
    assert (row["production"], row["consumption"]) == (1.0, 3.0)
    assert nodes_row(plant, "home")["consumption"] == 0.5


def test_a_flag_for_a_value_the_device_gives_is_a_usage_error(tmp_path: Path) -> None:
    device = tmp_path / "pv.toml"
    device.write_text("[[pv]]\noutput_kw = 6.0\n")
    proc = subprocess.run(
        [str(BIN / "zgrid-node"), "--id", "pv", "--bind", "tcp://127.0.0.1:1", "--device",
         str(device), "--production", "6", "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert "--production: the pv in" in proc.stderr and "leave out --production" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "d").exists()
