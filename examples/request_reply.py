"""Request/reply: a service answers "math.add" requests; a client asks it.

The service runs on a thread here; in real life it is another process that
connects to the same broker. Each request carries a private reply inbox
(msg.reply_to) and msg.respond() publishes the answer there."""

import os
import tempfile
import threading

import busx


def answer_additions(requests: busx.Subscription) -> None:
    for request in requests:            # ends when the service's bus closes
        request.respond(sum(request.data))


with (tempfile.TemporaryDirectory() as directory,
      busx.Broker(unix_path=os.path.join(directory, "bus.sock")) as broker):
    with busx.connect(broker.url, name="adder") as service:
        # Subscribe before starting the thread: requests sent once
        # subscribe() has returned cannot be missed.
        thread = threading.Thread(target=answer_additions,
                                  args=(service.subscribe("math.add"),))
        thread.start()
        with busx.connect(broker.url, name="client") as client:
            for numbers in ([1, 2], [10, 20, 30], []):
                reply = client.request("math.add", numbers, timeout=5)
                print(f"sum of {numbers} = {reply.data}")
    thread.join()                       # the service's bus is closed: its loop has ended
