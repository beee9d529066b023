"""Build busx._core. BUSX_DEBUG=1 builds with assertions, -O0 -g and the
live counters of busx/includes/counters.h; BUSX_ASAN=1 with AddressSanitizer;
BUSX_ANNOTATE=1 writes Cython's HTML annotation next to the sources."""

import os
import sys
import sysconfig

from Cython.Build import cythonize
from setuptools import Extension, setup


def require_openssl_headers():
    """TLS on TCP is OpenSSL driven from the core (docs/security.md): its
    headers must be there, and a missing package is named, not guessed at
    from a compiler error."""
    dirs = [os.environ.get("OPENSSL_INCLUDE", ""), sysconfig.get_config_var("INCLUDEDIR") or "",
            "/usr/include", "/usr/local/include"]
    if any(os.path.exists(os.path.join(d, "openssl", "ssl.h")) for d in dirs if d):
        return
    sys.exit("busx needs OpenSSL 3's headers to build (its TLS support): install them with "
             "`apt install libssl-dev` (Debian, Ubuntu), `dnf install openssl-devel` (Fedora, "
             "RHEL) or `apk add openssl-dev` (Alpine), or set OPENSSL_INCLUDE to the directory "
             "holding openssl/ssl.h")


require_openssl_headers()

debug = os.environ.get("BUSX_DEBUG") == "1"
extra_compile_args = ["-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
extra_compile_args += ["-O0", "-g"] if debug else ["-O2"]
if os.environ.get("BUSX_ASAN") == "1":
    extra_compile_args += ["-fsanitize=address", "-fno-omit-frame-pointer"]

extensions = [
    Extension(
        "busx._core",
        ["busx/_core.pyx"],
        include_dirs=["busx/includes"] + ([os.environ["OPENSSL_INCLUDE"]]
                                          if os.environ.get("OPENSSL_INCLUDE") else []),
        libraries=["ssl", "crypto"],
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
