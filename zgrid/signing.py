"""Ed25519 signatures on adverts: the origin signs every advert it writes, every receiver checks.

What it is for: `AdvertSeal` is the core's `Seal` with keys. It signs our own adverts with our
Ed25519 secret, and its `Keyring` verifies everyone else's against the signing key of the
member named as their origin, over `Advert.signed_bytes()` (docs/protocol.md, "Signed
adverts"). `new_keypair`
and `public_of` serve the key files (zgrid/security.py writes and reads them).

What it must never do: implement any cryptography itself (PyNaCl, i.e. libsodium, does all of
it); accept an advert whose origin has no key (no key, no advert); raise on a bad signature (a
forged advert is an ordinary event: the answer is False); do I/O (the core calls it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from zgrid.wire import SIGNATURE_BYTES, Advert

SIGNING_KEY_BYTES = 32  # an Ed25519 public key, and the seed a secret key is made from


def new_keypair() -> tuple[bytes, bytes]:
    """(public key, secret seed), 32 bytes each, from the OS's random source."""
    secret = SigningKey.generate()
    return bytes(secret.verify_key), bytes(secret)


def public_of(seed: bytes) -> bytes:
    """The public key that belongs to a secret seed."""
    return bytes(SigningKey(seed).verify_key)


class Keyring:
    """The members' public signing keys (id -> 32 bytes), ready to verify with. One keyring
    can serve many seals: the simulator runs thousands of nodes on one."""

    __slots__ = ("_keys",)

    def __init__(self, members: Mapping[str, bytes]) -> None:
        self._keys = {name: VerifyKey(key) for name, key in members.items()}

    def verify(self, advert: Advert) -> bool:
        """Whether `advert` is signed by the member named as its origin."""
        key = self._keys.get(advert.origin)
        if key is None or len(advert.signature) != SIGNATURE_BYTES:
            return False
        try:
            key.verify(advert.signed_bytes(), advert.signature)
        except BadSignatureError:
            return False
        return True


class AdvertSeal:
    """The core's `Seal` with keys: signs as `own` (a 32-byte seed), verifies with `keyring`."""

    __slots__ = ("_own", "verify")

    def __init__(self, own: bytes, keyring: Keyring) -> None:
        self._own = SigningKey(own)
        self.verify = keyring.verify

    def sign(self, advert: Advert) -> Advert:
        signature = self._own.sign(advert.signed_bytes()).signature
        return replace(advert, signature=signature)
