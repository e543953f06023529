"""Attacks by a member against real nodes: a forged advert, and a house changing another node.

The grid is a line n1 - n2 - n3 on 127.0.0.1; the attacker m is a member of the grid (with
keys, its key is in every keys directory) that links to n1 only and then hands n1 an advert of
n3 it copied and changed: a far higher seq and a production of 999. With keys the forgery
cannot carry n3's signature and changes nothing anywhere; without keys it spreads, and n3
outbids it, so the island agrees on what n3 itself says.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from zgrid.security import Membership, keygen, secure_client
from zgrid.wire import MAX_COUNTER, Advert, Adverts, encode

from conftest import Grid, NodeProc, ctl, wait_until

FORGED_PRODUCTION = 999.0
SEQ_JUMP = 1000


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    for name in ("n1", "n2", "n3", "m"):
        keygen(directory, name)
    keygen(directory, "operator", operator=True)
    return directory


def line(grid: Grid, keys: Path | None) -> tuple[NodeProc, NodeProc, NodeProc]:
    n1 = grid.add("n1", "--production", "10", keys=keys)
    n2 = grid.add("n2", "--consumption", "3", "--sibling", n1.address, keys=keys)
    n3 = grid.add("n3", "--production", "5", "--consumption", "1", "--sibling", n2.address,
                  keys=keys)
    grid.wait_island([n1, n2, n3])
    return n1, n2, n3


@pytest.fixture
def attacker() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def forge(ctx: zmq.Context[Any], grid: Grid, target: NodeProc, victim: NodeProc,
          keys: Path | None, incarnation: int | None = None) -> zmq.Socket[Any]:
    """As member m: run m linked to `target`, then, over a connection of m's own (with m's key),
    send `target` a copy of `victim`'s advert with a higher seq (or the given incarnation)
    and another production."""
    grid.add("m", "--sibling", target.address, keys=keys)
    with target.client() as client:  # the library's rows carry the advert's version and nonce
        rows = wait_until(lambda: (lambda r: r if any(
            n["id"] == "m" and n["reachable"] for n in r) else None)(client.nodes()),
            what=f"{target.id} to count m")
    m_nonce = next(n["nonce"] for n in rows if n["id"] == "m")
    real = next(n for n in rows if n["id"] == victim.id)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        secure_client(sock, Membership(keys), "m", target.id)
    sock.connect(target.endpoint)
    forged = Advert(victim.id, incarnation or real["incarnation"], real["seq"] + SEQ_JUMP,
                    FORGED_PRODUCTION,
                    real["consumption"], tuple(real["links"]), real["endpoint"], real["nonce"],
                    bytes(64) if keys is not None else b"")
    sock.send(encode(Adverts("m", m_nonce, (forged,))))
    return sock  # the caller keeps it open: closing it now could drop the unsent frame


def agreed_on(nodes: tuple[NodeProc, ...], production: float, total: float) -> bool:
    for node in nodes:
        status = node.status()
        n3 = next(n for n in node.ctl_json("nodes") if n["id"] == "n3")
        if n3["production"] != production or status["total_net"] != total:
            return False
    return True


def test_with_keys_a_forged_advert_is_dropped_and_changes_nothing_anywhere(
        grid: Grid, keys: Path, attacker: zmq.Context[Any]) -> None:
    nodes = line(grid, keys)
    n1, _, n3 = nodes
    _attack = forge(attacker, grid, n1, n3, keys)
    wait_until(lambda: n1.status()["counters"]["bad_signatures"] >= 1,
               what="n1 to drop the forged advert")
    assert agreed_on(nodes, 5.0, 11.0)
    assert n3.status()["seq"] < SEQ_JUMP, "n3 had nothing to outbid"
    wait_until(lambda: "signature does not verify" in n1.log_text(), what="the drop logged")


def test_without_keys_a_forged_advert_is_outbid_and_the_island_agrees_again(
        grid: Grid, attacker: zmq.Context[Any]) -> None:
    nodes = line(grid, None)
    n1, _, n3 = nodes
    _attack = forge(attacker, grid, n1, n3, None)
    wait_until(lambda: n3.status()["seq"] > SEQ_JUMP, what="n3 to outbid the forgery")
    wait_until(lambda: agreed_on(nodes, 5.0, 11.0), what="every node to hold n3's own values")


def test_a_forged_advert_at_the_maximum_incarnation_cannot_take_a_nodes_id(
        grid: Grid, attacker: zmq.Context[Any]) -> None:
    nodes = line(grid, None)
    n1, _, n3 = nodes
    _attack = forge(attacker, grid, n1, n3, None, incarnation=MAX_COUNTER)
    wait_until(lambda: n3.status()["incarnation"] == MAX_COUNTER, what="n3 to outbid it")
    wait_until(lambda: agreed_on(nodes, 5.0, 11.0), what="every node to hold n3's own values")
    n3.stop()
    n3.start()  # its saved incarnation is at the maximum: a restart must still come back
    wait_until(lambda: agreed_on(nodes, 5.0, 11.0), what="n3 back, counted with its values")
    assert n3.alive and n3.status()["incarnation"] == MAX_COUNTER


def test_a_member_that_is_not_an_operator_cannot_change_another_node(
        grid: Grid, keys: Path) -> None:
    n1, _, _ = line(grid, keys)
    refused = ctl("--keys", str(keys), "--as", "n2", "set", "--production", "0",
                  node=n1.address)
    assert refused.returncode == 1, refused.stderr
    assert "'n2' may not change n1" in refused.stderr and "Traceback" not in refused.stderr
    assert n1.status()["production"] == 10.0
    read = ctl("--keys", str(keys), "--as", "n2", "--json", "status", node=n1.address)
    assert read.returncode == 0, "reading is open to every member"
    for who, value in (("operator", "7"), ("n1", "8")):
        ctl("--keys", str(keys), "--as", who, "set", "--production", value, node=n1.address,
            check=True)
        assert n1.status()["production"] == float(value)
