"""asyncio face of busx: the same connection machinery as busx.client, with
waits done by the event loop. The client's I/O thread signals an eventfd that
the loop watches with add_reader: no thread per subscription, no polling.

    bus = await busx.aio.connect()
    sub = await bus.subscribe("orders.>")
    async for msg in sub: ...
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import time
from collections.abc import AsyncIterator, Generator, Iterable, Sequence
from typing import Any

from ._core import Message
from .client import DEFAULT_HEARTBEAT, Bus, Step, Subscription, _deadline
from .errors import Closed, Timeout

__all__ = ["AsyncBus", "AsyncSubscription", "connect"]


class AsyncSubscription:
    """Messages matching one pattern: `async for msg in sub`, or recv()."""

    def __init__(self, bus: AsyncBus, sub: Subscription) -> None:
        self._bus = bus
        self._sub = sub
        self.pattern = sub.pattern

    @property
    def dropped(self) -> int:
        return self._sub.dropped

    @property
    def closed(self) -> bool:
        return self._sub.closed

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message; raises Timeout when timeout seconds pass first."""
        msg = self._sub.next_queued()
        if msg is not None:
            return msg
        return await self._bus._wait(Step(self._sub.next_message, _deadline(timeout),
                                          "no message arrived within the timeout"))

    async def recv_many(self, max_count: int = 1024,
                        timeout: float | None = None) -> list[Message]:
        """Up to max_count queued messages; waits for one; [] on timeout."""
        batch = self._sub.queued(max_count)
        if batch:
            return batch
        try:
            first = await self.recv(timeout)
        except Timeout:
            return []
        return [first] + self._sub.queued(max_count - 1)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except Closed:
            raise StopAsyncIteration from None

    async def unsubscribe(self) -> None:
        if not self._sub.closed:
            await self._bus._drive(self._bus._bus.unsubscribe_steps(self._sub))


class AsyncBus:
    """A connection to a broker for asyncio code; see busx.client.Bus."""

    def __init__(self, bus: Bus, loop: asyncio.AbstractEventLoop) -> None:
        self._bus = bus
        self._loop = loop
        self._waiters: set[asyncio.Future] = set()
        self._publish_lock = asyncio.Lock()
        self._notify_fd = bus.watch_events(self)    # msg.respond() returns an awaitable
        loop.add_reader(self._notify_fd, self._on_events)

    @property
    def transport(self) -> str:
        return self._bus.transport

    @property
    def closed(self) -> bool:
        return self._bus.closed

    def _on_events(self) -> None:
        try:
            os.read(self._notify_fd, 8)
        except BlockingIOError:
            pass
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self, step: Step) -> Any:
        while True:
            result = self._bus.poll(step.ready)
            if result is not None:
                return result
            remaining = None if step.deadline is None else step.deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Timeout(step.timeout_message or "timed out")
            waiter = self._loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise Timeout(step.timeout_message or "timed out") from None
            finally:
                self._waiters.discard(waiter)

    async def _drive(self, steps: Generator[Step, Any, Any]) -> Any:
        try:
            step = next(steps)
            while True:
                step = steps.send(await self._wait(step))
        except StopIteration as done:
            return done.value
        finally:
            steps.close()       # a cancelled wait still runs the steps' cleanup

    async def publish(self, topic: str, data: Any, *, fds: Iterable[int] = ()) -> None:
        """Publish; waits (without blocking the loop) only while the buffer is full."""
        if not self._publish_lock.locked():
            try:
                return self._bus.publish(topic, data, fds=fds, timeout=0)
            except Timeout:
                pass
        # Full: wait for room on a worker thread, holding the lock so later
        # publishes cannot overtake this one.
        async with self._publish_lock:
            await self._loop.run_in_executor(
                None, functools.partial(self._bus.publish, topic, data, fds=fds))

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Publish (topic, data) pairs in order, as one batch."""
        items = list(items)
        async with self._publish_lock:
            await self._loop.run_in_executor(None, self._bus.publish_many, items)

    async def flush(self, timeout: float | None = None, *, backbone: bool = False) -> None:
        """Return once the broker has routed everything published before
        (backbone=True: and its NATS server holds it; see Bus.flush)."""
        await self._drive(self._bus.flush_steps(timeout, backbone))

    async def subscribe(self, pattern: str, *, queue: str | None = None) -> AsyncSubscription:
        """Subscribe; active when it returns."""
        sub = await self._drive(self._bus.subscribe_steps(pattern, queue))
        return AsyncSubscription(self, sub)

    async def request(self, topic: str, data: Any, timeout: float = 5.0) -> Message:
        """Publish with a private reply inbox and wait for one reply."""
        return await self._drive(self._bus.request_steps(topic, data, timeout))

    async def stats(self, timeout: float | None = None) -> dict:
        return await self._drive(self._bus.stats_steps(timeout))

    async def close(self) -> None:
        """Flush, then close. Idempotent."""
        if self._bus.closed:
            return
        try:
            await self.flush(timeout=5.0)
        except Exception:
            pass
        self._loop.remove_reader(self._notify_fd)
        self._bus.close_now()
        self._wake_waiters()    # they see Closed

    async def __aenter__(self) -> AsyncBus:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


async def connect(url: None | str | Sequence[str] = None, *,
                  token: tuple[str, str] | None = None, name: str | None = None,
                  timeout: float = 5.0, reconnect: bool = True,
                  max_buffer: int = 16 << 20, heartbeat: float | None = DEFAULT_HEARTBEAT,
                  tls_ca: str | os.PathLike | None = None,
                  tls_cert: str | os.PathLike | None = None,
                  tls_key: str | os.PathLike | None = None,
                  ssl_context: ssl.SSLContext | None = None) -> AsyncBus:
    """Connect to a broker; the same parameters as busx.connect."""
    loop = asyncio.get_running_loop()
    bus = await loop.run_in_executor(None, functools.partial(
        Bus, url, token=token, name=name, timeout=timeout, reconnect=reconnect,
        max_buffer=max_buffer, heartbeat=heartbeat, tls_ca=tls_ca, tls_cert=tls_cert,
        tls_key=tls_key, ssl_context=ssl_context))
    return AsyncBus(bus, loop)
