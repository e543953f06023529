"""A grid with CurveZMQ: members get in, strangers get nothing, revoked members are dropped."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from zgrid.security import keygen

from conftest import BIN, Grid, NodeProc, ctl, free_port, wait_until


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    for name in ("n1", "n2", "n3"):
        keygen(directory, name)
    keygen(directory, "operator", operator=True)
    return directory


@pytest.fixture
def secure_line(grid: Grid, keys: Path) -> tuple[NodeProc, NodeProc, NodeProc]:
    n1 = grid.add("n1", "--production", "10", keys=keys)
    n2 = grid.add("n2", "--consumption", "3", "--sibling", n1.address, keys=keys)
    n3 = grid.add("n3", "--consumption", "1", "--sibling", n2.address, keys=keys)
    grid.wait_island([n1, n2, n3])
    return n1, n2, n3


def test_members_link_and_agree_over_curve(secure_line: tuple[NodeProc, NodeProc, NodeProc]
                                           ) -> None:
    n1, _, _ = secure_line
    assert n1.ctl_json("status")["total_net"] == 6.0


def test_a_client_without_an_accepted_key_gets_no_service(
        tmp_path: Path, secure_line: tuple[NodeProc, NodeProc, NodeProc]) -> None:
    n1, _, _ = secure_line
    stranger = tmp_path / "stranger"
    keygen(stranger, "mallory")
    (stranger / "n1.key").write_bytes((n1.keys / "n1.key").read_bytes())  # type: ignore[operator]
    refused = ctl("--keys", str(stranger), "--as", "mallory", "set", "--production", "999",
                  node=n1.address, timeout=0.5)
    assert refused.returncode == 3 and "Traceback" not in refused.stderr
    plain = ctl("set", "--production", "999", node=n1.endpoint, timeout=0.5)
    assert plain.returncode == 3
    assert n1.status()["production"] == 10.0
    wait_until(lambda: n1.log_text().count("refused CURVE client") == 1,
               what="the refused key to be logged once")


def test_a_would_be_sibling_without_an_accepted_key_is_refused(
        grid: Grid, tmp_path: Path, secure_line: tuple[NodeProc, NodeProc, NodeProc]) -> None:
    n1, _, _ = secure_line
    outsider_keys = tmp_path / "outsider"
    keygen(outsider_keys, "mallory")
    (outsider_keys / "n1.key").write_bytes((n1.keys / "n1.key").read_bytes())  # type: ignore[operator]
    mallory = NodeProc("mallory", free_port(), tmp_path / "mallory", tmp_path / "mallory.log",
                       keys=outsider_keys)
    grid.nodes.append(mallory)
    mallory.start("--production", "1000", "--sibling", n1.address)
    wait_until(lambda: "refused CURVE client" in n1.log_text(), what="n1 to refuse mallory")
    assert [s["id"] for s in n1.status()["siblings"]] == ["n2"]
    assert n1.status()["total_net"] == 6.0
    assert mallory.alive


def test_removing_a_key_and_sighup_revokes_a_member(
        secure_line: tuple[NodeProc, NodeProc, NodeProc], grid: Grid) -> None:
    n1, n2, _ = secure_line
    assert n1.keys is not None
    (n1.keys / "n3.key").unlink()
    for node in (n1, n2):
        node.send(signal.SIGHUP)
    grid.wait_island([n1, n2])
    states = {s["id"]: s["state"] for s in n2.status()["siblings"]}
    assert states == {"n1": "up", "n3": "refused"}
    n3_as_client = ctl("--keys", str(n1.keys), "--as", "n3", "status", node=n1.address,
                       timeout=0.5)
    assert n3_as_client.returncode in (1, 3)


def test_a_node_refuses_to_start_with_keys_it_cannot_use(tmp_path: Path, keys: Path) -> None:
    proc = subprocess.run([str(BIN / "zgrid-node"), "--id", "nobody", "--bind",
                           "tcp://127.0.0.1:1", "--keys", str(keys), "--data-dir",
                           str(tmp_path / "d")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "nobody.key_secret" in proc.stderr and "Traceback" not in proc.stderr
