"""The command-line entry points: zgrid-node, zgrid-ctl and zgrid-sim (click).

Parsing and printing only. Everything these commands do is a call into the library (Node,
Client, sim); no protocol logic lives here. Every failure a user can cause ends in a one-line
message and a documented exit code, never a traceback:

    0 ok   1 the node refused the request   2 usage error / cannot start   3 no reply in time

zgrid-ctl checks the values a user types before sending them (exit 1, in the user's words:
"production must be a number >= 0, got -3"), and with --json its errors are one JSON object
on stderr too. `play` reads, checks and schedules a profile with zgrid.player; this file only
sends its rows through zgrid.client.Client and prints what happened. On a terminal, `status`,
`nodes`, `watch`, `top` and `play`'s progress bar are drawn by zgrid.views (rich); piped, they
print the plain text that scripts read, unchanged.

zgrid-node: 0 stopped by a signal, 1 its state cannot be saved (disk full, read-only, I/O
error: the storage needs fixing), 2 usage error or cannot start.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from zgrid import __version__
from zgrid.client import DEFAULT_TIMEOUT_S, Client
from zgrid.errors import ControlError, NoReply, StorageFailure, ZgridError
from zgrid.player import Profile, Row, power_error
from zgrid.top import TOP_INTERVAL_S, TOP_JOIN_S, TOP_MIN_GAP_S
from zgrid.wire import MAX_ABS_PRICE

if TYPE_CHECKING:  # the device models load only for a node that has a device
    from rich.console import RenderableType  # rich loads only to print to a terminal

    from zgrid.devices import Device
    from zgrid.views import PlayBar

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_REPLY = 3
EXIT_STORAGE = 1  # zgrid-node: the state cannot be saved (the same code `Node.run` returns)
LINK_WAIT_S = 3.0  # how long `zgrid-ctl link` waits to see the new link come up
LINK_CHECK_S = 1.0  # how long `link ID@ENDPOINT` waits for ENDPOINT to say who it is
PLAY_LATE_NOTE_S = 0.1  # `play` says when a row went out this much after its time


_ERROR_CODES = {EXIT_REFUSED: "refused", EXIT_USAGE: "usage", EXIT_NO_REPLY: "no_reply"}


def _json_wanted() -> bool:
    """Whether the running zgrid-ctl was given --json (then its errors are JSON too)."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if isinstance(ctx.obj, _Ctl):
            return ctx.obj.json
        if ctx.parent is None:
            return bool(ctx.params.get("as_json"))
        ctx = ctx.parent
    return False


def _fail(message: str, code: int, error: str | None = None, **extra: Any) -> NoReturn:
    """One line on stderr and exit `code`: `error: MESSAGE`, or with --json a JSON object
    `{"error": MESSAGE, "code": ERROR_CODE, "exit": CODE, ...extra}`."""
    if _json_wanted():
        body = {"error": message, "code": error or _ERROR_CODES.get(code, "error"),
                "exit": code, **extra}
        click.echo(json.dumps(body, sort_keys=True), err=True)
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


# ================================================================================ zgrid-node


@click.command(name="zgrid-node", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zgrid-node")
@click.option("--id", "node_id", required=True, help="This node's id, unique in the grid.")
@click.option("--bind", required=True, metavar="ENDPOINT",
              help="Where to listen, e.g. tcp://127.0.0.1:5001.")
@click.option("--advertise", metavar="ENDPOINT",
              help="Endpoint other nodes dial (default: --bind).")
@click.option("--sibling", "siblings", multiple=True, metavar="[ID@]ENDPOINT",
              help="A sibling to link with (repeatable); it links back by itself.")
@click.option("--production", type=float, default=0.0, show_default=True,
              help="Initial production in kW (a node with saved state resumes its own).")
@click.option("--consumption", type=float, default=0.0, show_default=True,
              help="Initial consumption in kW (a node with saved state resumes its own).")
@click.option("--flex-up", type=float, default=0.0, show_default=True,
              help="kW this node can raise its net by on request (Phase II balancing).")
@click.option("--price-up", type=float, default=0.0, show_default=True,
              help="Its price per kWh for raising its net.")
@click.option("--flex-down", type=float, default=0.0, show_default=True,
              help="kW this node can lower its net by on request.")
@click.option("--price-down", type=float, default=0.0, show_default=True,
              help="Its price per kWh for lowering its net (negative: it pays to).")
@click.option("--device", "device_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A TOML device file (one [[battery]], [[plant]], [[pv]] or [[load]]): its "
                   "model makes this node's offers and follows its activation.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the node keeps its state [default: ./.zgrid/ID].")
# The defaults are core.PING_INTERVAL_S and DEAD_AFTER_S (a test keeps them equal): core is
# not imported here, so that zgrid-ctl starts without it.
@click.option("--ping-interval", type=click.FloatRange(min=0.01), default=1.0,
              show_default=True, help="Seconds between pings to each sibling.")
@click.option("--dead-after", type=click.FloatRange(min=0.05), default=3.0, show_default=True,
              help="Seconds of silence after which a sibling is DOWN (a sibling whose process "
                   "exits is DOWN at once: its connection closes).")
@click.option("--forget-after", type=click.FloatRange(min=1.0), default=600.0,
              show_default=True, help="Seconds after which unreachable nodes are forgotten.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path),
              help="CurveZMQ keys directory: the grid's membership list (see zgrid-ctl keygen).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Serve Prometheus metrics over HTTP on this port [default: off].")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, metavar="HOST",
              help="Address the metrics port binds (warns if not loopback).")
@click.option("--drop-rate", type=click.FloatRange(0.0, 1.0), default=0.0, hidden=True,
              help="Testing only: drop this fraction of outgoing adverts messages.")
@click.option("--crash-before-save", is_flag=True, hidden=True,
              help="Testing only: exit like kill -9 after flooding a change, before saving it.")
@click.option("--fail-saves-while", type=click.Path(dir_okay=False, path_type=Path),
              hidden=True, metavar="FILE",
              help="Testing only: while FILE exists, every save fails as on a full disk.")
def node_main(node_id: str, bind: str, advertise: str | None, siblings: tuple[str, ...],
              production: float, consumption: float, flex_up: float, price_up: float,
              flex_down: float, price_down: float, device_file: Path | None,
              data_dir: Path | None,
              ping_interval: float, dead_after: float, forget_after: float,
              keys_dir: Path | None, log_level: str, metrics_port: int | None,
              metrics_host: str, drop_rate: float,
              crash_before_save: bool, fail_saves_while: Path | None) -> None:
    """Run one zgrid node in the foreground until SIGINT or SIGTERM."""
    from zgrid.node import Node, NodeSettings
    from zgrid.wire import Flex, check_endpoint, check_node_id, check_power, check_price

    def usage(why: str) -> click.BadParameter:
        return click.BadParameter(why)

    check_node_id(node_id, lambda why: usage(f"--id {why}"))
    check_endpoint(bind, lambda why: usage(f"--bind {why}"))
    if advertise:
        check_endpoint(advertise, lambda why: usage(f"--advertise {why}"))
    elif "*" in bind or "0.0.0.0" in bind:
        raise usage("--bind on a wildcard address needs --advertise with a dialable endpoint")
    check_power(production, lambda why: usage(f"--production {why}"))
    check_power(consumption, lambda why: usage(f"--consumption {why}"))
    flex = Flex(check_power(flex_up, lambda why: usage(f"--flex-up {why}")),
                check_price(price_up, lambda why: usage(f"--price-up {why}")),
                check_power(flex_down, lambda why: usage(f"--flex-down {why}")),
                check_price(price_down, lambda why: usage(f"--price-down {why}")))
    device = None if device_file is None else _load_device(device_file)
    if device is not None and flex.offered:
        raise usage("--device makes the offers: leave out --flex-up and --flex-down")
    if device is not None:  # one source per value: the device's, not a flag as well
        from click.core import ParameterSource

        from zgrid.devices import base_values

        for name, value in base_values(device).items():
            if click.get_current_context().get_parameter_source(name) is not (
                    ParameterSource.DEFAULT):
                raise usage(f"--{name}: the {device.kind} in {device_file} gives this node's "
                            f"{name} ({value:g} kW): leave out --{name}, or change the file")
    if dead_after <= ping_interval:
        raise usage("--dead-after must be longer than --ping-interval")

    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr,
        format=f"%(asctime)s.%(msecs)03d %(levelname)-7s {node_id}: %(message)s",
        datefmt="%H:%M:%S")
    settings = NodeSettings(
        node_id=node_id, bind=bind, advertise=advertise, siblings=siblings,
        production=production, consumption=consumption, flex=flex, device=device,
        data_dir=data_dir,
        ping_interval_s=ping_interval, dead_after_s=dead_after, forget_after_s=forget_after,
        keys_dir=keys_dir, metrics_port=metrics_port, metrics_host=metrics_host,
        drop_rate=drop_rate, crash_before_save=crash_before_save,
        fail_saves_while=fail_saves_while)
    try:
        node = Node(settings)
    except StorageFailure as exc:
        _fail(exc.message, EXIT_STORAGE)
    except ZgridError as exc:
        _fail(exc.message, EXIT_USAGE)
    sys.exit(node.run())


def _load_device(path: Path) -> Device:
    import tomllib

    from zgrid.devices import load_devices

    try:
        with path.open("rb") as f:
            devices = load_devices(tomllib.load(f))
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise click.BadParameter(f"{path}: {exc}") from None
    if len(devices) != 1:
        raise click.BadParameter(f"{path} describes {len(devices)} devices: a node runs one "
                                 "(its advert carries one offer); give each device its node")
    return devices[0]


# ================================================================================ zgrid-ctl


class _Ctl:
    def __init__(self, node: str | None, as_json: bool, timeout: float, keys: Path | None,
                 as_name: str) -> None:
        self.node, self.json, self.timeout, self.keys, self.as_name = (
            node, as_json, timeout, keys, as_name)

    @contextmanager
    def client(self) -> Iterator[Client]:
        if not self.node:
            _fail("say which node: --node ENDPOINT or ZGRID_NODE=ENDPOINT", EXIT_USAGE)
        try:
            with Client(self.node, self.timeout, keys_dir=self.keys,
                        as_name=self.as_name) as client:
                yield client
        except NoReply as exc:
            _fail(exc.message, EXIT_NO_REPLY, exc.code)
        except ControlError as exc:
            _fail(exc.message, EXIT_USAGE if exc.code == "usage" else EXIT_REFUSED, exc.code)
        except ZgridError as exc:
            _fail(exc.message, EXIT_USAGE, exc.code)

    def connect(self, address: str | None = None, timeout: float | None = None) -> Client:
        """A client of `address` (default: --node) with this command's keys; the caller
        closes it and handles its errors."""
        node = address or self.node
        assert node is not None
        return Client(node, self.timeout if timeout is None else timeout, keys_dir=self.keys,
                      as_name=self.as_name)

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        if self.json:
            click.echo(json.dumps(data, sort_keys=True))
        else:
            human()


pass_ctl = click.make_pass_decorator(_Ctl)


class _CtlGroup(click.Group):
    """zgrid-ctl's group: with --json, a usage error of a command is JSON too."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if not (isinstance(ctx.obj, _Ctl) and ctx.obj.json) and not ctx.params.get(
                    "as_json"):
                raise
            _fail(exc.format_message(), EXIT_USAGE)


@click.group(name="zgrid-ctl", cls=_CtlGroup,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zgrid-ctl")
@click.option("--node", envvar="ZGRID_NODE", metavar="[ID@]ENDPOINT",
              help="The node to talk to (or env ZGRID_NODE).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--timeout", type=click.FloatRange(min=0.01), default=DEFAULT_TIMEOUT_S,
              show_default=True, help="Seconds to wait for a reply (then exit 3).")
@click.option("--keys", type=click.Path(file_okay=False, path_type=Path),
              help="CurveZMQ keys directory (see keygen).")
@click.option("--as", "as_name", default="operator", show_default=True,
              help="With --keys: whose secret key to use.")
@click.pass_context
def ctl_main(ctx: click.Context, node: str | None, as_json: bool, timeout: float,
             keys: Path | None, as_name: str) -> None:
    """Talk to one zgrid node."""
    ctx.obj = _Ctl(node, as_json, timeout, keys, as_name)


_BALANCING_KEYS = ("imbalance_kw", "balanced_net_kw", "clearing_price", "shortfall_kw",
                   "clearing_hash", "activation_kw")


def _net(x: float) -> str:
    """A signed kW figure to three decimals; a residual of 1e-15 kW shows as +0.000, not -0.000
    (an activation is applied as a double, so the balanced net is exact only to its rounding)."""
    return f"{round(x, 3) + 0.0:+.3f}"


def _kw(x: float) -> str:
    return f"{x:.3f} kW"


def _on_terminal(render: Callable[[], RenderableType]) -> bool:
    """Print `render()` (a zgrid.views renderable: tables, colours) if stdout is a terminal,
    and say whether it did. Piped, the caller prints its plain text, which scripts and tests
    read and which never changes (rich's FORCE_COLOR or TTY_COMPATIBLE=1 force the views)."""
    from zgrid import views

    console = views.terminal()
    if console is None:
        return False
    console.print(render())
    return True


@ctl_main.command()
@pass_ctl
def status(ctl: _Ctl) -> None:
    """The node's own values and its view of the grid."""
    with ctl.client() as client:
        s = client.status()

    def human() -> None:
        from zgrid import views

        if _on_terminal(lambda: views.status_view(s)):
            return
        click.echo(f"{s['id']}  {s['endpoint']}  (incarnation {s['incarnation']})")
        click.echo(f"  production {_kw(s['production'])}   consumption "
                   f"{_kw(s['consumption'])}   net {s['net']:+.3f} kW")
        if s.get("flex_up") or s.get("flex_down") or s.get("activation_kw"):
            click.echo(f"  flex up {_kw(s['flex_up'])} at {s['price_up']:g}   down "
                       f"{_kw(s['flex_down'])} at {s['price_down']:g}   activation "
                       f"{s['activation_kw']:+.3f} kW")
        if s.get("device"):
            device = s["device"]
            values = "  ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in device.items() if k != "kind")
            click.echo(f"  device {device['kind']}: {values}")
        click.echo(f"grid: island of {s['island_size']}: {' '.join(s['island'])}")
        click.echo(f"  total_net {s['total_net']:+.3f} kW   production "
                   f"{_kw(s['total_production'])}   consumption {_kw(s['total_consumption'])}")
        if "imbalance_kw" in s:  # an older node does not balance
            price = "none" if s["clearing_price"] is None else f"{s['clearing_price']:g}"
            short = (f"   SHORTFALL {_kw(s['shortfall_kw'])} ({s['shortfall']})"
                     if s["shortfall_kw"] else "")
            click.echo(f"  balancing: imbalance {_net(s['imbalance_kw'])} kW -> balanced net "
                       f"{_net(s['balanced_net_kw'])} kW   price {price}{short}")
        click.echo("siblings:" if s["siblings"] else "siblings: none")
        for sib in s["siblings"]:
            note = f"  ({sib['error']})" if sib["error"] else ""
            click.echo(f"  {sib['id'] or '?':<12} {sib['endpoint']:<24} {sib['state']}{note}")
        if s["conflict"]:
            click.echo(f"CONFLICT: {s['conflict']}")
        if s.get("storage", "ok") != "ok":  # an older node sends no "storage": it was fine
            click.echo(f"STORAGE {s['storage']}")

    ctl.emit(s, human)


def _check_values(**powers: float | None) -> None:
    """Refuse a bad power before asking the node, in the user's words (exit 1, nothing sent):
    the node would refuse it too, and says it in the protocol's."""
    for name, value in powers.items():
        problem = None if value is None else power_error(name, value)
        if problem is not None:
            _fail(problem, EXIT_REFUSED, "bad_value")


@ctl_main.command(name="set")
@click.option("--production", type=float, help="Production in kW.")
@click.option("--consumption", type=float, help="Consumption in kW.")
@pass_ctl
def set_(ctl: _Ctl, production: float | None, consumption: float | None) -> None:
    """Change this node's production and/or consumption."""
    if production is None and consumption is None:
        raise click.UsageError("give --production, --consumption or both")
    _check_values(production=production, consumption=consumption)
    with ctl.client() as client:
        r = client.set(production, consumption)
    ctl.emit(r, lambda: click.echo(
        f"production {_kw(r['production'])}  consumption {_kw(r['consumption'])}  "
        f"net {r['net']:+.3f} kW"))


@ctl_main.command()
@click.option("--up", "flex_up", type=float, help="kW the node can raise its net by.")
@click.option("--price-up", type=float, help="Price per kWh for raising it.")
@click.option("--down", "flex_down", type=float, help="kW the node can lower its net by.")
@click.option("--price-down", type=float, help="Price per kWh for lowering it.")
@pass_ctl
def flex(ctl: _Ctl, flex_up: float | None, price_up: float | None, flex_down: float | None,
         price_down: float | None) -> None:
    """Change this node's flexibility offer (Phase II balancing)."""
    if flex_up is None and price_up is None and flex_down is None and price_down is None:
        raise click.UsageError("give at least one of --up, --price-up, --down, --price-down")
    _check_values(flex_up=flex_up, flex_down=flex_down)
    for name, price in (("price_up", price_up), ("price_down", price_down)):
        if price is not None and not (math.isfinite(price) and abs(price) <= MAX_ABS_PRICE):
            _fail(f"{name} must be a price between -{MAX_ABS_PRICE:.0f} and "
                  f"{MAX_ABS_PRICE:.0f} per kWh, got {price:g}", EXIT_REFUSED, "bad_value")
    with ctl.client() as client:
        r = client.flex(flex_up, price_up, flex_down, price_down)
    ctl.emit(r, lambda: click.echo(
        f"flex up {_kw(r['flex_up'])} at {r['price_up']:g}   down {_kw(r['flex_down'])} at "
        f"{r['price_down']:g}"))


@ctl_main.command()
@click.argument("endpoint", metavar="[ID@]ENDPOINT")
@pass_ctl
def link(ctl: _Ctl, endpoint: str) -> None:
    """Link this node with a sibling (both ends end up linked).

    With ID@ENDPOINT, a node at ENDPOINT that reports another id is refused and nothing
    changes. A link not up within the wait exits 3: the node keeps trying until `unlink`."""
    expected = _expected_id(endpoint)
    if expected is not None and ctl.node and _can_ask_directly(ctl.node, endpoint):
        _refuse_wrong_node(ctl, endpoint, expected)
    wait_s = min(LINK_WAIT_S, ctl.timeout * 2)
    with ctl.client() as client:
        r = client.link(endpoint)
        sibling = r["sibling"]
        if not r["created"] and expected is not None and sibling["id"] not in (None, expected):
            _fail(f"{sibling['endpoint']} is already a sibling, as node {sibling['id']}, not "
                  f"{expected}: nothing changed", EXIT_REFUSED, "wrong_node", sibling=sibling)
        deadline = time.monotonic() + wait_s
        while sibling["state"] not in ("up", "refused") and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the node's own status: a condition, not a fixed wait
            current = [s for s in client.status()["siblings"]
                       if s["endpoint"] == sibling["endpoint"]]
            if not current:
                break
            sibling = current[0]
    stop = f"zgrid-ctl --node {ctl.node} unlink {sibling['endpoint']}"
    if sibling["state"] == "refused":
        _fail(f"{sibling['endpoint']} refused the link: {sibling['error']}. The node keeps it "
              f"as a refused sibling and tries again now and then; to stop: {stop}",
              EXIT_REFUSED, "link_refused", sibling=sibling)
    if not sibling["up"]:
        _fail(f"the link to {sibling['endpoint']} is not up after {wait_s:g}s (it is "
              f"{sibling['state']}). The node keeps trying; to stop: {stop}", EXIT_NO_REPLY,
              "link_not_up", sibling=sibling)
    ctl.emit(sibling, lambda: click.echo(
        f"linked {sibling['id'] or '?'} at {sibling['endpoint']}: {sibling['state']}"))


def _expected_id(address: str) -> str | None:
    """The id in ID@ENDPOINT, if the address is well formed (else the node says what is
    wrong with it)."""
    from zgrid.errors import ProtocolError
    from zgrid.wire import parse_sibling_address

    try:
        return parse_sibling_address(address)[0]
    except ProtocolError:
        return None


def _can_ask_directly(node: str, address: str) -> bool:
    """Whether `address` means the same to us as to the node at `node`: a loopback address
    given to a node on another host names that host, not ours."""
    import ipaddress

    def loopback(endpoint: str) -> bool:
        host = endpoint.rpartition("@")[2].removeprefix("tcp://").rpartition(":")[0]
        try:
            return ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            return host == "localhost"

    return loopback(node) or not loopback(address)


def _refuse_wrong_node(ctl: _Ctl, address: str, expected: str) -> None:
    """Ask the node at `address` who it is; exit 1 if it is not `expected`. One that does not
    answer us is left to the node, which checks the id itself when it dials."""
    try:
        with ctl.connect(address, timeout=min(ctl.timeout, LINK_CHECK_S)) as peer:
            peer.status()
    except ControlError as exc:
        if exc.code == "wrong_node":
            _fail(f"not linked: {exc.message}", EXIT_REFUSED, "wrong_node")
    except ZgridError:
        pass


@ctl_main.command()
@click.argument("sibling", metavar="ENDPOINT_OR_ID")
@pass_ctl
def unlink(ctl: _Ctl, sibling: str) -> None:
    """Remove a sibling, on both ends."""
    with ctl.client() as client:
        r = client.unlink(sibling)["unlinked"]
    ctl.emit(r, lambda: click.echo(f"unlinked {r['id'] or '?'} at {r['endpoint']}"))


@ctl_main.command()
@pass_ctl
def nodes(ctl: _Ctl) -> None:
    """Every node this node knows of."""
    with ctl.client() as client:
        rows = client.nodes()
    public = [{k: row[k] for k in ("id", "production", "consumption", "net", "reachable",
                                   "activation_kw", "links", "endpoint", "incarnation")
               if k in row}
              for row in rows]

    def human() -> None:
        from zgrid import views

        if _on_terminal(lambda: views.nodes_table(rows)):
            return
        click.echo(f"{'id':<14}{'production':>14}{'consumption':>14}{'net':>14}  reachable"
                   "  links")
        for row in rows:
            click.echo(f"{row['id']:<14}{row['production']:>14.3f}{row['consumption']:>14.3f}"
                       f"{row['net']:>+14.3f}  {'yes' if row['reachable'] else 'no ':<9}"
                       f"  {' '.join(row.get('links', []))}")

    ctl.emit(public, human)


@ctl_main.command()
@click.option("--follow", is_flag=True,
              help="Keep watching when the node stops answering (stopped, restarted, frozen): "
                   "say so, wait for it, and carry on when it is back.")
@pass_ctl
def watch(ctl: _Ctl, follow: bool) -> None:
    """Stream the node's view of the grid as it changes, until Ctrl-C."""
    shown = _ViewPrinter(ctl)
    try:
        if not follow:
            with ctl.client() as client:
                for view in client.watch():
                    shown.view(view)
            return
        if not ctl.node:
            _fail("say which node: --node ENDPOINT or ZGRID_NODE=ENDPOINT", EXIT_USAGE)
        while True:  # each pass waits up to --timeout for an answer: no busy loop
            try:
                with ctl.connect() as client:
                    for view in client.watch():
                        shown.answering(True)
                        shown.view(view)
            except NoReply:
                shown.answering(False)
            except ControlError as exc:
                _fail(exc.message, EXIT_USAGE if exc.code == "usage" else EXIT_REFUSED,
                      exc.code)
            except ZgridError as exc:
                _fail(exc.message, EXIT_USAGE, exc.code)
    except KeyboardInterrupt:
        pass


class _ViewPrinter:
    """What `watch` prints: one line per view, and (with --follow) when the node stops and
    starts answering."""

    def __init__(self, ctl: _Ctl) -> None:
        from zgrid import views

        self.ctl = ctl
        self.who = ctl.node or "?"
        self.up = True
        self.active = False  # the node applied an activation in a view we printed
        # On a terminal the same lines in colour (zgrid.views); piped, the plain ones.
        self.console = None if ctl.json else views.terminal()
        self.err_console = None if ctl.json else views.terminal(stderr=True)

    def view(self, view: dict[str, Any]) -> None:
        self.who = view["id"]
        line = {"ts": view["ts"], "id": view["id"], "total_net": view["total_net"],
                "island_size": view["island_size"], "island": view["island"],
                "total_production": view["total_production"],
                "total_consumption": view["total_consumption"]}
        balancing = {k: view[k] for k in _BALANCING_KEYS if k in view}
        line.update(balancing)
        text = (f"{_stamp(view['ts'])} {view['id']} total_net={view['total_net']:+.3f} kW "
                f"island={view['island_size']} ({' '.join(view['island'])})")
        if "imbalance_kw" in balancing:  # a node that balances (Phase II)
            text += (f" imbalance={_net(view['imbalance_kw'])} kW balanced_net="
                     f"{_net(view['balanced_net_kw'])} kW")
        activation = view.get("activation_kw") or 0.0
        show_activation = bool(activation or self.active)
        if show_activation:  # this node's own share, while it has (or had) one
            text += f" activation={_net(activation)} kW"
            self.active = activation != 0.0
        if self.console is not None:
            from zgrid import views

            self.console.print(views.watch_line(view, _stamp(view["ts"]), show_activation),
                               soft_wrap=True)
        else:
            self.ctl.emit(line, lambda: click.echo(text))
        sys.stdout.flush()

    def answering(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        now = time.time()
        note = ("answering again" if up else
                f"stopped answering (no reply within {self.ctl.timeout:g}s); waiting for it")
        if self.ctl.json:
            click.echo(json.dumps({"ts": now, "id": self.who, "node": self.ctl.node,
                                   "answering": up}, sort_keys=True), err=True)
        elif self.err_console is not None:
            self.err_console.print(f"{_stamp(now)} {self.who} ({self.ctl.node}) {note}",
                                   style="green" if up else "bold yellow", soft_wrap=True,
                                   markup=False)
        else:
            click.echo(f"{_stamp(now)} {self.who} ({self.ctl.node}) {note}", err=True)
        sys.stderr.flush()


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts).isoformat(timespec="milliseconds")


@ctl_main.command()
@click.option("--interval", "interval_s", type=click.FloatRange(min=TOP_MIN_GAP_S),
              default=TOP_INTERVAL_S, show_default=True, metavar="SECONDS",
              help="Seconds between two requests for the node table (a change of the "
                   "island asks at once).")
@pass_ctl
def top(ctl: _Ctl, interval_s: float) -> None:
    """A live view of the island, redrawn in place like htop, until Ctrl-C.

    The island's totals and balancing (imbalance, balanced net, clearing price, shortfall)
    as the node's watch stream reports them, at once, and every node it knows (production,
    consumption, net, activation, reachable or not, links), asked for every --interval
    seconds and after each change. When stdout is not a terminal, it prints the same view as
    plain text (no colours, no escape codes) each time it changes, a blank line after each.
    A node that stops answering ends it as it ends `watch` (exit 3). No --json: use
    `watch --json` and `nodes --json`."""
    if ctl.json:
        _fail("top draws a screen and has no --json: use `watch --json` (the island as it "
              "changes) and `nodes --json` (the node table)", EXIT_USAGE)
    from zgrid.top import NodesPoller, TopScreen

    screen = TopScreen(ctl.node or "?", interval_s)
    signal.signal(signal.SIGTERM, _interrupt)  # leave the full screen as Ctrl-C does
    try:
        with ctl.client() as client:
            poller = NodesPoller(ctl.connect, interval_s, screen)
            poller.start()
            try:
                with screen.live():
                    for view in client.watch():
                        screen.view(view)
                        poller.poke()
            finally:  # the screen is gone first, so an error is printed on the terminal
                poller.stop(ctl.timeout + TOP_JOIN_S)
    except KeyboardInterrupt:
        pass


@ctl_main.command()
@click.argument("profile_file", metavar="PROFILE.csv",
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--speed", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              show_default=True, help="Profile seconds per wall second (60: a minute a second).")
@click.option("--loop", is_flag=True, help="Play it again from the start, until Ctrl-C.")
@click.option("--start", "start_s", type=click.FloatRange(min=0.0), default=0.0,
              show_default=True, metavar="S",
              help="Start at profile second S; each node first gets the values the profile "
                   "had given it by then.")
@pass_ctl
def play(ctl: _Ctl, profile_file: Path, speed: float, loop: bool, start_s: float) -> None:
    """Replay a recorded profile (CSV: time_s, node, production, consumption) into the grid.

    The whole file is checked before anything is sent. Each row is a `set` of its node (the
    node column, or --node), sent at its time; one line per row. Ctrl-C or SIGTERM stops."""
    from zgrid.player import Outcome, Player, ProfileError, load_profile, schedule

    try:
        profile = load_profile(profile_file, ctl.node)
        steps = schedule(profile, start_s, loop)
    except ProfileError as exc:
        _fail(exc.message, EXIT_USAGE, exc.code)
    addresses = _play_addresses(ctl, profile)
    clients: dict[str, Client] = {}

    def send(row: Row) -> dict[str, Any]:
        client = clients.get(row.node)
        if client is None:
            client = clients[row.node] = ctl.connect(addresses[row.node])
        return client.set(row.production, row.consumption)

    bar: PlayBar | None = None  # a progress bar on stderr, when it is a terminal

    def echo(line: str, err: bool = False) -> None:
        if bar is None:
            click.echo(line, err=err)
        else:  # above the bar, on the terminal
            bar.echo(line, err)

    def report(o: Outcome) -> None:
        row, step = o.step.row, o.step
        where = {"line": row.line, "time_s": row.time_s, "loop": step.loop, "node": row.node,
                 "set": row.values, "late_s": round(o.late_s, 6), "catch_up": step.catch_up}
        when = _profile_clock(row.time_s) + (f" (loop {step.loop + 1})" if loop else "")
        if o.error is not None:
            if ctl.json:
                click.echo(json.dumps({"ok": False, **where, "error": o.error.message,
                                       "code": o.error.code}, sort_keys=True))
            else:
                echo(f"error: {when} line {row.line} {row.node}: {o.error.message}", err=True)
            return
        r = o.reply or {}
        if ctl.json:
            click.echo(json.dumps({"ok": True, **where, "production": r.get("production"),
                                   "consumption": r.get("consumption"), "net": r.get("net")},
                                  sort_keys=True))
        else:
            sets = "  ".join(f"{k} {_kw(v)}" for k, v in row.values.items())
            late = f"  (late {o.late_s:.1f}s)" if o.late_s >= PLAY_LATE_NOTE_S else ""
            first = " (catching up to --start)" if step.catch_up else ""
            echo(f"{when} line {row.line} {row.node}{first}: {sets} -> net "
                 f"{r.get('net', 0.0):+.3f} kW{late}")
        sys.stdout.flush()

    def shown(o: Outcome) -> None:
        report(o)
        if bar is not None:
            bar.row(o.ok)

    player = Player(send, shown, speed)
    if not ctl.json:
        span = profile.end_s - min(start_s, profile.end_s)
        click.echo(f"playing {profile.name}: {len(profile.rows)} rows for "
                   f"{len(profile.nodes)} node(s), {_duration(span)} of profile at speed "
                   f"{speed:g} ({_duration(span / speed)}){', looping' if loop else ''}; "
                   "Ctrl-C stops",
                   err=True)
    signal.signal(signal.SIGTERM, _interrupt)
    stopped = False
    try:
        with _play_progress(ctl, profile, start_s, loop, speed) as bar:
            player.play(steps)
    except KeyboardInterrupt:
        stopped = True
    finally:
        for client in clients.values():
            client.close()
    if not ctl.json:
        at = "" if player.last is None else (
            f" at {_profile_clock(player.last.row.time_s)} (line {player.last.row.line})")
        click.echo(f"{'stopped' + at if stopped else 'done'}: {player.applied} rows applied, "
                   f"{len(player.failed)} failed", err=True)
    if player.failed:
        codes = {o.error.code for o in player.failed if o.error is not None}
        sys.exit(EXIT_NO_REPLY if codes == {"no_reply"} else EXIT_REFUSED)


def _play_progress(ctl: _Ctl, profile: Profile, start_s: float, loop: bool, speed: float
                   ) -> AbstractContextManager[PlayBar | None]:
    """The play's progress bar on stderr (zgrid.views), if stderr is a terminal and the
    output is not --json (which is for programs); else nothing is shown."""
    if ctl.json:
        return nullcontext(None)
    from zgrid import views

    return views.play_progress(f"playing {profile.name}", start_s, profile.end_s,
                               profile.period_s if loop else None, speed, _profile_clock)


def _play_addresses(ctl: _Ctl, profile: Profile) -> dict[str, str]:
    """The control address of each node the profile names: its own address, or for a node
    id, ID@ENDPOINT as the --node node knows it. Exit 2 if one cannot be found."""
    from zgrid.player import is_address

    first_line: dict[str, int] = {}
    for row in profile.rows:
        first_line.setdefault(row.node, row.line)
    ids = [n for n in profile.nodes if not is_address(n)]
    known: dict[str, str] = {}
    if ids:
        if not ctl.node:
            _fail(f"{profile.name} line {first_line[ids[0]]} names node {ids[0]} by its id: "
                  "give --node (any node of that grid) to find it", EXIT_USAGE)
        with ctl.client() as client:
            known = {n["id"]: f"{n['id']}@{n['endpoint']}" for n in client.nodes()
                     if n.get("endpoint")}
        for node_id in ids:
            if node_id not in known:
                _fail(f"{profile.name} line {first_line[node_id]}: node {node_id} is not in "
                      f"the grid as {ctl.node} knows it (it knows: "
                      f"{' '.join(sorted(known)) or 'nothing'}); nothing was sent", EXIT_USAGE,
                      "unknown_node")
    addresses = {n: known.get(n, n) for n in profile.nodes}
    if ctl.keys is not None:
        for node, address in addresses.items():
            if _expected_id(address) is None:
                _fail(f"{profile.name} line {first_line[node]}: with --keys, name the node as "
                      f"ID@{node} so its key can be checked", EXIT_USAGE)
    return addresses


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a play as Ctrl-C does


def _duration(seconds: float) -> str:
    """A span for a person: 0.5 s, 95 s, 23 min 45 s, 2 h 5 min."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 120:
        return f"{minutes} min" + (f" {secs} s" if secs else "")
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h" + (f" {minutes} min" if minutes else "")


def _profile_clock(t: float) -> str:
    """Profile seconds as H:MM:SS (with a fraction if there is one)."""
    hours, rest = divmod(t, 3600.0)
    minutes, seconds = divmod(rest, 60.0)
    secs = f"{seconds:02.0f}" if seconds == int(seconds) else f"{seconds:06.3f}"
    return f"{int(hours):02d}:{int(minutes):02d}:{secs}"


@ctl_main.command()
@pass_ctl
def graph(ctl: _Ctl) -> None:
    """The grid as this node knows it: its islands, and every link with its state (up: both
    ends list it; one_way: one end does; down: a link of this node that is not up)."""
    with ctl.client() as client:
        body = client.graph()

    def human() -> None:
        for i, island in enumerate(body["islands"]):
            mark = " (this node's)" if body["id"] in island else ""
            click.echo(f"island {i + 1}{mark}: {' '.join(island)}")
        for edge in body["edges"]:
            click.echo(f"{edge['a']} -- {edge['b']}  {edge['state']}")

    ctl.emit(body, human)


@ctl_main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve the page on (anything but loopback shows the grid to "
                   "whoever can reach it).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to serve on (0: any free port; the URL is printed).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a browser.")
@pass_ctl
def dashboard(ctl: _Ctl, host: str, port: int, open_browser: bool) -> None:
    """Serve a live web page of the grid --node knows: graph, totals over time, nodes,
    events. Read-only; Ctrl-C stops it."""
    if not ctl.node:
        _fail("say which node: --node ENDPOINT or ZGRID_NODE=ENDPOINT", EXIT_USAGE)
    try:
        from zgrid.dashboard.app import bind, is_loopback, serve
    except ImportError as exc:
        _fail(f"the dashboard needs the web extra: pip install 'zgrid[web]' ({exc})",
              EXIT_USAGE)
    from zgrid.dashboard.feed import Feed, Source

    if not is_loopback(host):
        click.echo(f"warning: serving on {host}, which is not a loopback address: anyone who "
                   "can reach it sees the grid (the page is read-only)", err=True)
    try:
        sock = bind(host, port)
    except OSError as exc:
        _fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}"
              f"{' (is a dashboard running already? try --port 0)' if port else ''}",
              EXIT_USAGE)

    def ready(url: str) -> None:
        click.echo(f"dashboard of {ctl.node} on {url} (Ctrl-C stops)")
        sys.stdout.flush()

    feed = Feed(Source(ctl.node, ctl.timeout, ctl.keys, ctl.as_name))
    signal.signal(signal.SIGTERM, _interrupt)
    serve(feed, sock, open_browser, ready)
    click.echo("dashboard stopped")


@ctl_main.command()
@click.option("--dir", "directory", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="The keys directory.")
@click.option("--operator", is_flag=True,
              help="Mark NAME an operator: it may change (set, link, unlink) every node whose "
                   "keys directory holds this .key.")
@click.argument("name")
def keygen(directory: Path, name: str, operator: bool) -> None:
    """Write NAME's keys: DIR/NAME.key (public: CURVE and signing keys, role) and
    DIR/NAME.key_secret (0600)."""
    from zgrid.security import keygen as make_keys

    try:
        public, secret = make_keys(directory, name, operator=operator)
    except ZgridError as exc:
        _fail(exc.message, EXIT_USAGE)
    click.echo(f"wrote {public} and {secret}")


# ================================================================================ zgrid-sim


def sim_main() -> None:
    """zgrid-sim: the simulator's command lives with the simulator (it needs the sim extras)."""
    if "--version" in sys.argv[1:]:  # answered here, so it works without the extras too
        click.echo(f"zgrid-sim, version {__version__}")
        return
    try:
        from zgrid.sim import sim_command
    except ImportError as exc:
        _fail(f"zgrid-sim needs the simulator extras: pip install 'zgrid[sim]' ({exc})",
              EXIT_USAGE)
    sim_command()


__all__ = ["ctl_main", "node_main", "sim_main"]
