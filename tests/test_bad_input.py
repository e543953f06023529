"""Bad input never kills or corrupts a node: it gets a clear error or is dropped and counted."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from conftest import Grid, NodeProc, wait_until


@pytest.fixture
def pair(grid: Grid) -> tuple[NodeProc, NodeProc]:
    n1, n2 = grid.line(("n1", 10, 2), ("n2", 3, 0))
    grid.wait_island([n1, n2])
    return n1, n2


@pytest.fixture
def raw(pair: tuple[NodeProc, NodeProc]) -> Iterator[zmq.Socket[bytes]]:
    """A plain DEALER connected to n1's ROUTER: sends whatever bytes a test wants."""
    ctx = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pair[0].endpoint)
    yield sock
    sock.close()
    ctx.term()


def _exchange(sock: zmq.Socket[bytes], frame: bytes, timeout_ms: int = 2000) -> Any:
    sock.send(frame)
    if not sock.poll(timeout_ms):
        return None
    return msgpack.unpackb(sock.recv())


def _state(node: NodeProc) -> tuple[Any, ...]:
    s = node.status()
    return (s["production"], s["consumption"], s["incarnation"], s["seq"], s["total_net"],
            s["island"], [(x["id"], x["state"]) for x in s["siblings"]])


CONTROL_GARBAGE = {
    "garbage bytes": b"\xc1\xff\x00garbage",
    "truncated msgpack": msgpack.packb({"v": 1, "t": "status", "rid": 1})[:-3],
    "a list, not a map": msgpack.packb([1, 2, 3]),
    "a bare integer": msgpack.packb(42),
    "no version": msgpack.packb({"t": "status"}),
    "unknown version": msgpack.packb({"v": 99, "t": "status"}),
    "unknown type": msgpack.packb({"v": 1, "t": "launch_missiles"}),
    "NaN production": msgpack.packb({"v": 1, "t": "set", "production": math.nan}),
    "infinite consumption": msgpack.packb({"v": 1, "t": "set", "consumption": math.inf}),
    "negative production": msgpack.packb({"v": 1, "t": "set", "production": -1.0}),
    "string production": msgpack.packb({"v": 1, "t": "set", "production": "10"}),
    "boolean production": msgpack.packb({"v": 1, "t": "set", "production": True}),
    "empty set": msgpack.packb({"v": 1, "t": "set"}),
    "link to nonsense": msgpack.packb({"v": 1, "t": "link", "endpoint": "http://x"}),
    "unlink without a sibling": msgpack.packb({"v": 1, "t": "unlink"}),
    "extension type": msgpack.packb(msgpack.ExtType(5, b"boom")),
    "deep nesting": b"\x91" * 100_000 + b"\xc0",
    "a huge map header": b"\xdf\xff\xff\xff\xff",
}


# Each row of the error table in docs/protocol.md, as a request a live node must answer with
# that code, echoing the request's rid (frames that are not a decodable map have no rid).
ERROR_TABLE = {
    "bad_frame": (msgpack.packb([1, 2, 3]), False),
    "unsupported_version": (msgpack.packb({"v": 99, "t": "status", "rid": 7}), True),
    "unknown_type": (msgpack.packb({"v": 1, "t": "launch", "rid": 7}), True),
    "bad_field": (msgpack.packb({"v": 1, "t": "set", "production": "10", "rid": 7}), True),
    "bad_value": (msgpack.packb({"v": 1, "t": "set", "production": -3, "rid": 7}), True),
    "unknown_sibling": (msgpack.packb({"v": 1, "t": "unlink", "sibling": "n9", "rid": 7}),
                        True),
}


@pytest.mark.parametrize("code", ERROR_TABLE, ids=ERROR_TABLE)
def test_each_error_code_of_the_protocol_doc_is_what_a_live_node_answers(
        pair: tuple[NodeProc, NodeProc], raw: zmq.Socket[bytes], code: str) -> None:
    frame, has_rid = ERROR_TABLE[code]
    reply = _exchange(raw, frame)
    assert reply is not None and reply["ok"] is False
    assert reply["error"]["code"] == code, reply
    assert reply.get("rid") == (7 if has_rid else None), "the reply echoes the request's rid"
    assert "None" not in reply["error"]["message"], "no Python in what a client reads"


def test_a_bad_value_error_speaks_the_users_language(
        pair: tuple[NodeProc, NodeProc], raw: zmq.Socket[bytes]) -> None:
    reply = _exchange(raw, msgpack.packb({"v": 1, "t": "set", "production": -3, "rid": 1}))
    assert reply["error"]["message"] == (
        "production must be a finite number of kW in 0..1e+09, got -3")
    reply = _exchange(raw, msgpack.packb({"t": "status", "rid": 2}))
    assert "no field 'v'" in reply["error"]["message"]


@pytest.mark.parametrize("frame", CONTROL_GARBAGE.values(), ids=CONTROL_GARBAGE.keys())
def test_a_bad_control_frame_gets_a_clear_error_and_changes_nothing(
        pair: tuple[NodeProc, NodeProc], raw: zmq.Socket[bytes], frame: bytes) -> None:
    n1, _ = pair
    before = _state(n1)
    reply = _exchange(raw, frame)
    assert reply is not None, "the node did not answer"
    assert reply["ok"] is False
    assert reply["error"]["code"] and len(reply["error"]["message"]) > 10
    assert _state(n1) == before


def test_a_ten_megabyte_frame_is_refused_and_the_node_keeps_serving(
        pair: tuple[NodeProc, NodeProc], raw: zmq.Socket[bytes]) -> None:
    n1, n2 = pair
    before = _state(n1)
    raw.send(msgpack.packb({"v": 1, "t": "set", "production": 1.0, "pad": "x" * 10_000_000}))
    # ZMQ_MAXMSGSIZE makes the node drop the connection: there is nothing to answer.
    assert not raw.poll(500)
    assert _state(n1) == before
    n2.ctl("set", "--production", "4", check=True)
    wait_until(lambda: n1.status()["total_net"] == 12.0, what="n1 to keep working")


def _peer_frame(**fields: Any) -> bytes:
    return msgpack.packb({"v": 1, "from": "n2", "n": 1, **fields})


PEER_GARBAGE = {
    "advert with NaN": _peer_frame(t="adverts", adverts=[
        ["evil", 1, 1, math.nan, 0.0, [], "tcp://127.0.0.1:1", 1]]),
    "advert with negative power": _peer_frame(t="adverts", adverts=[
        ["evil", 1, 1, -5.0, 0.0, [], "tcp://127.0.0.1:1", 1]]),
    "advert of the wrong shape": _peer_frame(t="adverts", adverts=[["evil", 1]]),
    "too many adverts": _peer_frame(t="adverts", adverts=[["e", 1, 1, 1.0, 0.0, [],
                                                            "tcp://127.0.0.1:1", 1]] * 201),
    "ping without hash": _peer_frame(t="ping"),
    "hello with a bad endpoint": _peer_frame(t="hello", endpoint="nowhere", ack=False,
                                             digest={}),
    "digest with a bad version": _peer_frame(t="digest", entries={"n2": "new"}, reply=True),
    "bad sender id": _peer_frame(t="ping", hash=1, **{"from": "no spaces allowed"}),
}


@pytest.mark.parametrize("frame", PEER_GARBAGE.values(), ids=PEER_GARBAGE.keys())
def test_a_bad_sibling_frame_is_dropped_and_counted(
        pair: tuple[NodeProc, NodeProc], raw: zmq.Socket[bytes], frame: bytes) -> None:
    n1, _ = pair
    before, bad_before = _state(n1), n1.status()["counters"]["bad_frames"]
    raw.send(frame)
    wait_until(lambda: n1.status()["counters"]["bad_frames"] == bad_before + 1,
               what="the bad frame to be counted")
    assert not raw.poll(100), "a sibling's bad frame must not be answered"
    assert _state(n1) == before
    assert n1.status()["known_nodes"] == 2  # "evil" was never learned


def test_adverts_from_a_node_that_is_not_a_sibling_are_ignored(
        pair: tuple[NodeProc, NodeProc], raw: zmq.Socket[bytes]) -> None:
    n1, _ = pair
    ignored = n1.status()["counters"]["ignored"]
    raw.send(msgpack.packb({"v": 1, "t": "adverts", "from": "stranger", "n": 5, "adverts": [
        ["stranger", 1, 1, 1000.0, 0.0, ["n1"], "tcp://127.0.0.1:1", 5]]}))
    wait_until(lambda: n1.status()["counters"]["ignored"] == ignored + 1,
               what="the stranger's adverts to be ignored")
    assert n1.status()["known_nodes"] == 2
    assert n1.status()["total_net"] == 11.0
