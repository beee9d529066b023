"""The UNIX socket as an access control: its mode whatever the umask, its
group, the directory it lives in, stale and foreign files at its path, and
other users kept out (or let in) by the kernel. Peers that run as another uid
are real child processes that drop to nobody (65534)."""

import grp
import json
import os
import shutil
import socket
import stat
import tempfile

import pytest
from support import run_python

import busx

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a child as another uid")

# Import everything as root first (the interpreter may live under /root, which
# nobody cannot read), then drop to the uid/gid/groups in argv, then connect.
CONNECT_AS = """
import json, os, sys, busx
url, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
try:
    with busx.connect(url, timeout=5) as bus:
        bus.flush(timeout=5)
        print(json.dumps({"connected": bus.transport}))
except busx.BusError as exc:
    print(json.dumps({"error": type(exc).__name__, "permission_error": isinstance(exc, PermissionError),
                      "message": str(exc)}))
"""


def connect_as(url: str, uid: int = NOBODY, gid: int = NOBODY) -> dict:
    result = run_python(CONNECT_AS, url, str(uid), str(gid), timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def nogroup():
    try:
        return grp.getgrgid(NOBODY)
    except KeyError:
        pytest.skip("no group with gid 65534 on this host")


@pytest.fixture
def restore_umask():
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)


@pytest.fixture
def tmp_dir_under_tmp():
    """A directory directly under /tmp, where the broker checks ownership and mode."""
    path = tempfile.mkdtemp(prefix="busx-perm-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- socket mode ----

def test_default_socket_mode_is_0600(socket_path):
    with busx.Broker(unix_path=socket_path):
        assert mode_of(socket_path) == 0o600


@pytest.mark.parametrize("umask", [0, 0o077, 0o022])
@pytest.mark.parametrize("socket_mode", [0o600, 0o660, 0o666, 0o640])
def test_socket_gets_exactly_socket_mode_whatever_the_umask(public_dir, restore_umask, umask,
                                                            socket_mode):
    path = os.path.join(public_dir, "bus.sock")
    os.umask(umask)
    with busx.Broker(unix_path=path, socket_mode=socket_mode):
        assert mode_of(path) == socket_mode


# ---- other users ----

@needs_root
def test_another_user_cannot_connect_to_a_0600_socket(public_dir):
    with busx.Broker(unix_path=os.path.join(public_dir, "bus.sock")) as broker:
        outcome = connect_as(broker.url)
    assert outcome["error"] == "PermissionDenied" and outcome["permission_error"], outcome
    assert str(NOBODY) in outcome["message"]


@needs_root
def test_another_user_can_connect_to_a_0666_socket(public_dir):
    with busx.Broker(unix_path=os.path.join(public_dir, "bus.sock"), socket_mode=0o666) as broker:
        assert connect_as(broker.url) == {"connected": "unix"}


@needs_root
def test_socket_group_lets_in_that_group_only(public_dir, nogroup):
    path = os.path.join(public_dir, "bus.sock")
    with busx.Broker(unix_path=path, socket_mode=0o660, socket_group=nogroup.gr_name) as broker:
        assert os.stat(path).st_gid == nogroup.gr_gid
        assert mode_of(path) == 0o660
        assert connect_as(broker.url, gid=nogroup.gr_gid) == {"connected": "unix"}
        outsider = connect_as(broker.url, gid=4242)
        assert outsider["error"] == "PermissionDenied", outsider


@needs_root
def test_socket_group_also_owns_the_directory_the_broker_creates(public_dir, nogroup):
    directory = os.path.join(public_dir, "made")
    path = os.path.join(directory, "bus.sock")
    with busx.Broker(unix_path=path, socket_mode=0o660, socket_group=nogroup.gr_gid) as broker:
        assert os.stat(directory).st_gid == nogroup.gr_gid
        assert os.stat(path).st_gid == nogroup.gr_gid
        assert mode_of(directory) == 0o710
        # The group may search the directory and connect; others may not even search it.
        assert connect_as(broker.url, gid=nogroup.gr_gid) == {"connected": "unix"}
        assert connect_as(broker.url, gid=4242)["error"] == "PermissionDenied"


def test_unknown_socket_group_is_a_clear_error(socket_path):
    with pytest.raises(busx.BusError, match="no-such-group-here"):
        busx.Broker(unix_path=socket_path, socket_group="no-such-group-here")


# ---- the directory ----

@pytest.mark.parametrize("umask", [0, 0o077])
@pytest.mark.parametrize("socket_mode, dir_mode", [(0o600, 0o700), (0o660, 0o710), (0o666, 0o711),
                                                   (0o604, 0o701)])
def test_created_directory_is_searchable_only_by_whom_socket_mode_lets_in(
        public_dir, restore_umask, umask, socket_mode, dir_mode):
    directory = os.path.join(public_dir, "made")
    os.umask(umask)
    with busx.Broker(unix_path=os.path.join(directory, "bus.sock"), socket_mode=socket_mode):
        info = os.stat(directory)
        assert stat.S_IMODE(info.st_mode) == dir_mode
        assert info.st_uid == os.getuid()


@needs_root
def test_another_user_reaches_a_0666_socket_in_a_created_directory(public_dir):
    path = os.path.join(public_dir, "made", "bus.sock")
    with busx.Broker(unix_path=path, socket_mode=0o666) as broker:
        assert connect_as(broker.url) == {"connected": "unix"}


def test_intermediate_directories_are_not_writable_by_others_whatever_the_umask(
        public_dir, restore_umask):
    """Parents the broker creates on the way to its socket directory must not be
    group/other-writable: another user could rename the socket directory away
    and put a socket of their own in its place."""
    outer = os.path.join(public_dir, "outer")
    os.umask(0)
    with busx.Broker(unix_path=os.path.join(outer, "inner", "bus.sock"), socket_mode=0o666):
        assert mode_of(outer) & 0o022 == 0, f"{outer} is mode {mode_of(outer):o}"


def test_uncreatable_socket_directory_is_a_bus_error():
    """Nobody, root included, can create directories in /proc: start() must
    say so with a BusError, like every other reason a broker cannot start."""
    broker = busx.Broker(unix_path="/proc/busx-no-such-dir/sub/bus.sock")
    with pytest.raises(busx.BusError, match="/proc/busx-no-such-dir"):
        broker.start()


@pytest.mark.parametrize("unsafe_mode", [0o777, 0o1777, 0o770, 0o702])
def test_group_or_other_writable_directory_under_tmp_is_refused(tmp_dir_under_tmp, unsafe_mode):
    os.chmod(tmp_dir_under_tmp, unsafe_mode)
    path = os.path.join(tmp_dir_under_tmp, "bus.sock")
    broker = busx.Broker(unix_path=path)
    with pytest.raises(busx.BusError, match="unsafe socket directory") as caught:
        broker.start()
    assert f"{unsafe_mode & 0o7777:o}" in str(caught.value)
    assert "writable by group or others" in str(caught.value)
    assert not os.path.exists(path)
    broker.stop()


@needs_root
def test_directory_under_tmp_owned_by_another_user_is_refused(tmp_dir_under_tmp):
    os.chmod(tmp_dir_under_tmp, 0o755)
    os.chown(tmp_dir_under_tmp, NOBODY, NOBODY)
    broker = busx.Broker(unix_path=os.path.join(tmp_dir_under_tmp, "bus.sock"))
    with pytest.raises(busx.BusError, match=f"owned by uid {os.getuid()}.*uid {NOBODY}"):
        broker.start()


def test_safe_existing_directory_under_tmp_is_used_and_kept(tmp_dir_under_tmp):
    path = os.path.join(tmp_dir_under_tmp, "bus.sock")
    with busx.Broker(unix_path=path) as broker, busx.connect(broker.url) as bus:
        bus.flush(timeout=5)
    assert not os.path.exists(path)
    assert os.path.isdir(tmp_dir_under_tmp), "stop() removed a directory it did not create"


def test_a_symlink_in_place_of_the_directory_is_refused(tmp_dir_under_tmp, public_dir):
    link = os.path.join(tmp_dir_under_tmp, "link")
    os.symlink(public_dir, link)
    with pytest.raises(busx.BusError, match="not a directory"):
        busx.Broker(unix_path=os.path.join(link, "bus.sock")).start()
    assert os.listdir(public_dir) == []


# ---- what already sits at the path ----

def test_stale_socket_file_is_replaced(socket_path):
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(socket_path)
    crashed.close()     # bound, never unlinked: what a crashed broker leaves
    with busx.Broker(unix_path=socket_path) as broker, busx.connect(broker.url) as bus:
        sub = bus.subscribe("alive")
        bus.publish("alive", 1)
        assert sub.recv(timeout=5).data == 1


def test_live_brokers_socket_is_never_replaced(socket_path):
    with busx.Broker(unix_path=socket_path) as first:
        inode = os.stat(socket_path).st_ino
        second = busx.Broker(unix_path=socket_path)
        with pytest.raises(busx.BusError, match="already running"):
            second.start()
        second.stop()
        assert os.stat(socket_path).st_ino == inode
        with busx.connect(first.url) as bus:
            bus.flush(timeout=5)


def test_regular_file_at_the_path_is_refused_and_left_intact(socket_path):
    with open(socket_path, "w") as f:
        f.write("precious")
    with pytest.raises(busx.BusError, match="not a socket"):
        busx.Broker(unix_path=socket_path).start()
    with open(socket_path) as f:
        assert f.read() == "precious"


# ---- stop ----

def test_stop_removes_the_socket_file_and_the_directory_it_created(public_dir):
    directory = os.path.join(public_dir, "made")
    path = os.path.join(directory, "bus.sock")
    broker = busx.Broker(unix_path=path).start()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    broker.stop()
    assert not os.path.exists(path)
    assert not os.path.exists(directory)
    broker.stop()   # twice is fine


def test_stop_leaves_a_file_that_replaced_its_socket(socket_path):
    broker = busx.Broker(unix_path=socket_path).start()
    os.unlink(socket_path)
    with open(socket_path, "w") as f:
        f.write("someone else's")
    broker.stop()
    with open(socket_path) as f:
        assert f.read() == "someone else's"
