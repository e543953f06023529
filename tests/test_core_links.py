"""Links across a sibling's restart, in the sans-IO core (issue 12), and the ping `hash` as
docs/protocol.md defines it. These tests never open a socket or sleep.

- An edge counts only between live lives: a HELLO from a sibling's new life does not let the
  advert of its previous life (which still lists us) make a two-way edge.
- Answers go back over the sibling's own connection (`Route`) when our DEALER cannot take
  them; a HELLO request never does (its token must reach the endpoint dialed).
- A duplicate ack is life and nothing more; a duplicate request is answered again.
"""

from __future__ import annotations

import hashlib

import msgpack

from zgrid.core import (
    ON_OUR_DEALER,
    Config,
    Core,
    Effect,
    LinkState,
    Log,
    LogLevel,
    Respond,
    Route,
    Send,
)
from zgrid.sim import converged_sim
from zgrid.wire import Advert, Adverts, Hello, LinkRequest, Ping, StatusRequest, encode

CLIENT = (b"operator",)
B = "tcp://b:7000"
FIRST = (b"\x00b-first",)  # the routing envelopes of b's connections to a's ROUTER
SECOND = (b"\x00b-second",)


def core() -> Core:
    return Core(Config("a", "tcp://a:7000", 1))


def linked() -> Core:
    """a, with b (nonce 5) linked, UP, and b's advert (which lists a) held."""
    a = core()
    effects = a.handle(CLIENT, LinkRequest(f"b@{B}"), 0.0)
    (hello,) = [e.message for e in effects if isinstance(e, Send)]
    assert isinstance(hello, Hello)
    a.handle(FIRST, Hello("b", 5, B, True, {"b": (1, 1)}, hello.dialed, hello.token), 0.1)
    a.handle(FIRST, Adverts("b", 5, (advert(5, 1, 2),)), 0.1)
    assert links(a) == ("b",) and a.island(0.1) == {"a", "b"}
    a.flush(0.1)  # what the link queued has gone out
    return a


def advert(nonce: int, incarnation: int, seq: int, production: float = 1.0) -> Advert:
    return Advert("b", incarnation, seq, production, 0.0, ("a",), B, nonce)


def request(nonce: int, incarnation: int) -> Hello:
    return Hello("b", nonce, B, False, {"b": (incarnation, 1)}, "tcp://a:7000", 77)


def links(c: Core) -> tuple[str, ...]:
    return c.own_advert.links


def sends(effects: list[Effect]) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


def test_a_restarted_siblings_past_life_makes_no_edge_until_its_new_life_is_heard() -> None:
    a = linked()
    flaps = a.counters["link_flaps"]
    effects = a.handle(SECOND, request(6, 2), 1.0)
    sib = a.sibling("b")
    assert sib is not None and sib.up and sib.nonce == 6
    # Its previous life's advert (nonce 5) still lists a: it must not count.
    assert links(a) == () and a.island(1.0) == {"a"}
    assert a.counters["link_flaps"] == flaps
    # The answer goes back over the connection this HELLO came on, which comes first.
    route = effects.index(Route(B, SECOND))
    (ack,) = [i for i, e in enumerate(effects) if isinstance(e, Send)
              and isinstance(e.message, Hello) and e.message.ack]
    assert route < ack and not effects[ack].dealer_only  # type: ignore[union-attr]
    a.handle(ON_OUR_DEALER, Adverts("b", 6, (advert(6, 2, 2, production=4.0),)), 1.01)
    assert links(a) == ("b",)
    assert a.island(1.01) == {"a", "b"} and a.totals(1.01)[1] == 4.0


def test_a_new_lifes_advert_heard_through_another_sibling_first_also_counts() -> None:
    a = linked()
    a.handle(SECOND, request(6, 2), 1.0)
    assert links(a) == ()
    # The new life's advert may reach us flooded by another node before b sends its own.
    a.handle(FIRST, Adverts("b", 6, (advert(6, 2, 2),)), 1.0)
    assert links(a) == ("b",)


def test_hello_requests_never_take_a_route_and_answers_may() -> None:
    a = linked()
    sib = a.sibling("b")
    assert sib is not None
    a.timer(sib.last_heard + a.config.dead_after_s)  # silent: DOWN, and we knock again
    knocks = [s for s in sends(a.timer(100.0)) if isinstance(s.message, Hello)]
    assert knocks and all(s.dealer_only and not s.message.ack for s in knocks)  # type: ignore[union-attr]
    pings = [s for s in sends(linked().timer(1.0)) if isinstance(s.message, Ping)]
    assert pings and not any(s.dealer_only for s in pings)


def test_a_closed_connection_takes_an_up_link_down_at_once_and_is_no_flap() -> None:
    a = linked()
    effects = a.connection_lost(B, 1.0)
    sib = a.sibling("b")
    assert sib is not None and sib.state is LinkState.DOWN
    assert links(a) == () and a.island(1.0) == {"a"}
    assert (a.counters["connections_lost"], a.counters["link_flaps"]) == (1, 0)
    assert Log(LogLevel.WARNING, "b closed its connection; link down") in effects
    knocks = [s for s in sends(a.timer(1.5)) if isinstance(s.message, Hello)]
    assert knocks, "we knock again: it may be restarting"
    # Once DOWN, or for an endpoint that is no sibling, a closure changes nothing.
    assert a.connection_lost(B, 1.6) == [] and a.connection_lost("tcp://c:7000", 1.6) == []
    assert a.counters["connections_lost"] == 1


def test_a_duplicate_ack_is_life_only_and_a_duplicate_request_is_answered_again() -> None:
    a = linked()
    sib = a.sibling("b")
    assert sib is not None
    token = a._token(B)
    duplicate_ack = Hello("b", 5, B, True, {"b": (1, 2)}, B, token)
    assert a.handle(FIRST, duplicate_ack, 0.5) == [] and sib.last_heard == 0.5
    assert sib.outbox == {}
    again = sends(a.handle(FIRST, request(5, 1), 0.6))
    assert [s.message.ack for s in again if isinstance(s.message, Hello)] == [True]
    assert links(a) == ("b",)


def test_control_requests_on_a_sibling_connection_are_bad_frames_not_answered() -> None:
    a = core()
    effects = a.handle(ON_OUR_DEALER, StatusRequest(rid=3), 0.0)
    assert not [e for e in effects if isinstance(e, Respond)]
    assert a.counters["bad_frames"] == 1


def doc_hash(entries: list[tuple[str, int, int]]) -> int:
    """docs/protocol.md, "The ping hash", followed literally (not zgrid/table.py's code)."""
    value = 0
    for origin, incarnation, seq in entries:
        key = origin.encode("utf-8") + b"\x00" + str(incarnation).encode("ascii") + b"\x00" + \
            str(seq).encode("ascii")
        value ^= int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return value


def test_the_ping_hash_is_what_the_protocol_doc_says() -> None:
    sim = converged_sim([(0, 1), (1, 2), (2, 0)], [(5.0, 1.0), (0.0, 2.5), (1.0, 0.0)])
    sim.set_value(1, 7.25, None)
    sim.run_until(sim.now + 0.01)
    c = sim.cores[0]
    assert c is not None
    effects = c.timer(sim.now + c.config.ping_interval_s)
    pings = [s.message for s in sends(effects) if isinstance(s.message, Ping)]
    assert pings
    # What goes on the wire, read back as plain msgpack.
    wire_hash = msgpack.unpackb(encode(pings[0]))["hash"]
    held = [(a.origin, a.incarnation, a.seq) for a in c.table]  # every advert, its own too
    assert {a.origin for a in c.table} == {"n0", "n1", "n2"}
    assert wire_hash == doc_hash(held)
    # Without its own advert it would differ: the node's own advert is in it.
    assert wire_hash != doc_hash([e for e in held if e[0] != "n0"])
