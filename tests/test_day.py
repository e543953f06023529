"""A simulated day (zgrid/sim/day.py): Phase II on real profiles, in virtual time.

The hamlet scenario (50 nodes: households on the BDEW profile, PV from pvlib, batteries,
plants, a factory) runs once for a whole day; the tests read what must hold of it: the grid
stays balanced where flexibility suffices, the imbalance energy falls by far more than 95 %,
batteries stay within their capacity and their energy ledger closes, every island agrees at
every step's end. Smaller runs check faults, determinism, the command and bad files.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("demandlib")
pytest.importorskip("pvlib")

from zgrid.sim.day import DayResult, DayScenario, load_day, parse_day, run_day
from zgrid.sim.errors import SimError

from conftest import BIN

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "scenarios"
HAMLET = EXAMPLES / "hamlet.toml"


def hamlet(**changes: Any) -> DayScenario:
    return dataclasses.replace(load_day(str(HAMLET)), **changes)


@pytest.fixture(scope="module")
def day() -> DayResult:
    return run_day(hamlet())


def test_where_flexibility_suffices_the_net_stays_within_one_percent_of_the_load(
        day: DayResult) -> None:
    s = day.summary
    assert s["steps"] == 1440 and s["steps_flex_sufficed"] == 1440
    assert s["balanced_fraction"] >= 0.999, s


def test_balancing_removes_more_than_95_percent_of_the_imbalance_energy(day: DayResult) -> None:
    s = day.summary
    assert s["imbalance_kwh_without_balancing"] > 100.0  # the day really is unbalanced
    assert s["imbalance_reduction"] >= 0.95, s


def test_every_island_agrees_at_the_end_of_every_step(day: DayResult) -> None:
    assert day.summary["steps_not_agreed_at_end"] == 0
    assert set(day.series["islands"]) == {1}


def test_batteries_stay_within_their_capacity_and_their_energy_ledger_closes(
        day: DayResult) -> None:
    assert all(0.0 <= x <= 1.0 for x in day.series["soc_fraction"])
    assert max(day.series["soc_fraction"]) > min(day.series["soc_fraction"])  # they worked
    assert day.summary["battery_ledger_error_kwh"] < 1e-9


def test_the_day_uses_every_kind_of_flexibility(day: DayResult) -> None:
    for kind in ("battery_kw", "plant_kw", "pv_kw"):
        assert any(x != 0.0 for x in day.series[kind]), kind
    # PV is curtailed (activation < 0) only, never raised
    assert all(x <= 0.0 for x in day.series["pv_kw"])


def test_a_partitioned_island_balances_itself_with_its_own_members() -> None:
    sc = dataclasses.replace(
        parse_day({**_hamlet_toml(), "faults": {"partition": ["00:10-00:40:half"]}}),
        duration_h=1.0)
    result = run_day(sc)
    s = result.series
    islands = s["islands"]
    # Cutting the links between the halves of a random graph leaves two or more islands.
    assert max(islands) >= 2 and islands[0] == 1 and islands[-1] == 1
    during = [k for k, n in enumerate(islands) if n >= 2 and s["shortfall_kw"][k] == 0.0]
    assert during
    # Each island clears over its own members, so the copper grid's net stays balanced.
    assert all(abs(s["net_kw"][k]) <= 0.01 * s["load_kw"][k] for k in during)


def test_a_crashed_batterys_controller_activates_nothing_and_returns() -> None:
    sc = dataclasses.replace(
        parse_day({**_hamlet_toml(), "faults": {"crash": ["00:05-00:20:battery1"]}}),
        duration_h=0.5)
    result = run_day(sc)
    assert result.series["agreed"][-1] and result.series["islands"][-1] == 1  # back, agreed
    assert result.summary["battery_ledger_error_kwh"] < 1e-9


def test_the_same_scenario_and_seed_give_the_same_day() -> None:
    a, b = run_day(hamlet(duration_h=0.5)), run_day(hamlet(duration_h=0.5))
    assert a.series == b.series
    other = run_day(hamlet(duration_h=0.5, seed=2))
    assert other.series["load_kw"] != a.series["load_kw"]


def _hamlet_toml() -> dict[str, Any]:
    import tomllib

    return tomllib.loads(HAMLET.read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["scenario"].update(step_s=7), "step_s"),
    (lambda d: d["scenario"].update(colour="red"), "unknown key 'colour'"),
    (lambda d: d["group"][0].pop("count"), "missing key 'count'"),
    (lambda d: d["group"][0].update(kind="windmill"), "kind"),
    (lambda d: d["group"][2].update(soc=[0.9, 0.1]), "soc"),
    (lambda d: d["group"][4].update(min_kw=90), "min_kw"),
    (lambda d: d.update(faults={"partition": ["25:99:half"]}), "HH:MM"),
    (lambda d: d.update(faults={"crash": ["01:00-02:00:nobody"]}), "unknown node"),
    (lambda d: d["topology"].update(kind="torus"), "topology"),
])
def test_a_bad_scenario_is_refused_naming_what_is_wrong(edit: Any, message: str) -> None:
    data = _hamlet_toml()
    edit(data)
    with pytest.raises(SimError, match=message):
        sc = parse_day(data)
        if sc.faults:
            run_day(dataclasses.replace(sc, duration_h=step_h(sc)))


def step_h(sc: DayScenario) -> float:
    return sc.step_s / 3600


def test_zgrid_sim_scenario_writes_json_and_a_plot(tmp_path: Path) -> None:
    short = tmp_path / "short.toml"
    short.write_text(HAMLET.read_text().replace("duration_h = 24", "duration_h = 1"))
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "zgrid-sim"), "--scenario", str(short), "--out", str(out),
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    written = json.loads((out / "day.json").read_text())
    assert written["summary"]["steps"] == summary["steps"] == 60
    assert len(written["series"]["net_kw"]) == 60
    assert (out / "day.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--nodes", "5"], "--nodes does not apply"),
    (["--out", "x"], None),
])
def test_zgrid_sim_scenario_refuses_options_that_do_not_apply(
        tmp_path: Path, args: list[str], message: str | None) -> None:
    cmd = [str(BIN / "zgrid-sim"), *args]
    if message is not None:
        cmd += ["--scenario", str(HAMLET)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (message or "--out goes with --scenario") in proc.stderr


def test_a_missing_scenario_file_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([str(BIN / "zgrid-sim"), "--scenario", str(tmp_path / "none.toml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot read scenario" in proc.stderr
    assert "Traceback" not in proc.stderr

