"""Instructions per message in each stage, counted by callgrind (stable on a
noisy machine, unlike time). Run:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/busx.cg \\
        python benchmarks/profile_message.py 20000
    python benchmarks/profile_message.py --report /tmp/busx.cg 20000

One process: a publisher, the broker's loop and a subscriber decoding every
message, 100-byte msgpack dicts as in compare.py. With --request first
(`profile_message.py --request 2000`, and `--report F --request 2000`), the
workload is request/reply instead: a requester and an echo service on one
embedded broker, so every stage runs once per request and once per reply."""

import os
import re
import subprocess
import sys
import tempfile

STAGES = {
    # stage: the function (compiled name suffix) whose inclusive cost it is
    "publish: Bus.publish's C part (topic, pack, queue)": "publish_data",
    "  of which packing (busx._core.encode's C packer)": "pack_payload",
    "client I/O thread: send batches": "ClientIO__write",
    "broker: read, parse, route, queue": "BrokerLoop__read",
    "  of which route (cache lookup, deliver)": "BrokerLoop__route",
    "broker: write batches": "BrokerLoop__flush_dirty",
    "client I/O thread: recv, cut frames": "ClientIO__read",
    "take: frames to Message objects": "take",
    "msg.data: decode": "Message_data",
}


def workload(count: int) -> None:
    import busx
    payload = {"id": 1, "name": "x" * 60, "v": 1.5, "ok": True}
    with tempfile.TemporaryDirectory() as directory:
        with busx.Broker(unix_path=os.path.join(directory, "bus.sock")) as broker:
            with busx.connect(broker.url) as pub, busx.connect(broker.url) as sub_bus:
                sub = sub_bus.subscribe("bench")
                received = 0
                for i in range(count):
                    pub.publish("bench", payload)
                    if i % 1000 == 999:
                        pub.flush()
                        received += drain(sub)
                pub.flush()
                while received < count:
                    received += drain(sub)


def request_workload(count: int) -> None:
    import threading

    import busx
    payload = {"id": 1, "name": "x" * 60}
    with tempfile.TemporaryDirectory() as directory:
        with busx.Broker(unix_path=os.path.join(directory, "bus.sock"), busy_poll_us=0) as broker:
            with busx.connect(broker.url) as requester, busx.connect(broker.url) as service:
                requests = service.subscribe("echo")

                def serve() -> None:
                    for _ in range(count):
                        msg = requests.recv(timeout=30)
                        msg.respond(msg.data)

                server = threading.Thread(target=serve)
                server.start()
                for _ in range(count):
                    requester.request("echo", payload, timeout=30).data
                server.join()


def drain(sub) -> int:
    batch = sub.recv_many(100_000, timeout=10)
    for msg in batch:
        msg.data
    return len(batch)


def report(path: str, count: int) -> None:
    annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", path],
                               capture_output=True, text=True, check=True).stdout
    costs: dict[str, int] = {}
    for line in annotated.splitlines():
        match = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(?:=>\s+)?\S*:(\w+)", line)
        if match:
            cost = int(match.group(1).replace(",", ""))
            costs[match.group(2)] = max(cost, costs.get(match.group(2), 0))
    print("| stage | instructions per message |\n|---|---:|")
    for stage, suffix in STAGES.items():
        total = max((cost for function, cost in costs.items() if function.endswith(suffix)),
                    default=0)
        print(f"| {stage} | {total / count:,.0f} |")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    request = "--request" in arguments
    if request:
        arguments.remove("--request")
    if arguments[0] == "--report":
        report(arguments[1], int(arguments[2]))
    else:
        (request_workload if request else workload)(int(arguments[0]))
