"""
``twistd claudesrv`` (and the ``claudesrv`` command): the options and the one place where the parts are wired
together.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet import endpoints
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpointStringParser
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.web.server import Site

from claudesrv.app import INSTALL_HINT, ClaudeAPI, ClaudeExecutable
from claudesrv.guard import (
    Guard,
    LimitedChannel,
    Policy,
    env_tokens,
    is_loopback_listener,
    read_token_file,
    request_factory,
)
from claudesrv.live import Limits
from claudesrv.logs import QuietSite, access_logged
from claudesrv.metrics import registry_for
from claudesrv.policy import TurnPolicy
from claudesrv.process import spawner
from claudesrv.projects import ProjectError, Projects, parse_project
from claudesrv.registry import SessionRegistry
from claudesrv.schema import MODEL_PATTERN, BodyLimits
from claudesrv.sessions import Readiness, Sessions
from claudesrv.store import PooledSqlite, SessionStore
from claudesrv.workspaces import Workspaces

log = Logger()

DEFAULT_LISTEN = "tcp:3000:interface=127.0.0.1"


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{value!r} is not a number")
    return number


def _whole(value: str) -> int:
    """A whole number, 0 or more."""
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _seconds(value: str) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _positive(value: str) -> int:
    number = _whole(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


def _dollars(value: str) -> float:
    number = _number(value)
    if not 0 < number <= 1_000_000:
        raise ValueError("must be more than 0 (and at most 1000000)")
    return number


class _NamedCoerce(usage.CoerceParameter):
    """Twisted says "Parameter type enforcement failed: must be 1 or more"; this says which option."""

    def dispatch(self, parameterName: str, value: str | None) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName}: needs a value")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{parameterName}: {e}") from None


def known_listener_types() -> list[str]:
    """The endpoint types --listen takes: Twisted's own and those of installed endpoint plugins."""
    plugins = {plugin.prefix.lower() for plugin in getPlugins(IStreamServerEndpointStringParser)}
    return sorted({"tcp", "ssl", "unix"} | plugins)


def _parts(description: str) -> list[str]:
    return re.split(r"(?<!\\):", description)


def _endpoint_problem(description: str) -> str | None:
    """Why Twisted cannot make an endpoint of C{description} (bad arguments, missing key files), or None."""
    try:
        endpoints.serverFromString(global_reactor, description)
    except OSError as e:
        return f"{e.strerror}: {e.filename}" if e.filename else str(e.strerror or e)
    except TypeError as e:
        return f"unknown or missing argument ({e})"
    except Exception as e:  # ValueError for bad numbers, OpenSSL errors for bad keys, ...
        return str(e) or type(e).__name__
    return None


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Serve the Claude Code CLI over HTTP: POST /api/claude streams a session's turn as "
                "Server-Sent Events, from one warm CLI process per session. Sessions are kept in "
                "<data-dir>/sessions.db, workspaces in <data-dir>/Workspace/, event logs in <data-dir>/events/.")

    optParameters = [
        ["data-dir", None, ".", "Folder that holds sessions.db, Workspace/ and events/."],
        ["claude", None, "claude", "The Claude CLI: a name looked up on PATH, or a path."],
        ["max-runs", None, 4, "Most turns running at once.", _positive],
        ["max-queue", None, 32, "Most turns waiting for a run slot or a process; beyond that 503.", _whole],
        ["max-live", None, 8, "Most live CLI processes (idle, running, starting, spare); the least recently "
                              "used idle one is put to sleep when a turn needs room.", _positive],
        ["spares", None, 1, "CLI processes kept started ahead of time for new sessions (0: none).", _whole],
        ["warm-idle", None, 600.0, "Seconds an idle CLI process stays warm before it is put to sleep "
                                   "(0: until it is needed elsewhere).", _seconds],
        ["run-timeout", None, 3600.0, "Seconds a turn may take in all (0: no limit).", _seconds],
        ["idle-timeout", None, 600.0, "Seconds a turn may print nothing, or a client may read nothing "
                                      "(0: no limit).", _seconds],
        ["keepalive", None, 15.0, "Seconds of silence before an SSE keepalive comment (0: none).", _seconds],
        ["kill-grace", None, 5.0, "Seconds a stopped turn has to end after the interrupt request before "
                                  "SIGINT; SIGTERM and SIGKILL follow 2 s apart.", _seconds],
        ["log-max-bytes", None, 256 << 20, "Most bytes of events kept per session; the oldest whole turns "
                                           "go first.", _positive],
        ["on-disconnect", None, "cancel", "What a turn does when its client goes away: cancel (interrupt "
                                          "it) or continue (its events stay in the log).", str],
        ["max-prompt", None, 1 << 20, "Largest prompt in bytes (its text).", _positive],
        ["max-system-prompt", None, 64 << 10, "Largest system_prompt or append_system_prompt in bytes.", _positive],
        ["max-image-bytes", None, 5 << 20, "Largest image in a prompt, in bytes (decoded).", _positive],
        ["default-model", None, None, "The model of turns that name none (default: the CLI's)."],
        ["max-budget-usd", None, None, "The most a turn may spend (max_budget_usd), and what a turn that sets "
                                       "no budget gets.", _dollars],
        ["max-turns-limit", None, None, "The most model turns a turn may take (max_turns), and what a turn that "
                                        "sets no limit gets.", _positive],
        ["openai-tool-activity", None, "reasoning", "Where /v1/ answers show Claude's tool activity: reasoning "
                                                    "(reasoning_content, thinking blocks), content (in the text) "
                                                    "or hidden."],
        ["allow-system-prompt", None, "yes", "yes, append (only append_system_prompt) or no: whether requests may "
                                             "set the system prompt."],
        ["http-timeout", None, 60.0, "Seconds an HTTP connection may sit idle or send its request slowly "
                                     "before it is closed (open streams are not cut).", _seconds],
        ["header-timeout", None, 30.0, "Seconds a client may take to send a request's line and headers, in all "
                                       "(0: no limit).", _seconds],
        ["max-connections-per-ip", None, 64, "Most open connections from one client address; the next gets 429 "
                                             "(0: no limit).", _whole],
        ["max-body", None, 32 << 20, "Largest request body in bytes (413 beyond; images count).", _positive],
        ["max-upload", None, 100 << 20, "Largest file uploaded to a session (PUT .../files/PATH), in bytes.",
         _positive],
        ["auth-token-file", None, None, "File of bearer tokens, one a line (re-read on SIGHUP; an empty file is "
                                        "an error). Tokens can "
                                        "also come from the CLAUDESRV_AUTH_TOKENS environment variable "
                                        "(comma-separated); never from the command line."],
        ["session-ttl", None, 0.0, "Delete sessions (rows and workspaces) idle this many seconds (0: keep).",
         _seconds],
        ["skip-permissions", None, "allow", "allow or deny requests for dangerously-skip-permissions."],
        ["approvals", None, "allow", "allow or deny turns that ask a person about tools (\"approvals\": true)."],
        ["approval-timeout", None, 300.0, "Seconds a tool approval waits for an answer before it is denied "
                                          "(0: no limit).", _seconds],
    ]
    optFlags = [
        ["insecure-no-auth", None, "Allow listening beyond loopback without any token (dangerous)."],
        ["sandboxed", None, "Say the host is a container or VM: sets IS_SANDBOX=1 for the CLI, which lets a "
                            "root daemon use dangerously-skip-permissions. Never on a real machine."],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name, handler in self._dispatch.items():
            if type(handler) is usage.CoerceParameter:
                self._dispatch[name] = _NamedCoerce(self, handler.coerce)
        self.docs = {name: " ".join(doc.split()) if doc else doc for name, doc in self.docs.items()}  # docstrings
        self["listen"] = []
        self["allowed-host"] = []
        self["cors-origin"] = []
        self["deny-tool"] = []
        self["project"] = []
        self["allow-input-edits"] = []
        self["allow-model"] = []
        self["tokens"] = []

    def opt_allowed_host(self, host: str) -> None:
        """A Host name to accept besides localhost while listening on loopback only (repeatable)."""
        self["allowed-host"].append(host.lower())

    def opt_cors_origin(self, origin: str) -> None:
        """An origin that gets CORS headers, e.g. http://localhost:8080 (repeatable; '*' allows any,
        dangerous without a token)."""
        self["cors-origin"].append(origin)

    def opt_project(self, value: str) -> None:
        """NAME=DIR: a folder new sessions may work in ("project": "NAME"), or in git worktrees of (repeatable)."""
        try:
            project = parse_project(value)
        except ProjectError as e:
            raise usage.UsageError(str(e)) from None
        if any(p.name == project.name for p in self["project"]):
            raise usage.UsageError(f"--project {project.name}: given twice")
        self["project"].append(project)

    def opt_deny_tool(self, tool: str) -> None:
        """A tool always added to the CLI's disallowed tools, whatever the request says (repeatable)."""
        self["deny-tool"].append(tool)

    def opt_allow_input_edits(self, tool: str) -> None:
        """A tool whose input a person's answer may change (repeatable; default AskUserQuestion only). An
        answer that edits another tool's input is refused: a stolen token must not turn an approved ls
        into rm."""
        self["allow-input-edits"].append(tool)

    def opt_allow_model(self, pattern: str) -> None:
        """A model (or a glob such as claude-sonnet-*) that requests may ask for (repeatable; default: any)."""
        self["allow-model"].append(pattern)

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:3000:interface=127.0.0.1 (repeatable;
        default tcp:3000:interface=127.0.0.1). A unix socket is made with mode 0600 unless it says mode=."""
        self["listen"].append(description)

    def opt_version(self) -> None:
        """Print the versions of claudesrv and of the Claude CLI (--claude, when given before) and exit."""
        # the command's own answer, before any logging exists (as twistd's --version): not a log event
        sys.stdout.write(version_text(self["claude"], os.environ) + "\n")
        sys.exit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Under twistd (or twist), a bad option is one line naming it, not the whole help and then the error."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            raise SystemExit(f"{os.path.basename(sys.argv[0])} claudesrv: {usage_line(e)}") from None

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["spares"] >= self["max-live"]:
            raise usage.UsageError(f"--spares: must be less than --max-live ({self['max-live']}), or no turn could "
                                   "get a process")
        for name, allowed in (("on-disconnect", ("cancel", "continue")), ("skip-permissions", ("allow", "deny")),
                              ("approvals", ("allow", "deny")),
                              ("openai-tool-activity", ("reasoning", "content", "hidden")),
                              ("allow-system-prompt", ("yes", "append", "no"))):
            if self[name] not in allowed:
                raise usage.UsageError(f"--{name}: must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                                       f"not {self[name]!r}")
        model = self["default-model"]
        if model is not None and not re.match(MODEL_PATTERN, model):
            raise usage.UsageError(f"--default-model: {model!r} is not a model name")
        if not self["allow-input-edits"]:
            self["allow-input-edits"] = ["AskUserQuestion"]
        known = known_listener_types()
        for description in self["listen"]:
            kind = _parts(description)[0].lower()
            if kind not in known or len(_parts(description)) < 2:
                raise usage.UsageError(f"--listen {description}: unknown listener type {kind!r}; known types: "
                                       f"{', '.join(known)} (e.g. tcp:3000:interface=127.0.0.1)")
        self["tokens"] = load_tokens(self["auth-token-file"], os.environ)
        exposed = [d for d in self["listen"] if not is_loopback_listener(d)]
        if exposed and not self["tokens"] and not self["insecure-no-auth"]:
            raise usage.UsageError(
                f"refusing to listen on {exposed[0]!r} without authentication: anyone who can reach it could "
                "run commands on this machine. Give --auth-token-file PATH or set CLAUDESRV_AUTH_TOKENS, "
                "or pass --insecure-no-auth if you really mean it.")
        for description in self["listen"]:
            problem = _endpoint_problem(description)
            if problem is not None:
                raise usage.UsageError(f"--listen {description}: {problem}")


def usage_line(error: usage.UsageError) -> str:
    """What to say about a usage error: ours name the option; getopt's (an unknown option) get a pointer to
    --help."""
    text = str(error)
    if "not recognized" in text or text.startswith("No such option"):
        return f"{text} (--help lists the options)"
    return text


def load_tokens(path: str | None, environ: Mapping[str, str]) -> list[str]:
    """The tokens of CLAUDESRV_AUTH_TOKENS and of the token file. A token file that holds none is an error: it
    would otherwise leave a daemon its operator meant to protect open (on loopback) or unable to start."""
    tokens = env_tokens(dict(environ))
    if path:
        try:
            from_file = read_token_file(path)
        except OSError as e:
            raise usage.UsageError(f"--auth-token-file {path}: cannot read it: {e.strerror}") from None
        except UnicodeDecodeError:
            raise usage.UsageError(f"--auth-token-file {path}: is not UTF-8 text") from None
        if not from_file:
            raise usage.UsageError(f"--auth-token-file {path} holds no token (one a line; blank lines and "
                                   "lines starting with # do not count)")
        tokens += from_file
    return tokens


def claudesrv_version() -> str:
    try:
        return metadata.version("claudesrv")
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION_NAME = re.compile(r"\d+\.\d+\.\d+(?:[-+.][0-9A-Za-z.-]+)?")


def installed_version(path: str) -> str | None:
    """
    The version of the CLI at C{path} as its installation tells it, without running it (a run would cost a
    process and, with some CLIs, a network round trip): the package.json of an npm install
    (``npm install -g @anthropic-ai/claude-code``), or the version-named file or folder of the native
    installer and of Homebrew. None when neither says.
    """
    real = os.path.realpath(path)
    for name in (os.path.basename(real), os.path.basename(os.path.dirname(real))):
        if VERSION_NAME.fullmatch(name):
            return name
    folder = os.path.dirname(real)
    for _ in range(3):
        manifest = os.path.join(folder, "package.json")
        if os.path.isfile(manifest):
            try:
                with open(manifest, encoding="utf-8") as f:
                    package = json.load(f)
            except (OSError, ValueError):
                return None
            if isinstance(package, dict) and package.get("name") == "@anthropic-ai/claude-code":
                return str(package.get("version")) if package.get("version") else None
            return None
        folder = os.path.dirname(folder)
    return None


def version_text(claude: str, environ: Mapping[str, str]) -> str:
    """What ``--version`` prints: claudesrv's version, then the CLI's path and what its --version says."""
    lines = [f"claudesrv {claudesrv_version()}"]
    path = ClaudeExecutable(claude, dict(environ)).find()
    if path is None:
        lines.append(f"{claude}: not found ({INSTALL_HINT})")
        return "\n".join(lines)
    try:
        done = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
                              env=dict(environ))
    except (OSError, subprocess.TimeoutExpired) as e:
        lines.append(f"{path}: --version failed: {getattr(e, 'strerror', None) or e}")
        return "\n".join(lines)
    said = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0 or not said:
        error = done.stderr.decode(errors="replace").strip().splitlines()
        lines.append(f"{path}: --version exited with {done.returncode}" + (f": {error[-1]}" if error else ""))
    else:
        lines.append(f"{path}: {said.splitlines()[0]}")
    return "\n".join(lines)


class ClaudeService(service.Service):
    """Owns the database and the live sessions: opens them at start, ends them cleanly at stop."""

    def __init__(self, store: SessionStore, registry: SessionRegistry, sessions: Sessions,
                 workspaces: Workspaces, cli: ClaudeExecutable, policy: Policy, token_file: str | None,
                 data_dir: str = "") -> None:
        self.sessions = sessions
        self.policy = policy
        self.token_file = token_file
        self.store = store
        self.registry = registry
        self.workspaces = workspaces
        self.cli = cli
        self.data_dir = data_dir
        self.ready: Deferred[Any] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.log_start()  # before the listeners (they start in this step) say where they listen

    def startService(self) -> None:
        super().startService()
        self.workspaces.ensure_root()
        reactor: Any = self.registry.clock
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.reload_tokens))
        if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            # started as `twistd ... &` from a script: keep ignoring SIGINT, but with a handler, which exec
            # resets, so the CLIs get SIGINT's default and can be spawned without forking the daemon
            signal.signal(signal.SIGINT, lambda *_: None)
        self.ready = self.store.start()
        self.ready.addErrback(lambda f: log.failure("could not open the session database", f))
        self.ready.addCallback(lambda _: self.sessions.remove_orphans())
        self.ready.addCallback(lambda _: self.registry.open() if self.cli.find() is not None else None)

    def log_start(self) -> None:
        """What an operator wants to see first: the version, where the data is, which CLI runs, whether
        requests need a token (how many there are, never the tokens). The listeners log their addresses."""
        log.info("claudesrv {version}, data in {data_dir}", version=claudesrv_version(), data_dir=self.data_dir)
        path = self.cli.find()
        if path is None:
            log.warn("the Claude CLI {name!r} was not found; requests get 503 until it is: {hint}",
                     name=self.cli.name, hint=INSTALL_HINT)
        else:
            version = installed_version(path)
            log.info("the Claude CLI is {cli_path}, version {cli_version}" if version else
                     "the Claude CLI is {cli_path} (its installation does not say its version; GET /readyz asks it)",
                     cli_path=path, cli_version=version)
        tokens = len(self.policy.tokens)
        if tokens:
            log.info("authentication on: {auth_tokens} bearer token(s)", auth=True, auth_tokens=tokens)
        else:
            log.info("authentication off: {why}", auth=False, auth_tokens=0,
                     why="listening on loopback only" if self.policy.loopback_only else "--insecure-no-auth")

    def reload_tokens(self) -> None:
        """SIGHUP: read the token file again; on error (an empty file too) keep the tokens in force."""
        if not self.token_file:
            log.info("SIGHUP: no --auth-token-file to reload")
            return
        try:
            tokens = load_tokens(self.token_file, os.environ)
        except usage.UsageError as e:
            log.error("keeping the current tokens: {error}", error=str(e))
            return
        self.policy.tokens = tokens
        log.info("reloaded {n} auth token(s)", n=len(tokens))

    @inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        yield self.registry.shutdown()
        # let the last result events leave the socket before the reactor closes connections
        yield deferLater(self.registry.clock, 0.1, lambda: None)
        self.store.close()


class ListenFailed(SystemExit):
    """A listener could not listen: the daemon stops with this one line (SystemExit: no traceback)."""


class Listener(StreamServerEndpointService):
    """
    One ``--listen`` endpoint (as strports.service makes it: a port it cannot have stops the daemon at start),
    which says where it listens once it does: the address it got (a tcp:0 port's number, a systemd socket's
    address), and stops the daemon with one line when it cannot listen.
    """

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise ListenFailed(f"cannot listen on {self.description}: {_why(e)}") from None
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        log.info("listening on {address} ({listen})", address=address_of(self.description, port),
                 listen=self.description)
        return port


def _why(error: CannotListenError) -> str:
    reason = error.socketError
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[0].lower() + reason.strerror[1:]
    return str(reason)


def address_of(description: str, port: IListeningPort) -> str:
    """Where a listener listens, as a client would say it: http://127.0.0.1:3000, https://[::1]:3443, unix:/path."""
    host = port.getHost()
    name = getattr(host, "name", None)
    if name is not None or getattr(host, "type", None) is None:  # a unix socket
        path = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        return f"unix:{path}"
    scheme = "https" if _parts(description)[0].lower() in ("ssl", "tls") else "http"
    ip = str(host.host)  # type: ignore[attr-defined]
    return f"{scheme}://{'[' + ip + ']' if ':' in ip else ip}:{host.port}"  # type: ignore[attr-defined]


def listener_description(description: str, requests: int) -> str:
    """
    The endpoint C{description} as the daemon listens on it. A TCP or TLS listener gets a listen queue as long
    as the requests it may hold (Twisted's default is 50: a burst beyond that loses SYNs, and the kernel retries
    them only after a second). A unix socket gets mode 0600 (only the daemon's user may connect) unless
    C{mode=} says otherwise: Twisted's default, 0666, would let every local user in.
    """
    parts = _parts(description)
    kind = parts[0].lower()
    if kind == "unix" and not any(p.startswith("mode=") for p in parts[1:]):
        return f"{description}:mode=600"
    if kind not in ("tcp", "tcp6", "ssl") or any(p.startswith("backlog=") for p in parts[1:]):
        return description
    return f"{description}:backlog={max(50, min(requests, 4096))}"


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    reactor = reactor or global_reactor
    data_dir = os.path.abspath(options["data-dir"])
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise usage.UsageError(f"--data-dir {data_dir}: cannot create it: {e.strerror}") from None
    environ = dict(os.environ)
    environ.pop("CLAUDESRV_AUTH_TOKENS", None)  # read already; no child process gets the clients' tokens
    store = SessionStore(PooledSqlite(os.path.join(data_dir, "sessions.db")), reactor)
    projects = Projects(options["project"], os.path.join(data_dir, "worktrees"))
    workspaces = Workspaces(os.path.join(data_dir, "Workspace"), projects.folders(), [projects.worktrees])
    cli = ClaudeExecutable(options["claude"], environ)
    limits = Limits(
        max_runs=options["max-runs"], max_queue=options["max-queue"], max_live=options["max-live"],
        spares=options["spares"], warm_idle=options["warm-idle"],
        run_timeout=options["run-timeout"], idle_timeout=options["idle-timeout"],
        keepalive=options["keepalive"], kill_grace=options["kill-grace"],
        log_max_bytes=options["log-max-bytes"], on_disconnect=options["on-disconnect"],
        deny_tools=tuple(options["deny-tool"]), sandboxed=bool(options["sandboxed"]),
        approval_timeout=options["approval-timeout"], allow_input_edits=tuple(options["allow-input-edits"]),
    )
    live = SessionRegistry(reactor, spawner(reactor), store, workspaces, cli.path, environ, limits,
                           os.path.join(data_dir, "events"))
    sessions = Sessions(store, workspaces, live, environ, projects=projects)
    turn_policy = TurnPolicy(
        skip_permissions=options["skip-permissions"], as_root=os.geteuid() == 0, sandboxed=bool(options["sandboxed"]),
        approvals=options["approvals"], allow_models=tuple(options["allow-model"]),
        default_model=options["default-model"], max_budget_usd=options["max-budget-usd"],
        max_turns_limit=options["max-turns-limit"], allow_system_prompt=options["allow-system-prompt"])
    live.plain_turn = turn_policy.defaults()
    metrics, http_metrics = registry_for(live)
    body_limits = BodyLimits(max_prompt=options["max-prompt"], max_system_prompt=options["max-system-prompt"],
                             max_image_bytes=options["max-image-bytes"])
    api = ClaudeAPI(live, store, workspaces, cli, sessions, Readiness(store, workspaces, live, cli), metrics,
                    policy=turn_policy, body_limits=body_limits, tool_activity=options["openai-tool-activity"],
                    projects=projects)
    policy = Policy(
        tokens=options["tokens"],
        loopback_only=all(is_loopback_listener(d) for d in options["listen"]),
        allowed_hosts=set(options["allowed-host"]),
        cors_origins=set(options["cors-origin"]),
    )

    top = service.MultiService()
    ClaudeService(store, live, sessions, workspaces, cli, policy, options["auth-token-file"],
                  data_dir).setServiceParent(top)
    ttl = options["session-ttl"]
    if ttl > 0:
        expiry = TimerService(min(ttl, 60.0), sessions.expire, ttl)
        expiry.clock = reactor
        expiry.setServiceParent(top)
    guard = Guard(api.resource(), policy, reactor, http_metrics)
    # the API takes JSON only: no form parsing (Twisted parses each POST's Content-Type with the email package);
    # each request logs its own access line (QuietSite: not Twisted's, which has the query string)
    requests = access_logged(request_factory(options["max-body"]), live.turns, reactor)
    site: Site = QuietSite(guard, requestFactory=requests, parsePOSTFormSubmission=False,
                           timeout=options["http-timeout"] or None, reactor=reactor)
    site.protocol = LimitedChannel  # type: ignore[method-assign, assignment]
    site.displayTracebacks = False
    site.header_timeout = options["header-timeout"]  # type: ignore[attr-defined]
    site.max_per_address = options["max-connections-per-ip"]  # type: ignore[attr-defined]
    site.max_upload = options["max-upload"]  # type: ignore[attr-defined]
    for description in options["listen"]:
        listening = listener_description(description, options["max-runs"] + options["max-queue"])
        Listener(description, endpoints.serverFromString(reactor, listening), site).setServiceParent(top)
    return top
