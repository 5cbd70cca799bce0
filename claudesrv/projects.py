"""
Projects: folders the operator names (``--project NAME=DIR``) that sessions may work in, instead of a fresh
workspace. A session runs in the project's folder itself, or (git projects only) in a git worktree of its
own on a new branch ``claudesrv/<session id>``, kept under the data directory, so parallel sessions never
edit one checkout. The operator decides which folders are reachable; a client only names a project.

Everything here runs git and touches the disk: call it in a thread. The project's own folder is never
removed; a worktree is removed with ``git worktree remove``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from claudesrv.errors import ApiError

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
GIT_TIMEOUT = 30


class ProjectError(ValueError):
    """A --project option that cannot be used."""


@dataclass(frozen=True)
class Project:
    name: str
    path: str  # real path
    git: bool


def parse_project(value: str) -> Project:
    """NAME=DIR as the operator gives it: a lower-case name and an existing folder."""
    name, sep, folder = value.partition("=")
    if not sep or not NAME.match(name):
        raise ProjectError(f"--project {value!r}: give NAME=DIR, NAME being lower-case letters, digits, '.', '_' "
                           "or '-'")
    path = os.path.realpath(os.path.expanduser(folder))
    if not os.path.isdir(path):
        raise ProjectError(f"--project {name}: {folder!r} is not a folder")
    return Project(name, path, _is_git(path))


# a session can write its folder's .git/config (Claude's Edit tool): the daemon's own git calls run none of
# the commands a config can name, and git gets no API token in its environment
SAFE = ("-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null", "-c", "core.sshCommand=false",
        "-c", "protocol.allow=never")


def _git(folder: str, *args: str, check: bool = True, index: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CLAUDESRV_AUTH_TOKENS"}
    env.update(GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    if index is not None:
        env["GIT_INDEX_FILE"] = index
    done = subprocess.run(["git", *SAFE, "-C", folder, *args], capture_output=True, text=True,
                          timeout=GIT_TIMEOUT, env=env)
    if check and done.returncode != 0:
        raise GitError(done.stderr.strip() or f"git {args[0]} failed")
    return done.stdout.strip()


class GitError(Exception):
    pass


def _is_git(path: str) -> bool:
    """Whether the folder is the top of a git repository (a worktree of it can be made)."""
    try:
        return os.path.realpath(_git(path, "rev-parse", "--show-toplevel")) == path
    except (GitError, OSError, subprocess.SubprocessError):
        return False


class Projects:
    """The operator's projects and the worktrees made of them under C{worktrees}."""

    def __init__(self, projects: list[Project], worktrees: str) -> None:
        self.by_name = {p.name: p for p in projects}
        self.worktrees = os.path.realpath(worktrees)
        # git takes locks in a repository (its config, its refs): one worktree change at a time per project
        self._locks = {p.name: threading.Lock() for p in projects}

    def get(self, name: str) -> Project:
        project = self.by_name.get(name)
        if project is None:
            known = ", ".join(sorted(self.by_name)) or "none (--project NAME=DIR)"
            raise ApiError(400, "unknown_project", f"no project {name!r} on this server; known: {known}", "project")
        return project

    def folders(self) -> list[str]:
        """Where sessions may run besides the workspace root (for checking a stored path)."""
        return [p.path for p in self.by_name.values()]

    def describe(self) -> list[dict[str, Any]]:
        """Each project: name, path, whether it is a git repository, and its current branch."""
        found = []
        for project in sorted(self.by_name.values(), key=lambda p: p.name):
            branch = None
            if project.git:
                try:
                    branch = _git(project.path, "rev-parse", "--abbrev-ref", "HEAD")
                except (GitError, OSError, subprocess.SubprocessError):
                    branch = None
            found.append({"name": project.name, "path": project.path, "git": project.git, "branch": branch})
        return found

    def worktree_path(self, session_id: str) -> str:
        return os.path.join(self.worktrees, session_id)

    def add_worktree(self, project: Project, session_id: str, base: str | None) -> str:
        """A worktree on a new branch claudesrv/<session id> from C{base} (default the project's HEAD); the
        commit it starts from."""
        try:
            commit = _git(project.path, "rev-parse", "--verify", "--end-of-options", f"{base or 'HEAD'}^{{commit}}")
        except GitError:
            raise ApiError(400, "unknown_base", f"{base!r} is not a commit of project {project.name}", "base") \
                from None
        os.makedirs(self.worktrees, exist_ok=True)
        with self._locks[project.name]:
            _git(project.path, "worktree", "add", "-b", f"claudesrv/{session_id}", self.worktree_path(session_id),
                 commit)
        return commit

    def remove_worktree(self, project: Project, session_id: str, delete_branch: bool) -> None:
        """The worktree goes (whatever it holds); its branch too when asked. The project's folder stays."""
        path = self.worktree_path(session_id)
        with self._locks[project.name]:
            if os.path.isdir(path):
                _git(project.path, "worktree", "remove", "--force", path, check=False)
            _git(project.path, "worktree", "prune", check=False)
            if delete_branch:
                _git(project.path, "branch", "-D", f"claudesrv/{session_id}", check=False)

    def diff(self, session_id: str, base: str) -> str:
        """What the session's worktree changed since its base commit, new files included. The worktree's own
        index is not touched: new files are marked in a copy of it."""
        path = self.worktree_path(session_id)
        if not os.path.isdir(path):
            raise ApiError(410, "worktree_missing", "the session's worktree no longer exists on disk")
        index = os.path.join(path, _git(path, "rev-parse", "--git-path", "index"))
        with tempfile.TemporaryDirectory(prefix="claudesrv-diff-") as scratch:
            copy = os.path.join(scratch, "index")
            if os.path.exists(index):
                shutil.copyfile(index, copy)
            _git(path, "add", "--all", "--intent-to-add", index=copy)
            return _git(path, "diff", "--no-ext-diff", "--no-textconv", base, index=copy) + "\n"


class Placement:
    """Where a new session of a project works: the project's folder, or a worktree made for it."""

    def __init__(self, projects: Projects, project: Project, worktree: bool, base: str | None) -> None:
        if worktree and not project.git:
            raise ApiError(400, "not_a_git_project", f"project {project.name} is not a git repository: "
                                                     "it can have no worktrees", "worktree")
        self.projects = projects
        self.project = project
        self.worktree = worktree
        self.base = base
        self.commit: str | None = None  # the worktree's base commit, once it is made

    def path(self, session_id: str) -> str:
        return self.projects.worktree_path(session_id) if self.worktree else self.project.path

    def create(self, session_id: str) -> None:
        """In a thread: the worktree (the project's own folder is there already)."""
        if self.worktree:
            self.commit = self.projects.add_worktree(self.project, session_id, self.base)
