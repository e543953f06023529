"""Tests of zgrid.security: key files, membership, and ZAP run from a poll loop on real sockets.

Every socket is on 127.0.0.1 or inproc, every wait has a deadline, and every socket and context
is closed by the fixtures. The poll loop in `Server.pump` is the shape the node's loop takes:
the ZAP socket is polled with the ROUTER and `ZapHandler.handle()` is called when it is readable.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.auth import load_certificate
from zmq.utils.monitor import recv_monitor_message

from zgrid.errors import SecurityError
from zgrid.security import (
    ZAP_DOMAIN,
    ZAP_ENDPOINT,
    Membership,
    ZapHandler,
    authenticated_name,
    keygen,
    secure_client,
    secure_server,
)
from zgrid.signing import public_of

WAIT_S = 5.0  # deadline for anything that should happen
QUIET_S = 0.3  # how long to watch for something that must not happen, once refusal is seen
POLL_MS = 20


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    for name in ("n1", "n2", "n3", "operator"):
        keygen(directory, name)
    return directory


@pytest.fixture
def outsider(tmp_path: Path) -> Membership:
    # A well-formed keypair that is simply not in the grid's keys directory; it knows n1's
    # public key, as anyone may.
    directory = tmp_path / "elsewhere"
    keygen(directory, "mallory")
    (directory / "n1.key").write_bytes((tmp_path / "keys" / "n1.key").read_bytes())
    return Membership(directory)


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


class Server:
    """A CURVE ROUTER with its ZapHandler, driven by a poll loop like the node's."""

    def __init__(self, context: zmq.Context[Any], membership: Membership) -> None:
        self.zap = ZapHandler(context, membership)  # before the CURVE ROUTER binds
        self.router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        secure_server(self.router, membership, "n1")
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.poller = zmq.Poller()
        self.poller.register(self.zap.socket, zmq.POLLIN)
        self.poller.register(self.router, zmq.POLLIN)
        self.refusals: list[str] = []
        self.received: list[tuple[bytes, str | None]] = []  # (payload, authenticated name)

    def pump(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Run the loop until done() or the deadline; returns done()."""
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            events = dict(self.poller.poll(POLL_MS))
            if self.zap.socket in events:
                refusal = self.zap.handle()
                if refusal is not None:
                    self.refusals.append(refusal)
            if self.router in events:
                frames = self.router.recv_multipart(copy=False)
                self.received.append((frames[-1].bytes, authenticated_name(frames[-1])))
        return done()

    def close(self) -> None:
        self.router.close(linger=0)
        self.zap.close()


@pytest.fixture
def server(context: zmq.Context[Any], keys: Path) -> Iterator[Server]:
    s = Server(context, Membership(keys))
    yield s
    s.close()


def _client(context: zmq.Context[Any], membership: Membership, name: str,
            endpoint: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, membership, name, "n1")
    sock.connect(endpoint)
    return sock


# ---------------------------------------------------------------------------- key files


def test_keygen_writes_pyzmq_certificates_with_safe_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the most permissive umask: the modes must not depend on it
    try:
        public_path, secret_path = keygen(tmp_path / "k", "n1")
    finally:
        os.umask(old_umask)
    assert (public_path.name, secret_path.name) == ("n1.key", "n1.key_secret")
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    public, none = load_certificate(public_path)
    public_again, secret = load_certificate(secret_path)
    assert none is None and b"secret-key" not in public_path.read_bytes()
    assert secret is not None and public == public_again
    assert zmq.curve_public(secret) == public  # a real keypair, not two random strings


def test_keygen_creates_the_secret_0600_from_the_first_instant(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the fchmod that follows creation, the file must already be 0600 under umask 0:
    # the mode is given to open(O_CREAT), not fixed up afterwards.
    monkeypatch.setattr(os, "fchmod", lambda fd, mode: None)
    old_umask = os.umask(0)
    try:
        _, secret_path = keygen(tmp_path, "n1")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600


def test_keygen_never_overwrites(tmp_path: Path) -> None:
    public_path, secret_path = keygen(tmp_path, "n1")
    before = (public_path.read_bytes(), secret_path.read_bytes())
    with pytest.raises(SecurityError, match="exists already"):
        keygen(tmp_path, "n1")
    public_path.unlink()  # half a pair left: still refused, the secret is kept
    with pytest.raises(SecurityError, match="exists already"):
        keygen(tmp_path, "n1")
    assert secret_path.read_bytes() == before[1]


@pytest.mark.parametrize("name", ["", "../n1", "a/b", ".hidden", "n 1", "x" * 65])
def test_keygen_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(SecurityError, match="key name"):
        keygen(tmp_path / "k", name)
    assert not list(tmp_path.rglob("*.key*"))


def test_keygen_writes_a_signing_keypair_beside_the_curve_keypair(tmp_path: Path) -> None:
    public_path, secret_path = keygen(tmp_path, "n1")
    assert b"sign-public-key" in public_path.read_bytes()
    assert b"sign-secret-key" not in public_path.read_bytes()
    assert b"sign-secret-key" in secret_path.read_bytes()
    membership = Membership(tmp_path)
    seed = membership.load_own_signing("n1")
    assert public_of(seed) == membership.signing_keys()["n1"]
    assert membership.operators() == frozenset() and membership.problems == []


def test_keygen_operator_gives_the_operator_role(tmp_path: Path) -> None:
    keygen(tmp_path, "n1")
    keygen(tmp_path, "admin", operator=True)
    assert Membership(tmp_path).operators() == {"admin"}


def test_a_key_without_a_signing_key_admits_its_member_but_says_its_adverts_are_dropped(
        tmp_path: Path) -> None:
    public_path, secret_path = keygen(tmp_path, "old")
    for path in (public_path, secret_path):  # as zgrid wrote them before adverts were signed
        path.write_bytes(b"".join(line for line in path.read_bytes().splitlines(keepends=True)
                                  if b"sign-" not in line))
    membership = Membership(tmp_path)
    assert "old" in membership and "old" not in membership.signing_keys()
    assert any("old.key has no valid sign-public-key" in p and "dropped" in p
               for p in membership.problems)
    with pytest.raises(SecurityError, match="holds no sign-secret-key"):
        membership.load_own_signing("old")


def test_a_signing_secret_that_does_not_match_its_public_key_is_refused(tmp_path: Path) -> None:
    keygen(tmp_path / "a", "n1")
    keygen(tmp_path / "b", "n1")

    def sign_line(path: Path) -> bytes:
        return next(x for x in path.read_bytes().splitlines(keepends=True) if b"sign-pub" in x)

    public = tmp_path / "a" / "n1.key"
    public.write_bytes(public.read_bytes().replace(sign_line(public),
                                                   sign_line(tmp_path / "b" / "n1.key")))
    with pytest.raises(SecurityError, match="does not belong to the signing secret"):
        Membership(tmp_path / "a").load_own_signing("n1")


# ---------------------------------------------------------------------------- membership


def test_membership_maps_keys_to_names(keys: Path) -> None:
    m = Membership(keys)
    assert m.names() == {"n1", "n2", "n3", "operator"}
    n2_public, _ = load_certificate(keys / "n2.key")
    assert m.name_of(n2_public) == "n2"
    assert m.public_key("n2") == n2_public
    assert m.name_of(b"x" * 40) is None
    expected = f"no key for sibling n9 in {keys}: copy n9.key there"
    with pytest.raises(SecurityError, match=re.escape(expected)):
        m.public_key("n9")
    assert m.problems == []


def test_membership_skips_unusable_files_and_says_why(keys: Path) -> None:
    (keys / "bad name.key").write_bytes((keys / "n2.key").read_bytes())
    (keys / "empty.key").write_text("curve\n    public-key = \"short\"\n")
    m = Membership(keys)
    assert m.names() == {"n1", "n2", "n3", "operator"}
    assert len(m.problems) == 2
    assert any("bad name.key" in p for p in m.problems)
    assert any("empty.key" in p and "no valid public-key" in p for p in m.problems)


def test_membership_refuses_one_key_for_two_names(keys: Path) -> None:
    (keys / "copy.key").write_bytes((keys / "n2.key").read_bytes())
    with pytest.raises(SecurityError, match="hold the same public key"):
        Membership(keys)


def test_reload_reports_removed_members_and_keeps_state_on_error(keys: Path) -> None:
    m = Membership(keys)
    (keys / "n2.key").unlink()
    keygen(keys, "n4")
    assert m.reload() == {"n2"}
    assert "n2" not in m and "n4" in m
    (keys / "dup.key").write_bytes((keys / "n3.key").read_bytes())
    with pytest.raises(SecurityError):
        m.reload()
    assert m.names() == {"n1", "n3", "n4", "operator"}  # unchanged by the failed reload


def test_missing_keys_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="does not exist"):
        Membership(tmp_path / "nope")


def test_load_own_checks_presence_mode_and_consistency(keys: Path, tmp_path: Path) -> None:
    m = Membership(keys)
    public, secret = m.load_own("n1")
    assert zmq.curve_public(secret) == public == m.public_key("n1")
    with pytest.raises(SecurityError, match=r"n9\.key_secret is missing"):
        m.load_own("n9")
    (keys / "n2.key_secret").chmod(0o640)
    with pytest.raises(SecurityError, match="chmod 600"):
        m.load_own("n2")
    # n3's listed public key belongs to another secret: the files were mixed up
    keygen(tmp_path / "other", "n3")
    (keys / "n3.key_secret").unlink()
    (keys / "n3.key_secret").write_bytes((tmp_path / "other" / "n3.key_secret").read_bytes())
    (keys / "n3.key_secret").chmod(0o600)
    with pytest.raises(SecurityError, match="does not match"):
        m.load_own("n3")


# ---------------------------------------------------------------------------- ZAP on sockets


def test_member_is_accepted_and_identified_by_its_key(server: Server, keys: Path,
                                                      context: zmq.Context[Any]) -> None:
    client_ctx: zmq.Context[Any] = zmq.Context()  # another process, in effect
    try:
        m = Membership(keys)
        n2 = _client(client_ctx, m, "n2", server.endpoint)
        op = _client(client_ctx, m, "operator", server.endpoint)
        n2.send(b"from n2")
        op.send(b"from operator")
        assert server.pump(lambda: len(server.received) == 2, WAIT_S)
        assert sorted(server.received) == [(b"from n2", "n2"), (b"from operator", "operator")]
        assert server.refusals == []
        assert server.zap.counters["accepted"] == 2
    finally:
        client_ctx.destroy(linger=0)


def test_client_without_a_member_key_is_refused(server: Server, outsider: Membership) -> None:
    client_ctx: zmq.Context[Any] = zmq.Context()
    try:
        mallory = _client(client_ctx, outsider, "mallory", server.endpoint)
        mallory.send(b"let me in")
        assert server.pump(lambda: bool(server.refusals), WAIT_S)
        mallory_public = outsider.public_key("mallory").decode()
        assert mallory_public in server.refusals[0]
        assert "not a *.key" in server.refusals[0]
        server.pump(lambda: False, QUIET_S)
        assert server.received == []
        # libzmq retries the handshake; every attempt gets the same text, so logging once
        # per distinct text is logging once per key
        assert len(set(server.refusals)) == 1
    finally:
        client_ctx.destroy(linger=0)


def test_revoked_member_cannot_connect_again(server: Server, keys: Path) -> None:
    client_ctx: zmq.Context[Any] = zmq.Context()
    try:
        m = Membership(keys)
        old = _client(client_ctx, m, "n2", server.endpoint)
        old.send(b"before")
        assert server.pump(lambda: len(server.received) == 1, WAIT_S)
        (keys / "n2.key").unlink()
        assert server.zap.membership.reload() == {"n2"}
        new = _client(client_ctx, m, "n2", server.endpoint)
        new.send(b"after")
        assert server.pump(lambda: bool(server.refusals), WAIT_S)
        assert "refused CURVE client" in server.refusals[0]
        # An established CURVE session survives the reload: libzmq authenticates once per
        # connection. The runtime must therefore drop frames whose authenticated name is no
        # longer in the membership (and close its DEALER to that member) on SIGHUP.
        old.send(b"old session")
        assert server.pump(lambda: len(server.received) == 2, WAIT_S)
        payload, name = server.received[1]
        assert (payload, name) == (b"old session", "n2") and name not in server.zap.membership
        server.pump(lambda: False, QUIET_S)
        assert b"after" not in [p for p, _ in server.received]
    finally:
        client_ctx.destroy(linger=0)


def test_client_checks_the_servers_key(server: Server, keys: Path, tmp_path: Path) -> None:
    # A client that expects n1 but gets a server with another key never talks to it, so a
    # sibling cannot be impersonated by whoever holds its endpoint.
    impostor_keys = tmp_path / "impostor"
    keygen(impostor_keys, "n2")
    (impostor_keys / "n1.key").write_bytes((keys / "n3.key").read_bytes())  # wrong key for n1
    client_ctx: zmq.Context[Any] = zmq.Context()
    monitor = server.router.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    try:
        fooled = _client(client_ctx, Membership(impostor_keys), "n2", server.endpoint)
        fooled.send(b"hello?")
        assert server.pump(lambda: monitor.poll(0) != 0, WAIT_S)
        event = recv_monitor_message(monitor)
        assert event["value"] == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC  # HELLO undecryptable
        server.pump(lambda: False, QUIET_S)
        assert server.received == [] and server.zap.counters["accepted"] == 0
    finally:
        server.router.disable_monitor()
        monitor.close(linger=0)
        client_ctx.destroy(linger=0)


def test_malformed_zap_requests_are_answered_safely(server: Server, keys: Path,
                                                    context: zmq.Context[Any]) -> None:
    fake: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    fake.setsockopt(zmq.LINGER, 0)
    fake.connect(ZAP_ENDPOINT)
    key = zmq.utils.z85.decode(Membership(keys).public_key("n2"))
    domain = ZAP_DOMAIN.encode()
    requests: list[tuple[list[bytes], bytes | None]] = [  # (frames, status expected or None)
        ([b"no delimiter"], None),
        ([b""], None),
        ([b"", b"1.0", b"r1"], b"500"),
        ([b"", b"2.0", b"r2", domain, b"1.2.3.4", b"", b"CURVE", key], b"500"),
        ([b"", b"1.0", b"r3", domain, b"1.2.3.4", b"", b"NULL"], b"400"),
        ([b"", b"1.0", b"r4", b"other", b"1.2.3.4", b"", b"CURVE", key], b"400"),
        ([b"", b"1.0", b"r5", domain, b"1.2.3.4", b"", b"CURVE", b"short"], b"500"),
        ([b"", b"1.0", b"r6", domain, b"1.2.3.4", b"", b"CURVE", key, key], b"500"),
        ([b"", b"1.0", b"r7", domain, b"1.2.3.4", b"", b"CURVE", key], b"200"),
    ]
    for i, (frames, expected) in enumerate(requests, start=1):
        fake.send_multipart(frames)
        # the condition runs inside this iteration only, so binding `i` late is what we want
        assert server.pump(lambda: sum(server.zap.counters.values()) == i, WAIT_S)  # noqa: B023
        if expected is None:
            assert fake.poll(int(QUIET_S * 1000)) == 0  # dropped: nothing to answer to
            continue
        assert fake.poll(int(WAIT_S * 1000)), f"no reply to {frames!r}"
        reply = fake.recv_multipart()
        assert reply[:4] == [b"", b"1.0", frames[2], expected]
        assert reply[5] == (b"n2" if expected == b"200" else b"")
    assert server.zap.counters == {"accepted": 1, "refused": 2, "malformed": 6}
    fake.close(linger=0)
    # and the handler still serves real clients
    client_ctx: zmq.Context[Any] = zmq.Context()
    try:
        n3 = _client(client_ctx, Membership(keys), "n3", server.endpoint)
        n3.send(b"still fine")
        assert server.pump(lambda: len(server.received) == 1, WAIT_S)
        assert server.received == [(b"still fine", "n3")]
    finally:
        client_ctx.destroy(linger=0)


# ---------------------------------------------------------------------------- refusing to start


def test_zap_handler_refuses_when_the_endpoint_is_taken(context: zmq.Context[Any],
                                                        keys: Path) -> None:
    squatter: zmq.Socket[bytes] = context.socket(zmq.REP)
    squatter.setsockopt(zmq.LINGER, 0)
    squatter.bind(ZAP_ENDPOINT)
    try:
        with pytest.raises(SecurityError, match="CURVE without ZAP accepts anyone"):
            ZapHandler(context, Membership(keys))
    finally:
        squatter.close(linger=0)


def test_secure_server_refuses_a_context_without_zap(context: zmq.Context[Any],
                                                     keys: Path) -> None:
    router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    try:
        with pytest.raises(SecurityError, match="no ZAP authenticator"):
            secure_server(router, Membership(keys), "n1")
        assert router.getsockopt(zmq.CURVE_SERVER) == 0  # left unsecured, so unusable as one
    finally:
        router.close(linger=0)
    with ZapHandler(context, Membership(keys)):  # the probe did not leave the endpoint taken
        pass


def test_authenticated_name_is_none_without_curve(context: zmq.Context[Any]) -> None:
    router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
    dealer: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    for s in (router, dealer):
        s.setsockopt(zmq.LINGER, 0)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"plain")
        assert router.poll(int(WAIT_S * 1000))
        frames = router.recv_multipart(copy=False)
        assert frames[-1].bytes == b"plain"
        assert authenticated_name(frames[-1]) is None  # a claim nobody vouched for
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
