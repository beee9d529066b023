"""busx.aio under asyncio's default loop and under uvloop."""

import asyncio
import threading

import pytest
from support import open_fds, wait_for

import busx

LOOPS = ["asyncio"]
try:
    import uvloop
    LOOPS.append("uvloop")
except ImportError:      # uvloop is part of the test extra; tolerate its absence
    uvloop = None


@pytest.fixture(params=LOOPS)
def run(request):
    """Run a coroutine to completion on the chosen event loop."""
    def runner(coro):
        if request.param == "uvloop":
            return uvloop.run(coro)
        return asyncio.run(coro)
    return runner


def test_aio_is_an_attribute_of_busx():
    assert busx.aio.connect is not None


def test_publish_subscribe_iterate(run, broker, tcp_url):
    async def main():
        for url in (broker.url, tcp_url):
            async with await busx.aio.connect(url) as bus:
                sub = await bus.subscribe("orders.>")
                for i in range(1000):
                    await bus.publish("orders.eu", {"n": i})
                got = []
                async for msg in sub:
                    got.append(msg.data["n"])
                    if len(got) == 1000:
                        break
                assert got == list(range(1000))
                assert (await sub.recv_many(timeout=0.05)) == []
    run(main())


def test_recv_timeout_and_cancellation_leave_the_connection_healthy(run, broker):
    async def main():
        async with await busx.aio.connect(broker.url) as bus:
            sub = await bus.subscribe("quiet")
            with pytest.raises(busx.Timeout):
                await sub.recv(timeout=0.05)
            pending = asyncio.ensure_future(sub.recv())
            await asyncio.sleep(0)            # let it start waiting
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            request = asyncio.ensure_future(bus.request("nobody.home", 1, timeout=10))
            await asyncio.sleep(0.01)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            assert bus._bus._requests == {}
            await bus.publish("quiet", "still works")
            assert (await sub.recv(timeout=5)).data == "still works"
            await bus.flush(timeout=5)
    run(main())


def test_request_reply_many_concurrent_over_one_inbox(run, broker):
    async def main():
        async with await busx.aio.connect(broker.url) as server, \
                await busx.aio.connect(broker.url) as client:
            sub = await server.subscribe("math.double")

            async def serve():
                async for msg in sub:
                    await msg.respond(msg.data * 2)

            server_task = asyncio.ensure_future(serve())
            replies = await asyncio.gather(*(client.request("math.double", i, timeout=10)
                                             for i in range(200)))
            assert [r.data for r in replies] == [i * 2 for i in range(200)]
            inboxes = [s for s in client._bus._subs.values() if s.pattern.startswith("_INBOX.")]
            assert len(inboxes) == 1
            with pytest.raises(busx.Timeout):
                await client.request("math.nobody", 1, timeout=0.1)
            server_task.cancel()
    run(main())


def test_sync_and_async_clients_share_one_process(run, broker):
    with busx.connect(broker.url) as sync_bus:
        sync_sub = sync_bus.subscribe("mixed.>")

        async def main():
            async with await busx.aio.connect(broker.url) as bus:
                sub = await bus.subscribe("mixed.>")
                sync_bus.publish("mixed.from-sync", 1)
                await bus.publish("mixed.from-async", 2)
                got = {(await sub.recv(timeout=5)).topic for _ in range(2)}
                assert got == {"mixed.from-sync", "mixed.from-async"}
        run(main())
        assert {sync_sub.recv(timeout=5).topic for _ in range(2)} == {"mixed.from-sync",
                                                                      "mixed.from-async"}


def test_no_thread_per_subscription_and_fds_released(run, broker):
    before_threads = threading.active_count()
    before_fds = open_fds()

    async def main():
        async with await busx.aio.connect(broker.url) as bus:
            subs = [await bus.subscribe(f"many.{i}") for i in range(50)]
            assert threading.active_count() <= before_threads + 2   # the I/O thread (+ executor)
            await bus.publish("many.7", "x")
            assert (await subs[7].recv(timeout=5)).data == "x"
    run(main())
    # The broker in this process closes its end once it reads the client's EOF.
    wait_for(lambda: open_fds() == before_fds, timeout=5,
             message=f"more than the {before_fds} fds open before stayed open")


def test_publish_waits_without_blocking_the_loop_when_full(run, broker):
    async def main():
        async with await busx.aio.connect(broker.url, max_buffer=64 << 10) as bus:
            sub = await bus.subscribe("big")
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)

            ticking = asyncio.ensure_future(ticker())
            for i in range(300):
                await bus.publish("big", i.to_bytes(4, "big") * 2500)   # 10 KB
            await bus.flush(timeout=30)
            got = []
            while len(got) < 300:
                got += [int.from_bytes(m.data[:4], "big") for m in await sub.recv_many(timeout=5)]
            ticking.cancel()
            assert got == list(range(300))
            assert ticks > 0
    run(main())
