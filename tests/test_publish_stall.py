"""A publisher whose socket filled up (the broker fell behind for a moment)
must send everything it buffered once the broker reads again, without
needing another publish to wake it. Found by benchmarks/test_fanout.py,
where a broker busy with four subscribers stalls a fast publisher."""

import os
import signal
import subprocess

from support import spawn_python, wait_for

import busx

COUNT = 20_000      # ~2.6 MB of frames: far more than a UNIX socket buffer holds

BROKER = """
import sys, busx
with busx.Broker(unix_path=sys.argv[1]) as broker:
    print("ready", flush=True)
    sys.stdin.readline()
"""


def kernel_wait_channel(thread_id: int) -> str:
    """Where a thread of this process sleeps in the kernel ("do_epoll_wait":
    it has done all it can and waits for an event)."""
    with open(f"/proc/self/task/{thread_id}/wchan") as wchan:
        return wchan.read()


def test_buffered_publishes_reach_the_broker_after_it_stalls(socket_path):
    process = spawn_python(BROKER, socket_path, stdin=subprocess.PIPE)
    try:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
        with busx.connect(f"unix://{socket_path}") as subscriber, \
                busx.connect(f"unix://{socket_path}") as publisher:
            sub = subscriber.subscribe("stall.>")
            # A stopped broker is a broker that fell behind. The first half
            # fills the publisher's socket; once its I/O thread has gone back
            # to epoll_wait with bytes unsent, the second half waits behind them.
            os.kill(process.pid, signal.SIGSTOP)
            try:
                publisher.publish_many(("stall.x", i) for i in range(COUNT // 2))
                wait_for(lambda: kernel_wait_channel(publisher._thread.native_id)
                         == "do_epoll_wait", message="the publisher's I/O thread never blocked")
                publisher.publish_many(("stall.x", i) for i in range(COUNT // 2, COUNT))
            finally:
                os.kill(process.pid, signal.SIGCONT)
            got = []
            while len(got) < COUNT:
                batch = sub.recv_many(max_count=COUNT, timeout=5)
                if not batch:
                    break
                got += [msg.data for msg in batch]
            assert got == list(range(COUNT)), f"{len(got)} of {COUNT} arrived"
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.stdin.close()
        process.wait(30)
        process.stdout.close()
        process.stderr.close()
