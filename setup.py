"""Build configuration beyond pyproject.toml: the optional C speedups.

shmcache/format/_speedups.c speeds up the reader's snapshot lookup and walk; it is
optional (``optional=True``): without a compiler, zlib headers or on another
platform, the install still succeeds and shmcache/format/snapshot.py uses its
pure-Python implementation of the same algorithm.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmcache.format._speedups",
            ["shmcache/format/_speedups.c"],
            libraries=["z"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
