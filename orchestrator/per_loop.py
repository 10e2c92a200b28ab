"""Process-wide shortcuts kept per running event loop: asyncio objects (locks, futures) belong to the loop
that made them, and tests run several orchestrator apps one after another, each on its own loop. Keyed
weakly by the loop itself, so a closed loop's values go with it (a loop's ``id`` can be reused)."""

from __future__ import annotations

import asyncio
import weakref
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """One ``factory()`` value per running event loop, made on first use in that loop."""

    def __init__(self, factory: Callable[[], T]):
        self._factory = factory
        self._values: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T]" = weakref.WeakKeyDictionary()

    def get(self) -> T:
        """This loop's value (call from a coroutine or callback of that loop)."""
        loop = asyncio.get_running_loop()
        if loop not in self._values:
            self._values[loop] = self._factory()
        return self._values[loop]
