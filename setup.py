"""setuptools entry point: compiles the C core once, at install time (cffi API mode)."""
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
