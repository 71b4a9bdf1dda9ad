"""Builds csrc/'s decode kernels (or the sm80 intrinsics' test kernels, sm80_kernels.cu) against the CPU emulator
(tests/cuda_emu/emu.h) into a shared library for ctypes.

The kernel files are compiled unmodified except for two rewrites a host compiler needs, each checked to have
matched every occurrence (a new construct fails the build instead of slipping through):
    kernel<<<grid, block, smem, stream>>>(args)  ->  ::cuda_emu::launch(kernel, grid, block, smem, stream)(args)
    extern __shared__ T name[];                  ->  T* name = ::cuda_emu::dynamic_shared<T>();
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
KERNEL_SOURCES = (CSRC / "lowrank_decode.cu", CSRC / "quant_lowrank_decode.cu", CSRC / "quant_lowrank_decode_v2.cu")
RUNTIME_SOURCES = ("emu.cpp", "harness.cpp")
# The intrinsics of csrc/sm80_intrinsics.cuh and csrc/int4_dequant.cuh, tested on their own (test_sm80_intrinsics.py).
SM80_KERNEL_SOURCES = (HERE / "sm80_kernels.cu",)
SM80_RUNTIME_SOURCES = ("emu.cpp",)

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)
_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")


def host_source(text: str, name: str) -> str:
    """The kernel source `text` with launches and dynamic shared memory rewritten for the emulator."""
    launches, shared = text.count("<<<"), len(re.findall(r"__shared__", text))
    text, n_launch = _LAUNCH.subn(r"::cuda_emu::launch(\1, \2)(", text)
    text, n_shared = _SHARED.subn(r"\1* \2 = ::cuda_emu::dynamic_shared<\1>();", text)
    if n_launch != launches or n_shared != shared:
        raise RuntimeError(f"{name}: rewrote {n_launch} of {launches} <<<>>> launches and {n_shared} of {shared} "
                           "__shared__ declarations; extend tests/cuda_emu/build.py for the new construct")  # fmt: skip
    return text


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator library failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _mutated(text: str, name: str, mutations: tuple[tuple[str, str, str], ...]) -> str:
    for source, old, new in mutations:
        if source == name:
            if text.count(old) != 1:
                raise ValueError(f"mutation of {name}: {old!r} occurs {text.count(old)} times, not once")
            text = text.replace(old, new)
    return text


def build(
    out_dir: Path,
    mutations: tuple[tuple[str, str, str], ...] = (),
    kernels: tuple[Path, ...] = KERNEL_SOURCES,
    runtime: tuple[str, ...] = RUNTIME_SOURCES,
) -> Path:
    """Compile (once per source content) and return the path of the shared library of the kernel sources `kernels`
    and the emulator's `runtime` sources. `mutations`: (source file name, old, new) text replacements in a kernel or
    runtime source or csrc header, each of which must match exactly once -- seeded bugs for the tests."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ / c++) on PATH")
    headers = sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh")) + [HERE / "emu.h"]
    unknown = {m[0] for m in mutations} - {p.name for p in kernels} - set(runtime) - {p.name for p in headers}
    if unknown:
        raise ValueError(f"mutations of sources this build does not compile: {sorted(unknown)}")
    inputs = list(kernels) + [HERE / s for s in runtime]
    content = b"".join(p.read_bytes() for p in inputs + headers) + repr(mutations).encode()
    digest = hashlib.sha256(content).hexdigest()[:16]
    library = out_dir / f"libcuda_emu-{digest}.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = out_dir / "mutated_headers"  # mutated copies of csrc headers, found before csrc/ on the include path
    for path in headers:
        if any(m[0] == path.name for m in mutations):
            overrides.mkdir(exist_ok=True)
            (overrides / path.name).write_text(_mutated(path.read_text(), path.name, mutations))
    sources = []
    for path in kernels:
        target = out_dir / (path.stem + ".cpp")
        target.write_text(host_source(_mutated(path.read_text(), path.name, mutations), path.name))
        sources.append(target)
    for name in runtime:
        if any(m[0] == name for m in mutations):
            target = out_dir / name
            target.write_text(_mutated((HERE / name).read_text(), name, mutations))
            sources.append(target)
        else:
            sources.append(HERE / name)
    flags = ["-std=c++17", "-O2", "-g", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
             "-DLOWRANK_OPS_CUDA_EMU"]  # csrc/: PDL wait / trigger and the sm80 intrinsics call the emulator's model
    includes = [f"-I{overrides}", f"-I{HERE / 'include'}", f"-I{HERE}", f"-I{CSRC}"]
    # One object per source, shared by the builds of a session (the siblings of out_dir) and keyed by the source, the
    # headers it may see and the flags: a seeded bug recompiles only the file it mutates (~10 s instead of ~40 s).
    objects_dir = out_dir.parent / "cuda_emu_objects"
    objects_dir.mkdir(exist_ok=True)
    seen_headers = b"".join(p.read_bytes() for p in sorted(overrides.glob("*")) + headers)
    objects = []
    for source in sources:
        key = hashlib.sha256(source.read_bytes() + seen_headers + " ".join(flags).encode()).hexdigest()[:16]
        obj = objects_dir / f"{source.stem}-{key}.o"
        if not obj.exists():
            partial = obj.with_suffix(f".{os.getpid()}.tmp")
            _run([cxx, *flags, *includes, "-c", str(source), "-o", str(partial)])
            os.replace(partial, obj)
        objects.append(obj)
    _run([cxx, "-shared", *map(str, objects), "-o", str(library)])
    return library
