"""Builds the compiled rebuild kernel, device_runtime/_kmnative.c (everything else is pyproject.toml).

It is a plain C library that device_runtime/native.py loads with ctypes, built like an extension
so pip compiles it for the interpreter and platform it installs on. Optional: without a C compiler
the install still succeeds and the device rebuilds kernels with numpy. KM_EDGE_NATIVE_BUILD=0
skips it (tools/arm64/setup.sh builds a pure wheel that way and cross-compiles the kernel itself).
"""

import os

from setuptools import Extension, setup

BUILD_ENV = "KM_EDGE_NATIVE_BUILD"
# -O3: the loops must vectorise; -Wno-psabi: the vector helpers are always inlined, no ABI crosses
KERNEL_FLAGS = ["-O3", "-std=gnu11", "-Wno-psabi"]

kernel = Extension(
    "device_runtime._kmnative",
    sources=["device_runtime/_kmnative.c"],
    extra_compile_args=KERNEL_FLAGS,
    optional=True,
)

setup(ext_modules=[] if os.environ.get(BUILD_ENV, "1").strip() == "0" else [kernel])
