"""The CPU backend of quant_lowrank_matmul: PyTorch's int4 CPU kernel on a packing of the layer made once and cached.

aten::_weight_int4pack_mm_for_cpu(A, B, g, SZ) computes, for A (M, K) and codes q (N, K) in [0, 15] packed by
aten::_convert_weight_to_int4pack_for_cpu into B (N, K / 2) uint8,

    C[i, j] = sum_k A[i, k] ((q[j, k] - 8) SZ[k // g, j, 0] + SZ[k // g, j, 1])

with SZ (K / g, N, 2) in A's dtype, g in {32, 64, 128, 256}, g | K, N % 16 == 0, fp32 FMAs and C rounded once to A's
dtype (torch 2.13, aten/src/ATen/native/cpu/int4mm_kernel.cpp; checked against float64 in the tests). A layer's group
size G_s only has to be a multiple of one of those: the kernel runs groups of g' = kernel_group_size(G_s, n), each
inside one of the layer's groups and given its scale (SmolLM2's n = 576 at G_s = 128 runs as groups of 64, so K = n).

Layout v1 defines W_hat = (q - z) s. The zero term stays out of the kernel, whose SZ[..., 1] is 0:
- bits 2 / 3 (q, z < 8): the codes go in as q - z + 8, in [1, 15], so the kernel's weights are W_hat exactly;
- bits 4: the codes go in as they are, the kernel computes P = x ((q - 8) s)^T, and the zero term x ((8 - z) s)^T
  = (x E^T) T is a rank-G product: E (G, n) the group indicator, T (G, m) = ((8 - z) s)^T, exact in fp32 (a 4-bit
  integer times a bf16 scale).
Putting (8 - z) s into SZ instead rounds it to bf16: an error of up to 2^-9 |8 - z| s per weight, shared by the whole
group, which took outputs to 2.2x their own bf16 rounding (the accuracy rule allows 1.75x, tests/helpers.py).

The zero term, the residual U (V x) and the bias ride one fp32 shrink and one fp32 expand:
    z = x [V; E; 0]^T + [0; 0; 1]       y = P + z [U, T^T, b]^T        (added into P in place, rounded once to bf16)
fp32, not bf16, because each oneDNN bf16 GEMM costs ~15 us at any size on this CPU (1 thread, M = 1, r = 64), and
the sum rounds once: y takes two roundings (the kernel's and this one), 1.1-1.4x the output's own in the tests, up
to 1.8x where P and the zero term cancel (codes that use only the lower half of the 4-bit range).
Rows are padded to N % 16 == 0 with zero scales (their outputs sliced off), x to K = ceil(n / g') g' with zero
columns where g' does not divide n (a copy of x per call).

Only bf16 activations: on x86 the kernel is vectorized (AVX512 / AVX2) for bf16 alone; fp32 and fp16 run a scalar
loop (so does aten's int8 weight-only kernel). Measured on the 2-core AMD EPYC (AVX512, 1 thread), 1536 x 576,
g = 64, M = 1: bf16 51 us against 92 us for the dense bf16 F.linear and 74 us for dense fp32; fp32 1630 us.

The packing is made on the first call and kept in `_CACHE` under the qweight tensor: B and SZ (n m / 2 + 4 m n / g'
bytes, about the size of the stored base) and the fp32 factors (4 (r + G + 1)(m + n) bytes: twice the bf16 residual,
the memory this backend trades for speed). Its key (`layer_key`) is bits, group_size and, of qweight, scales, zeros,
v, u and bias, the data pointer, version counter, shape, strides and dtype: an in-place change (load_state_dict,
copy_, an optimizer step), a swapped storage or a tensor viewed differently repacks on the next call, a new qweight
(module.to(...)) gets its own entry, and an entry goes when its qweight is garbage-collected. A matching key also
tells the op that a call repeats an already checked one (`_repeated_cpu_call` in ops/quant_lowrank_matmul.py).
Inference tensors have no version counter, so the op keeps them on the torch backend.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.nn.functional as F

from lowrank_ops.quant_format import unpack_qweight

KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # the qGroupSize values aten's kernel accepts
N_MULTIPLE = 16  # aten's packing: N % 16 == 0
CODE_OFFSET = 8  # aten reads code q as q - 8


def kernel_group_size(group_size: int, n: int) -> int | None:
    """The group size aten's kernel runs a layer of `group_size` with: the largest g' in KERNEL_GROUP_SIZES dividing
    group_size (each kernel group then lies in one of the layer's groups and takes its scale), preferring one that
    also divides n (K = n: x goes in as it is, no padded copy); None when no g' divides group_size."""
    dividing = [g for g in KERNEL_GROUP_SIZES if group_size % g == 0]
    if not dividing:
        return None
    return max((g for g in dividing if n % g == 0), default=max(dividing))


@dataclasses.dataclass(frozen=True)
class CpuInt4Packing:
    """One layer for the CPU backend: weight uint8 (N_pad, K / 2) and scales_and_zeros (K / group_size, N_pad, 2)
    for aten's kernel at `group_size` (kernel_group_size); shrink (R, n), shrink_bias (R,) and expand_t (R, N_pad)
    fp32, the [V; E; 0] / [U, T^T, b] of the module docstring (None when R = 0: no residual, no bias, bits < 4)."""

    key: tuple
    n: int
    m: int
    k: int
    group_size: int
    weight: torch.Tensor
    scales_and_zeros: torch.Tensor
    shrink: torch.Tensor | None
    shrink_bias: torch.Tensor | None
    expand_t: torch.Tensor | None


_CACHE: dict[int, CpuInt4Packing] = {}


def _fingerprint(t):
    """What says a tensor argument holds what a packing was made of: its data pointer, version counter (moved by every
    in-place write), shape, strides and dtype. Anything else stands for itself (and never matches a tensor's
    fingerprint). The cache slot itself is the qweight object's: callers pass the same tensors on every call."""
    if not isinstance(t, torch.Tensor):
        return t
    return t.data_ptr(), t._version, t.shape, t.stride(), t.dtype


def layer_key(qweight, scales, zeros, v, u, bias, bits: int, group_size: int) -> tuple:
    return (bits, group_size, *map(_fingerprint, (qweight, scales, zeros, v, u, bias)))


def pack_for_cpu(qweight, scales, zeros, v, u, bias, bits: int, group_size: int, n: int, key: tuple = ()):
    """The CpuInt4Packing of a layer (see the module docstring); SZ in the scales' dtype."""
    m, groups = scales.shape
    m_pad = -(-m // N_MULTIPLE) * N_MULTIPLE
    kernel_group = kernel_group_size(group_size, n)
    k = -(-n // kernel_group) * kernel_group
    with torch.no_grad():
        q = unpack_qweight(qweight, bits, n).to(torch.int32)
        s, z = scales.to(torch.float32), zeros.to(torch.float32)
        shrink, expand = ([v.float()], [u.float()]) if v is not None else ([], [])
        if bits < 4:
            q = q - z.to(torch.int32).repeat_interleave(group_size, dim=1)[:, :n] + CODE_OFFSET
        else:
            shrink.append(torch.arange(n).div(group_size, rounding_mode="floor") == torch.arange(groups)[:, None])
            expand.append((CODE_OFFSET - z) * s)
        shrink_bias = None
        if bias is not None:
            shrink.append(torch.zeros(1, n))
            expand.append(bias.float()[:, None])
            shrink_bias = torch.zeros(sum(t.shape[0] for t in shrink))
            shrink_bias[-1] = 1.0
        codes = torch.full((m_pad, k), CODE_OFFSET, dtype=torch.int32)
        codes[:m, :n] = q
        sz = torch.zeros((k // kernel_group, m_pad, 2), dtype=scales.dtype)
        sz[:, :m, 0] = scales.t().repeat_interleave(group_size // kernel_group, dim=0)[: k // kernel_group]
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        layout = dict(key=key, n=n, m=m, k=k, group_size=kernel_group, weight=weight, scales_and_zeros=sz)
        if not shrink:
            return CpuInt4Packing(**layout, shrink=None, shrink_bias=None, expand_t=None)
        expand_t = torch.zeros((sum(t.shape[0] for t in shrink), m_pad))
        expand_t[:, :m] = torch.cat(expand, dim=1).t()
        shrink_t = torch.cat([t.float() for t in shrink]).contiguous()
    return CpuInt4Packing(**layout, shrink=shrink_t, shrink_bias=shrink_bias, expand_t=expand_t)


def cached_packing(qweight, scales, zeros, v, u, bias, bits: int, group_size: int, n: int) -> CpuInt4Packing:
    """The packing of this layer, made on first use and remade when the key (module docstring) changes."""
    key = layer_key(qweight, scales, zeros, v, u, bias, bits, group_size)
    entry = _CACHE.get(id(qweight))
    if entry is None or entry.key != key:
        if entry is None:
            weakref.finalize(qweight, _CACHE.pop, id(qweight), None)
        entry = _CACHE[id(qweight)] = pack_for_cpu(qweight, scales, zeros, v, u, bias, bits, group_size, n, key)
    return entry


def packing_if_cached(qweight, scales, zeros, v, u, bias, bits: int, group_size: int) -> CpuInt4Packing | None:
    """The cached packing when one was made of exactly these arguments (unchanged since), else None."""
    entry = _CACHE.get(id(qweight))
    if entry is None or entry.key != layer_key(qweight, scales, zeros, v, u, bias, bits, group_size):
        return None
    return entry


def run_packing(x2d: torch.Tensor, packing: CpuInt4Packing) -> torch.Tensor:
    """y = x W_hat^T + b (+ (x V^T) U^T) for bf16 x2d (M >= 1, n): aten's kernel, then the fp32 shrink and expand
    added into its output in place (y + r rounded once to bf16, as one addmm then a cast would, in two fewer ops)."""
    n, k = packing.n, packing.k
    a = F.pad(x2d, (0, k - n)) if k != n else x2d.contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, packing.weight, packing.group_size, packing.scales_and_zeros)
    if packing.shrink is not None:
        y.add_(torch.mm(F.linear(x2d.float(), packing.shrink, packing.shrink_bias), packing.expand_t))
    return y if y.shape[1] == packing.m else y[:, : packing.m].contiguous()


def quant_lowrank_matmul_cpu(x2d, qweight, scales, zeros, v, u, bias, bits: int, group_size: int) -> torch.Tensor:
    """y = x W_hat^T + b (+ (x V^T) U^T) for bf16 x2d (M, n) on the CPU; arguments already checked by the op."""
    m, n = qweight.shape[0], x2d.shape[1]
    if x2d.shape[0] == 0:
        return x2d.new_empty((0, m))
    return run_packing(x2d, cached_packing(qweight, scales, zeros, v, u, bias, bits, group_size, n))
