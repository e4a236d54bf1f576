"""Build: generate protobuf/gRPC modules from proto/*.proto, then compile llmgw/_core/*.pyx.

There is deliberately no pure-Python fallback: a missing compiler or a failed Cython build fails the build.
"""

import glob
import importlib.util
import os

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_protos() -> None:
    spec = importlib.util.spec_from_file_location("genproto", os.path.join(HERE, "tools", "genproto.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate_protos()


class BuildExt(build_ext):
    def run(self):
        generate_protos()
        super().run()


class BuildPy(build_py):
    def run(self):
        generate_protos()
        super().run()


def extensions():
    pyx = sorted(glob.glob(os.path.join("llmgw", "_core", "*.pyx")))
    exts = [
        Extension(
            "llmgw._core." + os.path.splitext(os.path.basename(p))[0],
            [p],
            extra_compile_args=["-O3"],
        )
        for p in pyx
    ]
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        quiet=True,
    )


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
