"""Long polls: wake requests waiting on the event loop when the server's state changes.

The federated server changes state in threads of its own (the round loop opens a
round, the runner ends the run), while devices' ``GET /v1/task?wait=S`` requests
wait on uvicorn's event loop. :class:`Wakeup` joins the two: a waiting request
takes the current :class:`asyncio.Event` of its loop *before* it looks at the
server's state, then awaits it; :meth:`Wakeup.fire`, called from any thread after
a change, sets every loop's event (through ``call_soon_threadsafe``) and starts new
ones. A change made between the look and the await therefore still wakes the
request, no lock is held while it waits, and no thread is spent on it.

:meth:`Wakeup.close` wakes every waiting request for good (later waits return at
once): uvicorn calls it before it stops, so that it does not wait for long polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

__all__ = ["Wakeup"]


class Wakeup:
    """A broadcast from any thread to requests waiting on event loops."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._events: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}
        self.closed = False
        #: Requests waiting now (changed on the event loops only).
        self.waiting = 0

    def event(self) -> asyncio.Event:
        """The event the next :meth:`fire` sets, for the running event loop.
        Take it before looking at the state the wait depends on."""
        loop = asyncio.get_running_loop()
        with self._guard:
            ready = self._events.get(loop)
            if ready is None:
                ready = self._events[loop] = asyncio.Event()
                if self.closed:
                    ready.set()
            return ready

    def fire(self) -> None:
        """Wake every request waiting now (callable from any thread)."""
        with self._guard:
            events, self._events = self._events, {}
        for loop, ready in events.items():
            # A closed loop refuses the call: nobody waits there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ready.set)

    def close(self) -> None:
        """Wake every waiting request, and let later waits return at once."""
        with self._guard:
            self.closed = True
        self.fire()

    async def wait(self, ready: asyncio.Event, seconds: float) -> bool:
        """Wait until ``ready`` (from :meth:`event`) is set or ``seconds`` pass;
        ``True`` if it was set."""
        if seconds <= 0:
            return ready.is_set()
        self.waiting += 1
        try:
            await asyncio.wait_for(ready.wait(), seconds)
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1
        return True
