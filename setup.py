"""Builds pyshm's two extensions: pyshm._native (cffi over csrc/) and
pyshm._codec (Cython).  Metadata lives in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    cffi_modules=["pyshm/_native_build.py:ffibuilder"],
    ext_modules=cythonize(
        [Extension("pyshm._codec", ["pyshm/_codec.pyx"], include_dirs=["csrc"], extra_compile_args=["-O2"])],
        compiler_directives={"language_level": "3"},
    ),
)
