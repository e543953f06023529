"""What one peer's frames may cost a node, in the sans-IO core (issue 8: one frame must never
take a node down). Each test is one hostile input found against a live node, fed to a `Core`
by hand or through the simulator; tests/test_hostile_peers.py runs the ones that involve the
runtime against real processes. These tests must never open a socket or sleep.
"""

from __future__ import annotations

from functools import reduce

from zgrid.core import (
    MAX_REFUSALS_PER_WINDOW,
    MAX_UNLINKED_REMEMBERED,
    MAX_UNPROVED_SIBLINGS,
    REFUSAL_WINDOW_S,
    UNPROVED_SIBLING_TTL_S,
    UNREACHABLE_SHARE_PER_SIBLING,
    Config,
    Connect,
    Core,
    Disconnect,
    Effect,
    LinkState,
    Log,
    Persist,
    Respond,
    Send,
    SendOnce,
)
from zgrid.sim import converged_sim
from zgrid.table import AdvertTable, Merge, entry_hash
from zgrid.wire import (
    Advert,
    Adverts,
    Bye,
    ByeReason,
    DigestMsg,
    Hello,
    LinkRequest,
    PeerMessage,
    Ping,
    UnlinkRequest,
)

CLIENT = (b"operator",)
PEER = (b"peer",)


def core(node_id: str = "a", nonce: int = 1, **options: object) -> Core:
    return Core(Config(node_id, f"tcp://{node_id}:7000", nonce, **options))  # type: ignore[arg-type]


def deliver(c: Core, msg: PeerMessage, now: float) -> list[Effect]:
    return c.handle(PEER, msg, now)


def reply_to(c: Core, request: LinkRequest | UnlinkRequest, now: float) -> Respond:
    (answer,) = [e for e in c.handle(CLIENT, request, now) if isinstance(e, Respond)]
    return answer


def advert(origin: str, seq: int = 1, links: tuple[str, ...] = (), nonce: int = 99) -> Advert:
    return Advert(origin, 1, seq, 1.0, 0.0, links, f"tcp://{origin}:7000", nonce)


def request(sender: str, nonce: int, endpoint: str, to: Core, **fields: object) -> Hello:
    """A link request from `sender` at `endpoint` to the node `to`."""
    return Hello(sender, nonce, endpoint, ack=False, dialed=to.config.endpoint,
                 **fields)  # type: ignore[arg-type]


def sent(effects: list[Effect], kind: type) -> list[PeerMessage]:
    return [e.message for e in effects if isinstance(e, Send | SendOnce)
            and isinstance(e.message, kind)]


def hello_sent(effects: list[Effect], endpoint: str) -> Hello:
    """The HELLO request the core sent to `endpoint`."""
    (hello,) = [e.message for e in effects if isinstance(e, Send) and e.endpoint == endpoint
                and isinstance(e.message, Hello) and not e.message.ack]
    return hello


def ack_of(req: Hello, sender: str, nonce: int, endpoint: str) -> Hello:
    """The answer of the node that received `req`: its dialed endpoint and token echoed, and
    its digest (which always lists itself)."""
    return Hello(sender, nonce, endpoint, ack=True, digest={sender: (1, 1)}, dialed=req.dialed,
                 token=req.token)


def link_from(c: Core, peer: str, nonce: int, now: float) -> None:
    """`peer` asks `c` for a link and proves its endpoint by answering c's own HELLO."""
    endpoint = f"tcp://{peer}:7000"
    effects = deliver(c, request(peer, nonce, endpoint, c, token=5), now)
    deliver(c, ack_of(hello_sent(effects, endpoint), peer, nonce, endpoint), now)
    sib = c.sibling(peer)
    assert sib is not None and sib.up


# ------------------------------------------------------------------------ 1: undialable endpoints


def test_a_link_to_an_ipc_path_too_long_for_a_unix_socket_is_refused_as_a_bad_value() -> None:
    c = core()
    answer = reply_to(c, LinkRequest("ipc://" + "x" * 200), 0.0)
    assert not answer.reply.ok and answer.reply.code == "bad_value"
    assert "ipc path longer" in answer.reply.message
    assert c.siblings == {} and c.persisted_state().siblings == ()


def test_an_operators_link_that_cannot_be_dialled_stays_refused_and_is_not_knocked_again(
        ) -> None:
    c = core()
    reply_to(c, LinkRequest("tcp://_:7000"), 0.0)
    logged = c.connect_failed("tcp://_:7000", "Invalid argument", 0.0)
    sib = c.sibling("tcp://_:7000")
    assert sib is not None and sib.state is LinkState.REFUSED
    assert "Invalid argument" in sib.error and any(isinstance(e, Log) for e in logged)
    assert not sent(c.timer(3600.0), Hello), "no HELLO into a socket that does not exist"
    assert c.persisted_state().siblings == ("tcp://_:7000",), "the operator unlinks it"


def test_a_stranger_whose_endpoint_cannot_be_dialled_is_dropped() -> None:
    c = core()
    deliver(c, request("b", 5, "tcp://_:7000", c), 0.0)
    assert "tcp://_:7000" in c.siblings
    c.connect_failed("tcp://_:7000", "Invalid argument", 0.0)
    assert c.siblings == {}


# ------------------------------------------------------------------------ 2: refusal floods


def test_refusals_are_rate_limited_and_the_rest_are_dropped_and_counted() -> None:
    c = core()
    effects: list[Effect] = []
    for k in range(3000):  # HELLOs claiming our own id, each from another nonce and endpoint
        effects += deliver(c, request("a", 1000 + k, f"tcp://x{k}:7000", c), 0.5)
    refusals = [e for e in effects if isinstance(e, SendOnce)]
    assert len(refusals) == MAX_REFUSALS_PER_WINDOW
    assert all(isinstance(e.message, Bye) and e.message.reason is ByeReason.DUPLICATE_ID
               for e in refusals)
    assert c.counters["refusals_dropped"] == 3000 - MAX_REFUSALS_PER_WINDOW
    assert len([e for e in effects if isinstance(e, Log)]) == 1, "one log line, not 3000"
    later = deliver(c, request("a", 7, "tcp://y:7000", c), 0.5 + REFUSAL_WINDOW_S)
    assert [e for e in later if isinstance(e, SendOnce)], "the budget comes back"


def test_one_endpoint_is_refused_at_most_once_per_window() -> None:
    c = core()
    effects: list[Effect] = []
    for k in range(50):
        effects += deliver(c, request("a", 1000 + k, "tcp://x:7000", c), 0.0)
    assert len([e for e in effects if isinstance(e, SendOnce)]) == 1


# ------------------------------------------------------------------------ 4: strangers' HELLOs


def test_a_stranger_becomes_a_sibling_only_once_it_answers_from_the_endpoint_it_claims() -> None:
    c = core()
    effects = deliver(c, request("b", 5, "tcp://b:7000", c, token=77), 0.0)
    assert Connect("tcp://b:7000", "b") in effects
    (ack,) = [h for h in sent(effects, Hello) if isinstance(h, Hello) and h.ack]
    assert (ack.token, ack.digest) == (77, {}), "echo its token; no table to an unproved address"
    ours = hello_sent(effects, "tcp://b:7000")
    assert ours.digest == {} and ours.token != 0
    assert not any(isinstance(e, Persist) for e in effects)
    sib = c.sibling("tcp://b:7000")
    assert sib is not None and sib.state is LinkState.CONNECTING
    assert c.persisted_state().siblings == () and c.own_advert.links == ()

    forged = Hello("b", 5, "tcp://b:7000", ack=True, dialed=ours.dialed, token=ours.token ^ 1)
    assert deliver(c, forged, 0.1) == [], "an ack without our token proves nothing"
    assert sib.state is LinkState.CONNECTING

    effects = deliver(c, ack_of(ours, "b", 5, "tcp://b:7000"), 0.2)
    assert sib.up and c.own_advert.links == ("b",)
    assert any(isinstance(e, Persist) and e.state.siblings == ("b@tcp://b:7000",)
               for e in effects)
    (answer,) = [h for h in sent(effects, Hello) if isinstance(h, Hello) and h.ack]
    assert answer.token == 77 and answer.digest, "now its request is answered with our digest"


def test_hellos_from_strangers_take_no_operators_slot_and_expire_unless_proved() -> None:
    c = core()
    for k in range(70):
        deliver(c, request(f"junk{k}", k, f"tcp://junk{k}:7000", c), 0.0)
    assert len(c.siblings) == MAX_UNPROVED_SIBLINGS
    assert c.persisted_state().siblings == ()
    assert reply_to(c, LinkRequest("tcp://b:7000"), 0.1).reply.ok
    effects = c.timer(UNPROVED_SIBLING_TTL_S + 0.1)
    assert list(c.siblings) == ["tcp://b:7000"]
    assert sum(isinstance(e, Disconnect) for e in effects) == MAX_UNPROVED_SIBLINGS


def test_linking_a_stranger_that_asked_first_makes_it_the_operators_sibling() -> None:
    c = core()
    deliver(c, request("b", 5, "tcp://b:7000", c), 0.0)
    assert reply_to(c, LinkRequest("b@tcp://b:7000"), 0.1).reply.ok
    assert c.persisted_state().siblings == ("b@tcp://b:7000",)
    assert list(c.siblings) == ["tcp://b:7000"]
    c.timer(UNPROVED_SIBLING_TTL_S + 1.0)
    assert list(c.siblings) == ["tcp://b:7000"], "an operator's link does not expire"


# ------------------------------------------------------------------------ 5: endpoint binding


def test_a_hello_with_a_siblings_id_and_nonce_from_another_endpoint_does_not_move_it() -> None:
    sim = converged_sim([(0, 1)], [(1.0, 0.0), (2.0, 0.0)])
    a, b = sim.cores
    assert a is not None and b is not None
    ignored = a.counters["ignored"]
    assert deliver(a, request("n1", b.config.nonce, "tcp://evil:9", a), sim.now) == []
    sib = a.sibling("n1")
    assert sib is not None and sib.endpoint == "tcp://n1:7000" and sib.up
    assert a.counters["ignored"] == ignored + 1


def test_after_bye_unlinked_a_hello_posing_as_that_node_links_nothing() -> None:
    sim = converged_sim([(0, 1)], [(1.0, 0.0), (2.0, 0.0)])
    a, b = sim.cores
    assert a is not None and b is not None
    deliver(a, Bye("n1", b.config.nonce, ByeReason.UNLINKED), sim.now)
    assert a.siblings == {}
    # Its nonce, read off its advert, with another endpoint: not from that process.
    assert deliver(a, request("n1", b.config.nonce, "tcp://evil:9", a), sim.now) == []
    assert a.siblings == {}
    # A new nonce: a stranger's request like any other, which must answer from tcp://evil:9.
    deliver(a, request("n1", 4242, "tcp://evil:9", a), sim.now)
    assert a.own_advert.links == () and a.persisted_state().siblings == ()
    a.timer(sim.now + UNPROVED_SIBLING_TTL_S)
    assert a.siblings == {} and a.island(sim.now) == frozenset({"n0"})


def test_a_sibling_dialled_by_an_alias_is_bound_to_the_alias_and_the_endpoint_it_proved(
        ) -> None:
    c = core()
    effects = c.handle(CLIENT, LinkRequest("tcp://alias:7000"), 0.0)
    deliver(c, ack_of(hello_sent(effects, "tcp://alias:7000"), "b", 5, "tcp://b:7000"), 0.1)
    sib = c.sibling("b")
    assert sib is not None and sib.up and sib.endpoint == "tcp://alias:7000"
    # It restarts and knocks from the endpoint it advertises (a restart's HELLO has a digest).
    restarted = deliver(c, request("b", 6, "tcp://b:7000", c, digest={"b": (2, 1)}), 0.2)
    assert sib.nonce == 6 and [h for h in sent(restarted, Hello) if isinstance(h, Hello) and h.ack]
    assert deliver(c, request("b", 7, "tcp://third:7000", c, digest={"b": (3, 1)}), 0.3) == []
    assert sib.endpoint == "tcp://alias:7000"


# ------------------------------------------------------------------------ 6: a table at its cap


def test_a_full_table_makes_room_by_dropping_an_unreachable_origin() -> None:
    table = AdvertTable("a", max_nodes=4)
    table.put(advert("a", links=("b",)))
    table.merge(advert("b", links=("a",)))
    table.merge(advert("junk1"))
    table.merge(advert("junk2"))
    assert table.island(0.0) == frozenset({"a", "b"})
    assert table.merge(advert("c", links=("b",))) is Merge.NEW
    assert "junk1" not in table and len(table) == 4 and table.evicted == 1
    assert table.hash == reduce(lambda h, a: h ^ entry_hash(a), table, 0)
    assert table.merge(advert("junk1")) is Merge.NEW, "dropped for room, not forgotten"


def test_a_full_table_of_reachable_origins_refuses_a_new_one() -> None:
    table = AdvertTable("a", max_nodes=2)
    table.put(advert("a", links=("b",)))
    table.merge(advert("b", links=("a",)))
    table.island(0.0)
    assert table.merge(advert("c")) is Merge.FULL and table.evicted == 0


def test_one_sibling_cannot_fill_the_table_with_origins_nobody_can_reach() -> None:
    c = core(max_nodes=40)
    link_from(c, "evil", 5, 0.0)
    link_from(c, "d", 6, 0.0)
    fakes = tuple(advert(f"fake{k}") for k in range(40))
    deliver(c, Adverts("evil", 5, fakes), 0.1)
    share = int(40 * UNREACHABLE_SHARE_PER_SIBLING)
    assert sum(1 for a in c.table if a.origin.startswith("fake")) == share
    assert c.counters["origins_refused"] == 40 - share
    # A real node linked later, behind another sibling, is learned and counted.
    real = (advert("d", links=("a", "c"), nonce=6), advert("c", links=("d",)))
    deliver(c, Adverts("d", 6, real), 0.2)
    assert {"c", "d"} <= c.island(0.2)
    # The flooder's own advert is no invention: it is always taken.
    deliver(c, Adverts("evil", 5, (advert("evil", links=("a",), nonce=5),)), 0.3)
    assert "evil" in c.island(0.3)


# ------------------------------------------------------------------------ 7: digest floods


def test_pings_however_many_draw_at_most_one_digest_per_ping_interval() -> None:
    sim = converged_sim([(0, 1)], [(1.0, 0.0), (2.0, 0.0)])
    a, b = sim.cores
    assert a is not None and b is not None
    interval = a.config.ping_interval_s
    now = sim.now + interval  # clear of the digests the link's start exchanged
    mismatch = Ping("n1", b.config.nonce, a.table.hash ^ 1)
    digests = [m for _ in range(1000) for m in sent(deliver(a, mismatch, now), DigestMsg)]
    assert len(digests) == 1 and a.counters["digests_limited"] > 0
    later = [m for _ in range(1000) for m in sent(deliver(a, mismatch, now + interval),
                                                  DigestMsg)]
    assert len(later) == 1


def test_digests_however_many_are_answered_at_most_once_per_ping_interval() -> None:
    sim = converged_sim([(0, 1)], [(1.0, 0.0), (2.0, 0.0)])
    a, b = sim.cores
    assert a is not None and b is not None
    now = sim.now + a.config.ping_interval_s  # clear of the digests the link's start exchanged
    claims_little = DigestMsg("n1", b.config.nonce, {"zz": (1, 1)}, True)  # a lacks zz
    effects = [e for _ in range(1000) for e in deliver(a, claims_little, now)]
    assert len(sent(effects, DigestMsg)) == 1
    assert a.counters["digests_limited"] == 999
    adverts = [m for m in sent(a.flush(now), Adverts) if isinstance(m, Adverts)]
    assert len(adverts) == 1, "the table queued once, sent once"


# ------------------------------------------------------------------------ 8: sticky unlinks


def test_an_unlinked_node_that_knocks_again_is_answered_bye_unlinked_and_not_linked() -> None:
    sim = converged_sim([(0, 1)], [(1.0, 0.0), (2.0, 0.0)])
    a = sim.cores[0]
    assert a is not None
    sim.crash(1)  # our BYE cannot reach it
    assert reply_to(a, UnlinkRequest("n1"), sim.now).reply.ok
    assert a.persisted_state().unlinked == ("n1@tcp://n1:7000",)
    # It comes back (a new nonce) with its old record of us, and knocks.
    effects = deliver(a, request("n1", 999, "tcp://n1:7000", a, token=3), sim.now + 1.0)
    (refusal,) = [e.message for e in effects if isinstance(e, SendOnce)]
    assert isinstance(refusal, Bye) and refusal.reason is ByeReason.UNLINKED
    assert refusal.dialed == "tcp://n0:7000"  # so that it finds its record of us
    assert a.siblings == {}


def test_an_unlink_of_a_crashed_node_sticks_when_it_restarts() -> None:
    sim = converged_sim([(0, 1)], [(1.0, 0.0), (2.0, 0.0)])
    sim.crash(1)
    assert sim.unlink(0, 1) is not None
    sim.run_until(sim.now + 1.0)
    sim.restart(1)
    sim.run_until(sim.now + 10.0)
    a, b = sim.cores
    assert a is not None and b is not None
    assert a.siblings == {} and b.siblings == {}, "b was told, and dropped its record of a"
    assert a.island(sim.now) == frozenset({"n0"}) and b.island(sim.now) == frozenset({"n1"})


def test_unlinked_nodes_are_remembered_across_a_restart_and_the_oldest_forgotten() -> None:
    c = core()
    for k in range(MAX_UNLINKED_REMEMBERED + 10):
        reply_to(c, LinkRequest(f"p{k}@tcp://p{k}:7000"), 0.0)
        reply_to(c, UnlinkRequest(f"p{k}"), 0.0)
    state = c.persisted_state()
    assert len(state.unlinked) == MAX_UNLINKED_REMEMBERED
    assert state.unlinked[0] == "p10@tcp://p10:7000"
    restarted = Core(c.config, state)
    last = MAX_UNLINKED_REMEMBERED + 9
    refused = deliver(restarted, request(f"p{last}", 5, f"tcp://p{last}:7000", restarted), 1.0)
    assert [e for e in refused if isinstance(e, SendOnce)]
    asked = deliver(restarted, request("p0", 5, "tcp://p0:7000", restarted), 1.0)
    assert not [e for e in asked if isinstance(e, SendOnce)], "forgotten: a stranger again"


def test_a_link_by_either_operator_undoes_an_unlink() -> None:
    c = core()
    reply_to(c, LinkRequest("b@tcp://b:7000"), 0.0)
    reply_to(c, UnlinkRequest("b"), 0.1)
    # The other node's operator links: its HELLO says so, and it proves its endpoint.
    effects = deliver(c, request("b", 5, "tcp://b:7000", c, linking=True), 0.2)
    assert not [e for e in effects if isinstance(e, SendOnce)]
    deliver(c, ack_of(hello_sent(effects, "tcp://b:7000"), "b", 5, "tcp://b:7000"), 0.3)
    sib = c.sibling("b")
    assert sib is not None and sib.up and c.persisted_state().unlinked == ()
    # Ours: a link request forgets the unlink at once.
    reply_to(c, UnlinkRequest("b"), 0.4)
    assert c.persisted_state().unlinked == ("b@tcp://b:7000",)
    reply_to(c, LinkRequest("tcp://b:7000"), 0.5)
    assert c.persisted_state().unlinked == ()


def test_a_link_request_survives_a_crash_before_the_other_side_answers() -> None:
    # b's operator unlinked a; a's operator links b again while b cannot hear it.
    b = core("b", nonce=7)
    reply_to(b, LinkRequest("a@tcp://a:7000"), 0.0)
    reply_to(b, UnlinkRequest("a"), 0.1)
    a = core()
    effects = a.handle(CLIENT, LinkRequest("b@tcp://b:7000"), 0.2)
    (saved,) = [e.state for e in effects if isinstance(e, Persist)]
    assert saved.linking == ("b@tcp://b:7000",), "the acknowledged request is persisted"
    # a crashes before b answers, and comes back from what it saved.
    restarted = Core(Config("a", "tcp://a:7000", 2), saved)
    hello = hello_sent(restarted.start(1.0), "tcp://b:7000")
    assert hello.linking, "the restored request still undoes b's unlink"
    answer = b.handle(PEER, hello, 1.1)
    assert not sent(answer, Bye), "b links again instead of answering bye unlinked"
    assert "tcp://a:7000" in b.siblings
    # Answered: the request is done, and saved as done.
    effects = deliver(restarted, ack_of(hello, "b", 7, "tcp://b:7000"), 1.2)
    sib = restarted.sibling("b")
    assert sib is not None and sib.up
    assert [e.state.linking for e in effects if isinstance(e, Persist)] == [()]
