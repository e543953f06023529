"""Unit tests of the sans-IO core: no sockets, no clock, no threads.

Each test either hand-feeds typed messages to a `Core` or lets the simulator (zgrid/sim/) move
messages between a few cores under a virtual clock. Test names state the rule they check. These
tests must never open a socket or sleep.
"""

from __future__ import annotations

import itertools
import math

import pytest

from zgrid.core import (
    REFUSED_RETRY_S,
    STORAGE_FAILING,
    STORAGE_LOG_INTERVAL_S,
    STORAGE_RETRY_S,
    WATCH_LEASE_S,
    Config,
    Connect,
    Core,
    Disconnect,
    Effect,
    LinkState,
    Log,
    LogLevel,
    Persist,
    Publish,
    Respond,
    Send,
    SendOnce,
    Trust,
)
from zgrid.errors import ProtocolError
from zgrid.sim import Simulator, converged_sim
from zgrid.table import AdvertTable, Merge
from zgrid.wire import (
    MAX_LINKS_PER_ADVERT,
    Advert,
    Adverts,
    Bye,
    ByeReason,
    ControlRequest,
    Hello,
    LinkRequest,
    PeerMessage,
    Ping,
    Reply,
    SetRequest,
    StatusRequest,
    UnlinkRequest,
    WatchRequest,
)

CLIENT = (b"test",)  # a control client's routing envelope
PEER = (b"peer",)  # the envelope of a sibling's DEALER


def deliver(c: Core, msg: PeerMessage, now: float) -> list[Effect]:
    """A message from another node, through the core's one inbound entry."""
    return c.handle(PEER, msg, now)


def ask(c: Core, req: ControlRequest, now: float) -> list[Effect]:
    """A control request, through the same entry."""
    return c.handle(CLIENT, req, now)


def core(node_id: str = "a", nonce: int = 1, **options: object) -> Core:
    return Core(Config(node_id, f"tcp://{node_id}:7000", nonce, **options))  # type: ignore[arg-type]


def advert(origin: str, incarnation: int, seq: int, production: float = 0.0,
           consumption: float = 0.0, links: tuple[str, ...] = (), nonce: int = 99) -> Advert:
    return Advert(origin, incarnation, seq, production, consumption, links,
                  f"tcp://{origin}:7000", nonce)


def pair() -> tuple[Simulator, Core, Core]:
    """n0 - n1, linked and agreed."""
    sim = converged_sim([(0, 1)], [(1.0, 0.5), (2.0, 0.25)])
    a, b = sim.cores
    assert a is not None and b is not None
    return sim, a, b


def from_sibling(sender: Core, *adverts: Advert) -> Adverts:
    return Adverts(sender.id, sender.config.nonce, adverts)


def hello_sent(effects: list[Effect], endpoint: str) -> Hello:
    """The HELLO request the core sent to `endpoint` among `effects` (an ack must echo its
    token: only a node receiving there has seen it)."""
    (hello,) = [e.message for e in effects if isinstance(e, Send) and e.endpoint == endpoint
                and isinstance(e.message, Hello) and not e.message.ack]
    return hello


def ack_of(request: Hello, sender: str, nonce: int, endpoint: str) -> Hello:
    """What the node at `request.dialed` answers: the dialed endpoint and token echoed, and its
    digest (which always lists itself)."""
    return Hello(sender, nonce, endpoint, ack=True, digest={sender: (1, 1)},
                 dialed=request.dialed, token=request.token)


# ------------------------------------------------------------------------ merge rules


def test_newer_version_replaces_older_and_older_or_equal_is_ignored() -> None:
    _sim, a, b = pair()
    now = 5.0
    deliver(a, from_sibling(b, advert("x", 1, 5, production=5.0)), now)
    assert a.table.by_origin["x"].seq == 5
    deliver(a, from_sibling(b, advert("x", 1, 3, production=3.0)), now)
    assert a.table.by_origin["x"].production == 5.0, "an older seq must not replace a newer one"
    deliver(a, from_sibling(b, advert("x", 1, 5, production=7.0)), now)
    assert a.table.by_origin["x"].production == 5.0, "an equal version must not replace it"
    deliver(a, from_sibling(b, advert("x", 2, 1, production=9.0)), now)
    assert a.table.by_origin["x"].version == (2, 1), "a higher incarnation wins over any seq"


def test_any_arrival_order_of_adverts_converges_to_the_same_table() -> None:
    versions = [advert("x", 1, 1, 1.0), advert("x", 1, 4, 4.0), advert("x", 2, 1, 8.0),
                advert("y", 1, 2, 2.0), advert("y", 1, 1, 1.5)]
    tables = set()
    for order in itertools.permutations(versions):
        _sim, a, b = pair()
        for item in order:
            deliver(a, from_sibling(b, item), 5.0)
        tables.add(tuple(sorted((k, v.version, v.production) for k, v in a.table.by_origin.items()
                                if k in ("x", "y"))))
    assert tables == {(("x", (2, 1), 8.0), ("y", (1, 2), 2.0))}


def test_adverts_from_a_node_that_is_not_a_sibling_are_ignored() -> None:
    _sim, a, _b = pair()
    deliver(a, Adverts("stranger", 5, (advert("x", 1, 1),)), 5.0)
    assert "x" not in a.table
    assert a.counters["ignored"] >= 1


# ------------------------------------------------------------------------ two-way check, islands


def test_a_link_listed_by_one_side_only_is_not_an_edge() -> None:
    sim, a, b = pair()
    now = sim.now
    # n2 claims a link to n1, but n1's advert does not list n2: n2 is not reachable.
    deliver(a, from_sibling(b, advert("n2", 1, 1, production=100.0, links=("n1",))), now)
    assert a.totals(now)[0] == math.fsum([1.0, -0.5, 2.0, -0.25])
    assert not next(n for n in a.nodes(now) if n["id"] == "n2")["reachable"]
    # Once n1 lists n2 too, the edge exists and n2's net is counted.
    own_b = b.table.by_origin["n1"]
    both = advert("n1", own_b.incarnation, own_b.seq + 1, 2.0, 0.25, ("n0", "n2"),
                  nonce=b.config.nonce)
    deliver(a, from_sibling(b, both), now)
    assert a.totals(now)[0] == math.fsum([1.0, -0.5, 2.0, -0.25, 100.0])


def test_unlink_splits_grid_into_two_islands_and_relink_merges_them() -> None:
    values = [(1.5, 0.0), (0.0, 0.7), (2.25, 1.0), (0.0, 3.0)]
    sim = converged_sim([(0, 1), (1, 2), (2, 3)], values)
    reply = sim.unlink(1, 2)
    assert reply is not None and reply.ok
    sim.run_until(sim.now + 0.01)
    left = math.fsum([1.5, -0.0, 0.0, -0.7])
    right = math.fsum([2.25, -1.0, 0.0, -3.0])
    for i, expected in ((0, left), (1, left), (2, right), (3, right)):
        c = sim.cores[i]
        assert c is not None
        assert c.totals(sim.now)[0] == expected
        assert c.watch_view(sim.now)["island_size"] == 2
    assert sim.check_agreement(strict=True).agreed
    sim.link(2, 1)
    sim.run_until(sim.now + 0.01)
    c0 = sim.cores[0]
    assert c0 is not None and c0.watch_view(sim.now)["island_size"] == 4
    assert sim.check_agreement(strict=True).agreed


def test_a_node_without_links_is_an_island_of_one() -> None:
    c = core()
    ask(c, SetRequest(3.5, 1.25), 0.0)
    assert c.totals(0.0) == (2.25, 3.5, 1.25)
    assert c.watch_view(0.0)["island"] == ["a"]


# ------------------------------------------------------------------------ exact totals


def test_totals_are_bit_identical_on_every_node_and_equal_fsum() -> None:
    # Chosen so that naive left-to-right float addition depends on the order.
    values = [(1e9, 0.0), (1e-8, 0.0), (0.0, 1e9), (0.1, 0.0), (0.2, 0.0), (0.0, 0.3),
              (1e-300, 0.0), (3.0, 0.0)]
    terms = [x for p, c in values for x in (p, -c)]
    assert sum(terms) != math.fsum(terms), "these values must defeat naive summation"
    edges = [(i, i + 1) for i in range(len(values) - 1)] + [(0, 7), (2, 5)]
    sim = converged_sim(edges, values)
    totals = {c.totals(sim.now)[0].hex() for c in sim.cores if c is not None}
    assert totals == {math.fsum(terms).hex()}


def test_changing_values_keeps_totals_exact_without_recomputing_the_island() -> None:
    values = [(0.1, 0.0)] * 5
    sim = converged_sim([(0, 1), (1, 2), (2, 3), (3, 4)], values)
    for k, v in enumerate([0.7, 1e-17, 5e15, 0.3]):
        sim.set_value(k % 5, v, 0.1)
        sim.run_until(sim.now + 0.01)
    expected = math.fsum(x for c in sim.cores if c is not None
                         for x in (c.production, -c.consumption))
    assert {c.totals(sim.now)[0] for c in sim.cores if c is not None} == {expected}


# ------------------------------------------------------------------------ identity


def test_restarted_node_with_wiped_data_bumps_above_its_past_life() -> None:
    sim = converged_sim([(0, 1), (1, 2)], [(1.0, 0.0)] * 3)
    for k in range(5):  # give n0's past life a high seq
        sim.set_value(0, float(k), 0.0)
    sim.run_until(sim.now + 0.01)
    n1 = sim.cores[1]
    assert n1 is not None
    past = n1.table.by_origin["n0"].version
    sim.crash(0)
    sim.run_until(sim.now + 2.0)
    sim.restart(0, wiped=True)
    agreement = sim.run_until_agreed(10.0)
    assert agreement.agreed, agreement.problems
    n0 = sim.cores[0]
    assert n0 is not None
    assert n0.table.by_origin["n0"].version > past
    assert n1.table.by_origin["n0"].version == n0.table.by_origin["n0"].version
    assert not n0.conflict


def test_duplicate_id_is_reported_and_never_bump_wars() -> None:
    _sim, a, b = pair()
    versions = []
    duplicate_nonce = 424242
    for _ in range(20):
        mine = a.table.by_origin["n0"]
        # The duplicate always outbids whatever we just published.
        deliver(a, from_sibling(b, advert("n0", mine.incarnation, mine.seq + 1,
                                         nonce=duplicate_nonce)), 5.0)
        versions.append(a.table.by_origin["n0"].version)
    assert len(set(versions)) <= 2, f"bump war: {versions}"
    assert "another live node uses the id n0" in a.conflict


def test_hello_from_an_id_alive_elsewhere_in_the_island_is_refused() -> None:
    _sim, a, b = pair()
    impostor = Hello("n1", nonce=777, endpoint="tcp://elsewhere:9", ack=False,
                     dialed="tcp://n0:7000")
    effects = deliver(a, impostor, 5.0)
    refusals = [e for e in effects if isinstance(e, SendOnce)]
    assert len(refusals) == 1
    bye = refusals[0].message
    assert isinstance(bye, Bye) and bye.reason is ByeReason.DUPLICATE_ID
    sib = a.sibling("n1")
    assert sib is not None and sib.nonce == b.config.nonce


# ------------------------------------------------------------------------ batching


def test_several_sets_in_one_instant_leave_as_one_adverts_message_per_sibling() -> None:
    sim = converged_sim([(0, 1), (0, 2)], [(0.0, 0.0)] * 3)
    hub = sim.cores[0]
    assert hub is not None
    now = sim.now
    hub.flush(now)  # nothing pending
    for v in (1.0, 2.0, 3.0):
        ask(hub, SetRequest(v, None), now)
    sends = [e for e in hub.flush(now) if isinstance(e, Send)]
    assert sorted(e.endpoint for e in sends) == ["tcp://n1:7000", "tcp://n2:7000"]
    for e in sends:
        assert isinstance(e.message, Adverts)
        assert [(x.origin, x.production, x.seq) for x in e.message.adverts] == [
            ("n0", 3.0, hub.seq)]
    assert hub.flush(now) == []


def test_a_flood_is_not_sent_back_to_the_sibling_it_came_from() -> None:
    sim = converged_sim([(0, 1), (1, 2)], [(0.0, 0.0)] * 3)
    middle, left = sim.cores[1], sim.cores[0]
    assert middle is not None and left is not None
    deliver(middle, from_sibling(left, advert("x", 1, 1)), sim.now)
    sends = [e for e in middle.flush(sim.now) if isinstance(e, Send)]
    assert [e.endpoint for e in sends] == ["tcp://n2:7000"]


# ------------------------------------------------------------------------ control


@pytest.mark.parametrize("request_", [
    SetRequest(-1.0, None), SetRequest(math.nan, None), SetRequest(None, math.inf),
    SetRequest(2e9, None), SetRequest(None, -0.5), SetRequest(True, None),  # type: ignore[arg-type]
])
def test_bad_values_are_refused_with_a_control_error_and_no_state_change(
        request_: SetRequest) -> None:
    c = core()
    ask(c, SetRequest(1.0, 2.0), 0.0)
    before = (c.production, c.consumption, c.seq, c.table.hash)
    effects = ask(c, request_, 1.0)
    assert len(effects) == 1 and isinstance(effects[0], Respond)
    reply = effects[0].reply
    assert not reply.ok and reply.code == "bad_value" and reply.message
    assert (c.production, c.consumption, c.seq, c.table.hash) == before


def test_a_valid_set_persists_before_it_replies() -> None:
    c = core()
    effects = ask(c, SetRequest(4.0, None, rid=7), 0.0)
    kinds = [type(e) for e in effects]
    assert kinds.index(Persist) < kinds.index(Respond)
    reply = effects[-1].reply  # type: ignore[union-attr]
    assert reply.ok and reply.rid == 7 and reply.body["net"] == 4.0


def test_link_to_itself_and_unlink_of_a_stranger_are_refused() -> None:
    c = core()
    self_link = ask(c, LinkRequest("tcp://a:7000"), 0.0)[-1].reply  # type: ignore[union-attr]
    assert not self_link.ok and self_link.code == "bad_value"
    stranger = ask(c, UnlinkRequest("zz"), 0.0)[-1].reply  # type: ignore[union-attr]
    assert not stranger.ok and stranger.code == "unknown_sibling"
    assert c.siblings == {}


def test_more_siblings_than_an_advert_can_list_are_refused() -> None:
    c = core()
    for k in range(MAX_LINKS_PER_ADVERT):
        assert ask(c, LinkRequest(f"tcp://p{k}:7000"), 0.0)[-1].reply.ok  # type: ignore[union-attr]
    reply = ask(c, LinkRequest("tcp://one-more:7000"), 0.0)[-1].reply  # type: ignore[union-attr]
    assert not reply.ok and reply.code == "too_many_siblings"


# ------------------------------------------------------------------------ liveness


def test_a_silent_sibling_goes_down_after_dead_after_and_leaves_the_island() -> None:
    sim = converged_sim([(0, 1), (1, 2)], [(1.0, 0.0), (2.0, 0.0), (4.0, 0.0)],
                        dead_after_s=1.0)
    middle = sim.cores[1]
    assert middle is not None
    sim.freeze(2)
    frozen_at = sim.now
    sim.run_until(frozen_at + 0.7)
    assert middle.status(sim.now)["siblings"][-1]["up"], "down before dead_after"
    sim.run_until(frozen_at + 1.3)
    row = next(s for s in middle.status(sim.now)["siblings"] if s["id"] == "n2")
    assert row["state"] == str(LinkState.DOWN)
    assert "n2" not in middle.table.by_origin["n1"].links
    assert middle.totals(sim.now)[0] == 3.0
    sim.thaw(2)
    assert sim.run_until_agreed(5.0).agreed


def test_anti_entropy_repairs_a_lost_message_via_ping_hash_mismatch() -> None:
    from zgrid.sim import LinkModel

    sim = converged_sim([(0, 1)], [(1.0, 0.0), (1.0, 0.0)], ping_interval_s=0.25)
    receiver = sim.cores[1]
    assert receiver is not None
    sim.set_link_model(0, 1, LinkModel(loss=0.999999))
    sim.set_value(0, 50.0, None)
    sim.run_until(sim.now + 0.001)
    sim.link_overrides.clear()
    assert receiver.table.by_origin["n0"].production == 1.0, "the update should have been lost"
    sim.run_until(sim.now + 1.5)
    assert receiver.table.by_origin["n0"].production == 50.0
    assert receiver.counters["digests_sent"] + sim.cores[0].counters["digests_sent"] > 0  # type: ignore[union-attr]


def test_a_forgotten_node_is_not_resurrected_by_a_stale_copy() -> None:
    sim = converged_sim([(0, 1), (1, 2)], [(1.0, 0.0)] * 3, forget_after_s=2.0)
    n0, n1 = sim.cores[0], sim.cores[1]
    assert n0 is not None and n1 is not None
    stale = n0.table.by_origin["n2"]
    sim.crash(2)
    # Its closed connections tell n1 at once; then forget_after and a forget check, which
    # leaves the tombstone for another forget_after.
    sim.run_until(sim.now + 3.0)
    assert "n2" not in n0.table and "n2" not in n1.table
    deliver(n0, from_sibling(n1, stale), sim.now)
    assert "n2" not in n0.table, "a stale copy brought a forgotten node back"
    assert n0.totals(sim.now)[0] == 2.0


def test_status_reports_siblings_and_known_nodes() -> None:
    sim, a, _b = pair()
    status = ask(a, StatusRequest(rid=1), sim.now)[-1].reply.body  # type: ignore[union-attr]
    assert status["known_nodes"] == 2
    assert [s["id"] for s in status["siblings"]] == ["n1"]
    assert status["total_net"] == math.fsum([1.0, -0.5, 2.0, -0.25])


# ------------------------------------------------------------------------ one inbound entry


def test_peer_messages_and_control_requests_arrive_through_the_same_entry() -> None:
    sim, a, b = pair()
    deliver(a, from_sibling(b, advert("x", 1, 1, production=3.0)), sim.now)
    assert a.table.by_origin["x"].production == 3.0
    (reply,) = [e for e in ask(a, StatusRequest(rid=4), sim.now) if isinstance(e, Respond)]
    assert reply.reply.ok and reply.reply.rid == 4 and reply.with_runtime_counters


def test_a_bad_frame_from_a_sibling_is_counted_and_one_from_a_client_is_answered() -> None:
    c = core()
    peer_error = ProtocolError("adverts message: field 'n' is missing", "bad_field", "adverts")
    assert c.handle(PEER, peer_error, 0.0)[0] == Log(
        LogLevel.WARNING, "dropped 1 bad frame(s) from peers; latest: " + peer_error.message)
    assert c.handle(PEER, peer_error, 1.0) == [], "logged at most once per interval"
    assert c.counters["bad_frames"] == 2
    client_error = ProtocolError("frame is not valid msgpack", "bad_frame")
    (answer,) = c.handle(CLIENT, client_error, 2.0)
    assert isinstance(answer, Respond) and answer.client == CLIENT
    assert not answer.reply.ok and answer.reply.code == "bad_frame"


def test_a_message_a_node_never_accepts_is_answered_with_an_error() -> None:
    (answer,) = core().handle(CLIENT, Reply(1, True), 0.0)
    assert isinstance(answer, Respond) and answer.reply.code == "unknown_type"


def test_a_revoked_member_is_served_nothing() -> None:
    c = Core(Config("a", "tcp://a:7000", 1), trust=Trust(frozenset({"a", "op"})))
    (allowed,) = c.handle(CLIENT, StatusRequest(), 0.0, authenticated_as="op")
    assert isinstance(allowed, Respond) and allowed.reply.ok
    c.membership_changed(Trust(frozenset({"a"})), 1.0)
    (refused,) = c.handle(CLIENT, StatusRequest(), 1.0, authenticated_as="op")
    assert isinstance(refused, Respond) and refused.reply.code == "revoked"
    assert "op is not a member" in refused.reply.message
    effects = c.handle(PEER, Ping("op", 5, 0), 2.0, authenticated_as="op")
    assert not any(isinstance(e, Respond) for e in effects)
    assert c.counters["bad_frames"] == 1, "a revoked sibling's frame is dropped, not answered"


# ------------------------------------------------------------------------ lifecycle


def test_stop_says_goodbye_to_up_siblings_and_disconnects_every_sibling() -> None:
    sim, a, _b = pair()
    ask(a, LinkRequest("tcp://never:7000"), sim.now)  # CONNECTING: no one to say goodbye to
    effects = a.stop(sim.now)
    byes = [e for e in effects if isinstance(e, Send)]
    assert [(e.endpoint, e.message) for e in byes] == [
        ("tcp://n1:7000", Bye("n0", a.config.nonce, ByeReason.STOPPING))]
    assert sorted(e.endpoint for e in effects if isinstance(e, Disconnect)) == [
        "tcp://n1:7000", "tcp://never:7000"]


def test_a_node_that_dialled_itself_forgets_that_sibling() -> None:
    c = core()
    ask(c, LinkRequest("tcp://alias-of-a:7000"), 0.0)
    hello = Hello("a", c.config.nonce, "tcp://a:7000", ack=False, dialed="tcp://alias-of-a:7000")
    effects = deliver(c, hello, 0.1)
    assert c.siblings == {}
    assert Disconnect("tcp://alias-of-a:7000") in effects
    assert any(isinstance(e, Persist) and e.state.siblings == () for e in effects)


def test_a_sibling_that_is_not_the_expected_node_is_refused_and_not_linked() -> None:
    c = core()
    request = hello_sent(ask(c, LinkRequest("n9@tcp://x:7000"), 0.0), "tcp://x:7000")
    deliver(c, ack_of(request, "n8", 5, "tcp://x:7000"), 0.5)
    sib = c.sibling("tcp://x:7000")
    assert sib is not None and sib.state is LinkState.REFUSED
    assert sib.error == "expected node n9 at tcp://x:7000, found n8"
    assert c.own_advert.links == ()
    assert sib.next_hello == 0.5 + REFUSED_RETRY_S


def test_a_refusal_goodbye_marks_the_link_refused_and_drops_it_from_our_links() -> None:
    sim, a, b = pair()
    deliver(a, Bye("n1", b.config.nonce, ByeReason.REFUSED, detail="not a member"), sim.now)
    sib = a.sibling("n1")
    assert sib is not None and sib.state is LinkState.REFUSED and sib.error == "not a member"
    assert a.own_advert.links == ()
    assert not a.conflict, "a plain refusal is not an id conflict"


def test_a_duplicate_id_goodbye_reports_a_conflict() -> None:
    sim, a, b = pair()
    deliver(a, Bye("n1", b.config.nonce, ByeReason.DUPLICATE_ID, detail="n0 is alive"),
            sim.now)
    assert a.conflict == "n1 refused us: n0 is alive"
    retry = hello_sent(a.timer(sim.now + 6.0), "tcp://n1:7000")  # a refused link is retried
    deliver(a, ack_of(retry, "n1", b.config.nonce, "tcp://n1:7000"), sim.now + 6.0)
    assert not a.conflict, "an accepted link later clears the conflict"


def test_a_goodbye_from_a_past_life_or_a_stranger_changes_nothing() -> None:
    sim, a, b = pair()
    ignored = a.counters["ignored"]
    assert deliver(a, Bye("n1", b.config.nonce + 1, ByeReason.UNLINKED), sim.now) == []
    assert deliver(a, Bye("zz", 3, ByeReason.STOPPING), sim.now) == []
    assert a.counters["ignored"] == ignored + 2
    sib = a.sibling("n1")
    assert sib is not None and sib.state is LinkState.UP


def test_a_revoked_sibling_is_dropped_and_dialled_again_once_its_key_is_back() -> None:
    sim, a, _b = pair()
    a.membership_changed(Trust(frozenset({"n0", "n1"})), sim.now)
    effects = a.membership_changed(Trust(frozenset({"n0"})), sim.now)
    sib = a.sibling("n1")
    assert sib is not None and sib.state is LinkState.REFUSED and "revoked" in sib.error
    assert Disconnect("tcp://n1:7000") in effects
    assert a.own_advert.links == ()
    assert not any(isinstance(e, Send) for e in a.timer(sim.now + 60.0)), "never re-dialled"
    effects = a.membership_changed(Trust(frozenset({"n0", "n1"})), sim.now + 61.0)
    assert sib.state is LinkState.DOWN and sib.error == ""
    assert Connect("tcp://n1:7000", "n1") in effects
    assert any(isinstance(e, Send) and isinstance(e.message, Hello)
               for e in a.timer(sim.now + 61.0))


def test_a_watcher_that_stops_renewing_is_dropped_when_its_lease_ends() -> None:
    c = core()
    watcher = (b"watcher",)
    c.handle(watcher, WatchRequest(rid=1), 0.0)
    ask(c, SetRequest(1.0, None), 0.1)
    (published,) = [e for e in c.flush(0.1) if isinstance(e, Publish)]
    assert published.watchers == (watcher,)
    c.timer(WATCH_LEASE_S + 0.01)
    ask(c, SetRequest(2.0, None), WATCH_LEASE_S + 0.02)
    (published,) = [e for e in c.flush(WATCH_LEASE_S + 0.02) if isinstance(e, Publish)]
    assert published.watchers == ()


def test_a_tombstone_expires_so_a_forgotten_origin_may_come_back_later() -> None:
    table = AdvertTable("a", max_nodes=10)
    table.put(advert("a", 1, 1))
    table.merge(advert("gone", 1, 3))
    assert table.forget(0.0, forget_after_s=10.0) == [], "unreachable, but only just"
    assert table.forget(10.0, forget_after_s=10.0) == ["gone"]
    assert table.merge(advert("gone", 1, 3)) is Merge.FORGOTTEN
    assert table.tombstone("gone") == (1, 3)
    table.forget(20.0, forget_after_s=10.0)
    assert table.tombstone("gone") is None, "a tombstone lasts forget_after, not forever"
    assert table.merge(advert("gone", 1, 3)) is Merge.NEW


def test_a_newer_version_of_a_forgotten_origin_is_not_a_stale_copy() -> None:
    table = AdvertTable("a", max_nodes=10)
    table.put(advert("a", 1, 1))
    table.merge(advert("gone", 1, 3))
    table.forget(0.0, forget_after_s=10.0)
    assert table.forget(10.0, forget_after_s=10.0) == ["gone"]
    assert table.merge(advert("gone", 2, 1)) is Merge.NEW


def test_a_forgotten_node_stays_forgotten_while_pings_and_digests_flow() -> None:
    sim = converged_sim([(0, 1), (1, 2)], [(1.0, 0.0)] * 3, forget_after_s=2.0)
    sim.crash(2)
    sim.run_until(sim.now + 5.0)
    for i in (0, 1):
        c = sim.cores[i]
        assert c is not None and "n2" not in c.table
    sim.run_until(sim.now + 30.0)  # 120 ping rounds, and a digest on every hash mismatch
    for i in (0, 1):
        c = sim.cores[i]
        assert c is not None and "n2" not in c.table and len(c.table) == 2


# ------------------------------------------------------------------------ durability


def test_a_change_may_be_flooded_before_it_is_durable_but_a_new_incarnation_may_not() -> None:
    c = core()
    (persist, *_rest) = c.start(0.0)
    assert isinstance(persist, Persist) and persist.new_incarnation
    effects = ask(c, SetRequest(4.0, None), 0.1)
    (change,) = [e for e in effects if isinstance(e, Persist)]
    assert not change.new_incarnation, "a value change may leave before its fsync"
    kinds = [type(e) for e in effects]
    assert kinds.index(Persist) < kinds.index(Respond), "but its reply waits for it"


def test_outbidding_a_past_life_persists_the_new_incarnation_before_anything_is_sent() -> None:
    _sim, a, b = pair()
    past = advert("n0", a.incarnation + 3, 1, nonce=a.config.nonce + 1)
    (persist,) = deliver(a, from_sibling(b, past), 5.0)
    assert isinstance(persist, Persist) and persist.new_incarnation
    assert persist.state.incarnation == a.incarnation == past.incarnation + 1


def test_an_advert_heard_from_two_siblings_in_one_turn_goes_back_to_neither() -> None:
    sim = converged_sim([(0, 1), (0, 2), (0, 3)], [(0.0, 0.0)] * 4)
    hub, left, right = sim.cores[0], sim.cores[1], sim.cores[2]
    assert hub is not None and left is not None and right is not None
    news = advert("x", 1, 1, production=5.0)
    deliver(hub, from_sibling(left, news), sim.now)
    deliver(hub, from_sibling(right, news), sim.now)  # the same version, by another path
    sends = [e for e in hub.flush(sim.now) if isinstance(e, Send)]
    assert [e.endpoint for e in sends] == ["tcp://n3:7000"]


def test_an_origin_that_was_back_in_the_island_gets_a_full_forget_after_again() -> None:
    table = AdvertTable("a", max_nodes=10)
    table.put(advert("a", 1, 1))
    table.merge(advert("b", 1, 1))
    table.forget(0.0, forget_after_s=10.0)  # unreachable since 0
    table.put(advert("a", 1, 2, links=("b",)))
    table.merge(advert("b", 1, 2, links=("a",)))
    assert table.forget(5.0, forget_after_s=10.0) == [] and "b" in table.island(5.0)
    table.merge(advert("b", 1, 3))  # b drops the link again
    assert table.forget(12.0, forget_after_s=10.0) == [], "unreachable since 12, not since 0"
    assert table.forget(22.0, forget_after_s=10.0) == ["b"]


# ------------------------------------------------------------------------ failed saves

DISK_FULL = "disk full: cannot save the node state in /data/a (SQLite: database or disk is full)"


def own_adverts_sent(effects: list[Effect], origin: str) -> list[Advert]:
    return [ad for e in effects if isinstance(e, Send) and isinstance(e.message, Adverts)
            for ad in e.message.adverts if ad.origin == origin]


def test_a_set_that_cannot_be_saved_is_undone_and_a_newer_advert_restores_the_saved_values(
        ) -> None:
    _sim, a, b = pair()
    now = 5.0
    saved = (a.production, a.consumption)
    effects = ask(a, SetRequest(9.0, 3.0, rid=4), now)
    (persist,) = [e for e in effects if isinstance(e, Persist)]
    reply = effects[-1]
    assert isinstance(reply, Respond) and reply.acknowledges and reply.reply.ok
    (flooded,) = own_adverts_sent(a.flush(now), "n0")  # the runtime floods before the fsync
    assert flooded.production == 9.0

    logs = a.save_failed(persist.state, DISK_FULL, now)
    assert (a.production, a.consumption) == saved, "nothing changes in memory"
    assert [e.level for e in logs if isinstance(e, Log)] == [LogLevel.ERROR]
    (restoring,) = own_adverts_sent(a.flush(now), "n0")
    assert restoring.version > flooded.version, "the unsaved advert is superseded"
    assert (restoring.production, restoring.consumption) == saved
    deliver(b, from_sibling(a, flooded), now)
    deliver(b, from_sibling(a, restoring), now)
    assert b.table.by_origin["n0"].production == saved[0], "and on the wire"
    assert a.status(now)["storage"] == f"failing: {DISK_FULL}"
    refusal = a.refuse_unsaved(reply.reply)
    assert (refusal.ok, refusal.rid, refusal.code) == (False, 4, STORAGE_FAILING)
    assert DISK_FULL in refusal.message and "did not make this change" in refusal.message


def test_saves_are_retried_while_they_fail_and_changes_work_again_once_one_succeeds() -> None:
    c = core()
    c.save_succeeded(c.start(0.0)[0].state, 0.0)  # type: ignore[union-attr]
    (persist,) = [e for e in ask(c, SetRequest(4.0, None), 1.0) if isinstance(e, Persist)]
    c.save_failed(persist.state, DISK_FULL, 1.0)
    assert c.next_deadline() <= 1.0 + STORAGE_RETRY_S
    retries = [e for e in c.timer(1.0 + STORAGE_RETRY_S) if isinstance(e, Persist)]
    assert len(retries) == 1 and retries[0].state.production == 0.0, "the saved value, not 4"
    (recovered,) = c.save_succeeded(retries[0].state, 1.0 + STORAGE_RETRY_S)
    assert isinstance(recovered, Log) and recovered.level is LogLevel.INFO
    assert c.status(3.0)["storage"] == "ok"
    assert not [e for e in c.timer(20.0) if isinstance(e, Persist)], "no retries once it works"
    effects = ask(c, SetRequest(4.0, None), 21.0)
    assert effects[-1].reply.ok and c.production == 4.0  # type: ignore[union-attr]
    (persist,) = [e for e in effects if isinstance(e, Persist)]
    c.save_succeeded(persist.state, 21.0)
    c.save_failed(persist.state, DISK_FULL, 22.0)  # a later failure goes back to *that* save
    assert c.production == 4.0


def test_a_link_and_an_unlink_that_cannot_be_saved_are_undone_and_not_tried_while_saves_fail(
        ) -> None:
    _sim, a, b = pair()
    now = 5.0
    b_endpoint = b.config.endpoint
    effects = ask(a, UnlinkRequest("n1"), now)
    (persist,) = [e for e in effects if isinstance(e, Persist)]
    undo = a.save_failed(persist.state, DISK_FULL, now)
    assert Connect(b_endpoint, "n1") in undo, "an unsaved unlink is undone by linking again"
    assert b_endpoint in a.siblings and a.siblings[b_endpoint].expected_id == "n1"

    for request in (LinkRequest("tcp://c:7000"), UnlinkRequest("n1")):
        effects = ask(a, request, now)
        assert len(effects) == 1 and not effects[0].reply.ok  # type: ignore[union-attr]
        assert effects[0].reply.code == STORAGE_FAILING  # type: ignore[union-attr]
    assert set(a.siblings) == {b_endpoint}

    a.save_succeeded(a.persisted_state(), now + 1)
    effects = ask(a, LinkRequest("tcp://c:7000"), now + 1)
    assert effects[-1].reply.ok  # type: ignore[union-attr]
    (persist,) = [e for e in effects if isinstance(e, Persist)]
    undo = a.save_failed(persist.state, DISK_FULL, now + 1)
    assert Disconnect("tcp://c:7000") in undo and "tcp://c:7000" not in a.siblings


def test_only_replies_to_changes_acknowledge_a_persist() -> None:
    c = core()
    assert ask(c, SetRequest(1.0, None), 0.0)[-1].acknowledges  # type: ignore[union-attr]
    assert ask(c, LinkRequest("tcp://b:7000"), 0.0)[-1].acknowledges  # type: ignore[union-attr]
    for request in (StatusRequest(), LinkRequest("tcp://b:7000"), SetRequest(-1.0, None)):
        assert not ask(c, request, 0.0)[-1].acknowledges  # type: ignore[union-attr]


def test_failing_saves_are_logged_at_most_once_per_interval_unless_the_reason_changes() -> None:
    c = core()
    state = c.persisted_state()

    def logged(why: str, now: float) -> list[str]:
        return [e.text for e in c.save_failed(state, why, now) if isinstance(e, Log)]

    assert len(logged(DISK_FULL, 0.0)) == 1
    assert logged(DISK_FULL, 1.0) == [] and logged(DISK_FULL, 2.0) == []
    (again,) = logged(DISK_FULL, STORAGE_LOG_INTERVAL_S)
    assert "3 failed save(s)" in again  # the two it kept quiet about, and this one
    assert len(logged("I/O error: the disk says no", STORAGE_LOG_INTERVAL_S + 1)) == 1
