"""The exception classes of zgrid.

Every error zgrid raises on purpose derives from `ZgridError`, so a program embedding zgrid can
catch them all in one place. Each carries a short machine-readable `code` (it travels on the wire
in control replies) and a message written for the person who has to act on it.
"""

from __future__ import annotations


class ZgridError(Exception):
    """Base class of every error zgrid raises on purpose."""

    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ProtocolError(ZgridError):
    """Bad input from the network: undecodable, malformed, out of range or of an unknown kind.

    Never escapes the node's loop: a sibling's bad frame is dropped and counted, a control
    client's bad frame is answered with an error reply.
    """

    code = "bad_request"

    def __init__(self, message: str, code: str | None = None,
                 message_type: str | None = None, rid: int | None = None) -> None:
        super().__init__(message, code)
        # The `t` the frame claimed, once decoding got that far: it tells a sibling's bad
        # frame (dropped and counted) from a control client's (answered with this error).
        self.message_type = message_type
        # The frame's `rid`, if it had a valid one: the error reply echoes it, so that a client
        # matching replies by rid gets its answer.
        self.rid = rid


class ControlError(ZgridError):
    """A control request the node refuses (bad value, unknown sibling ...); nothing was changed."""

    code = "refused"


class NoReply(ZgridError):
    """A control client got no reply within its timeout: the node is down, frozen or unreachable."""

    code = "no_reply"


class StoreError(ZgridError):
    """The node's data directory cannot be used (locked by another node, unreadable, corrupt)."""

    code = "store"


class StorageFailure(StoreError):
    """The storage under the data dir refuses the node's writes (or reads) right now: the disk
    is full, the filesystem is read-only, the files are not writable, an I/O error.

    Not corruption: what is already on disk is intact, so the fix is to the storage (free
    space, fix permissions, remount), never to move the state aside. A running node keeps
    serving its last saved state and refuses changes until a save works again.
    """

    code = "storage_failing"

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause  # a few words for a status line: "disk full", "read-only" ...


class SecurityError(ZgridError):
    """Keys are missing or unusable, or no authenticator could be installed."""

    code = "security"
