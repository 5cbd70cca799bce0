"""
The session table: CLI session id -> workspace, in SQLite through adbapi.

One connection only (cp_max=1): with more, a read-then-write interaction lost updates. WAL keeps
readers off the writer's back and makes a commit cheap; every write is committed before it returns, so
a session id handed to a client is already on disk when the client sees it.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any, cast

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, inlineCallbacks

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    claude_session_id TEXT PRIMARY KEY,
    workspace_path TEXT NOT NULL,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    last_used_at DATETIME DEFAULT CURRENT_TIMESTAMP
)
"""


GROUPS = (
    "SELECT workspace_path, MIN(created_at), MAX(last_used_at) AS last, MAX(rid) AS newest, "
    "json_group_array(claude_session_id) FROM (SELECT rowid AS rid, * FROM sessions ORDER BY rowid) "
    "GROUP BY workspace_path"
)


@dataclass(frozen=True)
class SessionGroup:
    """The ids that share one workspace, newest first; C{session_id} is the one to resume."""

    session_ids: list[str]
    workspace: str
    created_at: str
    last_used_at: str

    @property
    def session_id(self) -> str:
        return self.session_ids[0]


def _groups(rows: list[tuple[Any, ...]]) -> list[SessionGroup]:
    return [SessionGroup(list(reversed(json.loads(ids))), workspace, created, last)
            for workspace, created, last, _, ids in rows]


def _open(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=5000")


class SessionStore:
    """Async access to the sessions table; every method returns a Deferred."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = adbapi.ConnectionPool(
            "sqlite3", path, check_same_thread=False, cp_min=1, cp_max=1, cp_openfun=_open,
            cp_noisy=False,
        )

    @inlineCallbacks
    def start(self) -> Any:
        """Create the table if needed (the seed's schema, unchanged)."""
        yield self._pool.runOperation(SCHEMA)
        yield self._pool.runOperation(
            "CREATE INDEX IF NOT EXISTS sessions_workspace ON sessions(workspace_path)")

    def close(self) -> None:
        self._pool.close()

    def record(self, session_id: str, workspace: str) -> Deferred[None]:
        """Insert the id, or mark it used again; the workspace of a known id never changes."""
        return cast("Deferred[None]", self._pool.runOperation(
            "INSERT INTO sessions (claude_session_id, workspace_path) VALUES (?, ?) "
            "ON CONFLICT(claude_session_id) DO UPDATE SET last_used_at = CURRENT_TIMESTAMP",
            (session_id, workspace)))

    def lookup(self, session_id: str) -> Deferred[str | None]:
        """The stored workspace path of a session id, or None."""
        d = self._pool.runQuery(
            "SELECT workspace_path FROM sessions WHERE claude_session_id = ?", (session_id,))
        return cast("Deferred[str | None]", d.addCallback(lambda rows: rows[0][0] if rows else None))

    def touch(self, session_id: str) -> Deferred[None]:
        return cast("Deferred[None]", self._pool.runOperation(
            "UPDATE sessions SET last_used_at = CURRENT_TIMESTAMP WHERE claude_session_id = ?",
            (session_id,)))

    def groups(self, limit: int, offset: int) -> Deferred[list[SessionGroup]]:
        """Sessions grouped by workspace (a resumed session that got a new id is one group),
        the most recently used first."""
        d = self._pool.runQuery(GROUPS + " ORDER BY last DESC, newest DESC LIMIT ? OFFSET ?", (limit, offset))
        return cast("Deferred[list[SessionGroup]]", d.addCallback(_groups))

    def group_of(self, session_id: str) -> Deferred[SessionGroup | None]:
        d = self._pool.runQuery(
            GROUPS.replace("GROUP BY", "WHERE workspace_path = (SELECT workspace_path FROM sessions "
                                       "WHERE claude_session_id = ?) GROUP BY"), (session_id,))
        return cast("Deferred[SessionGroup | None]", d.addCallback(lambda rows: next(iter(_groups(rows)), None)))

    def idle_since(self, cutoff: str) -> Deferred[list[SessionGroup]]:
        """Groups whose last use is older than C{cutoff} ('YYYY-MM-DD HH:MM:SS', UTC)."""
        d = self._pool.runQuery(GROUPS + " HAVING last < ?", (cutoff,))
        return cast("Deferred[list[SessionGroup]]", d.addCallback(_groups))

    def delete_workspace(self, workspace: str) -> Deferred[None]:
        return cast("Deferred[None]", self._pool.runOperation(
            "DELETE FROM sessions WHERE workspace_path = ?", (workspace,)))

    def ping(self) -> Deferred[Any]:
        return self._pool.runQuery("SELECT 1")
