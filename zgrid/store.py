"""A node's own durable state in its data directory (stdlib sqlite3, WAL, synchronous=FULL).

What it is for: the runtime saves the core's `PersistedState` (id, incarnation, production,
consumption, siblings, the siblings it unlinked, the link requests not answered yet) and
acknowledges a `set`/`link`/`unlink` only after `Store.save` has returned, so nothing
acknowledged is ever lost; after a restart `Store.load` gives the node back its last state.
With it, in the same row and transaction, the runtime saves the state of its device model
(`zgrid.devices.device_record`, a JSON object the store does not interpret;
`Store.load_device` reads it back).

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
- Storage failures are not corruption: when the disk is full, the filesystem read-only, the
  files not writable or the disk reports an I/O error, `open` and `save` raise
  `StorageFailure` (a StoreError), whose message says how to fix the storage and never to move
  the state aside: that state is intact, and moving it would throw it away. Only evidence that
  the file itself is damaged (SQLite's CORRUPT/NOTADB, a failed integrity check, values that
  cannot be ours) gets the "unreadable or corrupt ... move aside" message.

What it must never do: import zmq or know about the protocol; write anywhere but its own data
dir; return (or let the node acknowledge) before the state is durable; silently "repair" a
database it cannot read (that would lose acknowledged state: the operator decides).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from zgrid.errors import StorageFailure, StoreError
from zgrid.persisted import PersistedState
from zgrid.wire import Flex, check_node_id

SCHEMA_VERSION = 5
# Versions this zgrid upgrades in place when it opens them (1: no `unlinked` column, 2: no
# `flex` column, 3: no `device` column, 4: no `linking` column).
UPGRADABLE_SCHEMA_VERSIONS = frozenset({1, 2, 3, 4})
_NO_FLEX_JSON = "[0.0,0.0,0.0,0.0]"
# PRAGMA application_id marks the file as ours, so a foreign SQLite file is refused, not reused.
APPLICATION_ID = 0x7A677264  # b"zgrd"
DB_FILE_NAME = "state.sqlite3"
LOCK_FILE_NAME = "lock"
DATA_DIR_MODE = 0o700  # the state is nobody else's business
LOCK_FILE_MODE = 0o600
# We hold the flock, so nobody else should ever hold a SQLite lock: never wait for one.
SQLITE_BUSY_TIMEOUT_S = 0.0

_STATE_ROW_ID = 1  # the state is a single row: one UPDATE per save, one page in the WAL
# SQLite reports a -shm file that cannot grow on a full disk as SQLITE_IOERR_SHMSIZE, not as
# SQLITE_FULL: an I/O error with less free space than this is taken for a full disk.
LOW_SPACE_BYTES = 64 * 1024
_SQLITE_PRIMARY_CODE_MASK = 0xFF  # an extended result code's low byte is its primary code
# Primary codes that blame the storage (space, permissions, the device), not the file.
_STORAGE_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR,
                            sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM})
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_OS_STORAGE_CAUSES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk full",
                      errno.EROFS: "read-only filesystem", errno.EACCES: "not writable",
                      errno.EPERM: "not writable", errno.EIO: "I/O error"}


class Store:
    """The durable state of one node; use `Store.open`, then `load`/`save`, then `close`."""

    def __init__(self, data_dir: Path, node_id: str, lock_fd: int,
                 db: sqlite3.Connection, fail_saves_while: Path | None = None) -> None:
        # Private: `Store.open` acquires the lock and validates the database first.
        self.data_dir = data_dir
        self.node_id = node_id
        self._lock_fd: int | None = lock_fd
        self._db: sqlite3.Connection | None = db
        self._fail_saves_while = fail_saves_while

    # ------------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, data_dir: Path, node_id: str, *,
             fail_saves_while: Path | None = None) -> Store:
        """Lock `data_dir` (creating it 0700 if missing) and open or create its database.

        Raises StoreError if another process holds the dir, or the database belongs to another
        node id, has an unknown schema version, or cannot be read; StorageFailure if the
        storage (space, permissions, the device) is what fails.

        fail_saves_while: testing only. While this path exists, every `save` fails with the
        error SQLite gives for a full disk, so tests can fill the disk without filling one.
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
        return cls(data_dir, node_id, lock_fd, db, fail_saves_while)

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
                "SELECT incarnation, production, consumption, siblings, unlinked, flex, linking"
                " FROM state WHERE id = ?", (_STATE_ROW_ID,)).fetchone()
        except sqlite3.Error as e:
            raise _open_failure(self.data_dir, e, "read") from e
        if row is None:
            return None
        return self._decode_row(row)

    def load_device(self) -> dict[str, Any] | None:
        """The device record saved last (a JSON object), or None if none ever was."""
        db = self._connection()
        try:
            row = db.execute("SELECT device FROM state WHERE id = ?",
                             (_STATE_ROW_ID,)).fetchone()
        except sqlite3.Error as e:
            raise _open_failure(self.data_dir, e, "read") from e
        if row is None or row[0] is None:
            return None
        try:
            record = json.loads(row[0]) if isinstance(row[0], str) else None
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise self._corrupt(f"the device column is not a JSON object: {row[0]!r:.80}")
        return record

    def save(self, state: PersistedState, device: Mapping[str, Any] | None = None) -> None:
        """Write `state` durably; returns only once it survives a crash or power loss.

        device: the state of the node's device model (a JSON-able mapping of finite numbers,
        strings ...), written in the same transaction; None keeps the one saved last.

        On StoreError nothing was changed on disk, and the caller must not acknowledge. It is
        a StorageFailure whenever SQLite refused the write (disk full, read-only, I/O error, a
        damaged file): the state on disk is still the last one saved.
        """
        if state.node_id != self.node_id:
            raise StoreError(f"refusing to save the state of node {state.node_id!r} in the data "
                             f"dir of node {self.node_id!r} ({self.data_dir})")
        _check_state(state)
        device_json = None if device is None else _encode_device(device)
        db = self._connection()
        siblings = json.dumps(list(state.siblings), separators=(",", ":"))
        unlinked = json.dumps(list(state.unlinked), separators=(",", ":"))
        linking = json.dumps(list(state.linking), separators=(",", ":"))
        f = state.flex
        flex = json.dumps([f.flex_up_kw, f.price_up, f.flex_down_kw, f.price_down],
                          separators=(",", ":"))
        try:
            # BEGIN IMMEDIATE: take the write lock up front, so a failure cannot come half-way.
            db.execute("BEGIN IMMEDIATE")
            # The subquery reads the row before it is replaced: no device keeps the saved one.
            db.execute(
                "INSERT OR REPLACE INTO state (id, incarnation, production, consumption, siblings,"
                " unlinked, flex, linking, device) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
                " COALESCE(?, (SELECT device FROM state WHERE id = ?)))",
                (_STATE_ROW_ID, state.incarnation, state.production, state.consumption,
                 siblings, unlinked, flex, linking, device_json, _STATE_ROW_ID))
            if self._fail_saves_while is not None and self._fail_saves_while.exists():
                raise _simulated_full_disk()
            db.execute("COMMIT")  # synchronous=FULL: the WAL is fsynced before this returns
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise _save_failure(self.data_dir, e) from e

    # ------------------------------------------------------------------------ helpers

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"the store of {self.data_dir} is closed")
        return self._db

    def _corrupt(self, why: str) -> StoreError:
        return StoreError(_corrupt_message(self.data_dir, why))

    def _decode_flex(self, text: Any) -> Flex:
        try:
            values = json.loads(text) if isinstance(text, str) else None
            if not (isinstance(values, list) and len(values) == 4 and all(
                    type(x) in (int, float) for x in values)):
                raise ValueError(f"must be a list of 4 numbers, got {text!r}")
            return Flex(*(float(x) for x in values))
        except ValueError as e:
            raise self._corrupt(f"flex {e}") from None

    def _decode_row(self, row: tuple[Any, ...]) -> PersistedState:
        (incarnation, production, consumption, siblings_json, unlinked_json, flex_json,
         linking_json) = row
        siblings = self._decode_addresses("siblings", siblings_json)
        unlinked = self._decode_addresses("unlinked", unlinked_json)
        linking = self._decode_addresses("linking", linking_json)
        state = PersistedState(
            node_id=self.node_id, incarnation=incarnation, production=production,
            consumption=consumption, siblings=siblings, unlinked=unlinked,
            flex=self._decode_flex(flex_json), linking=linking)
        try:
            _check_state(state)
        except StoreError as e:
            raise self._corrupt(e.message) from e
        return state


    def _decode_addresses(self, column: str, text: Any) -> tuple[str, ...]:
        try:
            addresses = json.loads(text)
        except (TypeError, ValueError) as e:
            raise self._corrupt(f"the {column} column is not JSON: {e}") from e
        if not (isinstance(addresses, list) and all(isinstance(s, str) for s in addresses)):
            raise self._corrupt(f"the {column} column is not a list of strings")
        return tuple(addresses)


# ---------------------------------------------------------------------------- module helpers


def _corrupt_message(data_dir: Path, why: str) -> str:
    return (f"the node state in {data_dir / DB_FILE_NAME} is unreadable or corrupt ({why}); "
            f"move {data_dir} aside and restart: the node then comes back with a higher "
            "incarnation, but its production, consumption and siblings must be set again")


def _primary_code(error: sqlite3.Error) -> int:
    code: int = getattr(error, "sqlite_errorcode", 0) or 0
    return code & _SQLITE_PRIMARY_CODE_MASK


def _storage_cause(data_dir: Path, error: sqlite3.Error) -> str | None:
    """What is wrong with the storage under `data_dir`, in a few words; None if `error` does
    not blame the storage (then it may be the file itself)."""
    primary = _primary_code(error)
    if primary == sqlite3.SQLITE_FULL:
        return "disk full"
    if primary not in _STORAGE_CODES:
        return None
    # SQLite does not say which errno was behind an I/O or open error: ask the filesystem.
    try:
        fs = os.statvfs(data_dir)
    except OSError:
        fs = None
    if fs is not None and fs.f_flag & os.ST_RDONLY:
        return "read-only filesystem"
    if fs is not None and fs.f_bavail * fs.f_frsize < LOW_SPACE_BYTES:
        return "disk full"
    paths = [data_dir, *(data_dir / f"{DB_FILE_NAME}{suffix}" for suffix in ("", "-wal", "-shm"))]
    if any(p.exists() and not os.access(p, os.W_OK) for p in paths):
        return "not writable"
    if primary == sqlite3.SQLITE_READONLY:
        return "read-only"
    if primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return "cannot open files"
    return "I/O error"


def _storage_advice(data_dir: Path, cause: str) -> str:
    """What the operator should do about `cause` (from `_storage_cause`)."""
    if cause == "disk full":
        return f"free space on the filesystem holding {data_dir}"
    if cause == "read-only filesystem":
        return f"remount the filesystem holding {data_dir} read-write"
    if cause in ("not writable", "read-only", "cannot open files"):
        return (f"give this process (uid {os.getuid()}) write access to {data_dir} and the "
                "files in it")
    return f"check the disk holding {data_dir} (the kernel log says more)"


def _save_failure(data_dir: Path, error: sqlite3.Error) -> StorageFailure:
    cause = _storage_cause(data_dir, error)
    if cause is not None:
        return StorageFailure(f"{cause}: cannot save the node state in {data_dir} (SQLite: "
                              f"{error}); {_storage_advice(data_dir, cause)}", cause)
    if _primary_code(error) in _CORRUPT_CODES:
        return StorageFailure(f"damaged state file: cannot save the node state in "
                              f"{data_dir / DB_FILE_NAME} (SQLite: {error}); the node runs on "
                              "with its last saved state in memory: restore the file from a "
                              "backup, or stop the node and start it on a fresh --data-dir",
                              "damaged state file")
    name = getattr(error, "sqlite_errorname", "unknown")
    return StorageFailure(f"cannot save the node state in {data_dir} (SQLite: {error}, "
                          f"{name})", "cannot save")


def _open_failure(data_dir: Path, error: sqlite3.Error, doing: str = "open") -> StoreError:
    """The error for a database that cannot be opened or read: a StorageFailure, corruption,
    or neither (then no advice to move anything: nothing shows the state is damaged)."""
    path = data_dir / DB_FILE_NAME
    cause = _storage_cause(data_dir, error)
    if cause is not None:
        return StorageFailure(
            f"{cause}: cannot {doing} the node state in {path} (SQLite: {error}); "
            f"{_storage_advice(data_dir, cause)}, then start the node again. This is a storage "
            f"problem, not a damaged state: do not move {data_dir} aside (that would throw its "
            "saved state away)", cause)
    if _primary_code(error) in _CORRUPT_CODES:
        return StoreError(_corrupt_message(data_dir, str(error)))
    name = getattr(error, "sqlite_errorname", "unknown")
    return StoreError(f"cannot {doing} the node state in {path}: SQLite says {error} ({name}); "
                      f"nothing shows that the state is damaged, so keep {data_dir} as it is "
                      "and find the cause")


def _os_failure(what: str, path: Path, error: OSError, advice: str, data_dir: Path
                ) -> StoreError:
    cause = _OS_STORAGE_CAUSES.get(error.errno or 0)
    if cause is None:
        return StoreError(f"{what} {path}: {error.strerror}; {advice}")
    return StorageFailure(f"{cause}: {what} {path}: {error.strerror}; "
                          f"{_storage_advice(data_dir, cause)}", cause)


def _simulated_full_disk() -> sqlite3.OperationalError:
    """Exactly what sqlite3 raises when a write finds the disk full (the test hook's error)."""
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL
    error.sqlite_errorname = "SQLITE_FULL"
    return error


def _encode_device(device: Mapping[str, Any]) -> str:
    """A device record as JSON text; StoreError for what JSON cannot hold exactly (NaN, an
    infinity, a value that is not a number, string, list or mapping)."""
    if not isinstance(device, Mapping):
        raise StoreError(f"a device record must be a mapping, got {type(device).__name__}")
    try:
        return json.dumps(device, allow_nan=False, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise StoreError(f"cannot save the device record {device!r:.200}: {e}") from None


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
    if not all(isinstance(s, str) for s in state.unlinked):
        raise StoreError(f"unlinked must be strings, got {state.unlinked!r}")
    if not all(isinstance(s, str) for s in state.linking):
        raise StoreError(f"linking must be strings, got {state.linking!r}")


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
        raise _os_failure("cannot create data dir", data_dir, e,
                          "pass a writable --data-dir", data_dir) from e
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
        raise _os_failure("cannot open the lock file", path, e,
                          "check the permissions of the data dir", data_dir) from e
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
        raise _open_failure(data_dir, e) from e
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
        raise _open_failure(data_dir, e) from e
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
        raise _open_failure(data_dir, e) from e
    if check != "ok":
        raise StoreError(_corrupt_message(data_dir, f"integrity check: {check}"))
    path = data_dir / DB_FILE_NAME
    if not tables and app_id == 0:
        _create_schema(db, data_dir, node_id)  # new (or killed before its first commit)
        return
    if app_id != APPLICATION_ID:
        raise StoreError(f"{path} is an SQLite file but not a zgrid node state; "
                         "pass another --data-dir or move that file away")
    if version != SCHEMA_VERSION and version not in UPGRADABLE_SCHEMA_VERSIONS:
        raise StoreError(f"{path} has schema version {version}, this zgrid reads only version "
                         f"{SCHEMA_VERSION}: run the zgrid version that wrote it, or move "
                         f"{data_dir} aside (the node then starts with no saved state)")
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'node_id'").fetchone()
    except sqlite3.Error as e:
        raise _open_failure(data_dir, e) from e
    if row is None or not isinstance(row[0], str):
        raise StoreError(_corrupt_message(data_dir, "no node id recorded"))
    if row[0] != node_id:
        raise StoreError(f"data dir {data_dir} holds the state of node {row[0]!r}, not "
                         f"{node_id!r}: pass --id {row[0]} or another --data-dir")
    if version != SCHEMA_VERSION:
        _upgrade(db, data_dir, version)


@contextlib.contextmanager
def _schema_transaction(db: sqlite3.Connection, data_dir: Path, doing: str) -> Iterator[None]:
    """One write transaction for a schema change: SQLite's DDL, ALTER TABLE and the pragmas
    set in it are transactional, so a kill -9 leaves the file as before or as after."""
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("COMMIT")
    except sqlite3.Error as e:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise _open_failure(data_dir, e, doing) from e


def _upgrade(db: sqlite3.Connection, data_dir: Path, version: int) -> None:
    """Add what older versions lack: `unlinked` (version 1), `flex` (versions 1 and 2),
    `device` (versions 1 to 3), `linking` (versions 1 to 4), with the values that mean
    "none"."""
    with _schema_transaction(db, data_dir, "upgrade"):
        if version < 2:
            db.execute("ALTER TABLE state ADD COLUMN unlinked TEXT NOT NULL DEFAULT '[]'")
        if version < 3:
            db.execute("ALTER TABLE state ADD COLUMN flex TEXT NOT NULL DEFAULT "
                       f"'{_NO_FLEX_JSON}'")
        if version < 4:
            db.execute("ALTER TABLE state ADD COLUMN device TEXT")  # NULL: no device saved
        db.execute("ALTER TABLE state ADD COLUMN linking TEXT NOT NULL DEFAULT '[]'")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _create_schema(db: sqlite3.Connection, data_dir: Path, node_id: str) -> None:
    # A kill -9 leaves either an empty file (created again next time) or all of it.
    with _schema_transaction(db, data_dir, "create"):
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta (key, value) VALUES ('node_id', ?)", (node_id,))
        db.execute(
            "CREATE TABLE state (id INTEGER PRIMARY KEY CHECK (id = 1),"
            " incarnation INTEGER NOT NULL, production REAL NOT NULL,"
            " consumption REAL NOT NULL, siblings TEXT NOT NULL,"
            " unlinked TEXT NOT NULL DEFAULT '[]',"
            f" flex TEXT NOT NULL DEFAULT '{_NO_FLEX_JSON}', device TEXT,"
            " linking TEXT NOT NULL DEFAULT '[]')")
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
