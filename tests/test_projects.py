"""
Projects through a real daemon, the fake CLI and the real git: sessions in a project's folder (one running
turn at a time there), sessions in git worktrees of their own (isolated, with a diff, removed with their
branch), and what a client may not ask for.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.support import Daemon, get_json, post, wait_for
from tests.test_files import raw


def git(folder: str, *args: str) -> str:
    return subprocess.run(["git", "-C", folder, *args], check=True, capture_output=True, text=True).stdout.strip()


class ProjectTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_projects_and_worktrees(self) -> Any:
        base = os.path.abspath(self.mktemp())
        repo, plain = os.path.join(base, "repo"), os.path.join(base, "plain")
        os.makedirs(repo)
        os.makedirs(plain)
        git(repo, "init", "-q", "-b", "main")
        with open(os.path.join(repo, "README"), "w") as f:
            f.write("the project\n")
        git(repo, "add", "README")
        git(repo, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "first")
        first = git(repo, "rev-parse", "HEAD")
        daemon = yield Daemon(self, "--project", f"repo={repo}", "--project", f"plain={plain}").start()
        url = daemon.url + "/api/claude"

        code, body = yield get_json(daemon.url + "/api/projects")
        self.assertEqual((code, body["projects"]), (200, [
            {"name": "plain", "path": plain, "git": False, "branch": None},
            {"name": "repo", "path": repo, "git": True, "branch": "main"}]))

        # a session in the project's own folder, resumed there; a second one may not run at the same time
        before = yield post(url, {"prompt": "first", "project": "plain"})
        self.assertEqual(before.status, 200, daemon.log[-4000:])
        self.assertFalse(before.sse.results()[0]["is_error"], before.sse.results())
        first_plain = before.session_id
        one = yield post(url, {"prompt": "hello", "project": "plain"})
        self.assertEqual(daemon.invocations()[-1]["cwd"], plain)
        again = yield post(url, {"prompt": "again", "session_id": one.session_id})
        self.assertFalse(again.sse.results()[0]["is_error"])
        running = post(url, {"prompt": "[[fake hang=1]] long", "session_id": one.session_id})
        yield wait_for(lambda: daemon.turns()[-1]["prompt"].endswith("long"))
        busy = yield post(url, {"prompt": "me too", "project": "plain"})
        self.assertEqual((busy.status, busy.json()["error"]["code"]), (409, "project_busy"))
        status, _, body = yield raw(daemon.port, "PUT", f"/api/sessions/{first_plain}/files/x.txt", b"x")
        self.assertEqual(status, 409, body)  # another session's turn runs in the same folder
        yield post(f"{daemon.url}/api/sessions/{one.session_id}/cancel", {})
        yield running
        two = yield post(url, {"prompt": "now", "project": "plain"})
        code, listed = yield get_json(daemon.url + "/api/sessions")
        self.assertLessEqual({one.session_id, two.session_id}, {s["session_id"] for s in listed["sessions"]})

        # worktrees: each session its own, on its own branch, running side by side
        hangs = [post(url, {"prompt": f"[[fake hang=1]] tree {n}", "project": "repo", "worktree": True})
                 for n in range(2)]
        try:
            yield wait_for(lambda: sum(" tree " in t["prompt"] for t in daemon.turns()) == 2, 20)
        except AssertionError:
            self.fail(f"two worktree turns did not start; the daemon's log ends: {daemon.log[-4000:]}")
        trees = [i["cwd"] for i in daemon.invocations()[-2:]]
        self.assertEqual(len(set(trees)), 2)
        for tree in trees:
            self.assertTrue(tree.startswith(os.path.join(daemon.data_dir, "worktrees") + os.sep))
            self.assertEqual(git(tree, "rev-parse", "--abbrev-ref", "HEAD"), "claudesrv/" + os.path.basename(tree))
        for sid in (os.path.basename(t) for t in trees):
            yield post(f"{daemon.url}/api/sessions/{sid}/cancel", {})
        replies = yield gatherResults(hangs)
        sid = replies[0].session_id
        tree = os.path.join(daemon.data_dir, "worktrees", sid)
        self.assertIn(tree, trees)
        status, _, _ = yield raw(daemon.port, "PUT", f"/api/sessions/{sid}/files/NEW.txt", b"made in the worktree\n")
        self.assertEqual(status, 201)
        self.assertFalse(os.path.exists(os.path.join(repo, "NEW.txt")))  # the project's checkout is untouched
        status, headers, diff = yield raw(daemon.port, "GET", f"/api/sessions/{sid}/diff")
        self.assertEqual((status, headers["content-type"]), (200, "text/x-diff; charset=utf-8"))
        self.assertIn(b"+made in the worktree", diff)
        self.assertEqual(git(tree, "status", "--porcelain"), "?? NEW.txt")  # the worktree's index is untouched
        code, item = yield get_json(f"{daemon.url}/api/sessions/{sid}")
        self.assertEqual(item["project"], {"name": "repo", "worktree": tree, "branch": f"claudesrv/{sid}",
                                           "base": first})

        # deleting: the worktree goes (its branch with delete_branch=true); the project's folders stay
        status, _, body = yield raw(daemon.port, "DELETE", f"/api/sessions/{sid}?delete_branch=true")
        self.assertEqual(status, 200, body)
        self.assertFalse(os.path.exists(tree))
        self.assertNotIn(f"claudesrv/{sid}", git(repo, "branch", "--list"))
        other = replies[1].session_id
        yield raw(daemon.port, "DELETE", f"/api/sessions/{other}")
        self.assertIn(f"claudesrv/{other}", git(repo, "branch", "--list"))
        yield raw(daemon.port, "DELETE", f"/api/sessions/{one.session_id}")
        self.assertTrue(os.path.isdir(plain))
        self.assertEqual(sorted(os.listdir(repo)), [".git", "README"])

        # a worktree session whose CLI fails before saying anything leaves no worktree behind
        failed = yield post(url, {"prompt": "[[fake no_init=1]] fail", "project": "repo", "worktree": True})
        self.assertEqual(failed.sse.results()[0]["terminal_reason"], "cli_failed")
        yield wait_for(lambda: os.listdir(os.path.join(daemon.data_dir, "worktrees")) == [])  # removed in a thread

        # a worktree from another base; and what may not be asked
        based = yield post(url, {"prompt": "from first", "project": "repo", "worktree": True, "base": first})
        self.assertEqual(based.status, 200)
        for body, code, field in [
            ({"project": "nope"}, "unknown_project", "project"),
            ({"project": "plain", "worktree": True}, "not_a_git_project", "worktree"),
            ({"project": "repo", "worktree": True, "base": "no-such-ref"}, "unknown_base", "base"),
            ({"project": "repo", "worktree": True, "base": "--upload-pack=evil"}, "invalid_field", "base"),
            ({"worktree": True}, "invalid_field", "worktree"),
            ({"project": "repo", "base": "main"}, "invalid_field", "base"),
            ({"project": "Repo"}, "invalid_field", "project"),
            ({"project": "repo", "session_id": two.session_id}, "invalid_field", "project"),
        ]:
            refused = yield post(url, {"prompt": "x", **body})
            error = refused.json()["error"]
            self.assertEqual((refused.status, error["code"], error["field"]), (400, code, field), body)
        status, _, body = yield raw(daemon.port, "GET", f"/api/sessions/{two.session_id}/diff")
        self.assertEqual((status, json.loads(body)["error"]["code"]), (400, "not_a_worktree_session"))
        self.assertEqual(sorted(os.listdir(repo)), [".git", "README"])
