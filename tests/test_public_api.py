"""The package's public face: what `import zgrid` offers a program, and the version flags."""

from __future__ import annotations

import subprocess

import pytest

import zgrid
from zgrid.harness import BIN


def test_the_package_exports_the_client_the_errors_and_the_simulator() -> None:
    from zgrid.client import Client
    from zgrid.sim import Scenario, Simulator, run_scenario

    assert zgrid.Client is Client
    assert (zgrid.Simulator, zgrid.Scenario, zgrid.run_scenario) == (
        Simulator, Scenario, run_scenario)
    for error in (zgrid.ControlError, zgrid.NoReply, zgrid.ProtocolError, zgrid.StoreError,
                  zgrid.SecurityError):
        assert issubclass(error, zgrid.ZgridError)
    assert set(zgrid.__all__) <= set(dir(zgrid)) | {"Client", "Scenario", "Simulator",
                                                      "converged_sim", "run_scenario"}
    with pytest.raises(AttributeError):
        _ = zgrid.NoSuchThing  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", ["zgrid-node", "zgrid-ctl"])
def test_version_flag_prints_the_package_version(command: str) -> None:
    proc = subprocess.run([str(BIN / command), "--version"], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"{command}, version {zgrid.__version__}"


def test_zgrid_node_defaults_to_the_protocols_timing() -> None:
    from zgrid import cli, core, node

    options = {p.name: p.default for p in cli.node_main.params}
    assert (options["ping_interval"], options["dead_after"], options["forget_after"]) == (
        core.PING_INTERVAL_S, core.DEAD_AFTER_S, core.FORGET_AFTER_S)
    settings = node.NodeSettings("n", "tcp://127.0.0.1:1")
    assert (settings.ping_interval_s, settings.dead_after_s) == (
        core.PING_INTERVAL_S, core.DEAD_AFTER_S)
