"""Build script: the cffi extension is declared in darknet_bn/_ffi_build.py."""
from setuptools import setup

setup(cffi_modules=["darknet_bn/_ffi_build.py:ffi"])
