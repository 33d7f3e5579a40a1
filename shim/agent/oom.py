"""The OOM kills in the guest's containers, numbered, for WaitOom.

The numbers make WaitOom repeatable: a host whose reply was lost with its connection asks again
with the last number it saw and gets the same event, so none is lost or reported twice.
"""

from __future__ import annotations

import asyncio
import collections

KEPT_EVENTS = 1024  # a host that falls this far behind gets the oldest one still kept


class OomLog:
    def __init__(self) -> None:
        self._events: collections.deque[tuple[int, str]] = collections.deque(maxlen=KEPT_EVENTS)
        self.last = 0  # the sequence number of the latest event
        self._changed = asyncio.Event()

    def record(self, container_id: str) -> None:
        self.last += 1
        self._events.append((self.last, container_id))
        self._changed.set()

    async def wait(self, after: int) -> tuple[int, str]:
        """The first event numbered above `after`, once there is one."""
        while True:
            for event in self._events:
                if event[0] > after:
                    return event
            self._changed.clear()
            await self._changed.wait()
