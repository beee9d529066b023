"""The typed API: mypy passes over the package and the examples with the
project's mypy.ini, busx/_core.pyi matches what the compiled module really
exports, and mypy uses those stubs to catch misuse."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy)")

ROOT = Path(__file__).resolve().parent.parent

# Cython adds these to every compiled module; they are no API.
CYTHON_GENERATED = ["busx._core.__reduce_cython__", "busx._core.__setstate_cython__",
                    "busx._core.__test__"]


def run_module(module: str, *args: str | Path) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the repository root, where mypy finds
    busx (an editable install is invisible to mypy's own import search)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=110)


@pytest.fixture
def stub_only_config(tmp_path: Path) -> Path:
    """A mypy config that reports errors in _core.pyi and the checked file
    only, so the stub tests do not depend on the rest of the package."""
    config = tmp_path / "mypy.ini"
    config.write_text(textwrap.dedent(f"""\
        [mypy]
        python_version = 3.11
        cache_dir = {tmp_path / "cache"}
        [mypy-msgpack.*]
        ignore_missing_imports = True
        [mypy-busx.*]
        ignore_errors = True
        [mypy-busx._core]
        ignore_errors = False
        """))
    return config


def test_package_and_examples_type_check_clean(tmp_path):
    result = run_module("mypy", "--config-file", ROOT / "mypy.ini",
                        "--cache-dir", tmp_path / "cache", "busx", "examples")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_stub_matches_the_compiled_module(tmp_path, stub_only_config):
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text("\n".join(CYTHON_GENERATED) + "\n")
    result = run_module("mypy.stubtest", "busx._core", "--mypy-config-file", stub_only_config,
                        "--allowlist", allowlist)
    assert result.returncode == 0, result.stdout + result.stderr


# Lines marked "# error" must be reported, and only those: proof that mypy
# reads _core.pyi (an untyped module would let everything pass).
USES_OF_THE_CORE = """\
import busx
from busx import _core


def use(msg: busx.Message) -> None:
    topic: str = msg.topic
    raw: bytes = msg.raw
    fds: tuple[int, ...] = msg.fds
    lost: int = msg.fds_lost
    reply_to: str | None = msg.reply_to
    pid: int | None = msg.sender.pid
    anything: list[str] = msg.data
    msg.respond({"ok": True})
    frames = _core.FrameDecoder(max_frame=1024).feed(_core.encode_frame(4, b"t", id=1))
    kind: int = frames[0].kind
    wrong_topic: bytes = msg.topic  # error
    wrong_fds: list[int] = msg.fds  # error
    wrong_reply: str = msg.reply_to  # error
    msg.topic = "other"  # error
    _core.encode_frame("PUB")  # error
"""


def test_mypy_uses_the_stub_to_catch_misuse(tmp_path, stub_only_config):
    program = tmp_path / "uses_core.py"
    program.write_text(USES_OF_THE_CORE)
    result = run_module("mypy", "--config-file", stub_only_config, program)
    expected = {number for number, line in enumerate(USES_OF_THE_CORE.splitlines(), 1)
                if line.endswith("# error")}
    reported = {int(number) for number in
                re.findall(rf"^{re.escape(str(program))}:(\d+): error:", result.stdout, re.MULTILINE)}
    assert reported == expected, result.stdout + result.stderr
