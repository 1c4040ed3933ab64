"""Pure-Python install by default; FLASHSPARSE_CUDA=1 (with --no-build-isolation) also builds
the CUDA extension from csrc/. Without it, the first CUDA call JIT-builds it (flashsparse/_cuda.py)."""

from setuptools import setup

setup()
