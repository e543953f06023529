"""The dashboard: the `graph` request it is drawn from, its feed, its server, and the page in
a real headless Chromium (Debian's, driven by playwright) against real nodes.

Browser tests need /usr/bin/chromium (`make test` installs it with apt-get where it can);
without it they are skipped, saying why, except under CI, where a missing browser fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from zgrid.dashboard.feed import grid_events, kind_of, totals_point
from zgrid.security import keygen

from conftest import BIN, HOST, Grid, NodeProc, free_port, wait_until

CHROMIUM = Path("/usr/bin/chromium")
# As the machine's notes say: without the background-networking flags Chromium keeps trying
# to reach Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
PAGE_UPDATE_S = 2.0  # the bound: a change is on the page this soon
STOP_S = 5.0
HTTP_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------- the graph request


def _edges(graph: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(e["a"], e["b"]): e["state"] for e in graph["edges"]}


def test_graph_request_lists_every_link_once_with_its_island(grid: Grid) -> None:
    a, b, c = grid.line(("a", 10, 0), ("b", 0, 4), ("c", 0, 1))
    grid.wait_island([a, b, c])
    graph = b.ctl_json("graph")
    assert graph["id"] == "b"
    assert graph["islands"] == [["a", "b", "c"]]
    assert _edges(graph) == {("a", "b"): "up", ("b", "c"): "up"}
    assert [(n["id"], n["island"], n["net"]) for n in graph["nodes"]] == [
        ("a", 0, 10.0), ("b", 0, -4.0), ("c", 0, -1.0)]
    text = b.ctl("graph", check=True).stdout
    assert "island 1 (this node's): a b c" in text and "a -- b  up" in text


def test_graph_shows_a_dead_link_down_at_its_end_and_one_sided_elsewhere(grid: Grid) -> None:
    a, b, c = grid.line(("a", 10, 0), ("b", 0, 4), ("c", 0, 1))
    grid.wait_island([a, b, c])
    c.kill()

    def split(node: NodeProc) -> dict[str, Any] | None:
        graph = node.ctl_json("graph")
        return graph if graph["islands"] == [["a", "b"], ["c"]] else None

    at_b = wait_until(lambda: split(b), what="b to see c as an island of its own")
    at_a = wait_until(lambda: split(a), what="a to see c as an island of its own")
    assert _edges(at_b)[("b", "c")] == "down"  # b's own link: b knows it is down
    assert _edges(at_a)[("b", "c")] == "one_way"  # c's last advert still lists b
    assert [n["island"] for n in at_a["nodes"]] == [0, 0, 1]


# ---------------------------------------------------------------------------- the feed, pure


def _grid(nodes: list[tuple[str, bool]], edges: list[tuple[str, str, str]],
          islands: list[list[str]]) -> dict[str, Any]:
    return {"id": "a", "nodes": [{"id": x, "reachable": r} for x, r in nodes],
            "edges": [{"a": a, "b": b, "state": s} for a, b, s in edges], "islands": islands}


def test_kind_is_read_off_the_advert() -> None:
    row = {"production": 0.0, "consumption": 0.0, "flex_up": 0.0, "flex_down": 0.0}
    assert kind_of({**row, "flex_up": 5.0, "flex_down": 5.0}) == "battery"
    assert kind_of({**row, "production": 50.0, "flex_up": 20.0}) == "plant"
    assert kind_of({**row, "production": 6.0, "consumption": 2.5, "flex_down": 6.0}) == "pv"
    assert kind_of({**row, "consumption": 3.2}) == "load"
    assert kind_of(row) == "idle"


def test_events_name_links_that_went_down_and_islands_that_split() -> None:
    before = _grid([("a", True), ("b", True)], [("a", "b", "up")], [["a", "b"]])
    after = _grid([("a", True), ("b", False), ("c", True)], [("a", "b", "one_way")],
                  [["a", "c"], ["b"]])
    texts = [(e["kind"], e["text"]) for e in grid_events(before, after, 1.0)]
    assert texts == [("joined", "c joined the grid"), ("left", "b is no longer reachable"),
                     ("link_down", "link a - b down (one_way)"), ("split", "1 -> 2 islands")]
    assert grid_events(after, after, 2.0) == []
    back = [e["kind"] for e in grid_events(after, before, 3.0)]
    assert back == ["left", "joined", "link_up", "merge"]


def test_a_totals_point_carries_the_battery_state_of_charge_in_percent() -> None:
    view = {"total_net": 1.5, "island_size": 3, "clearing_price": None}
    point = totals_point(view, {"kind": "battery", "soc_kwh": 2.5, "capacity_kwh": 10.0}, 7.0)
    assert (point["t"], point["total_net"], point["soc_pct"]) == (7.0, 1.5, 25.0)
    assert point["clearing_price"] is None and point["imbalance_kw"] is None
    assert totals_point(view, None, 7.0)["soc_pct"] is None


# ---------------------------------------------------------------------------- the server


@dataclass
class Dashboard:
    proc: subprocess.Popen[str]
    url: str

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=HTTP_TIMEOUT_S) as reply:
            return json.load(reply)

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=STOP_S)
        return self.proc.returncode, err


def _start_dashboard(node: NodeProc, *extra: str) -> subprocess.Popen[str]:
    keys = ("--keys", str(node.keys)) if node.keys else ()
    return subprocess.Popen([str(BIN / "zgrid-ctl"), *keys, "--node", node.address,
                             "dashboard", "--port", "0", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


@pytest.fixture
def dashboards() -> Iterator[list[Dashboard]]:
    started: list[Dashboard] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
        d.proc.communicate(timeout=STOP_S)


def open_dashboard(dashboards: list[Dashboard], node: NodeProc) -> Dashboard:
    """Start `zgrid-ctl dashboard --port 0` for `node`; its URL is on its first line."""
    proc = _start_dashboard(node)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    out: list[str] = []

    def url() -> str | None:
        out.append(proc.stdout.read() or "")  # type: ignore[union-attr]
        text = "".join(out)
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited {proc.returncode}: {text}")
        return next((w for w in text.split() if w.startswith("http://")), None)

    d = Dashboard(proc, wait_until(url, what="the dashboard to print its URL"))
    dashboards.append(d)
    return d


def test_snapshot_holds_the_grid_and_the_totals_status_reports(
        grid: Grid, dashboards: list[Dashboard]) -> None:
    a, b = grid.line(("a", 10, 0), ("b", 0, 4))
    grid.wait_island([a, b])
    d = open_dashboard(dashboards, a)
    snap = wait_until(lambda: (s := d.get_json("api/snapshot"))["grid"] and s["history"] and s,
                      what="the snapshot to hold the grid")
    assert snap["link"]["ok"] is True
    assert [n["id"] for n in snap["grid"]["nodes"]] == ["a", "b"]
    assert snap["history"][-1]["total_net"] == a.ctl_json("status")["total_net"] == 6.0


def test_dashboard_follows_a_grid_that_uses_keys(
        grid: Grid, dashboards: list[Dashboard], tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    for name in ("a", "b"):
        keygen(keys, name)
    keygen(keys, "operator", operator=True)
    a = grid.add("a", "--production", "10", keys=keys)
    b = grid.add("b", "--consumption", "4", "--sibling", a.address, keys=keys)
    grid.wait_island([a, b])
    d = open_dashboard(dashboards, a)  # zgrid-ctl --keys DIR --node a@... dashboard
    snap = wait_until(lambda: (s := d.get_json("api/snapshot"))["grid"] and s,
                      what="the snapshot to hold the keyed grid")
    assert [n["id"] for n in snap["grid"]["nodes"]] == ["a", "b"]
    assert snap["link"]["ok"] is True


def test_dashboard_stops_cleanly_on_ctrl_c_with_a_page_streaming(
        grid: Grid, dashboards: list[Dashboard]) -> None:
    (a,) = grid.line(("a", 1, 0))
    d = open_dashboard(dashboards, a)
    with urllib.request.urlopen(d.url + "events", timeout=HTTP_TIMEOUT_S) as stream:
        assert stream.readline().startswith(b"retry:")  # the stream is open
        started = time.monotonic()
        code, err = d.stop(signal.SIGINT)
    assert (code, time.monotonic() - started < STOP_S) == (0, True), err
    assert "Traceback" not in err


def test_dashboard_refuses_a_taken_port_with_a_clear_error(grid: Grid) -> None:
    (a,) = grid.line(("a", 1, 0))
    port = free_port()
    with subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", HOST],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as holder:
        try:
            def taken() -> subprocess.CompletedProcess[str] | None:
                proc = subprocess.run([str(BIN / "zgrid-ctl"), "--node", a.endpoint,
                                       "dashboard", "--port", str(port)], capture_output=True,
                                      text=True, timeout=STOP_S, stdin=subprocess.DEVNULL)
                return proc if proc.returncode == 2 else None

            proc = wait_until(taken, what=f"port {port} to be taken")
        finally:
            holder.kill()
    assert f"cannot serve on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dashboard_without_the_web_extra_says_how_to_install_it() -> None:
    code = ("import sys; sys.modules['starlette'] = None; from zgrid.cli import ctl_main; "
            "ctl_main(['--node', 'tcp://127.0.0.1:9', 'dashboard'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=STOP_S, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "pip install 'zgrid[web]'" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: CI must run the browser tests "
                        "(the Makefile installs Debian's chromium with apt-get)")
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert errors == [], f"the page raised: {errors}"


def _page_state(page: Any) -> dict[str, Any]:
    return page.evaluate("""() => ({
        nodes: Number(document.body.dataset.nodes), islands: Number(document.body.dataset.islands),
        totalNet: document.body.dataset.totalNet === undefined ? null
                  : Number(document.body.dataset.totalNet),
        live: document.body.dataset.live === "true",
        drawnNodes: zgrid.cy.nodes(":childless").length,
        drawnIslands: zgrid.cy.nodes(":parent").length,
        rows: document.querySelectorAll("#nodes-table tbody tr").length,
        shownTotal: document.getElementById("total-net").textContent,
        events: [...document.querySelectorAll("#events li")].map((li) => li.textContent),
    })""")


def _wait_page(page: Any, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
    def shown() -> dict[str, Any] | None:
        state = _page_state(page)
        return state if predicate(state) else None

    return wait_until(shown, timeout, what=what)


FOUR_NODES = (("n1", 50, 0), ("n2", 6, 2.5), ("n3", 0, 3.2), ("n4", 0, 38))  # 12.3 kW net


@pytest.fixture
def four_node_page(grid: Grid, dashboards: list[Dashboard], page: Any) -> list[NodeProc]:
    """A 4-node line, its dashboard following n1, and `page` showing it: the nodes."""
    nodes = grid.line(*FOUR_NODES)
    grid.wait_island(nodes)
    page.goto(open_dashboard(dashboards, nodes[0]).url)
    _wait_page(page, lambda s: s["nodes"] == 4 and s["totalNet"] is not None, 10.0,
               "the page to load")
    return nodes


def test_page_draws_every_node_and_the_islands_total(
        four_node_page: list[NodeProc], page: Any, tmp_path: Path) -> None:
    nodes = four_node_page
    total = nodes[0].ctl_json("status")["total_net"]
    s = _wait_page(page, lambda s: s["nodes"] == 4 and s["totalNet"] == total, 10.0,
                   "the page to show 4 nodes and the total")
    assert (s["drawnNodes"], s["drawnIslands"], s["rows"], s["live"]) == (4, 1, 4, True)
    assert s["shownTotal"] == f"+{total:.3f} kW"
    page.screenshot(path=str(tmp_path / "dashboard.png"))


def test_page_shows_a_new_total_within_two_seconds_of_a_set(
        four_node_page: list[NodeProc], page: Any) -> None:
    nodes = four_node_page
    started = time.monotonic()
    nodes[3].ctl("set", "--consumption", "20", check=True)  # 12.3 -> 30.3 kW, at a far node
    _wait_page(page, lambda s: s["totalNet"] == 30.3, PAGE_UPDATE_S,
               "the page to show the new total")
    assert time.monotonic() - started < PAGE_UPDATE_S


def test_unlinking_a_node_draws_two_islands(
        four_node_page: list[NodeProc], page: Any, tmp_path: Path) -> None:
    nodes = four_node_page
    _wait_page(page, lambda s: s["drawnIslands"] == 1 and s["nodes"] == 4, 10.0,
               "the page to draw one island")
    nodes[2].ctl("unlink", "n4", check=True)

    def split_and_listed(s: dict[str, Any]) -> bool:
        # The feed sends the new grid, then its events: the page draws one before it lists
        # the other, so both are waited for.
        return (s["islands"] == 2 and s["drawnIslands"] == 2
                and any("link n3 - n4 down" in e for e in s["events"]))

    s = _wait_page(page, split_and_listed, PAGE_UPDATE_S,
                   "the page to draw two islands and list the link that went down")
    assert s["drawnNodes"] == 4 and s["totalNet"] == nodes[0].ctl_json("status")["total_net"]
    page.screenshot(path=str(tmp_path / "two-islands.png"))
    assert (tmp_path / "two-islands.png").stat().st_size > 0


def test_page_says_offline_when_its_node_stops_answering(
        grid: Grid, dashboards: list[Dashboard], page: Any) -> None:
    a, b = grid.line(("a", 10, 0), ("b", 0, 4))
    grid.wait_island([a, b])
    d = open_dashboard(dashboards, a)
    page.goto(d.url)
    _wait_page(page, lambda s: s["live"], 10.0, "the page to go live")
    a.kill()
    _wait_page(page, lambda s: not s["live"], 10.0, "the page to say offline")
    assert d.proc.poll() is None  # the dashboard waits for its node to come back
