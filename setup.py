"""Build script. Pure-Python package plus an optional C++/CUDA extension from csrc/.

The extension `lowrank_ops._C` is built only when it can be: torch importable with CUDA support and nvcc on
the PATH (or $CUDA_HOME). LOWRANK_OPS_BUILD_CUDA=0 skips it, =1 makes a missing prerequisite an error.
The reason for skipping is printed. The package works fully without the extension (Triton and torch
backends). torch is not a build requirement: install with `python3 -m pip install --no-build-isolation -e .`
so the machine's own torch is used.
"""

import os
import shutil
import sys

from setuptools import find_packages, setup

# Every subpackage of lowrank_ops/ (found, so a new one cannot be left out of the wheel), plus kernels/ shipped as
# lowrank_ops.kernels, never as a top-level `kernels` (tests/test_build.py checks the wheel's file list).
PACKAGES = [
    *find_packages(include=["lowrank_ops", "lowrank_ops.*"]),
    "lowrank_ops.kernels",
    *(f"lowrank_ops.kernels.{p}" for p in find_packages("kernels")),
]
PACKAGE_DIR = {"lowrank_ops.kernels": "kernels"}
CUDA_SOURCES = [
    "csrc/device_info.cu",
    "csrc/lowrank_decode.cu",
    "csrc/quant_lowrank_decode.cu",
    "csrc/quant_lowrank_decode_v2.cu",
    "csrc/bindings.cpp",
]


def _log(msg: str) -> None:
    print(f"lowrank-ops setup: {msg}", file=sys.stderr)


def _arch_flags() -> list[str]:
    """Hopper (sm_90a: the decode kernels chain with programmatic dependent launch) and Ampere (sm_80: the same
    kernels in plain stream order), unless the user picks archs with TORCH_CUDA_ARCH_LIST."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]


def _cuda_extension_or_reason():
    """(ext_modules, cmdclass) when the extension can be built, else a reason string."""
    switch = os.environ.get("LOWRANK_OPS_BUILD_CUDA", "auto").lower()
    if switch in ("0", "false", "no"):
        return "LOWRANK_OPS_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return f"torch is not importable in the build environment ({exc}); use --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc not found on PATH or in CUDA_HOME"
    ext = CUDAExtension(
        name="lowrank_ops._C",
        sources=CUDA_SOURCES,
        # No -std: torch's cpp_extension picks the standard its headers need (C++17 on older torch, C++20 on 2.13,
        # whose headers #error under C++17 from 2.14 on). An explicit flag would override that choice.
        # sm_90a + sm_80 unless the user picks archs; any "arch" flag turns off torch's own arch detection, so a
        # build without a matching image fails self_check loudly.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", *_arch_flags()]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


result = _cuda_extension_or_reason()
if isinstance(result, str):
    if os.environ.get("LOWRANK_OPS_BUILD_CUDA", "auto") == "1":
        raise SystemExit(
            f"lowrank-ops setup: LOWRANK_OPS_BUILD_CUDA=1 but the CUDA extension cannot be built: {result}"
        )
    _log(f"skipping the optional CUDA extension: {result}. Triton and torch backends are unaffected.")
    ext_modules, cmdclass = [], {}
else:
    _log("building the CUDA extension lowrank_ops._C from csrc/")
    ext_modules, cmdclass = result

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
