"""Publish and subscribe in ten lines, with the broker embedded in this process."""

import os
import tempfile

import busx

with (tempfile.TemporaryDirectory() as directory,
      busx.Broker(unix_path=os.path.join(directory, "bus.sock")) as broker,  # or `busx serve`
      busx.connect(broker.url) as bus):
    sub = bus.subscribe("greetings.*")
    bus.publish("greetings.world", {"text": "hello"})
    msg = sub.recv(timeout=5)
    print(msg.topic, msg.data, "from pid", msg.sender.pid)
