"""A small, bounded thread pool for the heavy part of request preparation.

Tokenizing, chat template rendering and grammar building can take seconds on a large request. On the event
loop they would stall every other client, `/healthz` included; here they run on a few threads instead
(llama.cpp's tokenizer releases the GIL through ctypes; pure-Python work yields it every switch interval).
The pool is bounded, so many huge requests queue for a thread rather than starve the process.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class Preparer:
    def __init__(self, threads: int | None = None) -> None:
        count = threads or min(4, max(os.cpu_count() or 1, 2))
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="prepare")

    async def run(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`work(*args, **kwargs)` on a pool thread; its exceptions are raised here."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(work, *args, **kwargs))

    def close(self) -> None:
        """Drops queued work and waits for running work (it may be using the vocabulary)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
