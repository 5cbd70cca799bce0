"""Work that arrives while the same work is under way waits, and then goes together in one call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class Batches(Generic[T]):
    """
    C{add(item)} hands C{item} to C{run} (which takes a list and returns a Deferred): at once when nothing
    is running, else with everything else added meanwhile, once the running call is done. Each item's
    Deferred fires with that call's outcome (a failure errbacks every item of its batch).
    """

    def __init__(self, run: Callable[[list[T]], Deferred[object]]) -> None:
        self.run = run
        self._waiting: list[tuple[T, Deferred[None]]] = []
        self._busy = False

    def add(self, item: T) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((item, d))
        if not self._busy:
            self._next()
        return d

    def _next(self) -> None:
        batch, self._waiting = self._waiting, []
        self._busy = bool(batch)
        if not batch:
            return

        def done(result: object) -> None:
            for _, d in batch:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)
            self._next()

        self.run([item for item, _ in batch]).addBoth(done)
