"""Triton kernels for y = dequant(W_hat) x + U (V^T x) + b: a group-wise quantized base plus a low-rank residual.

Shapes: x (M, n) (the op flattens leading dims), W_hat (m, n) packed as in `lowrank_ops.quant_format`
(LAYOUT_VERSION 1: int32 words of eight 4-bit codes along n, column 8j + c at bits 4c of word j, or uint8
8-bit codes; scales / zeros (m, G), G = ceil(n / group_size)), V (r, n), U (m, r), b (m,), y (M, m).
W_hat[i, k] = (q[i, k] - z) s with s = scales[i, k // g], z = zeros[i, k // g], evaluated in fp32 registers.

Small M (M <= FUSED_MAX_M = 64): two launches, chained with programmatic dependent launch (PDL, sm_90+).

    1. _quant_lowrank_shrink_kernel  z (S, M, r) fp32 = x V^T, split-K over n into S slices (no atomics;
       the S partials are summed by the consumer, deterministic). Skipped when r = 0. Every base program
       re-reads all S partials of its rows in its epilogue, so S is capped by the rule shared with
       lowrank_matmul (kernels/launch.py): re-reads within the weight bytes, staged partial tiles within
       32 KB per pipeline stage (uncapped, S = 16 at M = 64 needed 532 KB of shared memory on sm_90a).
    2. _quant_lowrank_matmul_kernel  program (pid_n, pid_m) owns BLOCK_N rows of W_hat over all of n and
       streams them through a K loop of (BLOCK_N, BLOCK_KW) tiles of packed words; code c of every word of a
       tile, (word >> 4c) & 15, is itself a plain 2-D tile (columns 8j + c) with the words' register layout:
       no gather of packed words, no reshape of codes. Epilogue: wait for the shrink (gdc_wait), add
       U[rows] . sum_s z[s] (fp32), bias, cast, store.

Why the shrink is a separate launch and the expand an epilogue (issue 5, section 3): the expand needs all of
z, i.e. a grid-wide dependency on the shrink. Putting the V rows into the base kernel's grid (some programs
on rows of W_hat, others on rows of V) would still need a second launch for the expand, plus an fp32 round
trip of the base result (2 x M x m x 4 bytes: 2 MB at M = 64, 4096 rows). Launching the shrink first and
the base kernel as its PDL dependent instead lets the two stream concurrently -- the base kernel's programs
start while the shrink runs, read x and the whole of W_hat, and wait for z only in their epilogue, by which
time the shrink (r n x 2 bytes, an eighth of W_hat's bytes at r = 128, n = m) is long done. So the shrink
costs bandwidth but no serialisation, and there is no intermediate besides z (S x M x r x 4 bytes). A single
persistent kernel would need a device-wide barrier and a co-resident grid; PDL gives the overlap without.
The shrink does not ride the base kernel's own K loop: that would give each W_hat program a slice of V rows
whose z the other programs need before their epilogue -- the same grid-wide dependency.

PDL ordering (as in kernels/lowrank_matmul.py): the base kernel reads x and W_hat BEFORE its gdc_wait, so it
must not launch until every kernel before the op is complete. The shrink therefore calls gdc_wait before it
reads anything (the previous kernel may write x or V: an optimizer step before a forward) and only then
gdc_launch_dependents: once every shrink program has passed its wait, x and the weights are final and the
base kernel may start. Without a residual the base kernel is the op's first launch and waits before reading
anything. tests/test_hopper_plans.py runs both kernels with PDL hazards poisoned (issue 20).
Every kernel here executes gdc_wait before it finishes, so "kernel done" implies "its predecessor done".

Inner product, per M (`_main_config`, `_shrink_config`). At decode the bottleneck is instruction issue, not
bytes: 4096^2 int4 is 16.7 M codes against 8.9 MB; at ~4 issue slots per code an H100 (132 SMs x 4
schedulers) needs ~2.3 us, about the 3.0 us the bytes take, so every instruction per code counts.
- M = 1 (GEMV_MAX_M), fp32 FMAs: codes become floats by the 2^23 magic-number trick (`_code_as_f32`, no
  quarter-rate I2F); zero point and scale are folded out of the per-code work -- per word (8 columns of one
  group) sum_c (q_c - z) s x_c = s (sum_c q_c x_c - z sum_c x_c) -- so a code costs a shift, a LOP3, an FADD
  and an FFMA. x is loaded once per K-step as a contiguous vector (16-byte loads) and split into the 8
  stride-8 column sets (`_split_columns`). The (BLOCK_N, BLOCK_KW) accumulator is reduced over K once, after
  the loop; the expand reuses it (BLOCK_R = BLOCK_KW). Register double buffer for the words.
- 1 < M <= 64, tl.dot on (BLOCK_M, BLOCK_KW) x (BLOCK_KW, BLOCK_N) sub-tiles, one per code position c.
  fp16 / bf16 activations: the dequantised tile (q s - z s, one FFMA per code) is rounded to x's dtype, as
  torch's dequantise-then-GEMM does, and multiplied on the tensor cores with fp32 accumulation; fp32
  activations: fp32 operands in 3xTF32. The words are staged through shared memory by Triton's pipeliner
  (cp.async, num_stages). The expand dot (fp32 z . U) runs in TF32 (U is exact in it; z is rounded to 10
  bits, finer than torch's rounding of z to bf16). Every tl.dot dimension is >= 16.
  Under the CPU interpreter every dot runs in IEEE fp32 (its bf16 tl.dot is wrong).
Accumulation is fp32 throughout; row offsets are int64.

Large M (M > FUSED_MAX_M): compute-bound, where the dequantisation is amortised over M rows:
`_dequantize_kernel` writes W_hat once in x's dtype (one pass: read m n / 2 bytes, write 2 m n) and the op
calls cuBLAS (F.linear, plus the residual as two GEMMs, the expand accumulating into y through addmm's
epilogue). Chosen over a Triton dequantise-into-tl.dot GEMM: cuBLAS runs the wgmma path near peak on H100,
and the extra pass costs ~42 MB of traffic at 4096^2 (~14 us at 3 TB/s) against ~100 us of GEMM at M = 2048.

Evidence so far (no GPU was available when this was written): every variant compiles for sm_90a with the
triton 3.6 wheel's ptxas on a CPU machine, without local-memory spills and within an H100 block's shared memory
(scripts/check_sm90_compile.py; it found the M = 64 residual epilogue at 532 KB before the split cap). K-loop SASS,
issue slots per int4 code: M = 1 GEMV
~11 (first version, scalar stride-8 x loads and I2F: 18.5), tl.dot at M = 16 (BLOCK_N = 32) ~12.6. By the
estimate above that is ~6 us for the M = 1 base at 4096^2: the int4 GEMV is issue-bound, not at the byte
floor. Leads for the GPU session, largest first: (1) the GEMV still converts the folded per-word tile and
the split x columns through shared memory (LDS + BAR per K-step); a layout that interleaves each 64-column
block (word j holding columns j + 8c) would make each thread's x columns contiguous and remove the split;
(2) fp16x2 / bf16x2 magic-number dequantisation (two codes per LOP3) needs inline asm, which the interpreter
cannot run; (3) int8 GEMV (~20 slots per code: byte extraction PRMTs) wants a 4-codes-per-word view.
Byte floor of the headline case (4096^2, int4 g128, bf16 scales, r = 128, M = 1): W_hat 8.4 MB + scales and
zeros 0.5 MB + V, U 2.1 MB -> 11.0 MB, 3.7 us at the measured 3.0 TB/s (issue 5 target: <= 6 us).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_ops.kernels.launch import (
    MAX_SPLIT,
    cap_split,
    device_info,
    dot_flags,
    partial_split_cap,
    target_programs,
)
from lowrank_ops.quant_format import CODES_PER_INT32, container_bits


@triton.jit
def _code_as_f32(q, c: tl.constexpr, CODE_BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr):
    """Code c of every packed word in `q`, as an exact fp32. 2^23 + q carries q in its low mantissa bits, so
    bitcast(q | 0x4B000000) - 2^23 == q: a shift, a LOP3 and an FADD, all at the full FP32 rate, where an
    int-to-float conversion (I2F) issues at a quarter of it on sm_90 and would bound the int4 GEMV."""
    if CODES_PER_WORD == 1:
        bits = q.to(tl.int32)
    else:
        bits = (q >> (CODE_BITS * c)) & ((1 << CODE_BITS) - 1)  # the mask also drops the sign of >> on int32
    return (bits | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _split_columns(x, BLOCK_KW: tl.constexpr, CODES_PER_WORD: tl.constexpr):
    """x (BLOCK_KW * CODES_PER_WORD,) contiguous columns -> tuple of CODES_PER_WORD tensors (BLOCK_KW,), the c-th
    holding columns CODES_PER_WORD * j + c (those of code c of word j)."""
    if CODES_PER_WORD == 1:
        return (x,)
    else:
        x = tl.reshape(x, (BLOCK_KW, 2, 2, 2))  # column 8 j + 4 c2 + 2 c1 + c0 -> (j, c2, c1, c0)
        e, o = tl.split(x)  # c0 = 0 / 1: (BLOCK_KW, 2, 2)
        e0, e1 = tl.split(e)  # c1
        o0, o1 = tl.split(o)
        x0, x4 = tl.split(e0)  # c2
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        return (x0, x1, x2, x3, x4, x5, x6, x7)


@triton.jit
def _quant_lowrank_shrink_kernel(
    x_ptr,  # (M, K)  fp16 / bf16 / fp32
    v_ptr,  # (R, K)  x's dtype
    z_ptr,  # (SPLIT, M, R) fp32 partial sums of x V^T, one per K-slice (grid axis 2)
    M,
    R,
    K,
    K_PER_SPLIT,  # K-slice of one program; multiple of BLOCK_K
    stride_xm,
    stride_xk,
    stride_vr,
    stride_vk,
    stride_zs,
    stride_zm,
    stride_zr,
    USE_DOT: tl.constexpr,  # False: M = 1 GEMV (BLOCK_M = 1), one x row per program
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    offs_k = k_start + tl.arange(0, BLOCK_K)

    if USE_PDL:
        # Nothing is read before the wait: the previous kernel may write x or V (an optimizer step before a forward).
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # only now: the base kernel reads x before its own wait
    v_ptrs = v_ptr + offs_r[:, None].to(tl.int64) * stride_vr + offs_k[None, :] * stride_vk
    v = tl.load(v_ptrs, mask=r_mask[:, None] & (offs_k[None, :] < k_end), other=0.0)

    z_base = z_ptr + pid_s * stride_zs
    if USE_DOT:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(
                x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & (offs_k[None, :] < k_end), other=0.0
            )
            v_ptrs += BLOCK_K * stride_vk
            v_next = tl.load(v_ptrs, mask=r_mask[:, None] & (offs_k[None, :] + BLOCK_K < k_end), other=0.0)
            if DOT_FP32:
                acc += tl.dot(xk.to(tl.float32), tl.trans(v.to(tl.float32)), input_precision=DOT_PRECISION)
            else:
                acc += tl.dot(xk, tl.trans(v), input_precision=DOT_PRECISION)
            v = v_next
        z_ptrs = z_base + offs_m[:, None].to(tl.int64) * stride_zm + offs_r[None, :] * stride_zr
        tl.store(z_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])
    else:
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_row + offs_k * stride_xk, mask=offs_k < k_end, other=0.0)
            v_ptrs += BLOCK_K * stride_vk
            v_next = tl.load(v_ptrs, mask=r_mask[:, None] & (offs_k[None, :] + BLOCK_K < k_end), other=0.0)
            acc += xk.to(tl.float32)[None, :] * v.to(tl.float32)
            v = v_next
        z_ptrs = z_base + pid_m.to(tl.int64) * stride_zm + offs_r * stride_zr
        tl.store(z_ptrs, tl.sum(acc, axis=1), mask=r_mask)


@triton.jit
def _quant_lowrank_matmul_kernel(
    x_ptr,  # (M, K)  fp16 / bf16 / fp32
    q_ptr,  # (N, KW) int32 words of eight 4-bit codes (KW = ceil(K / 8)), or uint8 (N, K) 8-bit codes
    s_ptr,  # (N, G)  scales, fp16 / bf16 / fp32
    zp_ptr,  # (N, G) zero points, scales' dtype
    z_ptr,  # (SPLIT, M, R) fp32 shrink partials, or a dummy when HAS_RESIDUAL is False
    u_ptr,  # (N, R)  x's dtype, or a dummy
    bias_ptr,  # (N,)  or a dummy when HAS_BIAS is False
    y_ptr,  # (M, N)  x's dtype
    M,
    N,
    K,
    KW,
    R,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_zpn,
    stride_zpg,
    stride_zs,
    stride_zm,
    stride_zr,
    stride_un,
    stride_ur,
    stride_ym,
    stride_yn,
    CODE_BITS: tl.constexpr,  # 4 or 8: width of a code's slot in the packed word
    CODES_PER_WORD: tl.constexpr,  # 8 (int32 words of 4-bit slots) or 1 (uint8)
    GROUP_SIZE: tl.constexpr,  # a multiple of CODES_PER_WORD: a word never straddles two groups
    SPLIT: tl.constexpr,  # number of shrink partials to sum
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,  # False: M = 1 GEMV (BLOCK_M = 1, BLOCK_R = BLOCK_KW)
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,  # packed words per K-step: BLOCK_KW * CODES_PER_WORD columns of x
    BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_j = tl.arange(0, BLOCK_KW)
    q_rows = q_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    s_rows = s_ptr + offs_n[:, None].to(tl.int64) * stride_sn
    zp_rows = zp_ptr + offs_n[:, None].to(tl.int64) * stride_zpn
    if USE_DOT:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)

    if USE_DOT:
        if USE_PDL:
            if not HAS_RESIDUAL:
                tl.extra.cuda.gdc_wait()  # x is the previous kernel's (with a residual, the shrink waited for it)
            tl.extra.cuda.gdc_launch_dependents()  # every consumer of y waits for this grid before reading it
        # No register double buffer here: the words feed tl.dot through elementwise dequantisation, a pattern
        # Triton's software pipeliner stages through shared memory itself (num_stages).
        for kw0 in range(0, KW, BLOCK_KW):
            offs_w = kw0 + offs_j
            w_mask = n_mask[:, None] & (offs_w[None, :] < KW)
            q = tl.load(q_rows + offs_w[None, :] * stride_qk, mask=w_mask, other=0)
            group = (offs_w * CODES_PER_WORD) // GROUP_SIZE
            scale = tl.load(s_rows + group[None, :] * stride_sg, mask=w_mask, other=0.0).to(tl.float32)
            zero = tl.load(zp_rows + group[None, :] * stride_zpg, mask=w_mask, other=0.0).to(tl.float32)
            offset = -zero * scale  # w = q s - z s: one FMA per code
            for c in tl.static_range(CODES_PER_WORD):
                w = _code_as_f32(q, c, CODE_BITS, CODES_PER_WORD) * scale + offset  # columns offs_w * CPW + c
                cols = offs_w * CODES_PER_WORD + c
                xk = tl.load(x_rows + cols[None, :] * stride_xk, mask=m_mask[:, None] & (cols[None, :] < K), other=0.0)
                if DOT_FP32:
                    acc += tl.dot(xk.to(tl.float32), tl.trans(w), input_precision=DOT_PRECISION)
                else:
                    acc += tl.dot(xk, tl.trans(w.to(x_ptr.dtype.element_ty)), input_precision=DOT_PRECISION)
    else:
        if USE_PDL and not HAS_RESIDUAL:
            tl.extra.cuda.gdc_wait()  # the op's first launch: the previous kernel may write x or the weights
        # With a residual the shrink waited for every earlier kernel before letting this one start, and never
        # writes the packed weight: its first tile is fetched before the wait for z.
        q = tl.load(q_rows + offs_j[None, :] * stride_qk, mask=n_mask[:, None] & (offs_j[None, :] < KW), other=0)
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()  # every consumer of y waits for this grid before reading it
        for kw0 in range(0, KW, BLOCK_KW):
            offs_w = kw0 + offs_j
            w_mask = n_mask[:, None] & (offs_w[None, :] < KW)
            # Register double buffer: issue the next tile of words before working on this one.
            q_next = tl.load(
                q_rows + (offs_w[None, :] + BLOCK_KW) * stride_qk,
                mask=n_mask[:, None] & (offs_w[None, :] + BLOCK_KW < KW),
                other=0,
            )
            group = (offs_w * CODES_PER_WORD) // GROUP_SIZE
            scale = tl.load(s_rows + group[None, :] * stride_sg, mask=w_mask, other=0.0).to(tl.float32)
            zero = tl.load(zp_rows + group[None, :] * stride_zpg, mask=w_mask, other=0.0).to(tl.float32)
            # Zero point and scale folded out of the per-code work: for each word (8 columns, one group)
            #   sum_c (q_c - z) s x_c = s (sum_c q_c x_c - z sum_c x_c),
            # so a code costs a shift, a LOP3, an FADD and one FFMA; the scale is applied once per word.
            # x is loaded once per K-step as a contiguous vector (vectorised loads) and split into the
            # CODES_PER_WORD stride-CPW column sets the codes need.
            offs_x = kw0 * CODES_PER_WORD + tl.arange(0, BLOCK_KW * CODES_PER_WORD)
            x_tile = tl.load(x_row + offs_x * stride_xk, mask=offs_x < K, other=0.0).to(tl.float32)
            xs = _split_columns(x_tile, BLOCK_KW, CODES_PER_WORD)
            inner = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_KW,), dtype=tl.float32)
            for c in tl.static_range(CODES_PER_WORD):
                inner += _code_as_f32(q, c, CODE_BITS, CODES_PER_WORD) * xs[c][None, :]
                x_sum += xs[c]
            acc += scale * (inner - zero * x_sum[None, :])
            q = q_next

    if HAS_RESIDUAL:
        offs_r = tl.arange(0, BLOCK_R)
        u_rows = u_ptr + offs_n[:, None].to(tl.int64) * stride_un
        u = tl.load(u_rows + offs_r[None, :] * stride_ur, mask=n_mask[:, None] & (offs_r[None, :] < R), other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()  # z is written by the shrink kernel
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            u_next = tl.load(
                u_rows + (offs_r[None, :] + BLOCK_R) * stride_ur,
                mask=n_mask[:, None] & (offs_r[None, :] + BLOCK_R < R),
                other=0.0,
            )
            if USE_DOT:
                z_ptrs = z_ptr + offs_m[:, None].to(tl.int64) * stride_zm + offs_r[None, :] * stride_zr
                z_mask = m_mask[:, None] & (offs_r[None, :] < R)
                zc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for t in tl.static_range(SPLIT):
                    zc += tl.load(z_ptrs + t * stride_zs, mask=z_mask, other=0.0)
                acc += tl.dot(zc, tl.trans(u.to(tl.float32)), input_precision=DOT_PRECISION)
            else:
                z_ptrs = z_ptr + pid_m.to(tl.int64) * stride_zm + offs_r * stride_zr
                zc = tl.zeros((BLOCK_R,), dtype=tl.float32)
                for t in tl.static_range(SPLIT):
                    zc += tl.load(z_ptrs + t * stride_zs, mask=offs_r < R, other=0.0)
                acc += zc[None, :] * u.to(tl.float32)  # same (BLOCK_N, BLOCK_KW) accumulator: BLOCK_R == BLOCK_KW
            u = u_next

    if USE_DOT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y_ptrs = y_ptr + pid_m.to(tl.int64) * stride_ym + offs_n * stride_yn
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=n_mask)


# One pass with contiguous (vectorisable) stores of W_hat. Each packed word is loaded once per code it holds
# (the 8 loads of a word hit L1): that costs load instructions, not DRAM bytes, in this write-bound pass.
@triton.jit
def _dequantize_kernel(
    q_ptr,  # (N, KW) int32 words of eight 4-bit codes, or uint8 (N, K)
    s_ptr,  # (N, G)
    zp_ptr,  # (N, G)
    w_ptr,  # (N, K) out: W_hat in x's dtype
    N,
    K,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_zpn,
    stride_zpg,
    stride_wn,
    stride_wk,
    CODE_BITS: tl.constexpr,
    CODES_PER_WORD: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    rows = offs_n[:, None].to(tl.int64)
    words = tl.load(q_ptr + rows * stride_qn + (offs_k // CODES_PER_WORD)[None, :] * stride_qk, mask=mask, other=0)
    if CODES_PER_WORD == 1:
        codes = words.to(tl.int32)
    else:
        shift = ((offs_k % CODES_PER_WORD) * CODE_BITS)[None, :]
        codes = (words >> shift) & ((1 << CODE_BITS) - 1)
    codes = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # exact, see _code_as_f32
    group = (offs_k // GROUP_SIZE)[None, :]
    scale = tl.load(s_ptr + rows * stride_sn + group * stride_sg, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zp_ptr + rows * stride_zpn + group * stride_zpg, mask=mask, other=0.0).to(tl.float32)
    w = (codes - zero) * scale
    tl.store(w_ptr + rows * stride_wn + offs_k[None, :] * stride_wk, w.to(w_ptr.dtype.element_ty), mask=mask)


# Constants: first choices for an H100, checked only by compiling for sm_90 without a GPU (registers, spills,
# SASS of the K loop; see the module docstring), NOT yet timed. benchmarks/bench_quant_lowrank_matmul.py decides.
GEMV_MAX_M = 1  # M = 1: FMA GEMV; above, tl.dot tiles (BLOCK_M >= 16): the dequantised tile serves all rows
FUSED_MAX_M = 64  # above: dequantise once + cuBLAS (compute-bound)
GEMV_BLOCK_N = 16  # 4096 rows -> 256 programs, ~2 per H100 SM
GEMV_TILE_BYTES = 4096  # packed weight per K-step and program: int4 16 x 64 words (512 columns, 8 words per
# thread with 4 warps: 158 registers, no spills), int8 16 x 256 bytes (219 registers); double-buffered
DOT_BLOCK_N = 32  # rows of W_hat per tl.dot program; 16 made every warp dequantise the same tile (mma operand
# replication): 24.7 issue slots per int4 code in the K loop against 12.6 at 32 (sm_90 SASS, M = 16)
SHRINK_GEMV_ELEMS = 2048  # BLOCK_R * BLOCK_K of the M = 1 shrink's accumulator and V tiles: 16 per thread
NUM_WARPS = 4
DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 16, 256


def _main_config(m_rows: int, code_bits: int, words_per_row: int, rank: int) -> dict:
    """Blocks of `_quant_lowrank_matmul_kernel` for M = m_rows."""
    words_pow2 = triton.next_power_of_2(words_per_row)
    if m_rows <= GEMV_MAX_M:
        block_n = GEMV_BLOCK_N
        word_bytes = 4 if code_bits == 4 else 1
        block_kw = max(16, min(GEMV_TILE_BYTES // (block_n * word_bytes), words_pow2))
        return dict(USE_DOT=False, BLOCK_M=1, BLOCK_N=block_n, BLOCK_KW=block_kw, BLOCK_R=block_kw)
    block_m = 16 if m_rows <= 16 else (32 if m_rows <= 32 else 64)
    block_n = DOT_BLOCK_N
    # K of each tl.dot is BLOCK_KW columns: 32 words = 256 columns per K-step for int4, 64 columns for int8.
    block_kw = max(16, min(32 if code_bits == 4 else 64, words_pow2))
    block_r = max(16, min(64, triton.next_power_of_2(max(rank, 1))))
    return dict(USE_DOT=True, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KW=block_kw, BLOCK_R=block_r)


def _shrink_config(m_rows: int, rank: int, k_in: int, target_programs: int) -> dict:
    """Blocks and split-K count of `_quant_lowrank_shrink_kernel` (z = x V^T, V (rank, k_in))."""
    k_pow2 = triton.next_power_of_2(k_in)
    if m_rows <= GEMV_MAX_M:
        block_m, use_dot = 1, False
        block_k = min(256, k_pow2)
        block_r = max(1, min(SHRINK_GEMV_ELEMS // block_k, triton.next_power_of_2(rank)))
    else:
        use_dot = True
        block_m = 16 if m_rows <= 16 else (32 if m_rows <= 32 else 64)
        block_r = 16 if m_rows <= 16 else 32
        block_k = max(16, min(64, k_pow2))
    programs = triton.cdiv(rank, block_r) * triton.cdiv(m_rows, block_m)
    k_blocks = triton.cdiv(k_in, block_k)
    split = max(1, min(k_blocks, MAX_SPLIT, target_programs // programs))
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(k_in, k_per_split)
    return dict(
        USE_DOT=use_dot, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, split=split, k_per_split=k_per_split
    )


def _packing(bits: int) -> tuple[int, int]:
    code_bits = container_bits(bits)
    return code_bits, (CODES_PER_INT32 if code_bits == 4 else 1)


def quant_lowrank_matmul_triton(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    v: torch.Tensor | None,
    u: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """The fused small-M path for a 2-D x (M, n), 1 <= M <= FUSED_MAX_M. Inputs are validated by the op."""
    m_rows, n_in = x2d.shape
    m_out, words = qweight.shape
    rank = 0 if v is None else v.shape[0]
    code_bits, codes_per_word = _packing(bits)
    device_index, use_pdl = device_info(x2d)
    dot_fp32, precision = dot_flags(x2d.dtype)
    extra = {"launch_pdl": True} if use_pdl else {}

    cfg = _main_config(m_rows, code_bits, words, rank)
    split = 1
    z = x2d  # dummy pointer when there is no residual
    if rank > 0:
        # Each program of the base kernel re-reads the S partials of its rows in its epilogue: the split is capped
        # by the rule shared with lowrank_matmul (kernels/launch.py; at M = 64 an uncapped S = 16 needed 532 KB of
        # shared memory in the sm_90a compile, over the 227 KB an H100 block may use).
        weight_bytes = sum(t.numel() * t.element_size() for t in (qweight, scales, zeros, v, u))
        reads_per_split = triton.cdiv(m_out, cfg["BLOCK_N"]) * m_rows * rank * 4
        cap = partial_split_cap(weight_bytes, reads_per_split, cfg["BLOCK_M"], cfg["BLOCK_R"], cfg["USE_DOT"])
        sc = cap_split(_shrink_config(m_rows, rank, n_in, target_programs(device_index)), n_in, cap)
        split = sc["split"]
        z = torch.empty((split, m_rows, rank), device=x2d.device, dtype=torch.float32)
        grid = (triton.cdiv(rank, sc["BLOCK_R"]), triton.cdiv(m_rows, sc["BLOCK_M"]), split)
        _quant_lowrank_shrink_kernel[grid](
            x2d, v, z,
            m_rows, rank, n_in, sc["k_per_split"],
            x2d.stride(0), x2d.stride(1),
            v.stride(0), v.stride(1),
            z.stride(0), z.stride(1), z.stride(2),
            USE_DOT=sc["USE_DOT"], DOT_FP32=dot_fp32, DOT_PRECISION=precision, USE_PDL=use_pdl,
            BLOCK_M=sc["BLOCK_M"], BLOCK_R=sc["BLOCK_R"], BLOCK_K=sc["BLOCK_K"],
            num_warps=NUM_WARPS,
            **extra,
        )  # fmt: skip

    y = torch.empty((m_rows, m_out), device=x2d.device, dtype=x2d.dtype)
    u_arg = u if rank > 0 else y
    grid = (triton.cdiv(m_out, cfg["BLOCK_N"]), triton.cdiv(m_rows, cfg["BLOCK_M"]))
    _quant_lowrank_matmul_kernel[grid](
        x2d, qweight, scales, zeros, z, u_arg, bias if bias is not None else y, y,
        m_rows, m_out, n_in, words, rank,
        x2d.stride(0), x2d.stride(1),
        qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1),
        z.stride(0) if rank > 0 else 0, z.stride(1) if rank > 0 else 0, z.stride(2) if rank > 0 else 0,
        u_arg.stride(0), u_arg.stride(1),
        y.stride(0), y.stride(1),
        CODE_BITS=code_bits, CODES_PER_WORD=codes_per_word, GROUP_SIZE=group_size,
        SPLIT=split, HAS_RESIDUAL=rank > 0, HAS_BIAS=bias is not None,
        USE_DOT=cfg["USE_DOT"], DOT_FP32=dot_fp32, DOT_PRECISION=precision, USE_PDL=use_pdl,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_KW=cfg["BLOCK_KW"], BLOCK_R=cfg["BLOCK_R"],
        num_warps=NUM_WARPS,
        **extra,
    )  # fmt: skip
    return y


def dequantize_triton(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    n_in: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """W_hat (m, n_in) in `dtype`, one pass (the large-M path); same values as quant_format.dequantize."""
    m_out = qweight.shape[0]
    code_bits, codes_per_word = _packing(bits)
    w = torch.empty((m_out, n_in), device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(n_in, DEQUANT_BLOCK_K), triton.cdiv(m_out, DEQUANT_BLOCK_N))
    _dequantize_kernel[grid](
        qweight, scales, zeros, w,
        m_out, n_in,
        qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1),
        w.stride(0), w.stride(1),
        CODE_BITS=code_bits, CODES_PER_WORD=codes_per_word, GROUP_SIZE=group_size,
        BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=DEQUANT_BLOCK_K,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return w
