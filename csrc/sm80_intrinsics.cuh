// The sm_80+ warp-level intrinsics of a Marlin-style int4 kernel (issue 19, part 2), as wrappers that compile both
// for the GPU (inline PTX, nvcc, sm_80 / sm_90a) and for the CPU emulator (tests/cuda_emu, LOWRANK_OPS_CUDA_EMU),
// where each one calls the emulator's model of the instruction. A kernel must call these wrappers, never write the
// PTX itself: the emulator cannot run inline PTX. Semantics and fragment layouts: PTX ISA 8.x / 9.0,
//   mma.sync.aligned.m16n8k16 .row.col .f32.{f16,bf16}.{f16,bf16}.f32  ("Matrix Fragments for mma.m16n8k16 with
//       floating point type"; groupID = lane / 4, tig = lane % 4; the lower-indexed element of a pair in the low
//       16 bits of its register):
//       A 16 x 16, 4 regs: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9],
//                          a[3] = A[g+8][2t+8, 2t+9]
//       B 16 x 8 (K x N), 2 regs: b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//       C, D 16 x 8 fp32, 4 regs: c[0, 1] = C[g][2t, 2t+1], c[2, 3] = C[g+8][2t, 2t+1]
//   ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i .. 8i+7 give the 16-byte-aligned addresses of rows
//       0..7 of matrix i; r[i] of lane l holds matrix i's row l/4, columns 2(l%4), 2(l%4)+1 (.trans: rows
//       2(l%4), 2(l%4)+1 of column l/4). With row l%16 and column block 8(l/16) of a 16 x 16 row-major tile as lane
//       l's address, r is exactly the A fragment above (and with .trans, of a K x N row-major tile, the B fragments
//       of two n8 tiles: r[0], r[1] for columns 0..7, r[2], r[3] for 8..15).
//   cp.async.cg.shared.global [dst], [src], 16, src_bytes: 16 bytes global -> shared (bytes past src_bytes are
//       zero-filled), asynchronous until cp.async.wait_group retires its group (commit_group closes a group).
//   lop3.b32 d, a, b, c, LUT: any 3-input bitwise function, LUT = F(0xF0, 0xCC, 0xAA).
//   prmt.b32 d, a, b, sel: byte permute of {b, a} (bytes 0-3 from a, 4-7 from b); nibble i of sel picks result
//       byte i, its bit 3 replicating the picked byte's sign bit instead.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

namespace lowrank_ops_sm80 {

// D = A B + C on one warp's m16n8k16 fragments (fp32 accumulate), T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                     const float (&c)[4]) {
#ifdef LOWRANK_OPS_CUDA_EMU
  ::cuda_emu::mma_m16n8k16(d, a, b, c, false);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2], const float (&c)[4]) {
#ifdef LOWRANK_OPS_CUDA_EMU
  ::cuda_emu::mma_m16n8k16(d, a, b, c, true);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// Four 8 x 8 b16 matrices from shared memory; `row` is this lane's row address (see the top of the file).
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef LOWRANK_OPS_CUDA_EMU
  ::cuda_emu::ldmatrix_x4(r, row, kTrans);
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#endif
}

// 16 bytes global -> shared, bypassing L1 (.cg); the first src_bytes (0..16) are read, the rest of dst zeroed.
// Both addresses 16-byte aligned. Not visible in dst until cp_async_wait retires the group it was committed in.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes = 16) {
#ifdef LOWRANK_OPS_CUDA_EMU
  ::cuda_emu::cp_async16(dst, src, src_bytes);
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(src), "r"(src_bytes));
#endif
}

// Closes the calling thread's group of cp_async16 copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef LOWRANK_OPS_CUDA_EMU
  ::cuda_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most kPending of the calling thread's committed groups are still in flight; other threads' copies
// need a barrier (__syncthreads) after their own wait before this thread may read them.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef LOWRANK_OPS_CUDA_EMU
  ::cuda_emu::cp_async_wait(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// Bitwise F(a, b, c) where kLut = F(0xF0, 0xCC, 0xAA), e.g. (a & b) | c: kLut = (0xF0 & 0xCC) | 0xAA = 0xEA.
template <int kLut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  static_assert(kLut >= 0 && kLut <= 0xFF, "lop3: the truth table is 8 bits");
#ifdef LOWRANK_OPS_CUDA_EMU
  return ::cuda_emu::lop3(a, b, c, kLut);
#else
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(kLut));
  return d;
#endif
}

// Byte permute (default mode) of the 8 bytes {b, a} by the low 16 bits of `selector`.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
#ifdef LOWRANK_OPS_CUDA_EMU
  return ::cuda_emu::prmt(a, b, selector);
#else
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
#endif
}

}  // namespace lowrank_ops_sm80
