"""The CPU backend of quant_lowrank_matmul: PyTorch's int4 CPU kernel on a packing of the base made once per weight.

aten::_weight_int4pack_mm_for_cpu(A, B, g, SZ) computes, for A (M, K) and codes q (N, K) in [0, 15] packed by
aten::_convert_weight_to_int4pack_for_cpu into B (N, K / 2) uint8,

    C[i, j] = sum_k A[i, k] ((q[j, k] - 8) SZ[k // g, j, 0] + SZ[k // g, j, 1])

with SZ (K / g, N, 2) in A's dtype, g in {32, 64, 128, 256}, g | K, N % 16 == 0, fp32 FMAs and C rounded once to A's
dtype (torch 2.13, aten/src/ATen/native/cpu/int4mm_kernel.cpp; checked against float64 in the tests).

Layout v1 defines W_hat = (q - z) s. The zero term is kept out of the kernel, whose SZ[..., 1] is 0:
- bits 2 / 3 (q, z < 8): the codes go in as q - z + 8, in [1, 15], so the kernel's weights are W_hat exactly;
- bits 4: the codes go in as they are, the kernel computes P = x ((q - 8) s)^T, and the zero term
  x ((8 - z) s)^T = xs T with xs (M, G) the sums of x over each group and T (G, m) = ((8 - z) s)^T (exact in fp32:
  a 4-bit integer times a bf16 scale) is one small fp32 GEMM, added to P in fp32.
Putting (8 - z) s into SZ instead rounds it to bf16: an error of up to 2^-9 |8 - z| s per weight, shared by the whole
group, which took outputs to 2.2x their own bf16 rounding (the accuracy rule allows 1.75x, tests/helpers.py).
P, the zero term, the bias and the residual U (V x) (both in fp32, their casts included: 38-71 us at M = 1, r = 64
on SmolLM2's shapes against 60-80 us for bf16 GEMMs, whose oneDNN calls cost ~15 us each at any size) are summed in
fp32 and rounded once to bf16. Rows are padded to N % 16 == 0 with zero scales (their outputs sliced off), x to
K = G g with zero columns (a copy of x per call where g does not divide n, e.g. SmolLM2's n = 576 at g = 128).

Only bf16 activations: on x86 the kernel is vectorized (AVX512 / AVX2) for bf16 alone; fp32 and fp16 run a scalar
loop. Measured on the 2-core AMD EPYC (AVX512, 1 thread), 1536 x 576, g = 64, M = 1: bf16 51 us against 92 us for
the dense bf16 F.linear and 74 us for dense fp32; fp32 1630 us, fp16 1760 us.

The packing (B, SZ and T: n m / 2 + 8 m G bytes, about the size of the stored base) is made on the first call and
kept in `_CACHE` under the qweight tensor, keyed by the data pointers, version counters, shapes and dtypes of qweight,
scales and zeros: an in-place change (load_state_dict, copy_) or a swapped storage repacks on the next call, a new
tensor (module.to(...)) gets its own entry, and an entry goes when its qweight is garbage-collected. Inference tensors
have no version counter, so the op keeps them on the torch backend.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.nn.functional as F

from lowrank_ops.quant_format import unpack_qweight

GROUP_SIZES = (32, 64, 128, 256)  # the qGroupSize values aten's kernel accepts
N_MULTIPLE = 16  # aten's packing: N % 16 == 0
CODE_OFFSET = 8  # aten reads code q as q - 8


@dataclasses.dataclass(frozen=True)
class CpuInt4Packing:
    """aten's CPU int4 packing of one base: weight uint8 (N_pad, K / 2), scales_and_zeros (G, N_pad, 2) with zero
    terms 0; zero_terms (G, m) fp32 = ((8 - z) s)^T for bits = 4, None for bits 2 / 3 (folded into the codes)."""

    key: tuple
    weight: torch.Tensor
    scales_and_zeros: torch.Tensor
    zero_terms: torch.Tensor | None


_CACHE: dict[int, CpuInt4Packing] = {}


def _key(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, n: int):
    tensors = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in (qweight, scales, zeros))
    return (*tensors, bits, group_size, n)


def pack_for_cpu(qweight, scales, zeros, bits: int, group_size: int, n: int, key: tuple = ()) -> CpuInt4Packing:
    """aten's packing of the layout-v1 base (see the module docstring), SZ in the scales' dtype."""
    m, groups = scales.shape
    m_pad = -(-m // N_MULTIPLE) * N_MULTIPLE
    with torch.no_grad():
        q = unpack_qweight(qweight, bits, n).to(torch.int32)
        s, z = scales.to(torch.float32), zeros.to(torch.float32)
        zero_terms = None
        if bits < 4:
            q = q - z.to(torch.int32).repeat_interleave(group_size, dim=1)[:, :n] + CODE_OFFSET
        else:
            zero_terms = ((CODE_OFFSET - z) * s).t().contiguous()
        codes = torch.full((m_pad, groups * group_size), CODE_OFFSET, dtype=torch.int32)
        codes[:m, :n] = q
        sz = torch.zeros((groups, m_pad, 2), dtype=scales.dtype)
        sz[:, :m, 0] = scales.t()
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return CpuInt4Packing(key, weight, sz, zero_terms)


def cached_packing(qweight, scales, zeros, bits: int, group_size: int, n: int) -> CpuInt4Packing:
    """The packing of this base, made on first use and remade when the key (module docstring) changes."""
    key = _key(qweight, scales, zeros, bits, group_size, n)
    entry = _CACHE.get(id(qweight))
    if entry is None or entry.key != key:
        if entry is None:
            weakref.finalize(qweight, _CACHE.pop, id(qweight), None)
        entry = _CACHE[id(qweight)] = pack_for_cpu(qweight, scales, zeros, bits, group_size, n, key)
    return entry


def quant_lowrank_matmul_cpu(x2d, qweight, scales, zeros, v, u, bias, bits: int, group_size: int) -> torch.Tensor:
    """y = x W_hat^T + b (+ (x V^T) U^T) for bf16 x2d (M, n) on the CPU; arguments already checked by the op."""
    m, n = qweight.shape[0], x2d.shape[1]
    if x2d.shape[0] == 0:
        return x2d.new_empty((0, m))
    packing = cached_packing(qweight, scales, zeros, bits, group_size, n)
    groups = scales.shape[1]
    a = F.pad(x2d, (0, groups * group_size - n)).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, packing.weight, group_size, packing.scales_and_zeros)
    if y.shape[1] != m:
        y = y[:, :m]
    if packing.zero_terms is None and v is None and bias is None:
        return y.contiguous()
    acc = y.float()
    if packing.zero_terms is not None:
        acc = torch.addmm(acc, a.view(-1, groups, group_size).sum(-1, dtype=torch.float32), packing.zero_terms)
    if bias is not None:
        acc += bias.float()
    if v is not None:
        acc = torch.addmm(acc, F.linear(x2d.float(), v.float()), u.float().t())
    return acc.to(x2d.dtype)
