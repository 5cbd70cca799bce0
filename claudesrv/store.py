"""
The session table: CLI session id -> workspace, in SQLite, through adbapi in the daemon.

One connection only (cp_max=1): with more, a read-then-write interaction lost updates. WAL keeps
readers off the writer's back and makes a commit cheap; every write is committed before it returns, so
a session id handed to a client is already on disk when the client sees it. The SQL stays in this module;
where it runs (a pool thread, or inline in tests) is a L{Database}, and times come from the injected clock.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from claudesrv.batches import Batches

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    claude_session_id TEXT PRIMARY KEY,
    workspace_path TEXT NOT NULL,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    last_used_at DATETIME DEFAULT CURRENT_TIMESTAMP
)
"""

# tools a person allowed for the rest of a session ("remember": "tool"); they go with the session's row
REMEMBERED = """
CREATE TABLE IF NOT EXISTS remembered_tools (
    claude_session_id TEXT NOT NULL REFERENCES sessions(claude_session_id) ON DELETE CASCADE,
    tool_name TEXT NOT NULL,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (claude_session_id, tool_name)
)
"""

# what a session's turns cost, summed (from each result's per-turn usage)
USAGE = """
CREATE TABLE IF NOT EXISTS session_usage (
    claude_session_id TEXT PRIMARY KEY REFERENCES sessions(claude_session_id) ON DELETE CASCADE,
    turns INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_tokens INTEGER NOT NULL DEFAULT 0
)
"""
# which session a stateless chat request continues (claudesrv.compat): "head:<conversation hash>" (a
# session's latest state only) and "chat:<Open WebUI chat id>"
CONVERSATIONS = """
CREATE TABLE IF NOT EXISTS conversations (
    key TEXT PRIMARY KEY,
    claude_session_id TEXT NOT NULL REFERENCES sessions(claude_session_id) ON DELETE CASCADE
)
"""
TOKEN_KINDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens")
ADD_USAGE = (
    f"INSERT INTO session_usage (claude_session_id, turns, cost_usd, {', '.join(TOKEN_KINDS)}) "
    "VALUES (?, 1, ?, ?, ?, ?, ?) ON CONFLICT(claude_session_id) DO UPDATE SET turns = turns + 1, "
    "cost_usd = cost_usd + excluded.cost_usd, "
    + ", ".join(f"{k} = {k} + excluded.{k}" for k in TOKEN_KINDS))


# the project a session works in (claudesrv.projects), and its worktree's base commit if it has one
PROJECTS = """
CREATE TABLE IF NOT EXISTS session_projects (
    claude_session_id TEXT PRIMARY KEY REFERENCES sessions(claude_session_id) ON DELETE CASCADE,
    project TEXT NOT NULL,
    worktree TEXT,
    base TEXT
)
"""

# ids that share a workspace are one session (a resume the CLI answered with a new id); sessions in a
# project's own folder share it and are each their own
GROUPS = (
    "SELECT workspace_path, MIN(created_at), MAX(last_used_at) AS last, MAX(rid) AS newest, "
    "json_group_array(claude_session_id) FROM (SELECT s.rowid AS rid, s.*, CASE WHEN p.worktree IS NULL AND "
    "p.project IS NOT NULL THEN s.claude_session_id ELSE s.workspace_path END AS grouping FROM sessions s "
    "LEFT JOIN session_projects p USING (claude_session_id) ORDER BY s.rowid) "
    "GROUP BY grouping"
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


T = TypeVar("T")
Interaction = Callable[..., T]


class Database(Protocol):
    """Where the store's SQL runs; each interaction is committed before its Deferred fires."""

    def run(self, interaction: Interaction[T], *args: Any) -> Deferred[T]: ...

    def close(self) -> None: ...


class PooledSqlite:
    """The daemon's: sqlite3 through adbapi, in a thread, on one connection."""

    def __init__(self, path: str) -> None:
        self._pool = adbapi.ConnectionPool(
            "sqlite3", path, check_same_thread=False, cp_min=1, cp_max=1, cp_openfun=_open, cp_noisy=False)

    def run(self, interaction: Interaction[T], *args: Any) -> Deferred[T]:
        return cast("Deferred[T]", self._pool.runInteraction(interaction, *args))

    def close(self) -> None:
        self._pool.close()


class InlineSqlite:
    """sqlite3 in the caller's thread: the same SQL with no thread, for in-process tests."""

    def __init__(self, path: str) -> None:
        self._connection = sqlite3.connect(path)
        _open(self._connection)

    def run(self, interaction: Interaction[T], *args: Any) -> Deferred[T]:
        cursor = self._connection.cursor()
        try:
            result = interaction(cursor, *args)
        except Exception:
            self._connection.rollback()
            return fail()
        self._connection.commit()
        return succeed(result)

    def close(self) -> None:
        self._connection.close()


def _execute(cursor: Any, sql: str, params: tuple[Any, ...]) -> None:
    cursor.execute(sql, params)


def _execute_many(cursor: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
    cursor.executemany(sql, rows)


RECORD = ("INSERT INTO sessions (claude_session_id, workspace_path, created_at, last_used_at) VALUES (?, ?, ?, ?) "
          "ON CONFLICT(claude_session_id) DO UPDATE SET last_used_at = excluded.last_used_at")


def _turn_ended(cursor: Any, session_id: str, now: str, usage: dict[str, dict[str, float]]) -> None:
    cursor.execute("UPDATE sessions SET last_used_at = ? WHERE claude_session_id = ?", (now, session_id))
    if usage and cursor.rowcount:
        sums = [sum(u.get(k, 0) for u in usage.values()) for k in ("cost_usd", *TOKEN_KINDS)]
        cursor.execute(ADD_USAGE, (session_id, *sums))


def _advance(cursor: Any, session_id: str, head: str, chat: str | None) -> None:
    cursor.execute("DELETE FROM conversations WHERE claude_session_id = ? AND key LIKE 'head:%'", (session_id,))
    cursor.execute("INSERT OR REPLACE INTO conversations (key, claude_session_id) VALUES (?, ?)", (head, session_id))
    if chat is not None:
        cursor.execute("INSERT OR REPLACE INTO conversations (key, claude_session_id) VALUES (?, ?)",
                       (chat, session_id))


def _create_tables(cursor: Any) -> None:
    for statement in (SCHEMA, REMEMBERED, USAGE, CONVERSATIONS, PROJECTS,
                      "CREATE INDEX IF NOT EXISTS conversations_session ON conversations(claude_session_id)",
                      "CREATE INDEX IF NOT EXISTS sessions_workspace ON sessions(workspace_path)"):
        cursor.execute(statement)


def _query(cursor: Any, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    cursor.execute(sql, params)
    return list(cursor.fetchall())


class SessionStore:
    """Async access to the sessions table; every method returns a Deferred. Times come from C{clock}."""

    def __init__(self, db: Database, clock: IReactorTime) -> None:
        self.db = db
        self.clock = clock
        self._records: Batches[tuple[str, str, str, str]] = Batches(
            lambda rows: self.db.run(_execute_many, RECORD, rows))

    def now(self) -> str:
        """The clock's time as SQLite's CURRENT_TIMESTAMP writes it (UTC, to the second)."""
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.clock.seconds()))

    def _execute(self, sql: str, *params: Any) -> Deferred[None]:
        return self.db.run(_execute, sql, params)

    def _query(self, sql: str, *params: Any) -> Deferred[list[tuple[Any, ...]]]:
        return self.db.run(_query, sql, params)

    def start(self) -> Deferred[None]:
        """
        Create the tables if needed (the seed's sessions table unchanged), in one interaction asked for before
        the daemon listens: the one database connection runs interactions in order, so no request's can come
        before the tables exist.
        """
        return self.db.run(_create_tables)

    def close(self) -> None:
        self.db.close()

    def record(self, session_id: str, workspace: str) -> Deferred[None]:
        """
        Insert the id, or mark it used again; the workspace of a known id never changes. Records asked for
        while one is being written are written together, in one transaction (a burst of new sessions costs
        a few commits, not one each).
        """
        now = self.now()
        return self._records.add((session_id, workspace, now, now))

    def lookup(self, session_id: str) -> Deferred[str | None]:
        """The stored workspace path of a session id, or None."""
        d = self._query("SELECT workspace_path FROM sessions WHERE claude_session_id = ?", session_id)
        return d.addCallback(lambda rows: rows[0][0] if rows else None)

    def touch(self, session_id: str, usage: dict[str, dict[str, float]] | None = None) -> Deferred[None]:
        """Mark the session used (a turn ended), adding what the turn cost (per model) to its sums."""
        return self.db.run(_turn_ended, session_id, self.now(), usage or {})

    def usage(self, session_ids: list[str]) -> Deferred[dict[str, float]]:
        """What these ids' turns cost in all: turns, cost_usd and tokens by kind."""
        marks = ", ".join("?" * len(session_ids))
        d = self._query(f"SELECT SUM(turns), SUM(cost_usd), {', '.join(f'SUM({k})' for k in TOKEN_KINDS)} "
                        f"FROM session_usage WHERE claude_session_id IN ({marks})", *session_ids)
        names = ("turns", "cost_usd", *TOKEN_KINDS)
        return d.addCallback(lambda rows: {n: (v or 0) for n, v in zip(names, rows[0], strict=True)})

    def groups(self, limit: int, offset: int) -> Deferred[list[SessionGroup]]:
        """Sessions grouped by workspace (a resumed session that got a new id is one group),
        the most recently used first."""
        d = self._query(GROUPS + " ORDER BY last DESC, newest DESC LIMIT ? OFFSET ?", limit, offset)
        return d.addCallback(_groups)

    def group_of(self, session_id: str) -> Deferred[SessionGroup | None]:
        """The group of one id: only the rows of its workspace are grouped (by the workspace index)."""
        one = GROUPS.replace("ORDER BY s.rowid)", "WHERE s.workspace_path = (SELECT workspace_path FROM sessions "
                                                  "WHERE claude_session_id = ?) ORDER BY s.rowid)")
        d = self._query(one + " HAVING SUM(claude_session_id = ?) > 0", session_id, session_id)
        return d.addCallback(lambda rows: next(iter(_groups(rows)), None))

    def idle_since(self, cutoff: str) -> Deferred[list[SessionGroup]]:
        """Groups whose last use is older than C{cutoff} ('YYYY-MM-DD HH:MM:SS', UTC)."""
        return self._query(GROUPS + " HAVING last < ?", cutoff).addCallback(_groups)

    def delete_sessions(self, session_ids: list[str]) -> Deferred[None]:
        """These ids' rows, and with them what other tables hold of them."""
        return self._execute(f"DELETE FROM sessions WHERE claude_session_id IN ({', '.join('?' * len(session_ids))})",
                             *session_ids)

    def record_project(self, session_id: str, project: str, worktree: str | None, base: str | None
                       ) -> Deferred[None]:
        return self._execute("INSERT OR REPLACE INTO session_projects (claude_session_id, project, worktree, base) "
                             "VALUES (?, ?, ?, ?)", session_id, project, worktree, base)

    def project_of(self, session_id: str) -> Deferred[tuple[str, str | None, str | None] | None]:
        """(project, worktree, base) of a session in a project, else None."""
        d = self._query("SELECT project, worktree, base FROM session_projects WHERE claude_session_id = ?",
                        session_id)
        return d.addCallback(lambda rows: tuple(rows[0]) if rows else None)

    def remembered(self, session_id: str) -> Deferred[set[str]]:
        """The tools a person allowed for the rest of this session."""
        d = self._query("SELECT tool_name FROM remembered_tools WHERE claude_session_id = ?", session_id)
        return d.addCallback(lambda rows: {r[0] for r in rows})

    def forget(self, session_id: str, tool: str) -> Deferred[None]:
        return self._execute("DELETE FROM remembered_tools WHERE claude_session_id = ? AND tool_name = ?",
                             session_id, tool)

    def remember(self, session_id: str, tool: str) -> Deferred[None]:
        return self._execute("INSERT OR IGNORE INTO remembered_tools (claude_session_id, tool_name, created_at) "
                             "VALUES (?, ?, ?)", session_id, tool, self.now())

    def conversation(self, key: str) -> Deferred[str | None]:
        d = self._query("SELECT claude_session_id FROM conversations WHERE key = ?", key)
        return d.addCallback(lambda rows: rows[0][0] if rows else None)

    def advance_conversation(self, session_id: str, head: str, chat: str | None) -> Deferred[None]:
        """The session's conversation has a new head (its old one is forgotten); a chat id binds to it."""
        return self.db.run(_advance, session_id, head, chat)

    def known(self) -> Deferred[tuple[set[str], set[str]]]:
        """Every session id and every workspace path in the table."""
        d = self._query("SELECT claude_session_id, workspace_path FROM sessions")
        return d.addCallback(lambda rows: ({r[0] for r in rows}, {r[1] for r in rows}))

    def ping(self) -> Deferred[Any]:
        return self._query("SELECT 1")
