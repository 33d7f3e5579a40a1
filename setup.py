# The cffi helper is compiled at install time; everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["shim/sys/native_build.py:ffibuilder"])
