"""The sqlite files the middleware keeps beside each other (the feedback outbox, the trace spool): created
for their owner only, and written in short immediate transactions that order the workers sharing them."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path


def create_private(path: str) -> None:
    """Create `path` (and its folder) for its owner only (0600, folder 0700), or make an existing file 0600.

    An existing file is never opened here: closing any descriptor of a file drops every POSIX lock this
    process holds on it, and sqlite's locks (another connection of this process may hold them) are those.
    """
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        with contextlib.suppress(OSError):  # another user's file: theirs to protect
            os.chmod(path, 0o600)


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection, lock: threading.Lock) -> Iterator[sqlite3.Connection]:
    """One write transaction on `conn` (an autocommit connection), taken at once so the workers sharing
    the file queue up for it instead of failing half-way; serialised in this process by `lock`."""
    with lock:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
