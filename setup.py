"""Build busx._core. BUSX_DEBUG=1 builds with assertions, -O0 -g and the
live counters of busx/includes/counters.h; BUSX_ASAN=1 with AddressSanitizer;
BUSX_ANNOTATE=1 writes Cython's HTML annotation next to the sources."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("BUSX_DEBUG") == "1"
extra_compile_args = ["-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
extra_compile_args += ["-O0", "-g"] if debug else ["-O2"]
if os.environ.get("BUSX_ASAN") == "1":
    extra_compile_args += ["-fsanitize=address", "-fno-omit-frame-pointer"]

extensions = [
    Extension(
        "busx._core",
        ["busx/_core.pyx"],
        include_dirs=["busx/includes"],
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fsanitize=address"] if os.environ.get("BUSX_ASAN") == "1" else [],
        define_macros=[("CYTHON_TRACE", "0")] + ([("BUSX_COUNTERS", "1")] if debug else []),
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "embedsignature": True,
            "boundscheck": debug,
            "wraparound": debug,
        },
        annotate=os.environ.get("BUSX_ANNOTATE") == "1",
    )
)
