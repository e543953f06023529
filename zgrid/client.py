"""The control client: how a program (or zgrid-ctl) talks to one node.

Request/reply over a DEALER connected to the node's ROUTER; every request carries a request
id (`rid`) and a reply is matched to it, so a late reply to an earlier, timed-out request is
never mistaken for the answer to a new one. This module must never print or exit: it returns
values and raises `ControlError` (the node refused) or `NoReply` (no answer in time).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq

from zgrid.errors import ControlError, NoReply, ProtocolError
from zgrid.wire import (
    ControlRequest,
    FlexRequest,
    GraphRequest,
    LinkRequest,
    NodesRequest,
    Reply,
    SetRequest,
    StatusRequest,
    UnlinkRequest,
    ViewUpdate,
    WatchRequest,
    decode,
    encode,
    parse_sibling_address,
)

DEFAULT_TIMEOUT_S = 2.0
WATCH_RENEW_S = 1.5  # well inside the node's 5 s watch lease


class Client:
    """A connection to one node's control interface. Not thread-safe; cheap to create."""

    def __init__(self, node: str, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                 keys_dir: Path | None = None, as_name: str = "operator",
                 context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.expected_id, self.endpoint = parse_sibling_address(
            node, lambda why: ControlError(f"--node {why}", "usage"))
        self.timeout_s = timeout_s
        self.keys_dir = keys_dir
        self.as_name = as_name
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._rids = itertools.count(1)
        self._socket: zmq.Socket[bytes] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._reset()
        if self._own_context:
            self._ctx.term()

    # ------------------------------------------------------------------------ requests

    def status(self) -> dict[str, Any]:
        return self.request(StatusRequest())

    def set(self, production: float | None = None, consumption: float | None = None
            ) -> dict[str, Any]:
        return self.request(SetRequest(production, consumption))

    def flex(self, flex_up_kw: float | None = None, price_up: float | None = None,
             flex_down_kw: float | None = None, price_down: float | None = None
             ) -> dict[str, Any]:
        """Change the node's plain offer; None keeps a field as it is."""
        return self.request(FlexRequest(flex_up_kw, price_up, flex_down_kw, price_down))

    def link(self, address: str) -> dict[str, Any]:
        return self.request(LinkRequest(address))

    def unlink(self, sibling: str) -> dict[str, Any]:
        return self.request(UnlinkRequest(sibling))

    def nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self.request(NodesRequest())["nodes"]
        return nodes

    def graph(self) -> dict[str, Any]:
        """Every known node with its island, every link with its state (protocol.md `graph`)."""
        return self.request(GraphRequest())

    def request(self, req: ControlRequest) -> dict[str, Any]:
        """Send one request, wait for its reply; the reply body on success."""
        rid = next(self._rids)
        sock = self._connected()
        sock.send(encode(_with_rid(req, rid)))
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._receive(deadline)
            if isinstance(reply, Reply) and reply.rid in (rid, None):
                if not reply.ok:
                    raise ControlError(reply.message, reply.code)
                return dict(reply.body)
            # a late reply to an earlier request, or a watch update: not ours

    def watch(self) -> Iterator[dict[str, Any]]:
        """The node's view now, then each time it changes; raises NoReply if the node goes."""
        last_key: object = None
        renew_at = 0.0
        pending: int | None = None
        reply_deadline = float("inf")
        while True:
            now = time.monotonic()
            if now >= renew_at and pending is None:
                pending = next(self._rids)
                self._connected().send(encode(WatchRequest(pending)))
                renew_at, reply_deadline = now + WATCH_RENEW_S, now + self.timeout_s
            msg = self._receive(min(renew_at, reply_deadline), allow_timeout=True)
            if msg is None:
                if pending is not None and time.monotonic() >= reply_deadline:
                    raise NoReply(f"{self.endpoint} stopped answering while watching")
                continue
            if isinstance(msg, Reply):
                if msg.rid != pending:
                    continue
                if not msg.ok:
                    raise ControlError(msg.message, msg.code)
                pending, reply_deadline = None, float("inf")
                view = dict(msg.body)
            else:
                view = {**msg.view, "ts": msg.ts}
            # Balancing counts as a change too: the activations follow the totals a flood later.
            key = (view.get("total_net"), view.get("island_size"), tuple(view.get("island", ())),
                   view.get("balanced_net_kw"), view.get("activation_kw"))
            if key != last_key:
                last_key = key
                yield view

    # ------------------------------------------------------------------------ plumbing

    def _connected(self) -> zmq.Socket[bytes]:
        if self._socket is None:
            sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.keys_dir is not None:
                from zgrid.security import Membership, secure_client

                if self.expected_id is None:
                    sock.close()
                    raise ControlError(
                        f"with --keys, name the node as ID@{self.endpoint} so its key can be "
                        "checked", "usage")
                secure_client(sock, Membership(self.keys_dir), self.as_name, self.expected_id)
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            # LINGER 0: a request that got no answer must not reach the node later, when it
            # comes back, and change something after we told the user it failed.
            self._socket.close(linger=0)
            self._socket = None

    def _receive(self, deadline: float, allow_timeout: bool = False
                 ) -> Reply | ViewUpdate | None:
        sock = self._connected()
        while True:
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not sock.poll(remaining_ms, zmq.POLLIN):
                if allow_timeout:
                    return None
                self._reset()
                raise NoReply(f"no reply from {self.endpoint} within {self.timeout_s:g}s "
                              "(is the node running, is this its endpoint, does it need --keys?)")
            try:
                msg = decode(sock.recv())
            except ProtocolError:
                continue  # not something a node sends; ignore rather than fail the request
            if isinstance(msg, Reply | ViewUpdate):
                if self.expected_id and isinstance(msg, Reply) and msg.ok and (
                        msg.body.get("id") not in (None, self.expected_id)):
                    raise ControlError(f"{self.endpoint} is node {msg.body['id']}, not "
                                       f"{self.expected_id}", "wrong_node")
                return msg


def _with_rid(req: ControlRequest, rid: int) -> ControlRequest:
    return replace(req, rid=rid)
