"""What one publish costs the caller: bus.publish(topic, small_dict) beside
msgpack.packb(small_dict) alone (the floor: publish must pack), a PUB send
on pyzmq, and a sendall on a plain socket. A sink process reads the other
end, so each call pays for a live connection, not a dead one."""

import msgpack
import peers
import pytest
from peers import SMALL_DICT, TOPIC

import busx

BATCH = 1000


def test_packb_alone(benchmark):
    benchmark(msgpack.packb, SMALL_DICT)


@pytest.fixture(params=["unix", "tcp"])
def bus(request, broker):
    with busx.connect(broker.url(request.param)) as client:
        yield client


def test_busx_publish(benchmark, bus):
    benchmark(bus.publish, TOPIC, SMALL_DICT)
    bus.flush(timeout=30)


def test_busx_publish_many(benchmark, bus):
    """Per-message cost is the time shown / 1000."""
    items = [(TOPIC, SMALL_DICT)] * BATCH
    benchmark(bus.publish_many, items)
    bus.flush(timeout=30)
    benchmark.extra_info["messages_per_call"] = BATCH


@pytest.fixture
def zmq_publisher(workdir, skip_without_zmq):
    skip_without_zmq("pyzmq")
    import zmq
    context = zmq.Context()
    sock = context.socket(zmq.XPUB)
    sock.bind(f"ipc://{workdir}/publish-cost.ipc")
    sink = peers.Peer("zmq-sub", f"ipc://{workdir}/publish-cost.ipc", "--no-decode")
    sock.recv()    # the sink's subscription arrived: sends now reach a pipe
    yield sock
    sink.kill()
    sock.close(linger=0)
    context.term()


def test_pyzmq_send(benchmark, zmq_publisher):
    topic, send, packb = TOPIC.encode(), zmq_publisher.send_multipart, msgpack.packb
    benchmark(lambda: send([topic, packb(SMALL_DICT)]))


@pytest.fixture
def plain_socket(workdir):
    sink = peers.Peer("raw-sub", f"unix:{workdir}/publish-cost.sock", "--no-decode")
    sock = peers.connect_to(sink.info["address"])
    yield sock
    sock.close()
    sink.finish()


def test_plain_socket_sendall(benchmark, plain_socket):
    sendall, packb, length = plain_socket.sendall, msgpack.packb, peers.LENGTH.pack

    def send():
        payload = packb(SMALL_DICT)
        sendall(length(len(payload)) + payload)
    benchmark(send)
