"""A node's own durable state in its data directory (stdlib sqlite3, WAL, synchronous=FULL).

What it is for: the runtime saves the core's `PersistedState` (id, incarnation, production,
consumption, siblings) and acknowledges a `set`/`link`/`unlink` only after `Store.save` has
returned, so nothing acknowledged is ever lost; after a restart `Store.load` gives the node back
its last state.

Guarantees:
- Durability: one SQLite transaction per save, in WAL mode with synchronous=FULL, so the WAL is
  fsynced before COMMIT returns. A save costs about one fsync.
- Atomicity: a kill -9 (or power loss) at any moment leaves the old state or the new one,
  never a mix and never a corrupt file: that is SQLite's commit protocol, not ours.
- Exclusive ownership: a lock file in the data dir is held with flock(LOCK_EX|LOCK_NB) for the
  Store's whole lifetime, so two nodes can never write the same state. The kernel drops the lock
  when the process dies, so a crashed node never leaves a stale lock behind.
- Refusal: a data dir of another node id, of an unknown schema version, or holding a file that
  is not a readable zgrid database is refused with a StoreError saying what to do.

What it must never do: import zmq or know about the protocol; write anywhere but its own data
dir; return (or let the node acknowledge) before the state is durable; silently "repair" a
database it cannot read (that would lose acknowledged state: the operator decides).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Any

from zgrid.errors import StoreError
from zgrid.persisted import PersistedState
from zgrid.wire import check_node_id

SCHEMA_VERSION = 1
# PRAGMA application_id marks the file as ours, so a foreign SQLite file is refused, not reused.
APPLICATION_ID = 0x7A677264  # b"zgrd"
DB_FILE_NAME = "state.sqlite3"
LOCK_FILE_NAME = "lock"
DATA_DIR_MODE = 0o700  # the state is nobody else's business
LOCK_FILE_MODE = 0o600
# We hold the flock, so nobody else should ever hold a SQLite lock: never wait for one.
SQLITE_BUSY_TIMEOUT_S = 0.0

_STATE_ROW_ID = 1  # the state is a single row: one UPDATE per save, one page in the WAL


class Store:
    """The durable state of one node; use `Store.open`, then `load`/`save`, then `close`."""

    def __init__(self, data_dir: Path, node_id: str, lock_fd: int,
                 db: sqlite3.Connection) -> None:
        # Private: `Store.open` acquires the lock and validates the database first.
        self.data_dir = data_dir
        self.node_id = node_id
        self._lock_fd: int | None = lock_fd
        self._db: sqlite3.Connection | None = db

    # ------------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, data_dir: Path, node_id: str) -> Store:
        """Lock `data_dir` (creating it 0700 if missing) and open or create its database.

        Raises StoreError if another process holds the dir, or the database belongs to another
        node id, has an unknown schema version, or cannot be read.
        """
        check_node_id(node_id, lambda why: StoreError(f"node id {why}"))
        data_dir = Path(data_dir)
        _make_data_dir(data_dir)
        lock_fd = _acquire_lock(data_dir)
        try:
            db = _open_database(data_dir, node_id)
        except BaseException:
            os.close(lock_fd)  # releases the flock
            raise
        return cls(data_dir, node_id, lock_fd, db)

    def close(self) -> None:
        """Close the database, then release the lock. Idempotent."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()  # checkpoints the WAL into the main file
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------------ state

    def load(self) -> PersistedState | None:
        """The last saved state, or None if this node never saved one."""
        db = self._connection()
        try:
            row = db.execute(
                "SELECT incarnation, production, consumption, siblings FROM state WHERE id = ?",
                (_STATE_ROW_ID,)).fetchone()
        except sqlite3.Error as e:
            raise self._corrupt(f"cannot read the state: {e}") from e
        if row is None:
            return None
        return self._decode_row(row)

    def save(self, state: PersistedState) -> None:
        """Write `state` durably; returns only once it survives a crash or power loss.

        On StoreError nothing was changed on disk, and the caller must not acknowledge.
        """
        if state.node_id != self.node_id:
            raise StoreError(f"refusing to save the state of node {state.node_id!r} in the data "
                             f"dir of node {self.node_id!r} ({self.data_dir})")
        _check_state(state)
        db = self._connection()
        siblings = json.dumps(list(state.siblings), separators=(",", ":"))
        try:
            # BEGIN IMMEDIATE: take the write lock up front, so a failure cannot come half-way.
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT OR REPLACE INTO state (id, incarnation, production, consumption, siblings)"
                " VALUES (?, ?, ?, ?, ?)",
                (_STATE_ROW_ID, state.incarnation, state.production, state.consumption,
                 siblings))
            db.execute("COMMIT")  # synchronous=FULL: the WAL is fsynced before this returns
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreError(f"cannot save the node state in {self.data_dir}: {e} "
                             "(is the disk full or read-only?)") from e

    # ------------------------------------------------------------------------ helpers

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the store of {self.data_dir} is closed")
        return self._db

    def _corrupt(self, why: str) -> StoreError:
        return StoreError(_corrupt_message(self.data_dir, why))

    def _decode_row(self, row: tuple[Any, ...]) -> PersistedState:
        incarnation, production, consumption, siblings_json = row
        try:
            siblings = json.loads(siblings_json)
        except (TypeError, ValueError) as e:
            raise self._corrupt(f"the siblings column is not JSON: {e}") from e
        if not (isinstance(siblings, list) and all(isinstance(s, str) for s in siblings)):
            raise self._corrupt("the siblings column is not a list of strings")
        state = PersistedState(
            node_id=self.node_id, incarnation=incarnation, production=production,
            consumption=consumption, siblings=tuple(siblings))
        try:
            _check_state(state)
        except StoreError as e:
            raise self._corrupt(e.message) from e
        return state


# ---------------------------------------------------------------------------- module helpers


def _corrupt_message(data_dir: Path, why: str) -> str:
    return (f"the node state in {data_dir / DB_FILE_NAME} is unreadable or corrupt ({why}); "
            f"move {data_dir} aside and restart: the node then comes back with a higher "
            "incarnation, but its production, consumption and siblings must be set again")


def _check_state(state: PersistedState) -> None:
    # Type checks guard the database too: SQLite would store a NaN as NULL, a str anywhere.
    if isinstance(state.incarnation, bool) or not isinstance(state.incarnation, int) \
            or not 0 <= state.incarnation < 2**63:
        raise StoreError(f"incarnation must be an integer in 0..2**63-1, "
                         f"got {state.incarnation!r}")
    for name in ("production", "consumption"):
        value = getattr(state, name)
        if not isinstance(value, float) or not math.isfinite(value) or value < 0:
            raise StoreError(f"{name} must be a finite float >= 0, got {value!r}")
    if not all(isinstance(s, str) for s in state.siblings):
        raise StoreError(f"siblings must be strings, got {state.siblings!r}")


def _make_data_dir(data_dir: Path) -> None:
    if data_dir.is_dir():
        return
    try:
        data_dir.mkdir(parents=True, mode=DATA_DIR_MODE)
        os.chmod(data_dir, DATA_DIR_MODE)  # mkdir's mode is masked by the umask
    except FileExistsError:
        if not data_dir.is_dir():
            raise StoreError(f"data dir {data_dir} exists and is not a directory: "
                             "pass another --data-dir") from None
    except OSError as e:
        raise StoreError(f"cannot create data dir {data_dir}: {e.strerror}; "
                         "pass a writable --data-dir") from e
    _fsync_dir(data_dir.parent)  # the new directory entry itself must survive a power loss


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # best effort: some filesystems cannot open a directory for fsync
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _acquire_lock(data_dir: Path) -> int:
    path = data_dir / LOCK_FILE_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_FILE_MODE)
    except OSError as e:
        raise StoreError(f"cannot open the lock file {path}: {e.strerror}; "
                         "check the permissions of the data dir") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise StoreError(f"data dir {data_dir} is in use by another zgrid node (pid {pid}): "
                         "stop that node or pass another --data-dir") from None
    except OSError as e:
        os.close(fd)
        raise StoreError(f"cannot lock {path}: {e.strerror}") from e
    # The pid is only a hint for the error message above; the flock is what protects.
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    return fd


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _open_database(data_dir: Path, node_id: str) -> sqlite3.Connection:
    path = data_dir / DB_FILE_NAME
    existed = path.exists()
    try:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per save.
        db = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(_corrupt_message(data_dir, str(e))) from e
    try:
        _configure(db, data_dir)
        _check_or_create_schema(db, data_dir, node_id)
    except BaseException:
        db.close()
        raise
    if not existed:
        _fsync_dir(data_dir)  # make the new file's directory entry durable
    return db


def _configure(db: sqlite3.Connection, data_dir: Path) -> None:
    try:
        # The first statement that reads the header: "file is not a database" shows up here.
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        db.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as e:
        raise StoreError(_corrupt_message(data_dir, str(e))) from e
    if str(mode).lower() != "wal":
        raise StoreError(f"cannot put {data_dir / DB_FILE_NAME} in WAL mode (got {mode!r}); "
                         "the data dir must be on a local filesystem")


def _check_or_create_schema(db: sqlite3.Connection, data_dir: Path, node_id: str) -> None:
    try:
        check = db.execute("PRAGMA quick_check").fetchone()[0]  # cheap: the database is tiny
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as e:
        raise StoreError(_corrupt_message(data_dir, str(e))) from e
    if check != "ok":
        raise StoreError(_corrupt_message(data_dir, f"integrity check: {check}"))
    path = data_dir / DB_FILE_NAME
    if not tables and app_id == 0:
        _create_schema(db, data_dir, node_id)  # new (or killed before its first commit)
        return
    if app_id != APPLICATION_ID:
        raise StoreError(f"{path} is an SQLite file but not a zgrid node state; "
                         "pass another --data-dir or move that file away")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {version}, this zgrid reads only version "
                         f"{SCHEMA_VERSION}: run the zgrid version that wrote it, or move "
                         f"{data_dir} aside (the node then starts with no saved state)")
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'node_id'").fetchone()
    except sqlite3.Error as e:
        raise StoreError(_corrupt_message(data_dir, str(e))) from e
    if row is None or not isinstance(row[0], str):
        raise StoreError(_corrupt_message(data_dir, "no node id recorded"))
    if row[0] != node_id:
        raise StoreError(f"data dir {data_dir} holds the state of node {row[0]!r}, not "
                         f"{node_id!r}: pass --id {row[0]} or another --data-dir")


def _create_schema(db: sqlite3.Connection, data_dir: Path, node_id: str) -> None:
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta (key, value) VALUES ('node_id', ?)", (node_id,))
        db.execute(
            "CREATE TABLE state (id INTEGER PRIMARY KEY CHECK (id = 1),"
            " incarnation INTEGER NOT NULL, production REAL NOT NULL,"
            " consumption REAL NOT NULL, siblings TEXT NOT NULL)")
        # Pragmas are transactional when set inside the transaction that creates the schema:
        # a kill -9 leaves either an empty file (created again next time) or all of it.
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except sqlite3.Error as e:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise StoreError(f"cannot create the node state in {data_dir}: {e}") from e
