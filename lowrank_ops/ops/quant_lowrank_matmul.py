"""The op `torch.ops.lowrank_ops.quant_lowrank_matmul(x, qweight, scales, zeros, v, u, bias, bits, group_size)`.

y = dequant(W_hat) x + U (V^T x) + b: a group-wise quantized base W_hat (m, n) plus an optional low-rank
residual (EoRA and friends, issue 5).

Schema (all positional, no defaults):
    quant_lowrank_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? v, Tensor? u,
                         Tensor? bias, int bits, int group_size) -> Tensor
- x (..., n) fp16 / bf16 / fp32 (fp64 on the torch backend); y (..., m) in x's dtype; x may be non-contiguous.
- qweight, scales, zeros in the packed layout of `lowrank_ops.quant_format` (LAYOUT_VERSION 1): int32
  (m, ceil(n / 8)) for bits 3 / 4, uint8 (m, n) for bits 8; scales and zeros (m, ceil(n / group_size)),
  one dtype, equal to x's dtype or float32. The op sees tensors only; `quant_lowrank_matmul_packed`
  takes a PackedQuantWeight and checks its layout version first. Codes are not range-checked here
  (`quant_format.pack` does that, once).
- No residual: v = u = None, or rank-0 tensors v (0, n), u (m, 0). Otherwise v (r, n), u (m, r) in x's
  dtype with 1 <= r <= min(m, n). bias (m,) in x's dtype or None.
- bits in {2, 3, 4, 8} (2- and 3-bit codes sit in 4-bit slots), group_size >= 1 and a multiple of 8 for bits <= 4.

Backends (chosen by `lowrank_ops.backends.select_backend`; on CUDA AUTO picks Triton at every M for this op):
- triton: M <= FUSED_MAX_M (64): kernels/quant_lowrank_matmul.py (split-K shrink, then the dequantising
  GEMV / GEMM with the expand in its epilogue, chained by PDL). Larger M: one Triton dequantisation pass
  into a temporary W_hat, then the cuBLAS GEMMs of the torch backend.
- torch: W_hat = quant_format.dequantize (fp32, rounded once to x's dtype), then F.linear(x, W_hat, b) and,
  with a residual, z = F.linear(x, V) and y = addmm(y, z, U^T) (the expand accumulates in the GEMM epilogue);
  on CUDA an unaligned rank is zero-padded to a multiple of 16 (as in lowrank_matmul).
- cpu: PyTorch's int4 CPU kernel (aten::_weight_int4pack_mm_for_cpu) on a packing of the base made on the first
  call and cached with fp32 copies of the factors (kernels/quant_lowrank_matmul_cpu.py); residual, bias and the
  zero-point term in one fp32 shrink and expand. Takes bf16 x with scales / zeros in bf16, bits 2 / 3 / 4,
  group_size a multiple of 32 (`cpu_unsupported_reason`); AUTO picks it on CPU for M <= 64 (backends.CPU_MAX_M).
  A call repeating one on an unchanged layer skips the argument checks (`_repeated_cpu_call`).
  Everything else on CPU (fp32 / fp16 x, bits 8, other group sizes, inference-mode weights) runs the torch
  backend, which stays the reference.
- cuda: csrc/quant_lowrank_decode.cu (split-K shrink, then the dequantising GEMV with the expand fused, PDL)
  through the private op torch.ops.lowrank_ops.quant_lowrank_matmul_cuda: M <= 16, fp16 / bf16 with scales
  and zeros in x's dtype, bits 2 / 3 / 4; only when requested (not chosen by AUTO yet).
Registered with torch.library (fake implementation, autograd for x, v, u and bias -- W_hat is frozen: qweight,
scales and zeros get no gradient), so it composes with torch.compile(fullgraph=True) and CUDA graphs.
The Python function runs the implementation directly, without the custom op's dispatch, when the call is eager
and records no gradient (`_checks.eager_without_autograd`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowrank_ops.backends import Backend, BackendUnavailableError, cuda_dtype_unavailable_reason, select_backend
from lowrank_ops.kernels import quant_lowrank_matmul_cpu as cpu_kernel
from lowrank_ops.ops._checks import (
    check_residual_args,
    check_same_dtype_and_device,
    eager_without_autograd,
    shape_of,
)
from lowrank_ops.ops.lowrank_matmul import RANK_PAD_MULTIPLE, _pad_rank
from lowrank_ops.quant_format import (
    PackedQuantWeight,
    check_format_args,
    check_packed,
    dequantize,
    num_groups,
    packed_width,
    qweight_dtype,
)

OP = "quant_lowrank_matmul"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DTYPES = (*TRITON_DTYPES, torch.float64)


def _rank(v: torch.Tensor | None) -> int:
    return 0 if v is None else v.shape[0]


def check_quant_lowrank_matmul_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    v: torch.Tensor | None,
    u: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> None:
    """Raise TypeError / ValueError naming the op, the offending value and the rule."""
    optional = ("v", "u", "bias")
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros), ("v", v), ("u", u),
                    ("bias", bias)):  # fmt: skip
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_format_args(OP, bits, group_size)
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least 1 dimension (..., n), got a 0-d tensor")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{OP}: x.dtype={x.dtype} must be one of {[str(d) for d in SUPPORTED_DTYPES]}")
    n_in = x.shape[-1]
    if qweight.dim() != 2:
        raise ValueError(f"{OP}: qweight must be 2-D (m, packed n), got qweight.shape={shape_of(qweight)}")
    if qweight.dtype != qweight_dtype(bits):
        raise TypeError(f"{OP}: qweight.dtype={qweight.dtype} must be {qweight_dtype(bits)} for bits={bits}")
    m_out = qweight.shape[0]
    if m_out < 1 or n_in < 1:
        raise ValueError(f"{OP}: m={m_out} (qweight.shape[0]) and n={n_in} (x.shape[-1]) must be >= 1")
    if qweight.shape[1] != packed_width(n_in, bits):
        raise ValueError(
            f"{OP}: qweight.shape[1]={qweight.shape[1]} must be {packed_width(n_in, bits)} for n=x.shape[-1]={n_in} "
            f"and bits={bits} ({'ceil(n / 8) int32 words' if qweight.dtype == torch.int32 else 'n bytes'})"
        )
    groups = num_groups(n_in, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if shape_of(t) != (m_out, groups):
            raise ValueError(
                f"{OP}: {name}.shape={shape_of(t)} must be (m, ceil(n / group_size)) = ({m_out}, {groups}) "
                f"for n={n_in}, group_size={group_size}"
            )
    if scales.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{OP}: scales.dtype={scales.dtype} must equal x.dtype={x.dtype} or be torch.float32")
    if zeros.dtype != scales.dtype:
        raise TypeError(f"{OP}: zeros.dtype={zeros.dtype} must equal scales.dtype={scales.dtype}")
    check_residual_args(OP, v, u, bias, m_out, n_in, min_rank=0)
    check_same_dtype_and_device(OP, x, dict(v=v, u=u, bias=bias),
                                dict(qweight=qweight, scales=scales, zeros=zeros, v=v, u=u, bias=bias))  # fmt: skip


def _gemms(
    x2d: torch.Tensor, w: torch.Tensor, v: torch.Tensor | None, u: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x W^T + b (+ (x V^T) U^T): cuBLAS / CPU GEMMs, the expand accumulating into y through addmm."""
    y = F.linear(x2d, w, bias)
    if _rank(v) == 0:
        return y
    if x2d.is_cuda:
        v, u = _pad_rank(v, u, RANK_PAD_MULTIPLE)
    return torch.addmm(y, F.linear(x2d, v), u.t())


def _quant_lowrank_matmul_torch(x2d, qweight, scales, zeros, v, u, bias, bits, group_size) -> torch.Tensor:
    w = dequantize(qweight, scales, zeros, bits, group_size, x2d.shape[1], x2d.dtype)
    return _gemms(x2d, w, v, u, bias)


def cuda_unsupported_reason(x: torch.Tensor, scales: torch.Tensor, bits: int) -> str | None:
    """None when the csrc/ kernels take these arguments, else why not (the op's own rules already hold)."""
    if (reason := cuda_dtype_unavailable_reason(x.dtype)) is not None:
        return reason
    if bits > 4:
        return f"the CUDA kernels read 4-bit slots (bits 2, 3, 4), got bits={bits}"
    if scales.dtype != x.dtype:
        return f"the CUDA kernels take scales / zeros in x's dtype {x.dtype}, got {scales.dtype}"
    return None


def cpu_unsupported_reason(x, qweight, scales, zeros, v, u, bias, bits: int, group_size: int) -> str | None:
    """None when the CPU backend takes these arguments (the op's own rules already hold), else why not."""
    if x.dtype != torch.bfloat16:
        return (f"the CPU backend takes bfloat16 activations, got {x.dtype} (aten's int4 CPU kernel is vectorized for "
                "bf16 only: 22x slower than dense in fp32 at 1536 x 576, M = 1)")
    if bits > 4:
        return f"the CPU backend reads 4-bit codes (bits 2, 3, 4), got bits={bits}"
    if cpu_kernel.kernel_group_size(group_size, x.shape[-1]) is None:
        return (f"aten's int4 CPU kernel takes groups of {cpu_kernel.KERNEL_GROUP_SIZES}: group_size must be a "
                f"multiple of one of them, got {group_size}")
    if scales.dtype != x.dtype:
        return f"the CPU backend takes scales / zeros in x's dtype {x.dtype}, got {scales.dtype}"
    if any(t is not None and t.is_inference() for t in (qweight, scales, zeros, v, u, bias)):
        return "the layer holds inference tensors, which have no version counter to invalidate a cached packing"
    return None


def _quant_lowrank_matmul_cuda(x2d, qweight, scales, zeros, v, u, bias, bits, group_size) -> torch.Tensor:
    """The csrc/ decode kernels (needs the extension and a GPU); x2d needs unit column stride."""
    if (reason := cuda_unsupported_reason(x2d, scales, bits)) is not None:
        raise BackendUnavailableError(f"{OP}: backend 'cuda' is unavailable: {reason}")
    if x2d.shape[0] == 0:
        return x2d.new_empty((0, qweight.shape[0]))
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    v, u, bias = (None if t is None else t.contiguous() for t in (v, u, bias))
    return torch.ops.lowrank_ops.quant_lowrank_matmul_cuda(
        x2d, qweight.contiguous(), scales.contiguous(), zeros.contiguous(), v, u, bias, bits, group_size
    )


def quant_lowrank_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    v: torch.Tensor | None,
    u: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """y = dequant(W_hat) x + U (V^T x) + b. See the module docstring for shapes, dtypes and backends.

    Same as torch.ops.lowrank_ops.quant_lowrank_matmul, except that non-tensor arguments raise TypeError here
    instead of the dispatcher's RuntimeError.
    """
    if (y := _repeated_cpu_call(x, qweight, scales, zeros, v, u, bias, bits, group_size)) is not None:
        return y
    check_quant_lowrank_matmul_args(x, qweight, scales, zeros, v, u, bias, bits, group_size)
    if eager_without_autograd(x, v, u, bias):
        return _quant_lowrank_matmul_impl(x, qweight, scales, zeros, v, u, bias, bits, group_size)
    return _quant_lowrank_matmul_op(x, qweight, scales, zeros, v, u, bias, bits, group_size)


def _repeated_cpu_call(x, qweight, scales, zeros, v, u, bias, bits, group_size) -> torch.Tensor | None:
    """The CPU backend's output when this call repeats, on an unchanged layer, one that passed the checks and ran the
    CPU backend; else None (the caller then takes the full path).

    A packing is cached only by such a call, under a key that says the layer's tensors have the same storage, version,
    shape, strides and dtype and bits / group_size are equal (kernels/quant_lowrank_matmul_cpu.py), so the layer's
    part of the checks holds. What is left is x's part (a bf16 CPU tensor, last dim n), the eager
    no-gradient rule, and the dispatch rule, asked of select_backend as on the full path. Decode calls a layer once
    per token with the same tensors: measured on a SmolLM2 layer (bf16, 1536 x 576, g = 128, r = 64, M = 1,
    1 thread, quiet 2-core machine) a module call took 134-161 us before and 108-112 us with this path (aten's
    kernel alone: 54-60 us; the fp32 residual and zero term most of the rest)."""
    if torch.compiler.is_compiling():  # traced: the custom op (dynamo need not look into the cache)
        return None
    packing = cpu_kernel.packing_if_cached(qweight, scales, zeros, v, u, bias, bits, group_size)
    if packing is None or not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return None
    if x.dim() == 0 or x.shape[-1] != packing.n or not eager_without_autograd(x, v, u, bias):
        return None
    m_rows = x.numel() // packing.n
    if m_rows == 0 or select_backend(OP, x.device, m_rows) is not Backend.CPU:
        return None
    return cpu_kernel.run_packing(x.reshape(m_rows, packing.n), packing).reshape(*x.shape[:-1], packing.m)


def quant_lowrank_matmul_packed(
    x: torch.Tensor,
    packed: PackedQuantWeight,
    v: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op on a PackedQuantWeight: rejects another layout version or an inconsistent packed weight first."""
    check_packed(packed, OP)
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != packed.shape[1]:
        raise ValueError(f"{OP}: x.shape[-1]={x.shape[-1]} must equal the packed weight's n={packed.shape[1]}")
    return quant_lowrank_matmul(
        x, packed.qweight, packed.scales, packed.zeros, v, u, bias, packed.bits, packed.group_size
    )


@torch.library.custom_op("lowrank_ops::quant_lowrank_matmul", mutates_args=())
def _quant_lowrank_matmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    v: torch.Tensor | None,
    u: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    check_quant_lowrank_matmul_args(x, qweight, scales, zeros, v, u, bias, bits, group_size)
    return _quant_lowrank_matmul_impl(x, qweight, scales, zeros, v, u, bias, bits, group_size)


def _quant_lowrank_matmul_impl(x, qweight, scales, zeros, v, u, bias, bits: int, group_size: int) -> torch.Tensor:
    """The op's body after its checks: pick the backend (the one dispatch point) and run it."""
    if _rank(v) == 0:
        v = u = None
    x2d = x.reshape(-1, x.shape[-1])
    m_rows = x2d.shape[0]
    cpu_reason = None
    if x.device.type == "cpu":
        cpu_reason = cpu_unsupported_reason(x, qweight, scales, zeros, v, u, bias, bits, group_size)
    backend = select_backend(OP, x.device, m_rows, cpu_unsupported=cpu_reason)
    if x.dtype == torch.float64 and backend is not Backend.TORCH:
        raise TypeError(f"{OP}: x.dtype=torch.float64 runs only on the torch backend, not {backend.value}")
    if backend is Backend.TRITON and m_rows > 0:
        from lowrank_ops.kernels.quant_lowrank_matmul import (
            FUSED_MAX_M,
            dequantize_triton,
            quant_lowrank_matmul_triton,
        )

        if m_rows <= FUSED_MAX_M:
            y2d = quant_lowrank_matmul_triton(x2d, qweight, scales, zeros, v, u, bias, bits, group_size)
        else:
            w = dequantize_triton(qweight, scales, zeros, bits, group_size, x2d.shape[1], x2d.dtype)
            y2d = _gemms(x2d, w, v, u, bias)
    elif backend is Backend.CUDA:  # pragma: no cover - needs the extension and a GPU (tests/test_cuda_kernels.py)
        y2d = _quant_lowrank_matmul_cuda(x2d, qweight, scales, zeros, v, u, bias, bits, group_size)
    elif backend is Backend.CPU:
        y2d = cpu_kernel.quant_lowrank_matmul_cpu(x2d, qweight, scales, zeros, v, u, bias, bits, group_size)
    else:
        y2d = _quant_lowrank_matmul_torch(x2d, qweight, scales, zeros, v, u, bias, bits, group_size)
    return y2d.reshape(*x.shape[:-1], qweight.shape[0])


@_quant_lowrank_matmul_op.register_fake
def _(x, qweight, scales, zeros, v, u, bias, bits, group_size):
    check_quant_lowrank_matmul_args(x, qweight, scales, zeros, v, u, bias, bits, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, v, u, bias, bits, group_size = inputs
    ctx.save_for_backward(x, qweight, scales, zeros, v, u)
    ctx.bits, ctx.group_size = bits, group_size
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    """dx = dy W_hat + (dy U) V, dU = dy^T z, dV = (dy U)^T x, db = sum dy; W_hat is frozen (no gradient)."""
    x, qweight, scales, zeros, v, u = ctx.saved_tensors
    x2d, dy = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
    has_residual = _rank(v) > 0
    grad_x = grad_v = grad_u = grad_b = None
    if ctx.needs_input_grad[0]:
        w = dequantize(qweight, scales, zeros, ctx.bits, ctx.group_size, x2d.shape[1], dy.dtype)
        grad_x2d = dy @ w
        if has_residual:
            grad_x2d = grad_x2d + (dy @ u) @ v
        grad_x = grad_x2d.reshape(x.shape)
    if has_residual and ctx.needs_input_grad[4]:
        grad_v = (dy @ u).T @ x2d
    if has_residual and ctx.needs_input_grad[5]:
        grad_u = dy.T @ (x2d @ v.T)
    if ctx.has_bias and ctx.needs_input_grad[6]:
        grad_b = dy.sum(0)
    return grad_x, None, None, None, grad_v, grad_u, grad_b, None, None


_quant_lowrank_matmul_op.register_autograd(_backward, setup_context=_setup_context)
