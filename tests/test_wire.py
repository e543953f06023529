"""The wire format: round trips, validation, and fuzzing the decoder and a live node."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zgrid.errors import ProtocolError
from zgrid.wire import (
    MAX_IPC_PATH_BYTES,
    Advert,
    Adverts,
    Bye,
    ByeReason,
    DigestMsg,
    Hello,
    LinkRequest,
    Message,
    NodesRequest,
    Ping,
    Reply,
    SetRequest,
    StatusRequest,
    UnlinkRequest,
    ViewUpdate,
    WatchRequest,
    check_endpoint,
    decode,
    encode,
)

from conftest import Grid, NodeProc

ADVERT = Advert("n1", 3, 17, 12.5, 0.25, ("n2", "n3"), "tcp://127.0.0.1:5001", 2**64 - 1)

EVERY_MESSAGE: list[Message] = [
    Hello("n1", 7, "tcp://127.0.0.1:5001", False, {"n1": (3, 17)}, "tcp://localhost:5002"),
    Hello("n2", 8, "tcp://[::1]:5002", True),
    Hello("n3", 9, "tcp://127.0.0.1:5003", False, {}, "tcp://127.0.0.1:5001", 2**64 - 1, True),
    Adverts("n1", 7, (ADVERT, ADVERT)),
    DigestMsg("n1", 7, {"n1": (3, 17), "n9": (1, 0)}, True),
    Ping("n1", 7, 2**63 + 5),
    Bye("n1", 7, ByeReason.DUPLICATE_ID, "tcp://127.0.0.1:5003", "duplicate node id 'n3'"),
    StatusRequest(1), SetRequest(1.5, None, 2), SetRequest(None, 0.0), LinkRequest(
        "n2@tcp://127.0.0.1:5002", 3), UnlinkRequest("n2"), NodesRequest(), WatchRequest(9),
    Reply(4, True, {"total_net": 1.25}), Reply(5, False, code="bad_value", message="no"),
    ViewUpdate({"id": "n1", "total_net": -3.0}, 1795537481.25),
]


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_every_message_survives_an_encode_decode_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg


def test_a_signed_advert_travels_with_its_signature_as_a_ninth_element() -> None:
    signed = replace(ADVERT, signature=bytes(range(64)))
    assert decode(encode(Adverts("n1", 7, (signed,)))).adverts == (signed,)
    row = msgpack.unpackb(encode(Adverts("n1", 7, (signed,))))["adverts"][0]
    assert len(row) == 9 and row[8] == signed.signature


def _adverts_frame_with_signature(signature: Any) -> bytes:
    row = [*msgpack.unpackb(encode(Adverts("n1", 7, (ADVERT,))))["adverts"][0], signature]
    frame: bytes = msgpack.packb({"v": 1, "t": "adverts", "from": "n1", "n": 7,
                                  "adverts": [row]})
    return frame


@pytest.mark.parametrize("signature", [bytes(63), bytes(65), "not bytes", 7])
def test_a_signature_must_be_64_bytes_of_binary(signature: Any) -> None:
    with pytest.raises(ProtocolError, match=r"signature must be binary|not valid msgpack"):
        decode(_adverts_frame_with_signature(signature))


def test_an_empty_signature_is_no_signature() -> None:
    assert decode(_adverts_frame_with_signature(b"")).adverts == (ADVERT,)


def test_what_is_signed_is_every_field_but_the_signature_in_a_fixed_encoding() -> None:
    data = ADVERT.signed_bytes()
    assert data.startswith(b"zgrid-advert-v1\x00")
    assert msgpack.unpackb(data[len(b"zgrid-advert-v1\x00"):]) == [
        "n1", 3, 17, 12.5, 0.25, ["n2", "n3"], "tcp://127.0.0.1:5001", 2**64 - 1]
    assert replace(ADVERT, production=12).signed_bytes() == replace(
        ADVERT, production=12.0).signed_bytes(), "power is always float64"
    assert replace(ADVERT, signature=b"x" * 64).signed_bytes() == data


def test_the_version_hash_is_the_documented_blake2b_and_never_travels() -> None:
    fresh = replace(ADVERT)
    frame = encode(Adverts("n1", 7, (fresh,)))
    assert fresh.version_hash() == int.from_bytes(
        hashlib.blake2b(b"n1\x003\x0017", digest_size=8).digest(), "little")
    assert encode(Adverts("n1", 7, (fresh,))) == frame, "the cached hash is not in the frame"
    assert fresh == ADVERT and hash(fresh) == hash(ADVERT)
    assert replace(fresh, seq=18).version_hash() != fresh.version_hash(), "a copy hashes anew"


def test_integer_power_is_accepted_and_becomes_a_float() -> None:
    msg = decode(msgpack.packb({"v": 1, "t": "set", "production": 20}))
    assert isinstance(msg, SetRequest) and msg.production == 20.0
    assert isinstance(msg.production, float)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.5, 1e10, True, "5", None])
def test_power_must_be_a_finite_non_negative_number(value: Any) -> None:
    row = ["n1", 1, 1, value, 0.0, [], "tcp://127.0.0.1:5001", 1]
    with pytest.raises(ProtocolError) as err:
        decode(msgpack.packb({"v": 1, "t": "adverts", "from": "n1", "n": 1, "adverts": [row]}))
    assert err.value.message_type == "adverts"  # a sibling's frame: dropped, not answered


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1", "tcp://127.0.0.1:0", "tcp://h:70000",
                                      "http://127.0.0.1:80", "", "tcp://a b:1"])
def test_malformed_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(ProtocolError):
        decode(msgpack.packb({"v": 1, "t": "link", "endpoint": endpoint}))


def test_an_ipc_path_longer_than_a_unix_socket_path_is_not_an_endpoint() -> None:
    longest = "ipc://" + "x" * MAX_IPC_PATH_BYTES
    assert check_endpoint(longest) == longest
    for too_long in ("ipc://" + "x" * (MAX_IPC_PATH_BYTES + 1), "ipc://" + "x" * 200,
                     "ipc://" + "é" * 54):  # 108 bytes in UTF-8: the limit is in bytes
        link = msgpack.packb({"v": 1, "t": "link", "endpoint": too_long})
        with pytest.raises(ProtocolError, match="ipc path longer") as refused:
            decode(link)
        assert refused.value.code == "bad_value"  # a control request: answered with this
        hello = msgpack.packb({"v": 1, "t": "hello", "from": "n2", "n": 1, "endpoint": too_long,
                               "ack": False, "digest": {}})
        with pytest.raises(ProtocolError) as dropped:
            decode(hello)
        assert dropped.value.message_type == "hello"  # a sibling's frame: dropped and counted


def test_a_hello_without_token_or_linking_asks_for_no_proof_and_no_new_link() -> None:
    frame = msgpack.packb({"v": 1, "t": "hello", "from": "n2", "n": 1, "ack": False,
                           "endpoint": "tcp://127.0.0.1:5002", "digest": {}})
    hello = decode(frame)
    assert isinstance(hello, Hello) and (hello.token, hello.linking) == (0, False)
    for bad in ({"token": -1}, {"token": "x"}, {"linking": 1}):
        with pytest.raises(ProtocolError, match=r"token|linking"):
            decode(msgpack.packb({**msgpack.unpackb(frame), **bad}))


def test_a_frame_over_the_size_limit_is_refused_before_decoding() -> None:
    with pytest.raises(ProtocolError) as err:
        decode(b"\x00" * (4 * 1024 * 1024 + 1))
    assert err.value.code == "too_large"


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=20,
)
field_names = st.sampled_from(["v", "t", "from", "n", "adverts", "production", "consumption",
                               "endpoint", "sibling", "rid", "hash", "ack", "digest", "reply",
                               "entries", "reason", "dialed", "token", "linking"])
message_types = st.sampled_from(["hello", "adverts", "digest", "ping", "bye", "status", "set",
                                 "link", "unlink", "nodes", "watch", "reply", "view", "x"])
# Maps that look like real messages, so the fuzzer gets past the first checks.
plausible_frames = st.builds(
    lambda t, fields: msgpack.packb({"v": 1, "t": t, **fields}),
    message_types, st.dictionaries(field_names, msgpack_values, max_size=6))
any_frame = st.binary(max_size=200) | plausible_frames | msgpack_values.map(msgpack.packb)


@given(any_frame)
@settings(max_examples=400, deadline=None)
def test_the_decoder_raises_nothing_but_protocol_error(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except ProtocolError:
        return
    assert decode(encode(msg)) == msg  # whatever it accepts is a well-formed message


@pytest.fixture(scope="module")
def live_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    grid = Grid(Path(tmp_path_factory.mktemp("fuzz")))
    try:
        yield grid.add("fuzzed", "--production", "7", "--consumption", "2")
    finally:
        grid.close()


@given(frames=st.lists(any_frame, min_size=1, max_size=10))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_live_node_survives_arbitrary_frames_unchanged(live_node: NodeProc,
                                                          frames: list[bytes]) -> None:
    before = live_node.status()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(live_node.endpoint)
        for frame in frames:
            sock.send(frame)
    finally:
        sock.close()
        ctx.term()
    after = live_node.status()
    # A lucky fuzz frame may be a valid `set` and change the values; put them back first.
    if (after["production"], after["consumption"]) != (7.0, 2.0):
        with live_node.client() as client:
            client.set(7.0, 2.0)
        after = live_node.status()
    assert live_node.alive
    keys = ("id", "production", "consumption", "island", "siblings", "total_net", "conflict")
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
