"""`zgrid-node --metrics-port`: the Prometheus endpoint of a real node, scraped over HTTP.

Real zgrid-node processes on 127.0.0.1, the real zgrid-ctl; the scrape is parsed with
prometheus_client's own parser, so what is checked is what Prometheus would read.
"""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

import zgrid

from conftest import BIN, HOST, Grid, NodeProc, free_port, wait_until

SCRAPE_TIMEOUT_S = 2.0
START_TIMEOUT_S = 30.0
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample the node serves, by (sample name, labels)."""
    url = f"http://{HOST}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample that must be there."""
    found = sample(samples, name, **labels)
    assert found is not None, f"no sample {name}{labels or ''}"
    return found


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every label set that includes `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (its sockets' inodes in its net namespace)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def metered(grid: Grid, node_id: str, *args: str) -> tuple[NodeProc, int]:
    port = free_port()
    return grid.add(node_id, "--metrics-port", str(port), *args), port


@pytest.fixture
def raw() -> Iterator[zmq.Socket[bytes]]:
    """A plain DEALER for whatever bytes a test wants to send to a node's ROUTER."""
    ctx = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    yield sock
    sock.close()
    ctx.term()


def test_the_metrics_match_status_and_follow_a_set(grid: Grid) -> None:
    n1, port = metered(grid, "n1", "--production", "50", "--flex-up", "20", "--price-up",
                       "0.12")
    n2 = grid.add("n2", "--production", "6", "--consumption", "2.5", "--sibling", n1.endpoint)
    n3 = grid.add("n3", "--consumption", "3.2", "--sibling", n2.endpoint)
    grid.wait_island([n1, n2, n3])

    def agrees_with_status() -> tuple[Samples, dict[str, float]] | None:
        status = n1.ctl_json("status")
        samples = scrape(port)
        seen = {"island_size": sample(samples, "zgrid_island_size"),
                "total_net": sample(samples, "zgrid_total_net_kw"),
                "production": sample(samples, "zgrid_production_kw"),
                "consumption": sample(samples, "zgrid_consumption_kw"),
                "activation_kw": sample(samples, "zgrid_activation_kw")}
        if seen == {key: status[key] for key in seen}:
            return samples, status
        return None

    before, status = wait_until(agrees_with_status, what="the metrics to match status")
    assert status["island_size"] == 3
    assert sample(before, "zgrid_flex_kw", direction="up") == 20.0
    assert sample(before, "zgrid_flex_price_per_kwh", direction="up") == 0.12
    assert sample(before, "zgrid_siblings", state="up") == 1.0
    assert value(before, "zgrid_link_state_changes_total", state="up") >= 1.0
    assert sample(before, "zgrid_node_info", id="n1", version=zgrid.__version__) == 1.0

    n3.ctl("set", "--consumption", "10", check=True)

    def moved() -> Samples | None:
        status = n1.ctl_json("status")
        samples = scrape(port)
        if status["total_net"] == before_net or sample(
                samples, "zgrid_total_net_kw") != status["total_net"]:
            return None
        return samples

    before_net = value(before, "zgrid_total_net_kw")
    after = wait_until(moved, what="total_net to change in the metrics as in status")
    assert value(after, "zgrid_total_net_kw") == 43.5  # 50 + 6 - 2.5 - 10, exactly
    for direction in ("in", "out"):
        for name in ("zgrid_messages_total", "zgrid_message_bytes_total"):
            assert total(after, name, direction=direction) > total(before, name,
                                                                   direction=direction)
    # n3's new advert reached n1 in an adverts message, and the statuses were answered.
    assert total(after, "zgrid_messages_total", direction="in", type="adverts") > total(
        before, "zgrid_messages_total", direction="in", type="adverts")
    assert total(after, "zgrid_messages_total", direction="in", type="status") > 0
    assert total(after, "zgrid_messages_total", direction="out", type="reply") > 0
    assert value(after, "zgrid_adverts_accepted_total") > value(
        before, "zgrid_adverts_accepted_total")


def test_a_bad_frame_raises_the_bad_frames_counter(grid: Grid,
                                                   raw: zmq.Socket[bytes]) -> None:
    n1, port = metered(grid, "n1", "--production", "10")
    n2 = grid.add("n2", "--sibling", n1.endpoint)
    grid.wait_island([n1, n2])
    before = scrape(port)
    bad_before = value(before, "zgrid_bad_frames_total")
    assert bad_before == n1.status()["counters"]["bad_frames"]
    raw.connect(n1.endpoint)
    raw.send(msgpack.packb({"v": 1, "t": "ping", "from": "n2", "n": 1}))  # a ping, no hash

    def counted() -> Samples | None:
        samples = scrape(port)
        return samples if value(samples, "zgrid_bad_frames_total") == bad_before + 1 else None

    after = wait_until(counted, what="the bad frame to be counted")
    assert n1.status()["counters"]["bad_frames"] == bad_before + 1
    assert total(after, "zgrid_messages_total", direction="in", type="invalid") >= 1


def test_the_handling_histogram_has_observations(grid: Grid) -> None:
    n1, port = metered(grid, "n1")
    n2 = grid.add("n2", "--sibling", n1.endpoint)
    grid.wait_island([n1, n2])

    def observed() -> Samples | None:
        samples = scrape(port)
        count = sample(samples, "zgrid_message_handling_seconds_count", type="ping")
        return samples if count else None

    samples = wait_until(observed, what="pings to be timed")
    count = value(samples, "zgrid_message_handling_seconds_count", type="ping")
    assert value(samples, "zgrid_message_handling_seconds_bucket", type="ping",
                 le="+Inf") == count
    assert 0 < value(samples, "zgrid_message_handling_seconds_sum", type="ping") < count
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                     if name == "zgrid_message_handling_seconds_bucket"
                     and dict(labels)["type"] == "ping")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "cumulative buckets"


def test_metrics_are_off_by_default_and_the_port_closes_when_the_node_stops(
        grid: Grid) -> None:
    plain = grid.add("plain")
    assert listening_ports(plain.pid) == {plain.port}  # no metrics port, nothing else either
    node, port = metered(grid, "metered")
    assert listening_ports(node.pid) == {node.port, port}  # the check sees a metrics port
    assert node.stop() == 0
    with socket.create_server((HOST, port)):  # free again: the node closed it
        pass


def test_a_stuck_scrape_blocks_neither_the_node_nor_other_scrapes_nor_its_stop(
        grid: Grid) -> None:
    node, port = metered(grid, "n1", "--production", "1")
    with socket.create_connection((HOST, port)) as stuck:
        stuck.sendall(b"GET /metrics HTTP/1.1\r\n")  # ... and never the rest of the request
        node.ctl("set", "--production", "2", check=True)
        wait_until(lambda: sample(scrape(port), "zgrid_production_kw") == 2.0,
                   what="a second scrape to see the set")
        assert node.stop() == 0


def test_a_taken_metrics_port_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.create_server((HOST, 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [str(BIN / "zgrid-node"), "--id", "n1", "--bind", f"tcp://{HOST}:{free_port()}",
             "--data-dir", str(tmp_path / "n1"), "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=START_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"error: cannot serve metrics on {HOST}:{port}: "
                           "Address already in use\n")
