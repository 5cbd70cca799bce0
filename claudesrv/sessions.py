"""
Session housekeeping: deleting a session with its workspace (and, if asked, the CLI's transcripts),
expiring idle ones, and telling a supervisor whether the daemon is ready.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from claudesrv.command import is_canonical_uuid
from claudesrv.live import LOGIN_HINT
from claudesrv.projects import Projects
from claudesrv.registry import SessionRegistry
from claudesrv.store import SessionGroup, SessionStore
from claudesrv.workspaces import Workspaces

log = Logger()

VERSION_CHECK_EVERY = 60.0
CREDENTIALS_CHECK_EVERY = 30.0
PROBE_TIMEOUT = 10.0
PROBE_OUTPUT = 64 * 1024  # bytes kept of a probe's stdout (its start) and stderr (its end)


def transcript_paths(config_dir: str, session_ids: list[str]) -> list[str]:
    """The CLI's own transcript files of these ids: ``<config>/projects/*/<id>.jsonl``, nothing else."""
    paths: list[str] = []
    for sid in session_ids:
        if is_canonical_uuid(sid):
            paths += glob.glob(os.path.join(glob.escape(config_dir), "projects", "*", f"{sid}.jsonl"))
    return paths


class Sessions:
    def __init__(self, store: SessionStore, workspaces: Workspaces, registry: SessionRegistry,
                 environ: dict[str, str], blocking: Callable[..., Deferred[Any]] = deferToThread,
                 projects: Projects | None = None) -> None:
        self.blocking = blocking  # file-system work off the reactor thread (inline in tests)
        self.projects = projects or Projects([], os.path.join(workspaces.root, os.pardir, "worktrees"))
        self.store = store
        self.workspaces = workspaces
        self.registry = registry
        self.config_dir = environ.get("CLAUDE_CONFIG_DIR") or os.path.join(
            environ.get("HOME", os.path.expanduser("~")), ".claude")

    @inlineCallbacks
    def delete(self, group: SessionGroup, purge_transcript: bool = False, delete_branch: bool = False) -> Any:
        """
        Its live process first (put to sleep and awaited), then the rows (so the session is gone for every
        client at once), then its event log (its followers get a ``deleted`` event) and its files. Its ids
        count as busy meanwhile, so no turn can start in a workspace that is being removed.
        """
        ids = set(group.session_ids) - self.registry.deleting
        self.registry.deleting |= ids
        purged: list[str] = []
        try:
            yield self.registry.stop_sessions(group.session_ids)
            project = yield self.store.project_of(group.session_id)
            yield self.store.delete_sessions(group.session_ids)
            for sid in group.session_ids:
                self.registry.destroy_log(sid)
            if project is not None and project[1] is not None and project[0] in self.projects.by_name:
                yield self.blocking(self.projects.remove_worktree, self.projects.by_name[project[0]],
                                    group.session_id, delete_branch)
            yield self.blocking(self.workspaces.remove, group.workspace)  # never a project's own folder
            if purge_transcript:
                purged = yield self.blocking(self._purge, group.session_ids)
        finally:
            self.registry.deleting -= ids
        log.info("session {session_id} deleted with workspace {workspace}", session_id=group.session_id,
                 workspace=group.workspace)
        return {"session_id": group.session_id, "session_ids": group.session_ids, "workspace": group.workspace,
                "event_log": True, "transcripts_removed": len(purged), "transcripts": purged}

    def _purge(self, session_ids: list[str]) -> list[str]:
        """Remove the CLI's transcripts of these ids; the paths removed."""
        removed = []
        for path in transcript_paths(self.config_dir, session_ids):
            try:
                os.remove(path)
            except OSError as e:
                log.warn("could not remove transcript {path}: {error}", path=path, error=e.strerror)
            else:
                removed.append(path)
        return removed

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
    """
    The checks behind /readyz. Two ask the CLI, each by one process at a time, killed after 10 s, its answer
    kept for a while so that /readyz stays cheap: ``--version`` (at most once a minute) and ``auth status``,
    whether it has credentials (at most every 30 s; CLI 2.1.330 answers offline in ~0.3 s).
    """

    def __init__(self, store: SessionStore, workspaces: Workspaces, registry: SessionRegistry, cli: Any) -> None:
        self.store = store
        self.workspaces = workspaces
        self.registry = registry
        self.cli = cli
        self._answers: dict[str, tuple[float, dict[str, Any]]] = {}
        self._waiters: dict[str, list[Deferred[dict[str, Any]]]] = {}

    @inlineCallbacks
    def check(self) -> Any:
        checks: dict[str, dict[str, Any]] = {}
        cli, credentials = self._cli(), self._credentials()  # both processes at once
        checks["cli"] = yield cli
        checks["credentials"] = yield credentials
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
        """The CLI's --version; an exit code other than 0 is an error that names it."""
        return self._ask("--version", VERSION_CHECK_EVERY, _version_check)

    def _credentials(self) -> Deferred[dict[str, Any]]:
        """``auth status``: ok when the CLI says it is logged in; else what to set."""
        return self._ask("auth status", CREDENTIALS_CHECK_EVERY, _credentials_check)

    def _ask(self, command: str, every: float, judge: Callable[[_Probe, str], dict[str, Any]]
             ) -> Deferred[dict[str, Any]]:
        """The check C{judge} makes of C{command}'s answer, asked again once the last is C{every} s old."""
        now = self.registry.clock.seconds()
        last = self._answers.get(command)
        if last is not None and now - last[0] < every:
            return succeed(last[1])
        waiter: Deferred[dict[str, Any]] = Deferred()
        waiters = self._waiters.setdefault(command, [])
        waiters.append(waiter)
        if len(waiters) == 1:
            self._probe(command, now, judge)
        return waiter

    def _probe(self, command: str, now: float, judge: Callable[[_Probe, str], dict[str, Any]]) -> None:
        def answer(check: dict[str, Any]) -> None:
            self._answers[command] = (now, check)
            for waiter in self._waiters.pop(command, []):
                waiter.callback(check)

        path = self.cli.find()
        if path is None:
            answer({"ok": False, "error": f"the Claude CLI {self.cli.name!r} was not found"})
            return
        probe = _Probe()
        reactor: Any = self.registry.clock
        try:
            transport = reactor.spawnProcess(probe, path, [path, *command.split()], env=self.registry.environ,
                                             path=self.workspaces.root, childFDs={0: "w", 1: "r", 2: "r"})
        except Exception as e:  # OSError, or a reactor that cannot start processes
            answer({"ok": False, "error": f"could not start the Claude CLI: {getattr(e, 'strerror', None) or e}"})
            return
        transport.closeStdin()
        killer = reactor.callLater(PROBE_TIMEOUT, probe.kill, transport)

        def ended(_: None) -> None:
            if killer.active():
                killer.cancel()
            answer(judge(probe, command))

        probe.ended.addCallback(ended)


def _version_check(probe: _Probe, command: str) -> dict[str, Any]:
    check: dict[str, Any] = {"ok": True, "version": probe.out.decode(errors="replace").strip()}
    failure = probe.failure(command)
    if failure is not None:
        check.update(ok=False, error=failure)
    return check


def _credentials_check(probe: _Probe, command: str) -> dict[str, Any]:
    """``auth status`` prints JSON (``loggedIn``, ``authMethod``, ``apiProvider``, ``configDirectory``, ...) and
    exits 0 when logged in, 1 when not; anything else is an error."""
    try:
        status = json.loads(probe.out)
    except ValueError:
        status = None
    if not isinstance(status, dict) or not isinstance(status.get("loggedIn"), bool):
        return {"ok": False, "error": probe.failure(command) or
                f"`{command}` printed no JSON with loggedIn; this daemon needs a CLI that has it (2.1.330 does)"}
    check: dict[str, Any] = {"ok": status["loggedIn"]}
    for ours, theirs in (("auth_method", "authMethod"), ("api_key_source", "apiKeySource"),
                         ("api_provider", "apiProvider"), ("config_directory", "configDirectory")):
        if isinstance(status.get(theirs), str):
            check[ours] = status[theirs]
    if not status["loggedIn"]:
        check["error"] = f"the Claude CLI has no credentials: {LOGIN_HINT}"
    return check


class _Probe(ProcessProtocol):
    """One short CLI command: the start of its stdout, the end of its stderr, how it ended."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.code: int | None = None
        self.signal: int | None = None
        self.timed_out = False
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data[:max(0, PROBE_OUTPUT - len(self.out))]

    def errReceived(self, data: bytes) -> None:
        self.err = (self.err + data)[-PROBE_OUTPUT:]

    def kill(self, transport: Any) -> None:
        self.timed_out = True
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def processEnded(self, reason: Any) -> None:
        self.code = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback(None)

    def failure(self, command: str) -> str | None:
        """Why C{command} failed (how it ended, and the end of its stderr), or None when it exited 0."""
        if self.timed_out:
            return f"the Claude CLI did not answer `{command}` within {PROBE_TIMEOUT:g} s"
        if self.code == 0:
            return None
        how = f"exited with code {self.code}" if self.code is not None else f"was killed by signal {self.signal}"
        said = self.err.decode(errors="replace").strip()[-500:]
        return f"the Claude CLI {how} on `{command}`" + (f": {said}" if said else "")
