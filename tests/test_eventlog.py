"""The durable event log: numbering, framing, replay offsets, bounds, and what a crash leaves behind."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from claudesrv.eventlog import EventLog


class Follower:
    def __init__(self, position: int = 0) -> None:
        self.position = position
        self.got = b""
        self.turns = 0
        self.closed: list[str] = []

    def log_grew(self, data: bytes, start: int) -> None:
        assert start == self.position
        self.got += data
        self.position += len(data)

    def turn_ended(self) -> None:
        self.turns += 1

    def log_closed(self, why: str) -> None:
        self.closed.append(why)


class EventLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(os.path.abspath(self.mktemp()), "events", "sid")

    def test_events_are_numbered_and_framed(self) -> None:
        """Each line is one event framed `id: N` + `data:`; followers get the bytes as they are stored."""
        log = EventLog.open(self.dir, 1 << 20)
        follower = Follower()
        log.follow(follower)
        log.begin_turn()
        self.assertEqual(log.append_lines([b'{"a":1}', b'{"b":2}']), 2)
        self.assertEqual(log.append_event({"type": "claudesrv"}), 3)
        log.append_piece(b'{"big":"', True, False)
        log.append_piece(b"x" * 10, False, False)
        log.append_piece(b'"}', False, True)
        log.turn_ended()
        expected = (b'id: 1\ndata: {"a":1}\n\nid: 2\ndata: {"b":2}\n\nid: 3\ndata: {"type":"claudesrv"}\n\n'
                    b'id: 4\ndata: {"big":"xxxxxxxxxx"}\n\n')
        self.assertEqual(follower.got, expected)
        self.assertEqual(follower.turns, 1)
        self.assertEqual(log.read(0, 1 << 20), expected)

    def test_offsets_for_replay(self) -> None:
        """offset_after(N) is where event N+1 starts, across turns; the end after the last event."""
        log = EventLog.open(self.dir, 1 << 20)
        for turn in range(3):
            log.begin_turn()
            log.append_lines([b'{"turn":%d}' % turn, b'{"line":2}'])
        self.assertEqual(log.offset_after(0), 0)
        for seq in range(1, 6):
            at = log.offset_after(seq)
            assert at is not None
            self.assertTrue(log.read(at, 100).startswith(b"id: %d\n" % (seq + 1)), seq)
        self.assertEqual(log.offset_after(6), log.end)
        self.assertEqual(log.offset_after(99), log.end)

    def test_oldest_whole_turns_go_but_not_one_being_read(self) -> None:
        """Past the bound the oldest turns are dropped whole; a turn a follower still reads stays."""
        log = EventLog.open(self.dir, 100)
        slow = Follower()
        log.follow(slow)
        slow.log_grew = lambda data, start: None  # type: ignore[method-assign]  # reads nothing
        for turn in range(5):
            log.begin_turn()
            log.append_lines([b'{"turn":%d,"pad":"..................."}' % turn])
        self.assertEqual(log.first_seq, 1)
        log.unfollow(slow)
        log.begin_turn()
        log.append_lines([b'{"turn":5}'])
        self.assertGreater(log.first_seq, 1)
        self.assertLessEqual(log.size(), 100 + 60)
        self.assertIsNone(log.offset_after(0))
        self.assertEqual(len(os.listdir(self.dir)), len(log.segments))

    def test_reopened_after_a_crash(self) -> None:
        """A log reopened keeps its numbering; a frame cut off by a crash is dropped."""
        log = EventLog.open(self.dir, 1 << 20)
        log.begin_turn()
        log.append_lines([b'{"a":1}', b'{"b":2}'])
        log.begin_turn()
        log.append_piece(b'{"c":"', True, False)  # the daemon dies here
        again = EventLog.open(self.dir, 1 << 20)
        self.assertEqual(again.last_seq, 2)
        self.assertEqual(again.read(0, 1000), b'id: 1\ndata: {"a":1}\n\nid: 2\ndata: {"b":2}\n\n')
        again.begin_turn()
        self.assertEqual(again.append_lines([b'{"d":4}']), 3)

    def test_destroy_tells_followers(self) -> None:
        """Deleting the log tells every follower and removes its folder."""
        log = EventLog.open(self.dir, 1 << 20)
        log.append_lines([b"{}"])
        follower = Follower(log.end)
        log.follow(follower)
        log.destroy()
        self.assertEqual(follower.closed, ["deleted"])
        self.assertFalse(os.path.exists(self.dir))
