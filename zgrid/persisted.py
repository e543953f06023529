"""What a node keeps on disk: the one record shared by the core (which produces it) and the
store (which writes it).

It lives in its own module so that the store never imports the core and the core never
imports the store: the core is sans-IO, the store is nothing but I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from zgrid.wire import NO_FLEX, Flex


@dataclass(frozen=True, slots=True)
class PersistedState:
    """Enough for a node to come back as itself after a crash."""

    node_id: str
    incarnation: int
    production: float
    consumption: float
    siblings: tuple[str, ...]  # "ID@ENDPOINT" once the id is known, else "ENDPOINT"
    # Siblings the operator unlinked, as addressed in `siblings` (oldest first, bounded): their
    # HELLOs are answered with `bye unlinked` until the operator links them again.
    unlinked: tuple[str, ...] = ()
    flex: Flex = NO_FLEX  # the node's plain offer (Phase II), set by flags or `flex` requests
    # Siblings of `siblings` (as addressed there) an operator's `link` asked for that have not
    # said HELLO back yet. Their HELLOs say `linking` after a restart too: that is what undoes
    # an unlink the other side remembers, so without it an acknowledged link is refused.
    linking: tuple[str, ...] = ()
