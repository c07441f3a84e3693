"""SQLite the way the catalog uses it: one connection per thread, re-entrant transactions, a
key-value `meta` table, and read-only opening that also works on read-only file systems."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from netvlad.errors import IndexStoreError


class SQLiteDatabase:
    """A SQLite file (WAL, synchronous=FULL: a committed change survives a crash) with a `meta`
    table. One connection per thread; `transaction()` is re-entrant within a thread, so several
    writes can be grouped into one atomic commit. `readonly` opens it for reading only, also on a
    read-only file system (where SQLite cannot create the WAL's shared-memory file, the file is
    opened as immutable: nobody can write it there)."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._uri = f"file:{quote(str(self.path.resolve()))}?mode=ro" if readonly else None
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _open_readonly(self) -> None:
        if not self.path.is_file():
            raise IndexStoreError(f"{self.path}: no catalog")
        try:
            self.connection.execute("SELECT COUNT(*) FROM meta").fetchone()
        except sqlite3.OperationalError:  # e.g. "unable to open database file" on a read-only folder
            self.close()
            self._uri = f"file:{quote(str(self.path.resolve()))}?immutable=1"

    @property
    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            target = self._uri or self.path
            conn = sqlite3.connect(target, timeout=60, isolation_level=None, check_same_thread=False,
                                   uri=self._uri is not None)
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn, self._local.depth = conn, 0
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error); nested calls join the outer transaction."""
        conn = self.connection
        if self._local.depth:
            self._local.depth += 1
            try:
                yield conn
            finally:
                self._local.depth -= 1
            return
        conn.execute("BEGIN IMMEDIATE")
        self._local.depth = 1
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")
        finally:
            self._local.depth = 0

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def get_meta(self, key: str) -> str | None:
        row = self.connection.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: object) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, str(value)),
            )
