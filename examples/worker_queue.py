"""Queue groups: subscribers that share a queue name split the messages
between them, so each job reaches exactly one worker.

Three workers (threads here, usually processes), each with its own
connection, subscribe to "jobs.resize" in the group "resizers"; the
publisher sends twelve jobs and every worker reports what it handled."""

import os
import queue
import tempfile
import threading
from collections import Counter

import busx

JOBS = 12


def work(name: str, jobs: busx.Subscription, done: queue.Queue[tuple[str, int]]) -> None:
    for job in jobs:                    # ends when the worker's bus closes
        done.put((name, job.data["image"]))


with (tempfile.TemporaryDirectory() as directory,
      busx.Broker(unix_path=os.path.join(directory, "bus.sock")) as broker):
    done: queue.Queue[tuple[str, int]] = queue.Queue()
    workers = {name: busx.connect(broker.url, name=name)
               for name in ("worker-1", "worker-2", "worker-3")}
    threads = [threading.Thread(target=work, args=(
                   name, worker.subscribe("jobs.resize", queue="resizers"), done))
               for name, worker in workers.items()]
    for thread in threads:
        thread.start()

    with busx.connect(broker.url, name="publisher") as publisher:
        for image in range(JOBS):
            publisher.publish("jobs.resize", {"image": image})

    results = [done.get(timeout=5) for _ in range(JOBS)]
    for worker in workers.values():
        worker.close()
    for thread in threads:
        thread.join()

handled = sorted(image for _, image in results)
assert handled == list(range(JOBS)), "each job is handled exactly once"
for name, count in sorted(Counter(name for name, _ in results).items()):
    print(f"{name} handled {count} jobs")
