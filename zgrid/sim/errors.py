"""The simulator's one exception: a scenario it cannot run.

What this file is for: `SimError`, raised by every module of zgrid/sim/ for bad arguments (a
topology that cannot be built, an unreadable file, a malformed fault or latency) and turned
into a usage error (exit status 2) by the command line. It lives apart so that the lowest
layers (network.py) can raise it without importing the engine.

What it must never do: grow into a home for unrelated helpers; a protocol error is
zgrid.errors.ProtocolError, never this.
"""

from __future__ import annotations


class SimError(ValueError):
    """A scenario the simulator cannot run (bad topology parameters, unreadable file ...)."""
