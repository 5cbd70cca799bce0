"""
Workspace directories: one per session, only ever created here, only ever used if they are ours.
"""

from __future__ import annotations

import os
import shutil


class WorkspaceError(Exception):
    """A stored workspace that cannot be used as a cwd: outside the root, or gone from disk."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Workspaces:
    """The ``Workspace/`` folder under the data dir."""

    def __init__(self, root: str, folders: list[str] | None = None, roots: list[str] | None = None) -> None:
        self.root = os.path.realpath(root)
        self.folders = {os.path.realpath(f) for f in folders or []}  # projects' own folders
        self.roots = [self.root] + [os.path.realpath(r) for r in roots or []]  # the worktrees' too

    def ensure_root(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def path_for(self, session_id: str) -> str:
        return os.path.join(self.root, f"session-{session_id}")

    def create(self, session_id: str) -> str:
        """A new, empty ``session-<session id>`` directory; its absolute path."""
        path = self.path_for(session_id)
        try:
            os.mkdir(path, 0o700)
        except FileNotFoundError:  # the root was removed while the daemon ran
            self.ensure_root()
            os.mkdir(path, 0o700)
        return path

    def resolve(self, stored: str) -> str:
        """
        The real path of a workspace read from the database, or L{WorkspaceError}.

        The check compares with a trailing separator, so ``Workspace-evil/`` next to the root is outside.
        """
        real = os.path.realpath(stored)
        if real not in self.folders and not any(real.startswith(root + os.sep) for root in self.roots):
            raise WorkspaceError("workspace_outside_root",
                                 "the stored workspace of this session is outside the workspace root")
        if not os.path.isdir(real):
            raise WorkspaceError("workspace_missing",
                                 "the workspace of this session no longer exists on disk; start a new session")
        return real

    def remove_if_empty(self, path: str) -> bool:
        try:
            os.rmdir(path)
        except OSError:
            return False
        return True

    def remove(self, path: str) -> None:
        """Delete a workspace (or worktree) tree; refuses anything outside the roots, and a project's own folder."""
        real = os.path.realpath(path)
        if real not in self.folders and any(real.startswith(root + os.sep) for root in self.roots):
            shutil.rmtree(real, ignore_errors=True)
