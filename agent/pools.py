"""The agent's threads, kept apart so that no kind of work can starve another (I/O).

Blocking work runs in threads. When everything shared asyncio's default pool, a few jobs
whose output servers trickled their answers held every thread, and the Lease renewal, the
agent's heartbeat, queued behind them until the operator declared the agent dead. So:

- the Lease renewal and each watch run on threads of their own (`run_in_thread`);
- downloads, deliveries and loading/generating each have a pool sized for them
  (`Pools`): at most `max_downloads`, `slots + queue_slots` and `slots + queue_slots`
  threads, which is all the work of that kind the agent ever runs at once;
- short API calls use the default pool, which nothing long-running uses any more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Pools", "run_in", "run_in_thread"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Pools:
    """Thread pools by kind of work; `None` means asyncio's default pool (tests)."""

    downloads: concurrent.futures.Executor | None = None
    uploads: concurrent.futures.Executor | None = None
    compute: concurrent.futures.Executor | None = None

    @classmethod
    def sized(cls, *, downloads: int, jobs: int) -> Pools:
        """Pools for `downloads` concurrent downloads and `jobs` jobs in progress."""
        return cls(
            downloads=concurrent.futures.ThreadPoolExecutor(max_workers=downloads, thread_name_prefix="download"),
            uploads=concurrent.futures.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="upload"),
            compute=concurrent.futures.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="compute"),
        )

    def shutdown(self) -> None:
        for pool in (self.downloads, self.uploads, self.compute):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


async def run_in(pool: concurrent.futures.Executor | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in `pool` (the default pool when None), like `asyncio.to_thread`."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await loop.run_in_executor(pool, call)


def run_in_thread(fn: Callable[..., T], *args: Any, name: str, **kwargs: Any) -> asyncio.Future[T]:
    """`fn(*args, **kwargs)` on a new daemon thread of its own; the future completes when it returns.

    For loops that live as long as the agent (watches, the Lease): they never wait for a
    pool's thread, and never hold one."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def hand_over(outcome: Callable[[], None]) -> None:
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def body() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to whoever awaits the future
            error = exc
            hand_over(lambda: future.set_exception(error))
        else:
            hand_over(lambda: future.set_result(result))

    threading.Thread(target=body, name=name, daemon=True).start()
    return future
