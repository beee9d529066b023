"""The examples run as documented and print what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_two_hosts_demo_crosses_nats_both_ways():
    out = run_example("two_hosts.py").splitlines()
    readings = [line for line in out if line.startswith("host-b got sensors.kitchen.temp")]
    assert [line.split(" = ")[1].split()[0] for line in readings] == ["20.5", "21.0", "21.5"]
    assert all("from host-a" in line for line in readings)
    assert "host-a asked host-b: {'celsius_to_fahrenheit': 70.7} (answered on host-b)" in out


def test_request_reply_example():
    assert "sum of [10, 20, 30] = 60" in run_example("request_reply.py")
