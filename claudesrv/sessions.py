"""
Session housekeeping: deleting a session with its workspace (and, if asked, the CLI's transcripts),
expiring idle ones, and telling a supervisor whether the daemon is ready.
"""

from __future__ import annotations

import glob
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from claudesrv.command import is_canonical_uuid
from claudesrv.registry import SessionRegistry
from claudesrv.store import SessionGroup, SessionStore
from claudesrv.workspaces import Workspaces

log = Logger()

VERSION_CHECK_EVERY = 60.0
VERSION_TIMEOUT = 10.0


def transcript_paths(config_dir: str, session_ids: list[str]) -> list[str]:
    """The CLI's own transcript files of these ids: ``<config>/projects/*/<id>.jsonl``, nothing else."""
    paths: list[str] = []
    for sid in session_ids:
        if is_canonical_uuid(sid):
            paths += glob.glob(os.path.join(glob.escape(config_dir), "projects", "*", f"{sid}.jsonl"))
    return paths


class Sessions:
    def __init__(self, store: SessionStore, workspaces: Workspaces, registry: SessionRegistry,
                 environ: dict[str, str], blocking: Callable[..., Deferred[Any]] = deferToThread) -> None:
        self.blocking = blocking  # file-system work off the reactor thread (inline in tests)
        self.store = store
        self.workspaces = workspaces
        self.registry = registry
        self.config_dir = environ.get("CLAUDE_CONFIG_DIR") or os.path.join(
            environ.get("HOME", os.path.expanduser("~")), ".claude")

    @inlineCallbacks
    def delete(self, group: SessionGroup, purge_transcript: bool = False) -> Any:
        """
        Its live process first (put to sleep and awaited), then the rows (so the session is gone for every
        client at once), then its event log (its followers get a ``deleted`` event) and its files. Its ids
        count as busy meanwhile, so no turn can start in a workspace that is being removed.
        """
        ids = set(group.session_ids) - self.registry.deleting
        self.registry.deleting |= ids
        try:
            yield self.registry.stop_sessions(group.session_ids)
            yield self.store.delete_workspace(group.workspace)
            for sid in group.session_ids:
                self.registry.destroy_log(sid)
            yield self.blocking(self.workspaces.remove, group.workspace)
            if purge_transcript:
                yield self.blocking(self._purge, group.session_ids)
        finally:
            self.registry.deleting -= ids
        log.info("session {session_id} deleted with workspace {workspace}", session_id=group.session_id,
                 workspace=group.workspace)

    def _purge(self, session_ids: list[str]) -> None:
        for path in transcript_paths(self.config_dir, session_ids):
            try:
                os.remove(path)
            except OSError as e:
                log.warn("could not remove transcript {path}: {error}", path=path, error=e.strerror)

    def remove_orphans(self) -> Deferred[int]:
        """
        At start: what a killed daemon may have left of sessions that never got a row (spares, new sessions
        cut off mid-creation): empty workspaces and event logs that no row names. A workspace with files in
        it is never touched. Never fails; the number of folders removed.
        """
        started = time.time()  # what this daemon makes meanwhile is newer, and not an orphan
        d = self.store.known().addCallback(lambda known: self.blocking(self._remove_orphans, *known, started))

        def failed(failure: Any) -> int:
            log.failure("could not look for leftover workspaces", failure)
            return 0

        return d.addErrback(failed)

    def _remove_orphans(self, session_ids: set[str], workspaces: set[str], started: float) -> int:
        def old(path: str) -> bool:
            try:
                return os.stat(path).st_mtime < started
            except OSError:
                return False

        removed = 0
        root = self.workspaces.root
        for name in os.listdir(root) if os.path.isdir(root) else []:
            path = os.path.join(root, name)
            if (name.startswith("session-") and path not in workspaces and old(path)
                    and self.workspaces.remove_if_empty(path)):
                removed += 1
        events = self.registry.events_dir
        for name in os.listdir(events) if os.path.isdir(events) else []:
            path = os.path.join(events, name)
            if is_canonical_uuid(name) and name not in session_ids and old(path):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        if removed:
            log.info("removed {n} folder(s) left by sessions that never came to be", n=removed)
        return removed

    def expire(self, ttl: float) -> Deferred[int]:
        """Delete the sessions idle for longer than C{ttl} seconds and not running; never fails."""
        now = self.registry.clock.seconds()
        cutoff = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now - ttl))

        @inlineCallbacks
        def sweep() -> Any:
            groups = yield self.store.idle_since(cutoff)
            removed = 0
            for group in groups:
                if not self.registry.busy(*group.session_ids):
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

    def __init__(self, store: SessionStore, workspaces: Workspaces, registry: SessionRegistry, cli: Any) -> None:
        self.store = store
        self.workspaces = workspaces
        self.registry = registry
        self.cli = cli
        self._version: tuple[float, dict[str, Any]] | None = None
        self._waiters: list[Deferred[dict[str, Any]]] = []

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
        limits = self.registry.limits
        free = limits.max_runs + limits.max_queue - len(self.registry.turns)
        checks["capacity"] = {"ok": free > 0, "running": self.registry.running, "queued": len(self.registry.queue),
                              "max_runs": limits.max_runs, "max_queue": limits.max_queue,
                              "live": len(self.registry.live), "max_live": limits.max_live}
        return checks

    def _cli(self) -> Deferred[dict[str, Any]]:
        """The CLI's --version, asked at most once a minute and by one process at a time, killed after 10 s."""
        now = self.registry.clock.seconds()
        if self._version is not None and now - self._version[0] < VERSION_CHECK_EVERY:
            return succeed(self._version[1])
        waiter: Deferred[dict[str, Any]] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._probe(now)
        return waiter

    def _probe(self, now: float) -> None:
        def answer(check: dict[str, Any]) -> None:
            self._version = (now, check)
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(check)

        path = self.cli.find()
        if path is None:
            answer({"ok": False, "error": f"the Claude CLI {self.cli.name!r} was not found"})
            return
        probe = _VersionProbe()
        reactor: Any = self.registry.clock
        try:
            transport = reactor.spawnProcess(probe, path, [path, "--version"], env=self.registry.environ,
                                             path=self.workspaces.root, childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            answer({"ok": False, "error": e.strerror})
            return
        transport.closeStdin()
        killer = reactor.callLater(VERSION_TIMEOUT, transport.signalProcess, "KILL")

        def ended(code: int | None) -> None:
            if killer.active():
                killer.cancel()
            check: dict[str, Any] = {"ok": code == 0, "version": probe.out.decode(errors="replace").strip()}
            if code != 0:
                check["error"] = (probe.err.decode(errors="replace").strip()[-500:]
                                  or f"--version did not answer within {VERSION_TIMEOUT:g} s")
            answer(check)

        probe.ended.addCallback(ended)


class _VersionProbe(ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data[:4096]

    def errReceived(self, data: bytes) -> None:
        self.err += data[:4096]

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))
