"""Keys for zgrid: key files, the membership list, and a ZAP handler run by the node's loop.

What it is for:
- `keygen` writes a member's keys in pyzmq's certificate format (NAME.key public,
  NAME.key_secret 0600, never readable by anyone else, not even for an instant): a CurveZMQ
  keypair (who is on a connection) and, in the `metadata` section, an Ed25519 signing keypair
  (who wrote an advert) and the member's role (`operator`: may change every node that lists it).
- `Membership` is a keys directory read as the grid's membership list: every `*.key` in it is a
  member allowed in, named by the file stem. `reload()` re-reads it (SIGHUP revocation).
- `ZapHandler` answers ZAP requests (RFC 27) on `inproc://zeromq.zap.01` of the node's own
  context. It has no thread: the node polls `handler.socket` with its other sockets and calls
  `handler.handle()` when it is readable. A CURVE client whose public key is a member's is
  accepted with User-Id = the member's name; anyone else is refused.
- `secure_server` / `secure_client` set the CURVE options of a socket; `authenticated_name`
  reads the User-Id the ZAP handler gave to the connection a frame arrived on.

What it must never do: accept a client it cannot identify (CURVE without ZAP accepts anyone,
so `ZapHandler` refuses to exist without its endpoint and `secure_server` refuses a context with
no ZAP handler); trust a routing id or a claimed name; start threads; block the node's loop
(every socket call here is non-blocking); leave a secret key readable by others.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq
from zmq.utils import z85

from zgrid.errors import SecurityError
from zgrid.signing import SIGNING_KEY_BYTES, new_keypair, public_of
from zgrid.wire import check_node_id

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27: libzmq connects here, per context
ZAP_VERSION = b"1.0"
ZAP_DOMAIN = "zgrid"  # set on our CURVE servers; a request for any other domain is refused
ZAP_STATUS_OK = b"200"
ZAP_STATUS_DENIED = b"400"
ZAP_STATUS_INTERNAL = b"500"
ZAP_REQUEST_MIN_FRAMES = 6  # version, request id, domain, address, identity, mechanism
CURVE_KEY_BYTES = 32
PUBLIC_KEY_SUFFIX = ".key"
SECRET_KEY_SUFFIX = ".key_secret"
SECRET_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
KEYS_DIR_MODE = 0o700
SECRET_MODE_FORBIDDEN_BITS = 0o077  # any access by group or others, like ssh refuses
MAX_KEY_FILE_BYTES = 64 * 1024  # a certificate is ~300 bytes; never read a huge file whole
# Metadata names: none starts with "public-key" or "secret-key", which pyzmq's reader matches.
SIGN_PUBLIC_FIELD = b"sign-public-key"
SIGN_SECRET_FIELD = b"sign-secret-key"
ROLE_FIELD = b"role"
OPERATOR_ROLE = b"operator"

_Z85_RE = re.compile(rb"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")

_PUBLIC_BANNER = """#   ****  Generated on {now} by zgrid  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange. Copy it into the keys directory of every
#   member that must accept {name}.

"""
_SECRET_BANNER = """#   ****  Generated on {now} by zgrid  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""


# ---------------------------------------------------------------------------- key files


def _check_name(name: str) -> str:
    return str(check_node_id(name, lambda why: SecurityError(f"key name {why}")))


def _certificate_text(banner: str, metadata: dict[bytes, bytes], public: bytes,
                      secret: bytes | None) -> bytes:
    # The layout of pyzmq's zmq.auth.certs._write_key_file (and czmq's zcert), so that
    # zmq.auth.load_certificate and other ZeroMQ tools read our files.
    lines = [banner, "metadata\n"]
    lines += [f'    {k.decode("ascii")} = "{v.decode("ascii")}"\n' for k, v in metadata.items()]
    lines += ["curve\n", f'    public-key = "{public.decode("ascii")}"\n']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"\n')
    return "".join(lines).encode("ascii")


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite (and no race with another keygen); the mode is given at creation,
    # so a secret file is 0600 from its first instant, whatever happens next.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.fchmod(fd, mode)  # creation mode is masked by the umask; make it exact
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def keygen(directory: Path, name: str, operator: bool = False) -> tuple[Path, Path]:
    """Write new keys DIRECTORY/NAME.key (public) and DIRECTORY/NAME.key_secret (0600).

    Both hold the CURVE and the signing public keys (and, with `operator`, the operator role);
    the secret file also holds both secrets. Returns (public path, secret path). Creates
    DIRECTORY (0700) if missing. Raises SecurityError if NAME is not a valid node id or either
    file exists already.
    """
    _check_name(name)
    directory = Path(directory)
    public_path = directory / f"{name}{PUBLIC_KEY_SUFFIX}"
    secret_path = directory / f"{name}{SECRET_KEY_SUFFIX}"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=KEYS_DIR_MODE)
    except OSError as e:
        raise SecurityError(f"cannot create keys directory {directory}: {e.strerror}") from e
    for path in (public_path, secret_path):
        if path.exists() or path.is_symlink():
            raise SecurityError(f"{path} exists already: keygen never overwrites a key; remove "
                                "both files first if you really mean to replace this member's "
                                "keys (every other member must then get the new .key)")
    public, secret = zmq.curve_keypair()
    sign_public, sign_secret = new_keypair()
    shared = {SIGN_PUBLIC_FIELD: z85.encode(sign_public)}
    if operator:
        shared[ROLE_FIELD] = OPERATOR_ROLE
    now = datetime.datetime.now().isoformat(timespec="seconds")
    try:
        _write_new_file(secret_path, _certificate_text(
            _SECRET_BANNER.format(now=now), {**shared, SIGN_SECRET_FIELD: z85.encode(sign_secret)},
            public, secret), SECRET_FILE_MODE)
    except OSError as e:
        raise SecurityError(f"cannot write {secret_path}: {e.strerror}") from e
    try:
        _write_new_file(public_path, _certificate_text(
            _PUBLIC_BANNER.format(now=now, name=name), shared, public, None), PUBLIC_FILE_MODE)
    except OSError as e:
        secret_path.unlink(missing_ok=True)  # ours: created above; a lone secret is useless
        raise SecurityError(f"cannot write {public_path}: {e.strerror}") from e
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return public_path, secret_path


def _parse_certificate(data: bytes) -> dict[bytes, bytes]:
    # Same reading rules as zmq.auth.load_certificate (`name = "value"` lines, the last one
    # wins), on bytes we already read and checked; the section a line is in does not matter.
    fields: dict[bytes, bytes] = {}
    for raw in data.splitlines():
        line = raw.strip()
        if line.startswith(b"#") or b"=" not in line:
            continue
        name, value = line.split(b"=", 1)
        fields[name.strip()] = value.strip(b" \t'\"")
    return fields


def _valid_z85_key(key: bytes | None) -> bool:
    return key is not None and _Z85_RE.fullmatch(key) is not None


def _signing_key(fields: dict[bytes, bytes], name: bytes) -> bytes | None:
    """A 32-byte Ed25519 key from its z85 field, or None if absent or malformed."""
    text = fields.get(name)
    if not _valid_z85_key(text):
        return None
    assert text is not None  # for mypy: checked by _valid_z85_key
    key = z85.decode(text)
    return key if len(key) == SIGNING_KEY_BYTES else None


def _read_key_file(path: Path, *, secret: bool) -> bytes:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)  # fstat of what we opened: no race between the check and the read
        if not stat.S_ISREG(info.st_mode):
            raise SecurityError(f"{path} is not a regular file")
        if secret and info.st_mode & SECRET_MODE_FORBIDDEN_BITS:
            raise SecurityError(
                f"{path} is accessible by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): run `chmod 600 {path}`; if others may have "
                "read it, generate new keys")
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise SecurityError(f"{path} is {info.st_size} bytes: not a key file")
        return os.read(fd, MAX_KEY_FILE_BYTES)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- membership


@dataclass(frozen=True, slots=True)
class MemberKeys:
    """What a member's public .key file says: its CURVE key (z85), its Ed25519 signing key
    (None in a file written before zgrid signed adverts: such a member's adverts are dropped)
    and whether it is an operator."""

    curve: bytes
    signing: bytes | None
    operator: bool


class Membership:
    """A keys directory as the grid's membership list: member name -> its public keys.

    Files that cannot be used (bad name, no valid public key) are skipped and described in
    `problems`, so the node can log them; they never make anyone a member.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.problems: list[str] = []
        self._members: dict[str, MemberKeys] = {}
        self._names: dict[bytes, str] = {}
        self.reload()

    def reload(self) -> set[str]:
        """Re-read the directory; returns the names that are no longer members.

        On SecurityError (directory unreadable, two members with one key) the membership is
        left as it was, so a botched edit during SIGHUP does not open or close the grid.
        """
        members, problems = self._scan()
        names: dict[bytes, str] = {}
        for name, keys in sorted(members.items()):
            if keys.curve in names:
                raise SecurityError(
                    f"{self.directory / (names[keys.curve] + PUBLIC_KEY_SUFFIX)} and "
                    f"{self.directory / (name + PUBLIC_KEY_SUFFIX)} hold the same public key: "
                    "a key must name one member; remove one of them")
            names[keys.curve] = name
        removed = set(self._members) - set(members)
        self._members, self._names, self.problems = members, names, problems
        return removed

    def _scan(self) -> tuple[dict[str, MemberKeys], list[str]]:
        if not self.directory.is_dir():
            raise SecurityError(f"keys directory {self.directory} does not exist: create it "
                                "with `zgrid-ctl keygen --dir DIR NAME` and copy the members' "
                                ".key files there")
        try:
            paths = sorted(self.directory.glob(f"*{PUBLIC_KEY_SUFFIX}"))
        except OSError as e:
            raise SecurityError(f"cannot read keys directory {self.directory}: {e}") from e
        members: dict[str, MemberKeys] = {}
        problems: list[str] = []
        for path in paths:
            name = path.name[: -len(PUBLIC_KEY_SUFFIX)]
            try:
                _check_name(name)
                fields = _parse_certificate(_read_key_file(path, secret=False))
            except SecurityError as e:
                problems.append(f"skipped {path}: {e.message}")
                continue
            except OSError as e:
                problems.append(f"skipped {path}: {e.strerror}")
                continue
            public = fields.get(b"public-key")
            if not _valid_z85_key(public):
                problems.append(f"skipped {path}: no valid public-key (40 Z85 characters)")
                continue
            if b"secret-key" in fields or SIGN_SECRET_FIELD in fields:
                problems.append(f"{path} contains a secret key: a .key file is shared with every "
                                "member, so that secret is exposed; generate new keys")
            signing = _signing_key(fields, SIGN_PUBLIC_FIELD)
            if signing is None:
                problems.append(f"{path} has no valid {SIGN_PUBLIC_FIELD.decode()}: {name}'s "
                                "adverts cannot be verified and are dropped; generate its keys "
                                "again with this version's `zgrid-ctl keygen`")
            assert public is not None  # for mypy: checked by _valid_z85_key
            members[name] = MemberKeys(public, signing, fields.get(ROLE_FIELD) == OPERATOR_ROLE)
        return members, problems

    def names(self) -> frozenset[str]:
        return frozenset(self._members)

    def operators(self) -> frozenset[str]:
        """The members whose .key file gives them the operator role."""
        return frozenset(name for name, keys in self._members.items() if keys.operator)

    def signing_keys(self) -> dict[str, bytes]:
        """Member name -> raw Ed25519 public key, for every member that has one."""
        return {name: keys.signing for name, keys in self._members.items()
                if keys.signing is not None}

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def name_of(self, public_key: bytes) -> str | None:
        """The member whose z85 public key this is, or None."""
        return self._names.get(public_key)

    def public_key(self, name: str) -> bytes:
        """The z85 public key of member NAME; SecurityError if it has none in the directory."""
        keys = self._members.get(name)
        if keys is None:
            raise SecurityError(f"no key for sibling {name} in {self.directory}: copy {name}.key "
                                "there")
        return keys.curve

    def _own_fields(self, name: str) -> tuple[Path, dict[bytes, bytes]]:
        _check_name(name)
        path = self.directory / f"{name}{SECRET_KEY_SUFFIX}"
        try:
            data = _read_key_file(path, secret=True)
        except FileNotFoundError:
            raise SecurityError(f"no secret key for {name}: {path} is missing; create it with "
                                f"`zgrid-ctl keygen --dir {self.directory} {name}`") from None
        except OSError as e:
            raise SecurityError(f"cannot read {path}: {e.strerror}") from e
        return path, _parse_certificate(data)

    def load_own(self, name: str) -> tuple[bytes, bytes]:
        """(public, secret) z85 CURVE keys of NAME from DIR/NAME.key_secret, checked for safety."""
        path, fields = self._own_fields(name)
        public, secret = fields.get(b"public-key"), fields.get(b"secret-key")
        if not (_valid_z85_key(public) and _valid_z85_key(secret)):
            raise SecurityError(f"{path} holds no valid public-key and secret-key pair: "
                                "regenerate it with zgrid-ctl keygen")
        assert public is not None and secret is not None  # for mypy: checked just above
        if zmq.curve_public(secret) != public:
            raise SecurityError(f"{path}: its public-key does not belong to its secret-key; "
                                "the file was edited or damaged: regenerate it")
        listed = self._members.get(name)
        if listed is not None and listed.curve != public:
            raise SecurityError(f"{self.directory / (name + PUBLIC_KEY_SUFFIX)} does not match "
                                f"{path}: copy the .key generated with this secret there (and "
                                "to every other member)")
        return public, secret

    def load_own_signing(self, name: str) -> bytes:
        """NAME's 32-byte Ed25519 secret seed from DIR/NAME.key_secret, checked against the
        signing key its .key file gives every other member."""
        path, fields = self._own_fields(name)
        seed = _signing_key(fields, SIGN_SECRET_FIELD)
        if seed is None:
            raise SecurityError(f"{path} holds no {SIGN_SECRET_FIELD.decode()} (written before "
                                "zgrid signed adverts?): generate this member's keys again with "
                                "`zgrid-ctl keygen` and give every member the new .key")
        listed = self._members.get(name)
        if listed is not None and listed.signing != public_of(seed):
            raise SecurityError(f"the {SIGN_PUBLIC_FIELD.decode()} of "
                                f"{self.directory / (name + PUBLIC_KEY_SUFFIX)} does not belong "
                                f"to the signing secret in {path}: copy the matching .key there")
        return seed


# ---------------------------------------------------------------------------- ZAP


class ZapHandler:
    """The ZAP authenticator of one context, driven by the node's own poll loop (no thread).

    Create it before any CURVE server socket of `context` binds, register `socket` with the
    poller (POLLIN), and call `handle()` each time it is readable. Close it after the sockets
    it authenticates.
    """

    def __init__(self, context: zmq.Context[Any], membership: Membership,
                 domain: str = ZAP_DOMAIN) -> None:
        self.membership = membership
        self.domain = domain.encode()
        self.counters: dict[str, int] = {"accepted": 0, "refused": 0, "malformed": 0}
        # ROUTER, not REP: a malformed request can simply be dropped without wedging a REP
        # state machine, and replies never block.
        sock: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            why = ("another ZAP handler is already bound on this context"
                   if e.errno == errno.EADDRINUSE else e.strerror)
            raise SecurityError(f"cannot install the ZAP authenticator on {ZAP_ENDPOINT}: {why}. "
                                "Refusing to start with --keys: CURVE without ZAP accepts "
                                "anyone") from e
        self.socket = sock

    def close(self) -> None:
        if not self.socket.closed:
            with contextlib.suppress(zmq.ZMQError):
                self.socket.unbind(ZAP_ENDPOINT)  # at once: close() frees inproc names later
            self.socket.close(linger=0)

    def __enter__(self) -> ZapHandler:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def handle(self) -> str | None:
        """Answer one pending ZAP request, if any.

        Returns None if nothing was pending or the client was accepted; otherwise a short
        description of the refusal, the same text for every attempt with the same key from
        the same address, so the node can log it once.
        """
        try:
            frames = self.socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        # [peer routing id, empty delimiter, request...]: libzmq's ZAP client speaks like REQ.
        if len(frames) < 2 or frames[1] != b"":
            self.counters["malformed"] += 1
            return "malformed ZAP request (no envelope): dropped"
        envelope, request = frames[:2], frames[2:]
        status, text, user_id, refusal = self._decide(request)
        if len(request) >= 2:
            self._reply(envelope, request[1], status, text, user_id)
        return refusal

    def _decide(self, request: list[bytes]) -> tuple[bytes, bytes, bytes, str | None]:
        if len(request) < ZAP_REQUEST_MIN_FRAMES:
            self.counters["malformed"] += 1
            return (ZAP_STATUS_INTERNAL, b"Not enough frames", b"",
                    f"malformed ZAP request ({len(request)} frames)")
        version, _request_id, domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        peer = address.decode("ascii", "replace")[:64]
        if version != ZAP_VERSION:
            self.counters["malformed"] += 1
            return (ZAP_STATUS_INTERNAL, b"Invalid version", b"",
                    f"malformed ZAP request (version {version[:16]!r})")
        if mechanism != b"CURVE":
            self.counters["refused"] += 1
            return (ZAP_STATUS_DENIED, b"CURVE required", b"",
                    f"refused a {mechanism[:16].decode('ascii', 'replace')} client from {peer}: "
                    "only CURVE members are accepted")
        if domain != self.domain:
            self.counters["refused"] += 1
            return (ZAP_STATUS_DENIED, b"Unknown domain", b"",
                    f"refused a client from {peer}: ZAP domain {domain[:32]!r} is not "
                    f"{self.domain!r}")
        if len(credentials) != 1 or len(credentials[0]) != CURVE_KEY_BYTES:
            self.counters["malformed"] += 1
            return (ZAP_STATUS_INTERNAL, b"Bad CURVE credentials", b"",
                    "malformed ZAP request (CURVE credentials are not one 32-byte key)")
        key = z85.encode(credentials[0])
        name = self.membership.name_of(key)
        if name is None:
            self.counters["refused"] += 1
            return (ZAP_STATUS_DENIED, b"Not a member", b"",
                    f"refused CURVE client {key.decode('ascii')} from {peer}: its public key is "
                    f"not a *.key in {self.membership.directory}")
        self.counters["accepted"] += 1
        return ZAP_STATUS_OK, b"OK", name.encode(), None

    def _reply(self, envelope: list[bytes], request_id: bytes, status: bytes, text: bytes,
               user_id: bytes) -> None:
        reply = [*envelope, ZAP_VERSION, request_id, status, text, user_id, b""]
        # The requesting session may be gone already: that is its loss, never a reason to block.
        with contextlib.suppress(zmq.ZMQError):
            self.socket.send_multipart(reply, zmq.NOBLOCK)


# ---------------------------------------------------------------------------- sockets


def _require_zap_handler(context: zmq.Context[Any]) -> None:
    # The only reliable test that *some* handler is bound on this context: try to bind the
    # endpoint ourselves. If that works, nobody would authenticate the clients.
    probe: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
    probe.setsockopt(zmq.LINGER, 0)
    try:
        probe.bind(ZAP_ENDPOINT)
    except zmq.ZMQError as e:
        probe.close(linger=0)
        if e.errno == errno.EADDRINUSE:
            return
        raise SecurityError(f"cannot check for a ZAP authenticator: {e.strerror}") from e
    # Unbind explicitly: close() frees an inproc endpoint only later, in libzmq's reaper, and
    # a ZapHandler created right after this refusal must be able to bind.
    with contextlib.suppress(zmq.ZMQError):
        probe.unbind(ZAP_ENDPOINT)
    probe.close(linger=0)
    raise SecurityError("no ZAP authenticator is bound on this socket's context: create a "
                        "ZapHandler on it before binding a CURVE server (CURVE without ZAP "
                        "accepts anyone)")


def secure_server(sock: zmq.Socket[Any], membership: Membership, own_name: str) -> None:
    """Make `sock` (not yet bound) a CURVE server with our keys, authenticated by ZAP.

    Raises SecurityError if our secret key is unusable or no ZAP handler is bound on the
    socket's context.
    """
    public, secret = membership.load_own(own_name)
    _require_zap_handler(sock.context)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())


def secure_client(sock: zmq.Socket[Any], membership: Membership, own_name: str,
                  server_name: str) -> None:
    """Make `sock` (not yet connected) a CURVE client of member `server_name`.

    The handshake fails unless the server holds `server_name`'s secret key, so the client also
    authenticates the server. Raises SecurityError if a key is missing or unusable.
    """
    server_key = membership.public_key(server_name)
    public, secret = membership.load_own(own_name)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


def authenticated_name(frame: zmq.Frame) -> str | None:
    """The member name ZAP gave the connection `frame` came in on (recv with copy=False).

    None when the connection was not authenticated (no CURVE, no ZAP user id). Read it from a
    payload frame: a frame the ROUTER made up itself (the routing id) may carry no metadata.
    """
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None  # libzmq: no such property on this message
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None

