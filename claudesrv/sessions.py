"""
Session housekeeping: deleting a session with its workspace (and, if asked, the CLI's transcripts),
expiring idle ones, and telling a supervisor whether the daemon is ready.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any

from twisted.internet import utils
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from claudesrv.command import is_canonical_uuid
from claudesrv.runs import RunManager
from claudesrv.store import SessionGroup, SessionStore
from claudesrv.workspaces import Workspaces

log = Logger()

VERSION_CHECK_EVERY = 60.0


def transcript_paths(config_dir: str, session_ids: list[str]) -> list[str]:
    """The CLI's own transcript files of these ids: ``<config>/projects/*/<id>.jsonl``, nothing else."""
    paths: list[str] = []
    for sid in session_ids:
        if is_canonical_uuid(sid):
            paths += glob.glob(os.path.join(glob.escape(config_dir), "projects", "*", f"{sid}.jsonl"))
    return paths


class Sessions:
    def __init__(self, store: SessionStore, workspaces: Workspaces, runs: RunManager,
                 environ: dict[str, str]) -> None:
        self.store = store
        self.workspaces = workspaces
        self.runs = runs
        self.config_dir = environ.get("CLAUDE_CONFIG_DIR") or os.path.join(
            environ.get("HOME", os.path.expanduser("~")), ".claude")

    @inlineCallbacks
    def delete(self, group: SessionGroup, purge_transcript: bool = False) -> Any:
        """Rows first (so the session is gone for every client at once), then the files."""
        yield self.store.delete_workspace(group.workspace)
        yield deferToThread(self.workspaces.remove, group.workspace)
        if purge_transcript:
            for path in transcript_paths(self.config_dir, group.session_ids):
                try:
                    os.remove(path)
                except OSError as e:
                    log.warn("could not remove transcript {path}: {error}", path=path, error=e.strerror)
        log.info("session {session_id} deleted with workspace {workspace}", session_id=group.session_id,
                 workspace=group.workspace)

    def expire(self, ttl: float) -> Deferred[int]:
        """Delete the sessions idle for longer than C{ttl} seconds and not running; never fails."""
        now = self.runs.clock.seconds()
        cutoff = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now - ttl))

        @inlineCallbacks
        def sweep() -> Any:
            groups = yield self.store.idle_since(cutoff)
            removed = 0
            for group in groups:
                if not any(self.runs.busy(sid) for sid in group.session_ids):
                    yield self.delete(group)
                    removed += 1
            return removed

        d: Deferred[int] = sweep()

        def failed(failure: Any) -> int:
            log.failure("session expiry sweep failed; the next one will run as planned", failure)
            return 0

        return d.addErrback(failed)


class Readiness:
    """The checks behind /readyz; the CLI's --version is asked at most once a minute."""

    def __init__(self, store: SessionStore, workspaces: Workspaces, runs: RunManager, cli: Any) -> None:
        self.store = store
        self.workspaces = workspaces
        self.runs = runs
        self.cli = cli
        self._version: tuple[float, dict[str, Any]] | None = None

    @inlineCallbacks
    def check(self) -> Any:
        checks: dict[str, dict[str, Any]] = {}
        checks["cli"] = yield self._cli()
        try:
            yield self.store.ping()
            checks["database"] = {"ok": True}
        except Exception as e:
            checks["database"] = {"ok": False, "error": str(e)}
        root = self.workspaces.root
        checks["workspace"] = {"ok": os.path.isdir(root) and os.access(root, os.W_OK | os.X_OK)}
        limits = self.runs.limits
        free = (limits.max_runs - len(self.runs.running)) + (limits.max_queue - len(self.runs.queue))
        checks["capacity"] = {"ok": free > 0, "running": len(self.runs.running), "queued": len(self.runs.queue),
                              "max_runs": limits.max_runs, "max_queue": limits.max_queue}
        return checks

    def _cli(self) -> Deferred[dict[str, Any]]:
        now = self.runs.clock.seconds()
        if self._version is not None and now - self._version[0] < VERSION_CHECK_EVERY:
            return succeed(self._version[1])
        path = self.cli.find()
        if path is None:
            return succeed({"ok": False, "error": f"the Claude CLI {self.cli.name!r} was not found"})
        d = utils.getProcessOutputAndValue(path, ["--version"], env=self.runs.environ, path=self.workspaces.root)

        def done(result: tuple[bytes, bytes, int]) -> dict[str, Any]:
            out, err, code = result
            check = {"ok": code == 0, "version": out.decode(errors="replace").strip()}
            if code != 0:
                check["error"] = err.decode(errors="replace").strip()[-500:]
            self._version = (now, check)
            return check

        return d.addCallback(done)
