"""Trust: signed adverts, changes only by operators, and a table that heals whatever it is handed.

Sans-IO tests of the core and simulator runs (no sockets, no sleeps). The same attacks against
real processes are in tests/test_secure_grid.py.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zgrid.core import (
    RIVAL_OUTBID_INTERVAL_S,
    Config,
    Core,
    Effect,
    Log,
    Persist,
    Respond,
    Trust,
)
from zgrid.signing import AdvertSeal, Keyring, public_of
from zgrid.sim import Simulator
from zgrid.sim.scenario import cold_start
from zgrid.table import AdvertTable
from zgrid.wire import (
    MAX_COUNTER,
    Advert,
    Adverts,
    LinkRequest,
    SetRequest,
    StatusRequest,
    UnlinkRequest,
    decode,
    encode,
)

CLIENT = (b"ctl",)
PEER = (b"peer",)
NONCES = {"a": 1, "b": 2, "c": 3}
SEEDS = {name: bytes([i + 1]) * 32 for i, name in enumerate(("a", "b", "c", "op"))}
KEYRING = Keyring({name: public_of(seed) for name, seed in SEEDS.items()})
MEMBERS = frozenset(SEEDS)


def endpoint(name: str) -> str:
    return f"tcp://{name}:7000"


def signed(origin: str, incarnation: int, seq: int, production: float = 0.0,
           links: tuple[str, ...] = (), by: str | None = None) -> Advert:
    """An advert of `origin`, signed with the key of `by` (default: the origin's own)."""
    advert = Advert(origin, incarnation, seq, production, 0.0, links, endpoint(origin),
                    NONCES.get(origin, 9))
    return AdvertSeal(SEEDS[by or origin], KEYRING).sign(advert)


class CountingSeal:
    """A real seal that counts how often it is asked to verify."""

    def __init__(self, seal: AdvertSeal) -> None:
        self.seal = seal
        self.verified = 0

    def sign(self, advert: Advert) -> Advert:
        return self.seal.sign(advert)

    def verify(self, advert: Advert) -> bool:
        self.verified += 1
        return self.seal.verify(advert)


def hub(seal: object = None, operators: frozenset[str] = frozenset()) -> Core:
    """a, linked (UP) to b and c, holding the signed adverts of all three: b - a - c."""
    own_seal = AdvertSeal(SEEDS["a"], KEYRING) if seal is None else seal
    adverts = {"a": signed("a", 1, 3, links=("b", "c")), "b": signed("b", 1, 2, 5.0, ("a",)),
               "c": signed("c", 1, 2, 7.0, ("a",))}
    table = AdvertTable.converged("a", adverts, 1000)
    trust = Trust(MEMBERS, operators, own_seal)  # type: ignore[arg-type]
    core = Core.converged(Config("a", endpoint("a"), NONCES["a"]), table,
                          [("b", endpoint("b"), NONCES["b"]), ("c", endpoint("c"), NONCES["c"])],
                          0.0, trust)
    core.start(0.0)
    return core


def forward(core: Core, via: str, *adverts: Advert, now: float = 1.0) -> list[Effect]:
    """`adverts` arriving from sibling `via`, over a connection authenticated as `via`."""
    return core.handle(PEER, Adverts(via, NONCES[via], adverts), now, authenticated_as=via)


def unsigned_core(node_id: str = "a") -> Core:
    core = Core(Config(node_id, endpoint(node_id), NONCES.get(node_id, 1)))
    core.start(0.0)
    return core


def rival_of(core: Core, incarnation: int, seq: int, nonce: int) -> Adverts:
    """An advert of `core`'s own id, as some other writer would send it, from a stranger."""
    advert = Advert(core.id, incarnation, seq, 999.0, 0.0, (), "tcp://elsewhere:1", nonce)
    return Adverts("x", 77, (advert,))


def learn_about_self(core: Core, msg: Adverts, now: float) -> list[Effect]:
    """Let `msg` reach the self-advert rule: the core accepts adverts only from UP siblings,
    so hand it straight to the rule the flood would reach (its one advert is about us)."""
    core._learn_about_self(msg.adverts[0], now)
    return core._save_incarnation()


# ------------------------------------------------------------------------ signed adverts


def test_every_advert_a_node_writes_carries_its_valid_signature() -> None:
    a = hub()
    a.handle(CLIENT, SetRequest(4.0, None), 1.0, authenticated_as="a")
    own = a.own_advert
    assert own.production == 4.0 and KEYRING.verify(own)
    assert decode(encode(Adverts("a", 1, (own,)))).adverts == (own,), "the signature travels"


def test_an_advert_signed_by_its_origin_replaces_the_stored_one() -> None:
    a = hub()
    forward(a, "b", signed("b", 1, 3, 6.0, ("a",)))
    assert a.table.by_origin["b"].production == 6.0
    assert a.totals(1.0)[0] == 13.0


def test_forged_and_unsigned_adverts_are_dropped_counted_and_logged_at_a_rate() -> None:
    a = hub()
    held = a.table.by_origin["c"]
    tampered = replace(signed("c", 1, 1000, 7.0, ("a",)), production=999.0)
    unsigned = replace(tampered, signature=b"")
    by_another = signed("c", 1, 1001, 999.0, ("a",), by="b")
    effects = forward(a, "b", tampered, unsigned, by_another)
    effects += forward(a, "b", replace(tampered, seq=1002), now=2.0)
    assert a.table.by_origin["c"] is held and a.totals(2.0)[0] == 12.0
    assert a.counters["bad_signatures"] == 4
    logs = [e for e in effects if isinstance(e, Log)]
    assert len(logs) == 1 and "signature does not verify" in logs[0].text


def test_a_version_is_verified_once_however_many_siblings_forward_it() -> None:
    seal = CountingSeal(AdvertSeal(SEEDS["a"], KEYRING))
    a = hub(seal)
    newer = signed("c", 1, 3, 8.0, ("a",))
    forward(a, "c", newer)
    forward(a, "b", newer)
    forward(a, "b", signed("c", 1, 2, 7.0, ("a",)))  # an older one: nothing to verify
    assert seal.verified == 1


def test_with_keys_a_forged_newer_advert_of_ourselves_is_dropped_not_outbid() -> None:
    a = hub()
    version = a.own_advert.version
    forged = signed("a", 1, 1000, 999.0, ("b", "c"), by="b")
    effects = forward(a, "b", forged)
    assert a.own_advert.version == version and a.counters["outbids"] == 0
    assert not any(isinstance(e, Persist) for e in effects)
    assert a.counters["bad_signatures"] == 1


def test_revocation_drops_a_members_adverts_and_it_leaves_every_island() -> None:
    a = hub()
    without_c = Keyring({name: public_of(SEEDS[name]) for name in ("a", "b", "op")})
    a.membership_changed(Trust(MEMBERS - {"c"}, frozenset(), AdvertSeal(SEEDS["a"], without_c)),
                         1.0)
    assert "c" not in a.table and a.island(1.0) == {"a", "b"}
    assert a.table.hash == AdvertTable.converged(
        "a", {o: x for o, x in a.table.by_origin.items()}, 10).hash
    forward(a, "b", signed("c", 1, 9, 7.0, ("a",)))
    assert "c" not in a.table, "a revoked member's adverts cannot come back"


# ------------------------------------------------------------------------ who may change a node


def test_only_operators_and_the_nodes_own_key_may_change_it() -> None:
    a = hub(operators=frozenset({"op"}))
    for request in (SetRequest(0.0, None), LinkRequest("d@tcp://d:7000"), UnlinkRequest("b")):
        (refused,) = a.handle(CLIENT, request, 1.0, authenticated_as="b")
        assert isinstance(refused, Respond) and refused.reply.code == "not_operator"
        assert "'b' may not change a" in refused.reply.message
    assert a.production == 0.0 and len(a.siblings) == 2 and a.own_advert.seq == 3
    for who in ("op", "a"):
        *_, reply = a.handle(CLIENT, SetRequest(float(len(who)), None), 1.0,
                             authenticated_as=who)
        assert isinstance(reply, Respond) and reply.reply.ok, who
    (status,) = a.handle(CLIENT, StatusRequest(), 1.0, authenticated_as="b")
    assert isinstance(status, Respond) and status.reply.ok, "reading is open to every member"


# ------------------------------------------------------------------------ a table that heals


def test_without_keys_a_newer_advert_of_ourselves_is_outbid_whatever_its_nonce() -> None:
    # Our own life (nonce and incarnation): outbid within it; another life: start a new one.
    for nonce, outbid in ((NONCES["a"], (1, 1001)), (12345, (2, 0))):
        a = unsigned_core()
        learn_about_self(a, rival_of(a, 1, 1000, nonce), 1.0)
        assert a.own_advert.version == outbid
        assert a.own_advert.production == 0.0 and a.counters["outbids"] == 1


def test_a_rival_is_outbid_again_only_after_an_interval_so_duplicates_cannot_bump_war() -> None:
    a = unsigned_core()
    learn_about_self(a, rival_of(a, 1, 10, 555), 1.0)
    assert a.own_advert.version == (2, 0)
    learn_about_self(a, rival_of(a, 2, 20, 555), 2.0)
    assert a.own_advert.version == (2, 0), "not at once"
    assert "another live node uses the id a" in a.conflict
    due = 1.0 + RIVAL_OUTBID_INTERVAL_S
    assert a.next_deadline() <= due
    a.timer(due)
    assert a.own_advert.version == (3, 0), "but once the interval is over: what we say wins"


def test_counters_at_their_maximum_cannot_crash_a_node_or_lock_it_out() -> None:
    for rival, outbid in (((MAX_COUNTER, 5), (MAX_COUNTER, 6)),
                          ((MAX_COUNTER - 1, MAX_COUNTER), (MAX_COUNTER, 0))):
        a = unsigned_core()
        effects = learn_about_self(a, rival_of(a, *rival, 555), 1.0)
        assert a.own_advert.version == outbid
        assert any(isinstance(e, Persist) and e.new_incarnation for e in effects)
        assert decode(encode(Adverts("a", 1, (a.own_advert,)))).adverts == (a.own_advert,)
        a.handle(CLIENT, SetRequest(1.0, None), 2.0)
        assert a.own_advert.version > outbid, "and it can still change its values"
    a = unsigned_core()
    learn_about_self(a, rival_of(a, MAX_COUNTER, MAX_COUNTER, 555), 1.0)
    assert a.own_advert.version == (1, 1) and "--keys" in a.conflict


def test_an_advert_at_the_maximum_version_retracts_its_origin_for_one_forget_period() -> None:
    sim, edges = _four_node_ring(signed_grid=False)
    _inject(sim, edges, [(0, "n2", (MAX_COUNTER, MAX_COUNTER), 999.0, True, ["n1", "n3"])])
    sim.run_until(sim.now + 1.0)
    others = [c for c in cores_of(sim) if c.id != "n2"]
    assert all("n2" not in c.table and "n2" not in c.island(sim.now) for c in others)
    assert all(c.totals(sim.now)[0] != 999.0 for c in cores_of(sim)), "never counted"
    assert sim.run_until_agreed(limit_s=3 * FORGET_AFTER_S, step_s=1.0).agreed
    assert all(c.table.by_origin["n2"].production == 3.0 for c in cores_of(sim)), "n2 is back"


def cores_of(sim: Simulator) -> list[Core]:
    return [core for core in sim.cores if core is not None]


def _four_node_ring(signed_grid: bool) -> tuple[Simulator, list[tuple[int, int]]]:
    names = ["n0", "n1", "n2", "n3"]
    sim = Simulator(names, seed=7, signed=signed_grid, forget_after_s=FORGET_AFTER_S)
    edges = [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert cold_start(sim, edges, [(5.0, 1.0), (0.0, 2.0), (3.0, 0.5), (0.0, 4.0)]) is not None
    return sim, edges


_VERSIONS = st.one_of(
    st.tuples(st.integers(1, 3), st.integers(0, 50)),
    st.tuples(st.integers(1, MAX_COUNTER), st.integers(0, MAX_COUNTER)),
    st.tuples(st.just(MAX_COUNTER), st.integers(0, MAX_COUNTER - 1)),
    st.tuples(st.integers(1, MAX_COUNTER - 1), st.just(MAX_COUNTER)),
    st.just((MAX_COUNTER, MAX_COUNTER)),  # nothing outbids it: it retracts its origin
)
FORGET_AFTER_S = 20.0  # virtual: how long a retraction at the maximum version lasts
_INJECTION = st.tuples(
    st.integers(0, 3),  # the node it is handed to
    st.sampled_from(["n0", "n1", "n2", "n3", "ghost"]),  # the origin it claims
    _VERSIONS,
    st.floats(0.0, 1e6),  # production
    st.booleans(),  # True: the origin's real nonce; False: another one
    st.lists(st.sampled_from(["n0", "n1", "n2", "n3", "ghost"]), max_size=4, unique=True),
)


def _inject(sim: Simulator, edges: list[tuple[int, int]],
            injections: list[tuple[int, str, tuple[int, int], float, bool, list[str]]]
            ) -> list[tuple[int, Advert]]:
    """Schedule each injection 10 ms apart; returns (receiver, forged advert) of each."""
    out = []
    for k, (dst, origin, (incarnation, seq), production, real_nonce, links) in enumerate(
            injections):
        src = next(v if u == dst else u for u, v in edges if dst in (u, v))
        sender = sim.cores[src]
        victim = sim.cores[sim.index[origin]] if origin in sim.index else None
        assert sender is not None
        nonce = victim.config.nonce if victim is not None and real_nonce else 1000 + k
        signature = victim.own_advert.signature if victim is not None else b""
        forged = Advert(origin, incarnation, seq, production, 0.0, tuple(sorted(links)),
                        "tcp://forger:1", nonce, signature)
        out.append((dst, forged))
        message = Adverts(sender.id, sender.config.nonce, (forged,))
        sim.at(sim.now + 0.01 * k, partial(sim.inject, dst, src, message))
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_INJECTION, min_size=1, max_size=6))
def test_whatever_adverts_are_injected_every_island_agrees_once_injection_stops(
        injections: list[tuple[int, str, tuple[int, int], float, bool, list[str]]]) -> None:
    # Without keys anyone can write anything; what must hold is that it does not last: a
    # forgery is outbid within RIVAL_OUTBID_INTERVAL_S, and one at the maximum version, which
    # nothing can outbid, retracts its origin for one forget period.
    sim, edges = _four_node_ring(signed_grid=False)
    _inject(sim, edges, injections)
    sim.run_until(sim.now + 1.0)
    agreement = sim.run_until_agreed(
        limit_s=4 * RIVAL_OUTBID_INTERVAL_S + 3 * FORGET_AFTER_S, step_s=1.0)
    assert agreement.agreed, agreement.problems


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_INJECTION, min_size=1, max_size=6))
def test_with_keys_injected_adverts_change_nothing_anywhere(
        injections: list[tuple[int, str, tuple[int, int], float, bool, list[str]]]) -> None:
    sim, edges = _four_node_ring(signed_grid=True)
    cores = [core for core in sim.cores if core is not None]
    before = [core.table.hash for core in cores]
    # Every forged version newer than what its receiver holds must reach the seal and fail.
    newer = sum(1 for dst, forged in _inject(sim, edges, injections)
                if forged.origin not in cores[dst].table
                or forged.version > cores[dst].table.by_origin[forged.origin].version)
    sim.run_until(sim.now + 1.0)
    assert [core.table.hash for core in cores] == before
    assert sim.check_agreement(strict=True).agreed
    assert sum(core.counters["bad_signatures"] for core in cores) == newer


def test_without_keys_a_forged_advert_is_outbid_by_its_origin_everywhere() -> None:
    sim, edges = _four_node_ring(signed_grid=False)
    _inject(sim, edges, [(0, "n2", (1, 1000), 999.0, True, ["n1", "n3"])])
    sim.run_until(sim.now + 0.1)
    assert sim.run_until_agreed(limit_s=5.0).agreed
    n2 = sim.cores[2]
    assert n2 is not None and n2.counters["outbids"] == 1, "the forgery reached n2 and was seen"
    assert all(core is not None and core.table.by_origin["n2"].version == (1, 1001)
               and core.table.by_origin["n2"].production == 3.0 for core in sim.cores)


def test_a_rival_next_to_the_maximum_makes_its_victim_retract_itself_and_return() -> None:
    # Nothing but the maximum is above (2^63-1, 2^63-2), and the maximum only retracts: n0
    # retracts itself, which drops the rival everywhere, and comes back after a forget period.
    sim, edges = _four_node_ring(signed_grid=False)
    _inject(sim, edges, [(1, "n0", (MAX_COUNTER, MAX_COUNTER - 1), 999.0, False, [])])
    sim.run_until(sim.now + 1.0)
    n0 = sim.cores[0]
    assert n0 is not None and "retracted itself" in n0.conflict
    assert n0.own_advert.version < (MAX_COUNTER, MAX_COUNTER - 1), "it never takes the maximum"
    assert all("n0" not in c.table for c in cores_of(sim) if c.id != "n0")
    assert sim.run_until_agreed(limit_s=3 * FORGET_AFTER_S, step_s=1.0).agreed
    assert all(c.table.by_origin["n0"].production == 5.0 for c in cores_of(sim))
