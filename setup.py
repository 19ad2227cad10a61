"""Builds the Python module `longheads` (python/longheads_module.cpp) with pybind11's helpers:
`pip install --no-build-isolation .` (docs/python.md). CMake builds the same source as the
target longheads_python, with the project's flags, for the tests."""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))
# This CPU's instructions, as the CMake build uses (LONGHEADS_NATIVE=0 for a portable module).
native = [] if os.environ.get("LONGHEADS_NATIVE", "1") == "0" else ["-march=native"]
# setuptools' own build files beside CMake's build/, not in it.
os.makedirs(os.path.join(here, "build-python"), exist_ok=True)

setup(
    ext_modules=[
        Pybind11Extension(
            "longheads",
            [os.path.join("python", "longheads_module.cpp")],
            include_dirs=[os.path.join(here, "include"), os.path.join(here, "examples"), "/usr/include/eigen3"],
            cxx_std=20,
            extra_compile_args=["-O3", *native],
        )
    ],
    cmdclass={"build_ext": build_ext},
    packages=[],  # the extension module only (no package discovery over the checkout)
    py_modules=[],
    options={"build": {"build_base": "build-python"}, "egg_info": {"egg_base": "build-python"}},
)
