"""The mypyc-compiled tree (scripts/mypyc_build.py) runs the same protocol as the sources.

Long simulator runs use it (`make bench-sim`); these tests build it once (about 40 s) and
check that it really is compiled, that it refuses to be built over the checkout, and that a
simulated day on it is the interpreted day, figure for figure and step for step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypyc")
pytest.importorskip("demandlib")
pytest.importorskip("pvlib")

from zgrid.sim.day import load_day, run_day

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "mypyc_build.py"
HAMLET = ROOT / "examples" / "scenarios" / "hamlet.toml"
HOURS = 3.0  # from 10:00: PV, batteries and quarter-hour boundaries, in a few seconds

# Run from outside the checkout, by path: the compiled tree on PYTHONPATH comes before the
# sources (the editable install's path), and nothing else can shadow it.
DAY_SCRIPT = """
import dataclasses, json, sys
import zgrid.core
from zgrid.sim.day import load_day, run_day
sc = dataclasses.replace(load_day(sys.argv[1]), start_h=10.0, duration_h=float(sys.argv[2]))
result = run_day(sc)
print(json.dumps({"core": zgrid.core.__file__, "summary": result.summary,
                  "series": result.series}))
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler for mypyc")
    out = tmp_path_factory.mktemp("mypyc") / "tree"
    subprocess.run([sys.executable, str(BUILD), str(out)], check=True, timeout=600)
    return out


def test_the_tree_holds_compiled_modules_and_the_hash_of_their_sources(tree: Path) -> None:
    assert list((tree / "zgrid").glob("core.*.so")), "core was not compiled"
    assert list((tree / "zgrid" / "sim").glob("engine.*.so")), "the engine was not compiled"
    assert list((tree / "zgrid" / "sim").glob("measurement.*.so")), "measurement was not compiled"
    assert len((tree / "SOURCE_HASH").read_text().strip()) == 64
    assert not list((ROOT / "zgrid").glob("*.so")), "the build wrote into the checkout"


def test_a_day_on_the_compiled_tree_is_the_interpreted_day(tree: Path, tmp_path: Path) -> None:
    script = tmp_path / "day.py"
    script.write_text(DAY_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, str(script), str(HAMLET), str(HOURS)], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    compiled = json.loads(done.stdout)
    assert not compiled["core"].endswith(".py"), compiled["core"]
    interpreted = run_day(dataclasses.replace(load_day(str(HAMLET)), start_h=10.0,
                                              duration_h=HOURS))
    timing = {"wall_s", "loop_wall_s"}
    assert {k: v for k, v in compiled["summary"].items() if k not in timing} == {
        k: v for k, v in interpreted.summary.items() if k not in timing}
    assert compiled["series"] == json.loads(json.dumps(interpreted.series))
    assert interpreted.summary["steps"] == 180 and interpreted.summary["messages"] > 0


SCENARIO_SCRIPT = """
import json
import zgrid.sim.measurement
from zgrid.sim import Scenario, run_scenario
result = run_scenario(Scenario(nodes=60, degree=4, changes=10, start="cold"))
print(json.dumps({"measurement": zgrid.sim.measurement.__file__, "result": result}))
"""


def test_a_scenario_on_the_compiled_tree_is_the_interpreted_one_delivery_for_delivery(
        tree: Path, tmp_path: Path) -> None:
    from zgrid.sim import Scenario, run_scenario

    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], env=dict(os.environ, PYTHONPATH=str(tree)),
                          capture_output=True, text=True, timeout=120, check=True)
    compiled = json.loads(done.stdout)
    assert not compiled["measurement"].endswith(".py"), compiled["measurement"]
    interpreted = json.loads(json.dumps(run_scenario(Scenario(nodes=60, degree=4, changes=10,
                                                              start="cold"))))

    def figures(result: dict[str, object]) -> dict[str, object]:
        return {k: v for k, v in result.items()
                if not k.endswith(("wall_s", "per_s")) and k != "memory_peak_mb"}

    assert figures(compiled["result"]) == figures(interpreted)
    assert interpreted["trace_hash"] and interpreted["changes_converged"] == 10


PICKLE_SCRIPT = """
import pickle
from zgrid.sim import Latency, LinkModel, Scenario
import zgrid.sim.network
sc = Scenario(nodes=10, latency=Latency.parse("uniform:40e-6:80e-6"))
model = LinkModel(Latency.parse("lognormal:60e-6:0.5"), loss=0.1)
assert pickle.loads(pickle.dumps(sc)) == sc and pickle.loads(pickle.dumps(model)) == model
print(zgrid.sim.network.__file__)
"""


def test_a_scenario_pickles_to_a_worker_on_the_compiled_tree(tree: Path, tmp_path: Path) -> None:
    script = tmp_path / "pickles.py"
    script.write_text(PICKLE_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], env=dict(os.environ, PYTHONPATH=str(tree)),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert not done.stdout.strip().endswith(".py"), done.stdout


def test_the_build_refuses_to_write_over_the_checkout() -> None:
    done = subprocess.run([sys.executable, str(BUILD), str(ROOT)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "checkout" in done.stderr
