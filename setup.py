"""Build script. The pure-Python package needs nothing special; the native module
`cersa_kernels._cuda` (csrc/ + python_api/) is built here when nvcc is found."""
from setuptools import setup

setup()
