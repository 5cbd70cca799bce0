"""
A session's files over HTTP: list a folder, download a file (ranges, streamed), upload one (streamed to a
temporary file, then moved into place), delete one.

Every path is relative to the session's folder (its workspace, project or worktree) and must stay inside
it: absolute paths, ``..``, NUL bytes and over-long names are 400 before anything is touched; a path that
leaves the folder through a symlink is 403. Writes never follow a symlink at the destination: the new file
replaces the link itself.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from typing import IO, Any

from claudesrv.approvals import iso
from claudesrv.errors import ApiError

MAX_NAME = 255  # bytes in one path component
MAX_PATH = 4096
HIDDEN = {".git"}


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_path", message, "path")


def check_relative(path: str) -> list[str]:
    """The components of a client's path, or 400 naming what is wrong with it."""
    if "\0" in path:
        raise _bad("the path must not contain NUL bytes")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise _bad(f"the path is longer than {MAX_PATH} bytes")
    if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        raise _bad("the path must be relative to the session's folder")
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise _bad("the path must not contain '..'")
        if part.lower() == ".git":
            raise ApiError(403, "git_metadata", "a session's .git is not reachable over HTTP", "path")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise _bad(f"a name in the path is longer than {MAX_NAME} bytes")
    return parts


def resolve(root: str, path: str, must_exist: bool = True) -> str:
    """The real path of C{path} under C{root}; 403 if it (or a folder on the way) leads outside, 404 if absent."""
    parts = check_relative(path)
    real_root = os.path.realpath(root)
    target = os.path.join(real_root, *parts)
    real = os.path.realpath(target)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise ApiError(403, "path_outside_session", "the path leads outside the session's folder", "path")
    if must_exist and not os.path.lexists(target):
        raise ApiError(404, "file_not_found", f"no {path!r} in the session's folder", "path")
    return real


def listing(root: str, path: str, show_hidden: bool = False) -> list[dict[str, Any]]:
    """The entries of a folder: name, type (file, dir, symlink, other), size, modified time."""
    folder = resolve(root, path)
    if not os.path.isdir(folder):
        raise ApiError(400, "not_a_folder", f"{path!r} is not a folder", "path")
    entries = []
    with os.scandir(folder) as found:
        for entry in found:
            if entry.name in HIDDEN and not show_hidden:
                continue
            info = entry.stat(follow_symlinks=False)
            kind = ("symlink" if stat.S_ISLNK(info.st_mode) else "dir" if stat.S_ISDIR(info.st_mode)
                    else "file" if stat.S_ISREG(info.st_mode) else "other")
            entries.append({"name": entry.name, "type": kind, "size": info.st_size,
                            "modified": iso(info.st_mtime)})
    return sorted(entries, key=lambda e: (e["type"] != "dir", e["name"]))


def readable_file(root: str, path: str) -> str:
    """A regular file to download (not a folder, device or fifo)."""
    real = resolve(root, path)
    if not os.path.isfile(real):
        raise ApiError(400, "not_a_file", f"{path!r} is not a regular file", "path")
    return real


def write_file(root: str, path: str, body: IO[bytes], size: int) -> dict[str, Any]:
    """
    Store an upload: copied to a temporary file next to its destination (parent folders made, each checked to
    stay inside), then renamed over it. A folder or special file in the way is 409; nothing is left on error.
    """
    parts = check_relative(path)
    if not parts:
        raise _bad("the path names no file")
    real_root = os.path.realpath(root)
    folder = real_root
    for part in parts[:-1]:
        folder = os.path.join(folder, part)
        if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
            real = os.path.realpath(folder)
            if not (real.startswith(real_root + os.sep) and os.path.isdir(real)):
                raise ApiError(403, "path_outside_session", "the path leads outside the session's folder", "path")
        os.makedirs(folder, exist_ok=True)
    destination = os.path.join(folder, parts[-1])
    if os.path.lexists(destination) and not os.path.islink(destination) and not os.path.isfile(destination):
        raise ApiError(409, "not_a_file", f"{path!r} exists and is not a file", "path")
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as out:
            body.seek(0)
            shutil.copyfileobj(body, out, 1 << 20)
        os.replace(temporary, destination)
    except BaseException:
        os.unlink(temporary)
        raise
    return {"path": "/".join(parts), "size": size}


def delete_file(root: str, path: str) -> None:
    """Remove one file (or a symlink: the link, never what it points to)."""
    parts = check_relative(path)
    if not parts:
        raise _bad("the path names no file")
    resolve(root, "/".join(parts[:-1]))  # the folder it is in stays inside
    target = os.path.join(os.path.realpath(root), *parts)
    if not os.path.lexists(target):
        raise ApiError(404, "file_not_found", f"no {path!r} in the session's folder", "path")
    if os.path.isdir(target) and not os.path.islink(target):
        raise ApiError(409, "not_a_file", f"{path!r} is a folder", "path")
    os.unlink(target)


