"""Backend choice for every lowrank_ops op, in one place.

`select_backend` is the single dispatch point: ops call it with the device and the number of rows M of the
activation, and get back which implementation runs. Rules (AUTO):

- CPU tensors run the torch path, except where the CPU backend applies (below). Triton on CPU only exists as the
  slow interpreter (``TRITON_INTERPRET=1``), which tests request explicitly.
- CUDA tensors with M <= DECODE_MAX_M run the Triton decode path (split-K shrink + fused expand, chained with
  programmatic dependent launch) -- the regime where two library GEMV launches plus a dependency gap cost
  more than the bytes (H100 anchor: two cuBLAS GEMMs 10.6 us vs a 1.25 us byte floor at 4096^2, r=256).
- CUDA tensors with DECODE_MAX_M < M <= TRITON_TILED_MAX_M run the Triton tiled path; larger M goes to the
  torch backend (two cuBLAS tensor-core GEMMs, rank padded to a multiple of 16), which is compute-bound and
  near peak there. The crossover constants are provisional until the H100 benchmark has been run
  (benchmarks/bench_lowrank_matmul.py); they are not yet measured on this package's kernels.
- Ops in TRITON_ALL_M_OPS take the Triton backend on CUDA at every M: their Triton backend has its own
  large-M path (quant_lowrank_matmul: one Triton dequantisation pass, then cuBLAS; its torch backend would
  dequantise in several eager passes).
- codebook_matmul (SWSC) takes the default M rule on purpose: its Triton decode path (shrink over [C; V], then
  gather + expand) removes the launches and the dependency gap at small M, while above TRITON_TILED_MAX_M the
  torch backend is compute-bound cuBLAS work plus O(M m) extra elements: rows shared, one K-wide GEMM x C^T and
  a gather; columns shared, an index_add_ over x (O(M n)) and one K-deep GEMM.

- The CUDA backend (csrc/ decode kernels, issue 9: M <= CUDA_MAX_M, fp16 / bf16) runs only when requested:
  AUTO does not pick it until it has been measured against Triton on an H100. The measured crossover goes into
  `select_backend`'s AUTO branch below, as a per-op table of (max M, shapes) where CUDA won, with the benchmark
  figures (benchmarks/bench_lowrank_matmul.py and bench_quant_lowrank_matmul.py, provider lowrank_ops_cuda).

- The CPU backend (ops in CPU_OPS: quant_lowrank_matmul, through PyTorch's int4 CPU kernel
  aten::_weight_int4pack_mm_for_cpu, kernels/quant_lowrank_matmul_cpu.py): AUTO picks it for CPU tensors when the
  op says its arguments fit (`cpu_unsupported` is None: bf16 activations, bits <= 4, group size a multiple of
  32) on an AVX2 / AVX512 CPU, for M <= CPU_MAX_M rows; otherwise CPU tensors run the torch path. CPU_MAX_M:
  the kernel dequantises every 4-row block of x anew, so its time grows with M while the torch path dequantises
  once; measured on the 2-core AMD EPYC (AVX512, 1 thread, bf16, g = 128, r = 64, SmolLM2's four shapes) the CPU
  backend was 1.7-2.2x faster at M = 64 and tied at M = 128 (576 x 576: 1436 against 1378 us).

An explicitly requested backend that is unavailable raises `BackendUnavailableError` with the reason.
AUTO never fails: it falls back to torch and logs one line per (op, reason).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
from collections.abc import Iterator

import torch

logger = logging.getLogger("lowrank_ops")

DECODE_MAX_M = 16
TRITON_TILED_MAX_M = 64
TRITON_ALL_M_OPS = frozenset({"quant_lowrank_matmul"})
CUDA_MAX_M = 16  # csrc/ decode kernels: LOWRANK_OPS_DECODE_MAX_ROWS in csrc/lowrank_decode.h
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CPU_OPS = frozenset({"quant_lowrank_matmul"})  # ops with a CPU backend
CPU_MAX_M = 64
CPU_CAPABILITIES = ("AVX2", "AVX512")  # where aten's int4 CPU kernel is vectorized (x86); AVX512 measured


class Backend(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"
    CUDA = "cuda"
    CPU = "cpu"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable ({exc})"
    return None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when Triton can run on `device`, else a sentence saying why not."""
    if (reason := _triton_import_error()) is not None:
        return reason
    if device.type == "cuda":
        if triton_interpreting():
            return None
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"Triton kernels need compute capability >= 8.0, {torch.cuda.get_device_name(device)} has {major}.x"
        return None
    if device.type == "cpu":
        if triton_interpreting():
            return None
        return "Triton on CPU only runs under the interpreter (set TRITON_INTERPRET=1 before importing lowrank_ops)"
    return f"Triton does not run on device type {device.type!r}"


def cuda_unavailable_reason(op: str, device: torch.device, m_rows: int | None = None) -> str | None:
    """None when the csrc/ extension provides `op` for `device` (and `m_rows` rows, when given), else why not."""
    if device.type != "cuda":
        return f"the CUDA backend needs a CUDA tensor, got device {device}"
    from lowrank_ops import _C_loader

    if (reason := _C_loader.extension_unavailable_reason()) is not None:
        return reason
    if op not in _C_loader.cuda_ops():
        return f"the loaded CUDA extension registers no {op} kernel (rebuild it: python3 -m pip install -e .)"
    if m_rows is not None and m_rows > CUDA_MAX_M:
        return f"the CUDA {op} kernels are decode kernels for M <= {CUDA_MAX_M} rows of x, got M={m_rows}"
    return None


def cuda_dtype_unavailable_reason(dtype: torch.dtype) -> str | None:
    """None when the CUDA decode kernels take activations of `dtype`, else why not."""
    if dtype not in CUDA_DTYPES:
        return f"the CUDA decode kernels take float16 / bfloat16 activations, got {dtype}"
    return None


@functools.cache
def _cpu_kernel_unavailable_reason() -> str | None:
    """None when aten's int4 CPU kernel exists and is vectorized on this CPU (constant per process: cached, since
    get_cpu_capability costs microseconds on every decode call)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no aten::_weight_int4pack_mm_for_cpu"
    if (capability := torch.backends.cpu.get_cpu_capability()) not in CPU_CAPABILITIES:
        return f"aten's int4 CPU kernel is vectorized for {' / '.join(CPU_CAPABILITIES)}, this CPU runs {capability}"
    return None


def cpu_unavailable_reason(op: str, device: torch.device) -> str | None:
    """None when `op` has a CPU backend that runs here, else a sentence saying why not."""
    if device.type != "cpu":
        return f"the CPU backend needs a CPU tensor, got device {device}"
    if op not in CPU_OPS:
        return f"{op} has no CPU backend (its torch backend is its CPU path)"
    return _cpu_kernel_unavailable_reason()


_requested: Backend | None = None


def requested_backend() -> Backend:
    """The backend asked for by `use_backend(...)`, else $LOWRANK_OPS_BACKEND, else AUTO."""
    if _requested is not None:
        return _requested
    env = os.environ.get("LOWRANK_OPS_BACKEND", "auto").lower()
    try:
        return Backend(env)
    except ValueError:
        raise ValueError(f"LOWRANK_OPS_BACKEND={env!r} is not one of {[b.value for b in Backend]}") from None


@contextlib.contextmanager
def use_backend(backend: Backend | str) -> Iterator[None]:
    """Force a backend for the ops called inside the block (tests, benchmarks, debugging)."""
    global _requested
    previous, _requested = _requested, Backend(backend)
    try:
        yield
    finally:
        _requested = previous


@functools.cache
def _log_fallback_once(op: str, reason: str) -> None:
    logger.info("lowrank_ops.%s: AUTO uses the torch backend because %s", op, reason)


def select_backend(op: str, device: torch.device, m_rows: int, requested: Backend | str | None = None, *,
                   cpu_unsupported: str | None = None) -> Backend:
    """Pick the implementation of `op` for activations with `m_rows` rows on `device`.

    `cpu_unsupported`: why the CPU backend cannot take this call's arguments (None: it can; the op knows its
    arguments, this function the rules). Returns TRITON, TORCH, CUDA or CPU, never AUTO. See the module docstring.
    """
    requested = requested_backend() if requested is None else Backend(requested)
    if requested is Backend.TORCH:
        return Backend.TORCH
    if requested is Backend.TRITON:
        if (reason := triton_unavailable_reason(device)) is not None:
            raise BackendUnavailableError(f"{op}: backend 'triton' is unavailable: {reason}")
        return Backend.TRITON
    if requested is Backend.CUDA:
        if (reason := cuda_unavailable_reason(op, device, m_rows)) is not None:
            raise BackendUnavailableError(f"{op}: backend 'cuda' is unavailable: {reason}")
        return Backend.CUDA
    if requested is Backend.CPU:
        if (reason := cpu_unavailable_reason(op, device) or cpu_unsupported) is not None:
            raise BackendUnavailableError(f"{op}: backend 'cpu' is unavailable: {reason}")
        return Backend.CPU
    # AUTO. CUDA is not chosen here yet: it needs the H100 crossover against Triton first (module docstring).
    if device.type == "cpu" and op in CPU_OPS and m_rows <= CPU_MAX_M:
        if (reason := cpu_unavailable_reason(op, device) or cpu_unsupported) is None:
            return Backend.CPU
        _log_fallback_once(op, reason)
        return Backend.TORCH
    if device.type != "cuda":
        _log_fallback_once(op, f"the tensors are on {device.type}, where torch is the fast path")
        return Backend.TORCH
    if m_rows > TRITON_TILED_MAX_M and op not in TRITON_ALL_M_OPS:
        return Backend.TORCH  # compute-bound: cuBLAS tensor-core GEMMs (see module docstring)
    if (reason := triton_unavailable_reason(device)) is not None:
        _log_fallback_once(op, reason)
        return Backend.TORCH
    return Backend.TRITON
