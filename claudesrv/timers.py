"""Named one-shot timers on an injected clock: what a turn, a session and a stream each schedule."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Timers:
    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._calls: dict[str, IDelayedCall] = {}

    def set(self, name: str, delay: float, fn: Callable[[], object]) -> None:
        """Call C{fn} after C{delay} seconds, replacing a timer of the same name."""
        self.cancel(name)
        self._calls[name] = self.clock.callLater(max(delay, 0), self._fire, name, fn)

    def set_if(self, name: str, delay: float, fn: Callable[[], object]) -> None:
        """The same, but 0 means "no limit": nothing is scheduled."""
        if delay > 0:
            self.set(name, delay, fn)

    def _fire(self, name: str, fn: Callable[[], object]) -> None:
        self._calls.pop(name, None)
        fn()

    def active(self, name: str) -> bool:
        return name in self._calls

    def cancel(self, *names: str) -> None:
        """Cancel the named timers, or all of them when no name is given."""
        for name in names or tuple(self._calls):
            call = self._calls.pop(name, None)
            if call is not None and call.active():
                call.cancel()
