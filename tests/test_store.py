"""Tests of zgrid.store: round trips, refusals, exclusive ownership and kill -9 durability.

The crash test runs a real writer process that saves in a loop and reports each save once
`save` has returned; it is killed with SIGKILL at random moments, and the reopened store must
always hold the last reported state or the one that was in flight, never anything else.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from zgrid import store as store_module
from zgrid.errors import StorageFailure, StoreError
from zgrid.persisted import PersistedState
from zgrid.store import DB_FILE_NAME, LOCK_FILE_NAME, SCHEMA_VERSION, Store
from zgrid.wire import NO_FLEX, Flex

from conftest import SmallDisk

REPO_ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_S = 30.0
CRASH_KILLS = 20
CREATION_KILLS = 6
MAX_KILL_DELAY_S = 0.05
WRITER_MAX_SAVES = 10_000  # bounds the writer even if a kill never comes


def expected_state(i: int) -> PersistedState:
    """The i-th state the crash-test writer saves: every field depends on i, so a torn or
    mixed write cannot pass for a real one."""
    return PersistedState(
        node_id="n1",
        incarnation=i,
        production=i * 0.1,
        consumption=i / 3,
        siblings=tuple(f"n{j}@tcp://127.0.0.1:{5000 + j + i}" for j in range(i % 5)),
    )


WRITER_SRC = textwrap.dedent("""
    import sys
    from pathlib import Path
    from zgrid.core import PersistedState
    from zgrid.store import Store
    """) + textwrap.dedent(inspect.getsource(expected_state)) + textwrap.dedent("""
    store = Store.open(Path(sys.argv[1]), "n1")
    loaded = store.load()
    i = loaded.incarnation if loaded else 0
    print("ready", i, flush=True)
    for _ in range(int(sys.argv[2])):
        i += 1
        store.save(expected_state(i))
        print("saved", i, flush=True)
    """)

CREATOR_SRC = textwrap.dedent("""
    import sys
    from pathlib import Path
    from zgrid.core import PersistedState
    from zgrid.store import Store
    """) + textwrap.dedent(inspect.getsource(expected_state)) + textwrap.dedent("""
    base = Path(sys.argv[1])
    print("ready", flush=True)
    for j in range(int(sys.argv[2])):
        with Store.open(base / str(j), "n1") as store:
            store.save(expected_state(j + 1))
        print("created", j, flush=True)
    """)

HOLDER_SRC = textwrap.dedent("""
    import sys
    from pathlib import Path
    from zgrid.store import Store

    store = Store.open(Path(sys.argv[1]), "n1")
    print("locked", flush=True)
    sys.stdin.read()  # hold the store until the test closes our stdin
    """)


# Run inside a small tmpfs's mount namespace (as root there): save, fill the disk, reopen;
# free it, reopen; remount it read-only, reopen. Prints what each step raised, as JSON.
FULL_DISK_SRC = textwrap.dedent("""
    import json, subprocess, sys
    from pathlib import Path
    from zgrid.errors import StoreError
    from zgrid.persisted import PersistedState
    from zgrid.store import Store

    disk = Path(sys.argv[1])
    data_dir = disk / "n1"
    state = PersistedState("n1", 7, 2.5, 1.0, ("n2@tcp://127.0.0.1:5002",))
    report = {}

    def reopen(step):
        try:
            with Store.open(data_dir, "n1") as store:
                report[step] = ["opened", store.load() == state]
        except StoreError as exc:
            report[step] = [type(exc).__name__, exc.message, getattr(exc, "cause", "")]

    with Store.open(data_dir, "n1") as store:
        store.save(state)
    try:
        with open(disk / "filler", "wb") as filler:
            while True:
                filler.write(bytes(4096))
                filler.flush()
    except OSError:
        pass  # full
    reopen("full")
    (disk / "filler").unlink()
    reopen("freed")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    reopen("read_only")
    print(json.dumps(report))
    """)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _state(**changes: object) -> PersistedState:
    base: dict[str, object] = {
        "node_id": "n1", "incarnation": 3, "production": 12.5, "consumption": 0.1 + 0.2,
        "siblings": ("n2@tcp://127.0.0.1:5002", "tcp://127.0.0.1:5003"),
    }
    base.update(changes)
    return PersistedState(**base)  # type: ignore[arg-type]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "zgrid" / "n1"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    s = Store.open(data_dir, "n1")
    yield s
    s.close()


# ---------------------------------------------------------------------------- basics


def test_fresh_store_loads_nothing_and_creates_a_private_dir(store: Store,
                                                             data_dir: Path) -> None:
    assert store.load() is None
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert (data_dir / LOCK_FILE_NAME).read_text().strip() == str(os.getpid())
    db = sqlite3.connect(data_dir / DB_FILE_NAME)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_round_trip_is_exact_and_last_save_wins(store: Store) -> None:
    first = _state()
    store.save(first)
    assert store.load() == first
    # Values a float round trip through text would damage: denormals, repeating fractions.
    second = _state(incarnation=4, production=5e-324, consumption=1 / 3, siblings=())
    store.save(second)
    assert store.load() == second


def test_reopen_after_close_restores_the_state(data_dir: Path) -> None:
    saved = _state(incarnation=41, production=1e300)
    with Store.open(data_dir, "n1") as s:
        s.save(_state(incarnation=40))
        s.save(saved)
    with Store.open(data_dir, "n1") as s:
        assert s.load() == saved


def test_closed_store_refuses_use(data_dir: Path) -> None:
    s = Store.open(data_dir, "n1")
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.load()


@pytest.mark.parametrize("bad", [
    {"production": float("nan")},
    {"consumption": float("inf")},
    {"production": -1.0},
    {"incarnation": -1},
    {"incarnation": 2**63},
    {"node_id": "n9"},
])
def test_invalid_state_is_refused_and_nothing_changes(store: Store,
                                                      bad: dict[str, object]) -> None:
    good = _state()
    store.save(good)
    with pytest.raises(StoreError):
        store.save(_state(**bad))
    assert store.load() == good


# ---------------------------------------------------------------------------- ownership


def test_second_opener_in_the_same_process_is_refused(store: Store, data_dir: Path) -> None:
    with pytest.raises(StoreError, match=rf"in use by another zgrid node \(pid {os.getpid()}\)"):
        Store.open(data_dir, "n1")
    store.close()
    with Store.open(data_dir, "n1") as again:  # the lock goes with close()
        assert again.load() is None


def test_second_process_is_refused_with_the_holders_pid(data_dir: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SRC, str(data_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=_child_env())
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError) as refused:
            Store.open(data_dir, "n1")
        assert refused.value.message.startswith(
            f"data dir {data_dir} is in use by another zgrid node (pid {holder.pid})")
        holder.stdin.close()
        assert holder.wait(timeout=CHILD_TIMEOUT_S) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with Store.open(data_dir, "n1") as s:  # the holder is gone: the dir is free again
        assert s.load() is None


# ---------------------------------------------------------------------------- refusals


def test_wrong_node_id_is_refused(data_dir: Path) -> None:
    with Store.open(data_dir, "n1") as s:
        s.save(_state())
    with pytest.raises(StoreError, match=r"holds the state of node 'n1', not 'n2'"):
        Store.open(data_dir, "n2")
    with Store.open(data_dir, "n1") as s:  # the refusal released the lock and changed nothing
        assert s.load() == _state()


def test_invalid_node_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="node id"):
        Store.open(tmp_path / "x", "../n1")


def test_garbage_file_is_refused(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    (data_dir / DB_FILE_NAME).write_bytes(random.Random(7).randbytes(8192))
    with pytest.raises(StoreError, match="unreadable or corrupt"):
        Store.open(data_dir, "n1")


def test_truncated_database_is_refused(data_dir: Path) -> None:
    with Store.open(data_dir, "n1") as s:
        s.save(_state())
    path = data_dir / DB_FILE_NAME
    data = path.read_bytes()
    assert len(data) > 4096  # closed cleanly: the WAL was checkpointed into the file
    path.write_bytes(data[:100] + bytes(len(data) - 100))  # header intact, pages zeroed
    with pytest.raises(StoreError, match="unreadable or corrupt"):
        Store.open(data_dir, "n1")  # the integrity check at open catches it


def test_foreign_sqlite_file_is_refused(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    db = sqlite3.connect(data_dir / DB_FILE_NAME)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a zgrid node state"):
        Store.open(data_dir, "n1")


def test_unknown_schema_version_is_refused(data_dir: Path) -> None:
    with Store.open(data_dir, "n1") as s:
        s.save(_state())
    db = sqlite3.connect(data_dir / DB_FILE_NAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match=rf"schema version {SCHEMA_VERSION + 1}"):
        Store.open(data_dir, "n1")


@pytest.mark.parametrize("column, value", [
    ("production", "'lots'"), ("consumption", "-1.0"), ("siblings", "'not json'"),
    ("siblings", "'[1, 2]'"), ("incarnation", "1.5"),
    ("linking", "'not json'"), ("linking", "'[1]'"), ("linking", "'{}'"),
])
def test_bad_values_in_the_database_are_refused_on_load(data_dir: Path, column: str,
                                                        value: str) -> None:
    with Store.open(data_dir, "n1") as s:
        s.save(_state())
    db = sqlite3.connect(data_dir / DB_FILE_NAME)
    db.execute(f"UPDATE state SET {column} = {value}")
    db.commit()
    db.close()
    with Store.open(data_dir, "n1") as s, pytest.raises(StoreError, match="corrupt"):
        s.load()


# ---------------------------------------------------------------------------- storage failures


def test_a_save_that_finds_the_disk_full_is_a_storage_failure_and_changes_nothing(
        tmp_path: Path) -> None:
    disk_full = tmp_path / "disk-full"
    with Store.open(tmp_path / "n1", "n1", fail_saves_while=disk_full) as s:
        s.save(_state())
        disk_full.touch()
        with pytest.raises(StorageFailure) as failed:
            s.save(_state(production=99.0))
        assert failed.value.cause == "disk full" and failed.value.code == "storage_failing"
        assert "free space" in failed.value.message and "aside" not in failed.value.message
        assert s.load() == _state()
        disk_full.unlink()
        s.save(_state(production=99.0))  # the same store works again once the disk has room
        assert s.load() == _state(production=99.0)


def test_an_io_error_with_no_space_left_is_a_full_disk_not_corruption(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(data_dir, "n1") as s:
        s.save(_state())
    # What SQLite raises when the -shm file cannot grow: an I/O error, not SQLITE_FULL.
    shm_error = sqlite3.OperationalError("disk I/O error")
    shm_error.sqlite_errorcode = sqlite3.SQLITE_IOERR_SHMSIZE
    shm_error.sqlite_errorname = "SQLITE_IOERR_SHMSIZE"
    real = os.statvfs(data_dir)
    no_room = os.statvfs_result((real.f_bsize, real.f_frsize, real.f_blocks, 0, 0,
                                 real.f_files, real.f_ffree, real.f_favail, real.f_flag,
                                 real.f_namemax))
    monkeypatch.setattr(store_module.os, "statvfs", lambda _path: no_room)
    failure = store_module._open_failure(data_dir, shm_error)
    assert isinstance(failure, StorageFailure) and failure.cause == "disk full"
    assert "do not move" in failure.message and "corrupt" not in failure.message
    corrupt = sqlite3.DatabaseError("database disk image is malformed")
    corrupt.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
    assert "unreadable or corrupt" in store_module._open_failure(data_dir, corrupt).message


def test_on_a_real_full_or_read_only_disk_open_says_fix_the_storage_never_move_it(
        small_disk: SmallDisk) -> None:
    proc = small_disk.run("env", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-c",
                          FULL_DISK_SRC, str(small_disk.path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    kind, message, cause = report["full"]
    assert (kind, cause) == ("StorageFailure", "disk full"), message
    assert "free space" in message and "do not move" in message
    assert "unreadable or corrupt" not in message
    assert report["freed"] == ["opened", True], "the state was intact all along"
    kind, message, cause = report["read_only"]
    assert (kind, cause) == ("StorageFailure", "read-only filesystem"), message
    assert "remount" in message and "aside" not in message


# ---------------------------------------------------------------------------- crashes


def _run_writer_and_kill(data_dir: Path, delay_s: float,
                         after_ready: bool) -> tuple[int | None, int | None]:
    """Start a writer, SIGKILL it `delay_s` after it is ready (or after spawn).

    Returns (state it started from, last save it reported); None where it got no that far.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SRC, str(data_dir), str(WRITER_MAX_SAVES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())
    try:
        assert proc.stdout is not None
        if after_ready:
            line = proc.stdout.readline()
            assert line.startswith("ready"), line + (proc.stderr.read() if proc.stderr else "")
        time.sleep(delay_s)  # the random kill moment is the point of this test
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
    output = (line if after_ready else "") + rest
    started: int | None = None
    acked: int | None = None
    for text in output.split("\n")[:-1]:  # a line cut by the kill has no "\n": not reported
        word, number = text.split()
        if word == "ready":
            started = int(number)
        elif word == "saved":
            acked = int(number)
    return started, acked


def _check_recovered(data_dir: Path, acked: int | None) -> int | None:
    with Store.open(data_dir, "n1") as s:  # the dead writer's flock is gone with it
        loaded = s.load()
    if loaded is None:
        assert acked is None, f"save {acked} was acknowledged, then lost"
        return None
    k = loaded.incarnation
    floor = acked or 0
    assert k in (floor, floor + 1), f"acknowledged {acked}, found {k}"
    assert loaded == expected_state(k), "a state the writer never wrote"
    return k


def test_kill_9_while_saving_never_loses_or_corrupts(tmp_path: Path) -> None:
    rng = random.Random(20240901)
    data_dir = tmp_path / "n1"
    previous: int | None = None
    kills_mid_run = 0
    for _ in range(CRASH_KILLS):
        started, acked = _run_writer_and_kill(data_dir, rng.uniform(0, MAX_KILL_DELAY_S),
                                              after_ready=True)
        assert started == (previous or 0)  # each run resumed from what the last one left
        if acked is not None:
            kills_mid_run += 1
        previous = _check_recovered(data_dir, acked if acked is not None else started)
    assert kills_mid_run >= CRASH_KILLS // 2  # most kills landed in the save loop


def test_kill_9_while_creating_stores_leaves_every_dir_usable(tmp_path: Path) -> None:
    # Creating a store is where the most can go wrong (new dir, new file, WAL switch, schema),
    # so a writer creates fresh stores in a loop and is killed in the middle of one.
    rng = random.Random(7)
    for trial in range(CREATION_KILLS):
        base = tmp_path / f"trial{trial}"
        proc = subprocess.Popen([sys.executable, "-c", CREATOR_SRC, str(base),
                                 str(WRITER_MAX_SAVES)],
                                stdout=subprocess.PIPE, text=True, env=_child_env())
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0, MAX_KILL_DELAY_S))  # the random kill moment
            proc.send_signal(signal.SIGKILL)
            output = proc.stdout.read()
            proc.wait(timeout=CHILD_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        created = [int(line.split()[1]) for line in output.split("\n")[:-1]]
        last = created[-1] if created else -1
        assert created == list(range(last + 1))
        dirs = sorted(int(d.name) for d in base.iterdir())
        assert dirs[:last + 1] == list(range(last + 1)) and len(dirs) <= last + 2
        for j in dirs:
            with Store.open(base / str(j), "n1") as s:
                loaded = s.load()
            if j <= last:
                assert loaded == expected_state(j + 1), f"store {j} was acknowledged, then lost"
            else:  # the one being created when the kill came: nothing, or all of it
                assert loaded in (None, expected_state(j + 1))


# ---------------------------------------------------------------------------- schema upgrades


def _write_version_1_store(data_dir: Path, state: PersistedState) -> None:
    """A data dir as zgrid wrote it before schema version 2 (no `unlinked` column)."""
    data_dir.mkdir(parents=True)
    db = sqlite3.connect(data_dir / DB_FILE_NAME, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta (key, value) VALUES ('node_id', ?)", (state.node_id,))
        db.execute("CREATE TABLE state (id INTEGER PRIMARY KEY CHECK (id = 1),"
                   " incarnation INTEGER NOT NULL, production REAL NOT NULL,"
                   " consumption REAL NOT NULL, siblings TEXT NOT NULL)")
        db.execute("INSERT INTO state VALUES (1, ?, ?, ?, ?)",
                   (state.incarnation, state.production, state.consumption,
                    json.dumps(list(state.siblings))))
        db.execute(f"PRAGMA application_id = {store_module.APPLICATION_ID}")
        db.execute("PRAGMA user_version = 1")
    finally:
        db.close()


def test_unlinked_siblings_round_trip(store: Store) -> None:
    state = _state(unlinked=("n4@tcp://127.0.0.1:5004", "ipc:///tmp/n5"))
    store.save(state)
    assert store.load() == state


def test_a_version_1_store_is_upgraded_in_place_and_keeps_its_state(data_dir: Path) -> None:
    old = _state()
    _write_version_1_store(data_dir, old)
    with Store.open(data_dir, "n1") as s:
        assert s.load() == old  # nothing unlinked yet
        s.save(_state(unlinked=("n4@tcp://127.0.0.1:5004",)))
    db = sqlite3.connect(data_dir / DB_FILE_NAME)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    finally:
        db.close()
    with Store.open(data_dir, "n1") as s:
        loaded = s.load()
    assert loaded is not None and loaded.unlinked == ("n4@tcp://127.0.0.1:5004",)


def test_a_flexibility_offer_is_kept_exactly(data_dir: Path) -> None:
    offer = Flex(5.0, 0.125, 2.5, -0.1)
    with Store.open(data_dir, "n1") as s:
        s.save(replace(_state(), flex=offer))
    with Store.open(data_dir, "n1") as s:
        loaded = s.load()
    assert loaded is not None and loaded.flex == offer


def test_a_version_2_store_is_upgraded_and_offers_nothing_until_told(data_dir: Path) -> None:
    _write_version_1_store(data_dir, _state())
    db = sqlite3.connect(data_dir / DB_FILE_NAME)  # make it what version 2 wrote
    try:
        db.execute("ALTER TABLE state ADD COLUMN unlinked TEXT NOT NULL DEFAULT '[]'")
        db.execute("PRAGMA user_version = 2")
        db.commit()
    finally:
        db.close()
    with Store.open(data_dir, "n1") as s:
        loaded = s.load()
    assert loaded is not None and loaded.flex == NO_FLEX and loaded == _state()


def test_a_version_1_store_of_another_node_is_refused_and_not_upgraded(data_dir: Path) -> None:
    _write_version_1_store(data_dir, _state(node_id="n9"))
    with pytest.raises(StoreError, match="holds the state of node 'n9'"):
        Store.open(data_dir, "n1")
    db = sqlite3.connect(data_dir / DB_FILE_NAME)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        db.close()


def test_bad_unlinked_values_in_the_database_are_refused_on_load(data_dir: Path) -> None:
    with Store.open(data_dir, "n1") as s:
        s.save(_state())
    db = sqlite3.connect(data_dir / DB_FILE_NAME)
    db.execute("UPDATE state SET unlinked = '[1]'")
    db.commit()
    db.close()
    with Store.open(data_dir, "n1") as s, pytest.raises(StoreError, match="corrupt"):
        s.load()


# ---------------------------------------------------------------------------- device state

BATTERY_RECORD = {"kind": "battery", "parameters": {"capacity_kwh": 10.0, "power_kw": 5.0},
                  "state": {"soc_kwh": 1 / 3, "charged_kwh": 5e-324, "losses_kwh": 0.0}}


def _write_later_store(data_dir: Path, state: PersistedState, version: int,
                       columns: tuple[str, ...], fill: str = "", values: tuple[str, ...] = ()
                       ) -> None:
    """A data dir as zgrid wrote it at schema `version`: version 1's, plus the `columns` the
    versions after it added, then `fill` (an UPDATE) with `values`."""
    _write_version_1_store(data_dir, state)
    db = sqlite3.connect(data_dir / DB_FILE_NAME)
    try:
        for column in columns:
            db.execute(f"ALTER TABLE state ADD COLUMN {column}")
        if fill:
            db.execute(fill, values)
        db.execute(f"PRAGMA user_version = {version}")
        db.commit()
    finally:
        db.close()


def _write_version_3_store(data_dir: Path, state: PersistedState) -> None:
    """A data dir as zgrid wrote it before schema version 4 (no `device` column)."""
    _write_later_store(data_dir, state, 3, (
        "unlinked TEXT NOT NULL DEFAULT '[]'",
        "flex TEXT NOT NULL DEFAULT '[5.0,0.125,2.5,-0.1]'"))


def test_a_device_record_round_trips_exactly_with_the_state(data_dir: Path) -> None:
    with Store.open(data_dir, "n1") as s:
        assert s.load_device() is None
        s.save(_state(), device=BATTERY_RECORD)
        assert s.load_device() == BATTERY_RECORD
        s.save(_state(incarnation=4))  # no device given: the saved one stays
        assert s.load_device() == BATTERY_RECORD
        newer = {**BATTERY_RECORD, "state": {"soc_kwh": 0.25}}
        s.save(_state(incarnation=5), device=newer)
    with Store.open(data_dir, "n1") as s:
        assert s.load_device() == newer and s.load() == _state(incarnation=5)


def test_a_version_3_store_is_upgraded_in_place_and_has_no_device_until_saved(
        data_dir: Path) -> None:
    _write_version_3_store(data_dir, _state())
    with Store.open(data_dir, "n1") as s:
        loaded = s.load()
        assert loaded == replace(_state(), flex=Flex(5.0, 0.125, 2.5, -0.1))
        assert s.load_device() is None
        s.save(_state(), device=BATTERY_RECORD)
    db = sqlite3.connect(data_dir / DB_FILE_NAME)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    finally:
        db.close()
    with Store.open(data_dir, "n1") as s:
        assert s.load_device() == BATTERY_RECORD


def test_a_version_1_store_is_upgraded_to_hold_a_device_too(data_dir: Path) -> None:
    _write_version_1_store(data_dir, _state())
    with Store.open(data_dir, "n1") as s:
        assert s.load() == _state() and s.load_device() is None
        s.save(_state(), device=BATTERY_RECORD)
        assert s.load_device() == BATTERY_RECORD


@pytest.mark.parametrize("bad", [
    {"state": {"soc_kwh": float("nan")}}, {"state": {"soc_kwh": float("inf")}},
    {"state": object()}, ["not", "a", "mapping"],
])
def test_a_device_record_json_cannot_hold_is_refused_and_nothing_changes(
        store: Store, bad: Any) -> None:
    store.save(_state(), device=BATTERY_RECORD)
    with pytest.raises(StoreError, match="device record"):
        store.save(_state(incarnation=9), device=bad)
    assert store.load() == _state() and store.load_device() == BATTERY_RECORD


@pytest.mark.parametrize("value", ["'not json'", "'[1, 2]'", "42"])
def test_a_damaged_device_record_is_refused_on_load(data_dir: Path, value: str) -> None:
    with Store.open(data_dir, "n1") as s:
        s.save(_state(), device=BATTERY_RECORD)
    db = sqlite3.connect(data_dir / DB_FILE_NAME)
    db.execute(f"UPDATE state SET device = {value}")
    db.commit()
    db.close()
    with Store.open(data_dir, "n1") as s, pytest.raises(StoreError, match="corrupt"):
        s.load_device()


def test_a_device_save_that_finds_the_disk_full_keeps_the_last_record(tmp_path: Path) -> None:
    disk_full = tmp_path / "disk-full"
    with Store.open(tmp_path / "n1", "n1", fail_saves_while=disk_full) as s:
        s.save(_state(), device=BATTERY_RECORD)
        disk_full.touch()
        with pytest.raises(StorageFailure, match="disk full"):
            s.save(_state(), device={**BATTERY_RECORD, "state": {"soc_kwh": 0.0}})
        assert s.load_device() == BATTERY_RECORD


# ---------------------------------------------------------------------- pending link requests


def _write_version_4_store(data_dir: Path, state: PersistedState) -> None:
    """A data dir as zgrid wrote it before schema version 5 (no `linking` column)."""
    _write_later_store(data_dir, state, 4, (
        "unlinked TEXT NOT NULL DEFAULT '[]'",
        "flex TEXT NOT NULL DEFAULT '[0.0,0.0,0.0,0.0]'",
        "device TEXT"), "UPDATE state SET unlinked = ?, device = ?",
        (json.dumps(list(state.unlinked)), json.dumps(BATTERY_RECORD)))


def test_pending_link_requests_round_trip(data_dir: Path) -> None:
    state = _state(linking=("n2@tcp://127.0.0.1:5002",))
    with Store.open(data_dir, "n1") as s:
        s.save(state)
        assert s.load() == state
        s.save(_state())  # answered: none pending
        assert s.load() == _state()
        s.save(state)
    with Store.open(data_dir, "n1") as s:
        assert s.load() == state


def test_a_version_4_store_is_upgraded_in_place_with_no_link_request_pending(
        data_dir: Path) -> None:
    old = _state(unlinked=("n4@tcp://127.0.0.1:5004",))
    _write_version_4_store(data_dir, old)
    with Store.open(data_dir, "n1") as s:
        upgraded = s.load()
        assert upgraded == old and upgraded is not None and upgraded.linking == ()
        assert s.load_device() == BATTERY_RECORD
        s.save(replace(old, linking=("tcp://127.0.0.1:5003",)))
    db = sqlite3.connect(data_dir / DB_FILE_NAME)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    finally:
        db.close()
    with Store.open(data_dir, "n1") as s:
        loaded = s.load()
        assert s.load_device() == BATTERY_RECORD
    assert loaded == replace(old, linking=("tcp://127.0.0.1:5003",))


def test_pending_link_requests_that_are_not_strings_are_refused_on_save(store: Store) -> None:
    store.save(_state())
    with pytest.raises(StoreError, match="linking must be strings"):
        store.save(_state(linking=(5,)))
    assert store.load() == _state()
