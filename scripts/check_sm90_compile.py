"""Compile every shipped Triton kernel for sm_90a (H100 / H200) on a machine without a GPU and check its resources.

    python scripts/check_sm90_compile.py            # every variant (see VARIANTS)
    python scripts/check_sm90_compile.py --quick    # the subset tests/test_sm90_compile.py runs
    python scripts/check_sm90_compile.py --op lowrank_matmul --verbose

For each variant (op, dtype, M, shape) the real launcher runs on CPU tensors and every kernel it would launch is
compiled instead; one line per compiled kernel reports its grid, block sizes, shared memory, registers and local
memory. Exit status 1 if any kernel needs more than SMEM_LIMIT bytes of shared memory (it would fail to launch on
an H100) or uses local memory (register spills or a stack frame); 0 otherwise; 77 (the "skipped" status of
automake tests) when Triton's CUDA backend or its bundled ptxas / cuobjdump is missing.

How the GPU is emulated, in three pieces, each undone when `check` returns (but the kernels' JIT caches keep the
sm_90a target for device 0: run the check in its own process, as this script and its test do):
1. Triton's driver: `triton.runtime.driver.set_active(_OfflineCudaDriver())`, a stand-in that reports the target
   GPUTarget("cuda", 90, 32) -- Triton's CUDA backend compiles capability 9.0 for sm_90a -- device 0 and stream 0.
   That is all the JIT asks of a driver before it launches; nothing is ever loaded or launched.
2. The launchers: `lowrank_ops.kernels.launch.emulated_device(H100_SMS, (9, 0))` makes them choose split counts,
   PDL (launch_pdl, gdc_* instructions) and dot precision as on an H100 SXM (132 SMs), for CPU tensors.
3. The launch: inside `_compile_instead_of_launch`, `kernel[grid](*args, **kwargs)` calls
   `kernel.warmup(*args, grid=grid, **kwargs)`: Triton's own argument specialisation (pointer and integer
   divisibility by 16, integer 1 as a constant) and compile, then no launch. The CPU tensors' values are never
   read, so they are allocated with torch.empty.
The interpreter must be off (TRITON_INTERPRET unset) when the kernel modules are imported: an interpreted
@triton.jit function cannot be compiled. This script switches it off for its own process.

Resources per compiled kernel: shared memory is the dynamic shared memory the launch requests
(`metadata.shared`; Triton's launcher refuses a kernel above the device's opt-in maximum, 232448 bytes = 227 KB
on H100 / H200); registers and local memory (STACK and LOCAL bytes per thread) come from
`cuobjdump --dump-resource-usage` on the cubin, the cuobjdump bundled with Triton. Compiled kernels are cached by
Triton (~/.triton/cache, or TRITON_CACHE_DIR): a second run only re-reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

SMEM_LIMIT = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin of H100 and H200 (227 KB)
H100_SMS = 132  # H100 SXM; the launchers' split counts follow the SM count
CAPABILITY = (9, 0)
EXIT_SKIPPED = 77


def toolchain_unavailable_reason() -> str | None:
    """None when Triton's CUDA backend, ptxas and cuobjdump can be used here, else why not."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the backend is unusable
        return f"Triton's CUDA backend is not importable ({type(exc).__name__}: {exc})"
    for tool in ("ptxas", "cuobjdump"):
        try:
            path = getattr(knobs.nvidia, tool).path  # Triton's bundled binary, or TRITON_<TOOL>_PATH
        except RuntimeError as exc:
            return f"{tool} is unavailable ({exc})"
        if not os.access(path, os.X_OK):
            return f"{tool} at {path} is not executable"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Variants: (op, label, launcher call). The shapes are a 4096^2 attention projection at r = 128 / 256 and the
# LLaMA-7B MLP (4096 <-> 11008); M covers every code path of each launcher and its edges.


@dataclasses.dataclass(frozen=True)
class Variant:
    op: str
    label: str
    run: Callable[[], object]
    quick: bool = False  # part of the --quick subset (tests/test_sm90_compile.py)


def _empty(*shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype)


def _lowrank_variants() -> list[Variant]:
    import torch

    from lowrank_ops.backends import DECODE_MAX_M
    from lowrank_ops.kernels.lowrank_matmul import lowrank_matmul_triton

    def run(m_rows, n, m, r, dtype, bias):
        x, v, u = _empty(m_rows, n, dtype=dtype), _empty(r, n, dtype=dtype), _empty(m, r, dtype=dtype)
        return lowrank_matmul_triton(x, v, u, _empty(m, dtype=dtype) if bias else None, DECODE_MAX_M)

    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n, m, r in ((4096, 4096, 128), (4096, 4096, 256), (4096, 11008, 1024), (11008, 4096, 1024)):
            for m_rows in (1, 3, 4, 16, 17, 64):
                quick = dtype != torch.float16 and (n, m, r) == (4096, 4096, 128) and m_rows in (1, 4, 16, 64)
                label = f"{_dt(dtype)} M={m_rows} {n}->{m} r={r}"
                out.append(Variant("lowrank_matmul", label, functools.partial(run, m_rows, n, m, r, dtype, m_rows == 3),
                                   quick))  # fmt: skip
    return out


def _quant_variants() -> list[Variant]:
    import torch

    from lowrank_ops.kernels.quant_lowrank_matmul import FUSED_MAX_M, dequantize_triton, quant_lowrank_matmul_triton
    from lowrank_ops.quant_format import num_groups, packed_width, qweight_dtype

    group = 128

    def run(m_rows, n, m, r, bits, dtype):
        qweight = _empty(m, packed_width(n, bits), dtype=qweight_dtype(bits))
        scales, zeros = _empty(m, num_groups(n, group), dtype=dtype), _empty(m, num_groups(n, group), dtype=dtype)
        if m_rows > FUSED_MAX_M:
            return dequantize_triton(qweight, scales, zeros, bits, group, n, dtype)
        v, u = (_empty(r, n, dtype=dtype), _empty(m, r, dtype=dtype)) if r else (None, None)
        return quant_lowrank_matmul_triton(_empty(m_rows, n, dtype=dtype), qweight, scales, zeros, v, u, None, bits,
                                           group)  # fmt: skip

    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for bits in (4, 8):
            for n, m, r in ((4096, 4096, 128), (4096, 4096, 0), (4096, 11008, 256)):
                for m_rows in (1, 3, 16, 64, FUSED_MAX_M + 1):
                    if m_rows > FUSED_MAX_M and r:
                        continue  # the large-M path dequantises W_hat only; the residual runs in cuBLAS
                    quick = (
                        bits == 4
                        and (n, m, r) == (4096, 4096, 128)
                        and (
                            (dtype == torch.bfloat16 and m_rows in (1, 16, 64))
                            or (dtype == torch.float32 and m_rows == 64)
                        )
                    )
                    label = f"{_dt(dtype)} M={m_rows} {n}->{m} r={r} int{bits} g{group}"
                    out.append(Variant("quant_lowrank_matmul", label,
                                       functools.partial(run, m_rows, n, m, r, bits, dtype), quick))  # fmt: skip
    return out


def _codebook_variants() -> list[Variant]:
    import torch

    from lowrank_ops.backends import DECODE_MAX_M
    from lowrank_ops.kernels.codebook_matmul import codebook_matmul_triton

    def run(shared, dtype, m_rows, m, n, k, r):
        x = _empty(m_rows, n, dtype=dtype)
        codebook = _empty(k, n, dtype=dtype) if shared == "rows" else _empty(m, k, dtype=dtype)
        index = torch.zeros(m if shared == "rows" else n, dtype=torch.int32)
        v, u = (_empty(r, n, dtype=dtype), _empty(m, r, dtype=dtype)) if r else (None, None)
        return codebook_matmul_triton(x, codebook, index, v, u, None, shared, DECODE_MAX_M)

    cases = [  # (shared, dtype, M, m, n, K, r, quick)
        ("rows", torch.bfloat16, 1, 4096, 4096, 1024, 128, True),
        ("columns", torch.bfloat16, 1, 4096, 4096, 1024, 128, True),
        ("rows", torch.bfloat16, 1, 4096, 4096, 256, 0, False),
        ("rows", torch.float16, 3, 11008, 4096, 256, 128, False),
        ("columns", torch.float32, 2, 4096, 4096, 256, 128, False),
        ("rows", torch.bfloat16, 16, 4096, 4096, 1024, 128, True),
        ("columns", torch.bfloat16, 16, 4096, 4096, 1024, 128, True),
        ("rows", torch.float32, 16, 4096, 4096, 256, 128, False),
        ("rows", torch.float16, 64, 4096, 11008, 1024, 128, False),
        ("columns", torch.float16, 64, 11008, 4096, 256, 0, False),
    ]
    return [
        Variant("codebook_matmul", f"{shared} {_dt(dtype)} M={m_rows} {n}->{m} K={k} r={r}",
                functools.partial(run, shared, dtype, m_rows, m, n, k, r), quick)
        for shared, dtype, m_rows, m, n, k, r, quick in cases
    ]  # fmt: skip


def _dt(dtype) -> str:
    return str(dtype).removeprefix("torch.")


VARIANTS = {
    "lowrank_matmul": _lowrank_variants,
    "quant_lowrank_matmul": _quant_variants,
    "codebook_matmul": _codebook_variants,
}


# ---------------------------------------------------------------------------------------------------------------
# Emulation (see the module docstring).


class _OfflineCudaDriver:
    """The part of Triton's CUDA driver that the JIT consults before a launch, for a GPU that is not here."""

    def __init__(self, capability: tuple[int, int]):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclasses.dataclass
class Compiled:
    kernel: str
    grid: tuple
    constexprs: dict
    compiled: object  # triton.compiler.CompiledKernel


@contextlib.contextmanager
def _compile_instead_of_launch(records: list[Compiled]) -> Iterator[None]:
    """Inside, `kernel[grid](*args, **kwargs)` compiles the kernel for the active driver's target
    (JITFunction.warmup) and appends it to `records` instead of launching it."""
    from triton.runtime.jit import JITFunction

    def getitem(kernel, grid):
        def compile_only(*args, **kwargs):
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
            shown = {k: v for k, v in kwargs.items() if k.startswith(("BLOCK_", "SPLIT", "DOT_PRECISION"))}
            records.append(Compiled(kernel.fn.__name__, tuple(grid), shown, compiled))

        return compile_only

    original = JITFunction.__getitem__
    JITFunction.__getitem__ = getitem
    try:
        yield
    finally:
        JITFunction.__getitem__ = original


@contextlib.contextmanager
def emulated_sm90() -> Iterator[None]:
    """Triton's driver, the launchers' device facts and the launches, emulated for an H100 (module docstring)."""
    from triton.runtime import driver

    from lowrank_ops.kernels.launch import emulated_device

    driver.set_active(_OfflineCudaDriver(CAPABILITY))
    try:
        with emulated_device(H100_SMS, CAPABILITY):
            yield
    finally:
        driver.set_active(None)  # the next use of the driver finds the real one, if any (reset_active would raise here)


# ---------------------------------------------------------------------------------------------------------------
# Resources of a compiled kernel.


@dataclasses.dataclass(frozen=True)
class Resources:
    shared: int  # dynamic shared memory per block, bytes
    registers: int  # per thread
    local: int  # STACK + LOCAL bytes per thread: register spills or a stack frame

    def problems(self) -> list[str]:
        out = []
        if self.shared > SMEM_LIMIT:
            out.append(f"shared memory {self.shared} B > {SMEM_LIMIT} B (would fail to launch)")
        if self.local:
            out.append(f"{self.local} B of local memory per thread (register spills)")
        return out


@functools.cache
def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, STACK + LOCAL bytes) of the one function in `cubin`, read by Triton's bundled cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    if set(usage) != {"REG", "STACK", "LOCAL"}:
        raise RuntimeError(f"unexpected cuobjdump --dump-resource-usage output:\n{text}")
    return int(usage["REG"]), int(usage["STACK"]) + int(usage["LOCAL"])


def resources(compiled) -> Resources:
    registers, local = _resource_usage(compiled.asm["cubin"])
    return Resources(shared=compiled.metadata.shared, registers=registers, local=local)


# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    variant: Variant
    launch: Compiled
    res: Resources


def check(variants: list[Variant], log=print) -> list[Row]:
    """Compile every kernel that each variant's launcher launches; one Row per launch, in order."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("check_sm90_compile: TRITON_INTERPRET=1 makes @triton.jit kernels interpreted, which cannot "
                           "be compiled; unset it before the kernel modules are imported (main() does)")  # fmt: skip
    rows = []
    with emulated_sm90():
        for variant in variants:
            records: list[Compiled] = []
            with _compile_instead_of_launch(records):
                variant.run()
            if not records:  # interpreted kernels launch through their own class, and run on the CPU instead
                raise RuntimeError(f"{variant.op} {variant.label}: no kernel was compiled; were the kernel modules "
                                   "imported with TRITON_INTERPRET=1? Run this script in its own process.")  # fmt: skip
            for launch in records:
                row = Row(variant, launch, resources(launch.compiled))
                rows.append(row)
                log(format_row(row))
    return rows


def format_row(row: Row) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in row.launch.constexprs.items())
    res = row.res
    status = "FAIL: " + "; ".join(res.problems()) if res.problems() else "ok"
    return (f"{row.variant.op:20} {row.variant.label:42} {row.launch.kernel:30} grid={str(row.launch.grid):15} "
            f"{blocks:78} smem={res.shared:6} regs={res.registers:3} local={res.local:4}  {status}")  # fmt: skip


def _select(ops: list[str], quick: bool) -> list[Variant]:
    variants = [v for op in ops for v in VARIANTS[op]()]
    return [v for v in variants if v.quick] if quick else variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the subset that tests/test_sm90_compile.py runs")
    parser.add_argument("--op", action="append", choices=sorted(VARIANTS), help="only this op (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="one line per kernel, not only the failures")
    args = parser.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)  # before the kernel modules are imported: they must be compilable
    if (reason := toolchain_unavailable_reason()) is not None:
        print(f"check_sm90_compile: skipped: {reason}")
        return EXIT_SKIPPED

    start = time.perf_counter()
    variants = _select(args.op or list(VARIANTS), args.quick)
    rows = check(variants, log=print if args.verbose else lambda line: None)
    failures = [row for row in rows if row.res.problems()]
    if not args.verbose:
        for row in failures:
            print(format_row(row))
    kernels = len({row.launch.compiled.hash for row in rows})
    worst = max(rows, key=lambda row: row.res.shared)
    print(f"check_sm90_compile: {len(variants)} variants, {len(rows)} launches, {kernels} distinct kernels compiled "
          f"for sm_90a in {time.perf_counter() - start:.0f} s; largest shared memory {worst.res.shared} B "
          f"({worst.launch.kernel}, {worst.variant.label}); max registers {max(r.res.registers for r in rows)}; "
          f"{len(failures)} failing")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
