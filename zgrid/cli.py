"""The command-line entry points: zgrid-node, zgrid-ctl and zgrid-sim (click).

Parsing and printing only. Everything these commands do is a call into the library (Node,
Client, sim); no protocol logic lives here. Every failure a user can cause ends in a one-line
message and a documented exit code, never a traceback:

    0 ok   1 the node refused the request   2 usage error / cannot start   3 no reply in time

zgrid-node: 0 stopped by a signal, 1 its state cannot be saved (disk full, read-only, I/O
error: the storage needs fixing), 2 usage error or cannot start.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from zgrid import __version__
from zgrid.client import DEFAULT_TIMEOUT_S, Client
from zgrid.errors import ControlError, NoReply, StorageFailure, ZgridError

if TYPE_CHECKING:  # the device models load only for a node that has a device
    from zgrid.devices import Device

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_REPLY = 3
EXIT_STORAGE = 1  # zgrid-node: the state cannot be saved (the same code `Node.run` returns)
LINK_WAIT_S = 3.0  # how long `zgrid-ctl link` waits to see the new link come up


def _fail(message: str, code: int) -> NoReturn:
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
@click.option("--ping-interval", type=click.FloatRange(min=0.01), default=0.25,
              show_default=True, help="Seconds between pings to each sibling.")
@click.option("--dead-after", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds of silence after which a sibling is DOWN.")
@click.option("--forget-after", type=click.FloatRange(min=1.0), default=600.0,
              show_default=True, help="Seconds after which unreachable nodes are forgotten.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path),
              help="CurveZMQ keys directory: the grid's membership list (see zgrid-ctl keygen).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
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
              keys_dir: Path | None, log_level: str, drop_rate: float,
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
        keys_dir=keys_dir, drop_rate=drop_rate, crash_before_save=crash_before_save,
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
            _fail(exc.message, EXIT_NO_REPLY)
        except ControlError as exc:
            _fail(exc.message, EXIT_USAGE if exc.code == "usage" else EXIT_REFUSED)
        except ZgridError as exc:
            _fail(exc.message, EXIT_USAGE)

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        if self.json:
            click.echo(json.dumps(data, sort_keys=True))
        else:
            human()


pass_ctl = click.make_pass_decorator(_Ctl)


@click.group(name="zgrid-ctl", context_settings={"help_option_names": ["-h", "--help"]})
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
                   "clearing_hash")


def _net(x: float) -> str:
    """A signed kW figure to three decimals; a residual of 1e-15 kW shows as +0.000, not -0.000
    (an activation is applied as a double, so the balanced net is exact only to its rounding)."""
    return f"{round(x, 3) + 0.0:+.3f}"


def _kw(x: float) -> str:
    return f"{x:.3f} kW"


@ctl_main.command()
@pass_ctl
def status(ctl: _Ctl) -> None:
    """The node's own values and its view of the grid."""
    with ctl.client() as client:
        s = client.status()

    def human() -> None:
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


@ctl_main.command(name="set")
@click.option("--production", type=float, help="Production in kW.")
@click.option("--consumption", type=float, help="Consumption in kW.")
@pass_ctl
def set_(ctl: _Ctl, production: float | None, consumption: float | None) -> None:
    """Change this node's production and/or consumption."""
    if production is None and consumption is None:
        raise click.UsageError("give --production, --consumption or both")
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
    with ctl.client() as client:
        r = client.flex(flex_up, price_up, flex_down, price_down)
    ctl.emit(r, lambda: click.echo(
        f"flex up {_kw(r['flex_up'])} at {r['price_up']:g}   down {_kw(r['flex_down'])} at "
        f"{r['price_down']:g}"))


@ctl_main.command()
@click.argument("endpoint", metavar="[ID@]ENDPOINT")
@pass_ctl
def link(ctl: _Ctl, endpoint: str) -> None:
    """Link this node with a sibling (both ends end up linked)."""
    with ctl.client() as client:
        r = client.link(endpoint)
        sibling = r["sibling"]
        deadline = time.monotonic() + min(LINK_WAIT_S, ctl.timeout * 2)
        while sibling["state"] == "connecting" and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the node's own status: a condition, not a fixed wait
            current = [s for s in client.status()["siblings"]
                       if s["endpoint"] == sibling["endpoint"]]
            if not current:
                break
            sibling = current[0]
    if sibling["state"] == "refused":
        _fail(f"{sibling['endpoint']} refused the link: {sibling['error']}", EXIT_REFUSED)
    ctl.emit(sibling, lambda: click.echo(
        f"linked {sibling['id'] or '?'} at {sibling['endpoint']}: {sibling['state']}"
        + ("" if sibling["up"] else " (the node keeps trying)")))


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
        click.echo(f"{'id':<14}{'production':>14}{'consumption':>14}{'net':>14}  reachable"
                   "  links")
        for row in rows:
            click.echo(f"{row['id']:<14}{row['production']:>14.3f}{row['consumption']:>14.3f}"
                       f"{row['net']:>+14.3f}  {'yes' if row['reachable'] else 'no ':<9}"
                       f"  {' '.join(row.get('links', []))}")

    ctl.emit(public, human)


@ctl_main.command()
@pass_ctl
def watch(ctl: _Ctl) -> None:
    """Stream the node's view of the grid as it changes, until Ctrl-C."""
    with ctl.client() as client:
        try:
            for view in client.watch():
                line = {"ts": view["ts"], "id": view["id"], "total_net": view["total_net"],
                        "island_size": view["island_size"], "island": view["island"],
                        "total_production": view["total_production"],
                        "total_consumption": view["total_consumption"]}
                balancing = {k: view[k] for k in _BALANCING_KEYS if k in view}
                line.update(balancing)
                stamp = datetime.fromtimestamp(view["ts"]).isoformat(timespec="milliseconds")
                text = (f"{stamp} {view['id']} total_net={view['total_net']:+.3f} kW "
                        f"island={view['island_size']} ({' '.join(view['island'])})")
                if balancing:  # a node that balances (Phase II)
                    text += (f" imbalance={_net(view['imbalance_kw'])} kW balanced_net="
                             f"{_net(view['balanced_net_kw'])} kW")
                ctl.emit(line, lambda text=text: click.echo(text))  # type: ignore[misc]
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


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
    try:
        from zgrid.sim import sim_command
    except ImportError as exc:
        _fail(f"zgrid-sim needs the simulator extras: pip install 'zgrid[sim]' ({exc})",
              EXIT_USAGE)
    sim_command()


__all__ = ["ctl_main", "node_main", "sim_main"]
