"""Pass an open file to another process: the publisher writes a report into
an anonymous in-memory file (memfd) and publishes the fd; the subscriber, a
separate process, receives its own descriptor for the same file and reads it.
Nothing is copied through the bus but the descriptor. UNIX transport only.

    python pass_fd.py                  # runs the broker, the publisher and a subscriber
"""

import os
import subprocess
import sys
import tempfile

import busx


def subscriber(url: str) -> None:
    with busx.connect(url, name="reader") as bus:
        sub = bus.subscribe("reports.ready")
        print("ready", flush=True)                  # tells the publisher it may publish
        msg = sub.recv(timeout=10)
        (fd,) = msg.fds                             # ours now: we must close it
        with os.fdopen(fd, "rb") as report:
            text = report.read().decode()
        print(f"subscriber {os.getpid()} read {text!r} ({msg.data['bytes']} bytes) "
              f"from pid {msg.sender.pid}", flush=True)


def publisher() -> int:
    with (tempfile.TemporaryDirectory() as directory,
          busx.Broker(unix_path=os.path.join(directory, "bus.sock")) as broker):
        reader = subprocess.Popen([sys.executable, __file__, broker.url],
                                  stdout=subprocess.PIPE, text=True)
        assert reader.stdout is not None
        assert reader.stdout.readline() == "ready\n"
        report = b"quarterly numbers: all up"
        fd = os.memfd_create("report")
        os.write(fd, report)
        os.lseek(fd, 0, os.SEEK_SET)            # the reader shares this file offset
        with busx.connect(broker.url, name="writer") as bus:
            bus.publish("reports.ready", {"bytes": len(report)}, fds=[fd])
            os.close(fd)                        # publish took a duplicate: ours can go now
        print(reader.stdout.read(), end="")
        return reader.wait()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        subscriber(sys.argv[1])
    else:
        sys.exit(publisher())
