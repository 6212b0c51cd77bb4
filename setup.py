"""Build script: the Python package plus the optional C++/CUDA extension ``fastvl._C``.

* CPU sources (``csrc/*.cpp``) build whenever torch and a C++ compiler are present (OpenMP if the
  compiler has it).
* CUDA sources (``csrc/*.cu``) build only where torch is a CUDA build and ``CUDA_HOME`` is found;
  ``FASTVL_BUILD_CUDA=0`` skips them, ``=1`` insists on them.
* ``FASTVL_BUILD_EXT=0`` skips the extension altogether. A failed extension build is a warning, not an
  error: fastvl then runs on its other backends and ``fastvl info`` says the extension is missing.

Build with ``pip install --no-build-isolation .`` so the extension links against the installed torch.
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extension_setup():
    if os.environ.get("FASTVL_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("fastvl: torch is not importable at build time; building without fastvl._C "
                      "(install torch first and build with --no-build-isolation)", stacklevel=2)
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = os.environ.get("FASTVL_BUILD_CUDA", "auto")
    use_cuda = bool(cu_sources) and want_cuda != "0" and torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda == "1" and not use_cuda:
        raise RuntimeError("FASTVL_BUILD_CUDA=1 but torch is not a CUDA build or CUDA_HOME is not set")

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    define_macros = [("FASTVL_WITH_CUDA", "1")] if use_cuda else []
    if use_cuda:
        ext = CUDAExtension(
            "fastvl._C", cpp_sources + cu_sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("fastvl._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=["-fopenmp"])

    class OptionalBuildExtension(BuildExtension):
        """Turns a failed extension build into a warning so the pure-Python package still installs."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as error:  # any compiler failure degrades to a warning
                warnings.warn(f"fastvl: building {extension.name} failed ({error}); "
                              "the cpp/cuda backends will report 'not built'", stacklevel=2)

    # Cap parallel nvcc/gcc jobs: each can take a few GB.
    os.environ.setdefault("MAX_JOBS", "2")
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_setup()

setup(
    packages=find_packages(include=["fastvl", "fastvl.*"]) + ["fastvl.kernels"],
    # The Triton kernels live at the top level in kernels/ and ship as fastvl.kernels.
    package_dir={"fastvl.kernels": "kernels"},
    package_data={"fastvl": ["configs/*.json", "data/synth/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
