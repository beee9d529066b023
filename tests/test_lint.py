"""Lint: ruff over the Python, cython-lint over the Cython, with the rules in
pyproject.toml. (mypy runs in test_typing.py.) Both tools come with the
project's test extras."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is not installed: pip install '.[test]'")
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)


def test_python_is_lint_clean():
    result = run_tool("ruff", "check", "busx", "tests", "benchmarks", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_cython_is_lint_clean():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "busx").rglob("*")
                     if p.suffix in (".pyx", ".pxd", ".pxi"))
    assert sources
    result = run_tool("cython-lint", *sources)
    assert result.returncode == 0, result.stdout + result.stderr
