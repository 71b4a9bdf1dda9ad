// Quantized base plus low-rank residual, decode: y = dequant(W_hat) x + U (V x) + b, M = 1 .. 16 rows, fp16 / bf16
// activations, fp32 accumulation (interface and layout: quant_lowrank_decode.h, lowrank_ops/quant_format.py v1).
//
// Bytes (4096^2, 4-bit, g128, r = 128, M = 1): codes 8 MB + scales / zeros 0.5 MB + V, U 2 MB = 10.5 MB, 3.3 us at
// 3.0 TB/s. Two kernels when there is a residual, one without:
//
//   shrink (lowrank_decode.cu)  z = sum_s x V_s^T, reduced by its last-arriving warps   (M, r) fp32
//   quant_lowrank_kernel        y = sum_g s_g (sum_{k in g} q_k x_k - z_g sum_{k in g} x_k) + U z + b
//
// The base GEMV does not depend on the shrink, so the fused kernel is PDL-launched behind it and streams its whole
// first row tile of codes before wait_for_producer(); only the residual expand (z, written by the shrink,
// staged in shared memory as in lowrank_decode.cu) waits. The shrink's V stream and the codes stream overlap.
//
// Base GEMV: one warp owns kQuantRows rows of W_hat; each lane loads 4 int32 words (32 codes, 16 bytes) per row
// per step, a warp 128 words = 1024 columns. Layout v1 keeps every word inside one group (group_size % 8 == 0),
// so zero point and scale come out of the per-code work: per word, dot = sum q_k x_k and xsum = sum x_k (shared by
// the rows), then acc += s (dot - z xsum) -- per code one shift, one AND/OR and one FADD (the 2^23 magic-number
// conversion of a nibble to fp32, no I2F) and one FFMA per row of x. W_hat is exact in fp32 here (the torch
// reference rounds it to the activation dtype first).
// Why layout v1 as is: a lane's 4 words are 32 consecutive columns, so the matching x is 4 contiguous 16-byte
// loads and the codes' order within a word is the order of x; no re-pack is needed for this FMA kernel. A tensor-core
// (mma.sync) path for M = 8 .. 16 would want a re-packed (fragment-ordered) layout v2; see the report of issue 9.
//
// Awkward shapes: 16-byte code loads need ceil(n / 8) % 4 == 0 and an aligned qweight, 16-byte x loads n % 8 == 0
// and an aligned x and row stride, 16-byte U loads r % 8 == 0 and an aligned U; each falls back to masked scalar
// loads on its own. Columns beyond n read x as 0 (layout v1 pads codes with zeros; x masks them anyway).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_status.h"
#include "decode_common.cuh"
#include "lowrank_decode.h"
#include "quant_lowrank_decode.h"

namespace lowrank_ops_decode {
namespace {

// 8 warps per block share one copy of z in shared memory (residual).
constexpr int kQuantThreads = 256;
constexpr int kQuantWarps = kQuantThreads / kWarp;
// 4 rows of W_hat per warp: 4 x 512 B of codes in flight per warp, each x vector (from L1) used 4 times.
constexpr int kQuantRows = 4;
// int32 words per 16-byte code load: 32 columns.
constexpr int kWordsPerLoad = 4;
constexpr int kCodesPerWord = 8;
// Blocks per SM the grid is capped at (each block reads the residual's z); more rows loop.
constexpr int kQuantBlocksPerSm = 2;
// Register budget. sm_90a, left to itself, gives the M = 8 tile 128 registers (two resident blocks per SM) and the
// M = 16 tile 196, without spills. ptxas for sm_80 also caps the M = 8 tile at 128 but spills 16 bytes there, so the
// sm_80 image asks for one resident block per SM (up to 255 registers): 139 registers, no spills. One block is
// 8 warps x 4 rows x 512 B = 16 KB of codes in flight per SM, above the ~9 KB an A100 needs (1.5 TB/s x ~0.6 us
// of DRAM latency over 108 SMs).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define LOWRANK_OPS_QUANT_LAUNCH_BOUNDS __launch_bounds__(kQuantThreads, 1)
#else
#define LOWRANK_OPS_QUANT_LAUNCH_BOUNDS __launch_bounds__(kQuantThreads)
#endif
// 2^23 as the fp32 bit pattern 0x4B000000: OR-ing a 4-bit code c into its mantissa gives the float 2^23 + c exactly.
constexpr uint32_t kMagicBits = 0x4B000000u;
constexpr float kMagic = 8388608.0f;

// Words p[0 .. valid) (clamped to [0, 4]) as one 16-byte vector, zero words beyond. vec: one 16-byte load (p
// 16-byte aligned and valid 0 or >= 4 for the whole launch), else masked 4-byte loads. Codes are read once:
// evict-first.
__device__ __forceinline__ uint4 load_words(const int32_t* p, int valid, bool vec) {
  if (valid <= 0) {
    return make_uint4(0u, 0u, 0u, 0u);
  }
  if (vec) {
    return __ldcs(reinterpret_cast<const uint4*>(p));
  }
  const unsigned int* s = reinterpret_cast<const unsigned int*>(p);
  return make_uint4(__ldcs(s), valid > 1 ? __ldcs(s + 1) : 0u, valid > 2 ? __ldcs(s + 2) : 0u,
                    valid > 3 ? __ldcs(s + 3) : 0u);
}

__device__ __forceinline__ uint32_t word_of(const uint4& q, int j) {
  return j == 0 ? q.x : j == 1 ? q.y : j == 2 ? q.z : q.w;
}

template <typename T, int MT>
__global__ void LOWRANK_OPS_QUANT_LAUNCH_BOUNDS
    quant_lowrank_kernel(const T* __restrict__ x,              // (M, n), row stride ldx
                         const int32_t* __restrict__ qweight,  // (m, ceil(n / 8))
                         const T* __restrict__ scales,         // (m, G)
                         const T* __restrict__ zeros,          // (m, G)
                         const float* __restrict__ z,          // (M, r) or nullptr when r = 0
                         const T* __restrict__ u,              // (m, r) or nullptr when r = 0
                         const T* __restrict__ bias,           // (m,) or nullptr
                         T* __restrict__ y,                    // (M, m)
                         int rows, int n, int m, int group_size, int rank, int64_t ldx, bool x_vec,
                         bool q_vec, bool u_vec) {
  constexpr int R = kQuantRows;
  extern __shared__ float zs[];  // (M, r): z = x V^T, only with a residual
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int words = (n + kCodesPerWord - 1) / kCodesPerWord;
  const int groups = (n + group_size - 1) / group_size;
  const int tiles = (m + kQuantWarps * R - 1) / (kQuantWarps * R);

  // tile is uniform across the block, so the __syncthreads() of the first iteration is reached by every thread.
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int row0 = (tile * kQuantWarps + warp) * R;
    float acc[MT][R] = {};
    for (int w0 = lane * kWordsPerLoad; w0 < words; w0 += kWarp * kWordsPerLoad) {
      uint4 q[R];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        q[i] = load_words(qweight + static_cast<int64_t>(row0 + i) * words + w0, row0 + i < m ? words - w0 : 0,
                          q_vec);
      }
#pragma unroll
      for (int j = 0; j < kWordsPerLoad; ++j) {
        const int col = (w0 + j) * kCodesPerWord;
        if (col >= n) {
          break;
        }
        const int g = col / group_size;
        float s[R], zp[R], c[R][kCodesPerWord];
#pragma unroll
        for (int i = 0; i < R; ++i) {
          const bool live = row0 + i < m;
          const int64_t sz = static_cast<int64_t>(row0 + i) * groups + g;
          s[i] = live ? Convert<T>::to_float(scales[sz]) : 0.0f;
          zp[i] = live ? Convert<T>::to_float(zeros[sz]) : 0.0f;
          const uint32_t word = word_of(q[i], j);
#pragma unroll
          for (int e = 0; e < kCodesPerWord; ++e) {
            c[i][e] = __uint_as_float(kMagicBits | ((word >> (4 * e)) & 0xFu)) - kMagic;
          }
        }
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          float xf[kVec];
          to_float8<T>(load8(x + mi * ldx + col, mi < rows ? n - col : 0, x_vec, false), xf);
          float xsum = 0.0f;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            xsum += xf[e];
          }
#pragma unroll
          for (int i = 0; i < R; ++i) {
            float dot = 0.0f;
#pragma unroll
            for (int e = 0; e < kCodesPerWord; ++e) {
              dot = fmaf(c[i][e], xf[e], dot);
            }
            acc[mi][i] = fmaf(s[i], dot - zp[i] * xsum, acc[mi][i]);
          }
        }
      }
    }

    if (rank > 0) {
      if (tile == static_cast<int>(blockIdx.x)) {
        wait_for_producer();  // the shrink's z is complete and visible
        load_z(zs, z, rows * rank);
        __syncthreads();
      }
      for (int c0 = 0; c0 < rank; c0 += kExpandChunk) {
        uint4 w[R][kExpandVecs];
        load_u_chunk<T, R>(w, u, row0, m, rank, c0, lane, u_vec);
        fma_u_chunk<T, MT, R>(acc, w, zs, rows, rank, c0, lane);
      }
    }

    store_output_rows<T, MT, R>(acc, lane, row0, rows, m, bias, y);
  }
}

LowrankOpsStatus check_args(const QuantLowrankDecodeArgs* a, char* err, size_t err_len) {
  if (a == nullptr) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len, "quant_lowrank_decode: args must not be null");
  }
  LowrankOpsStatus status = check_dtype_and_rows("quant_lowrank_decode", a->dtype, a->rows, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  if (a->n < 1 || a->m < 1 || a->rank < 0) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode: n=%d and m=%d must be >= 1, rank=%d >= 0", a->n, a->m, a->rank);
  }
  if (a->group_size < kCodesPerWord || a->group_size % kCodesPerWord != 0) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode: group_size=%d must be a positive multiple of %d (layout v1: an "
                            "int32 word of 8 codes never straddles two groups)",
                            a->group_size, kCodesPerWord);
  }
  status = check_x_stride("quant_lowrank_decode", a->rows, a->n, a->x_row_stride, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  if (a->x == nullptr || a->qweight == nullptr || a->scales == nullptr || a->zeros == nullptr || a->y == nullptr ||
      (a->rank > 0 && (a->v == nullptr || a->u == nullptr))) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode: x, qweight, scales, zeros, y (and v, u when rank=%d > 0) must "
                            "not be null",
                            a->rank);
  }
  return LOWRANK_OPS_OK;
}

struct Plan {
  LowrankDecodeDevice device;
  LowrankShrinkPlan shrink;  // used when rank > 0
  int blocks;
  size_t smem_bytes;
};

LowrankOpsStatus make_plan(const QuantLowrankDecodeArgs* a, Plan* plan, char* err, size_t err_len) {
  const LowrankOpsStatus status = check_args(a, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  const LowrankOpsStatus device_status = lowrank_decode_device(&plan->device, err, err_len);
  if (device_status != LOWRANK_OPS_OK) {
    return device_status;
  }
  const int rows_per_block = kQuantWarps * kQuantRows;
  plan->blocks = min((a->m + rows_per_block - 1) / rows_per_block, kQuantBlocksPerSm * plan->device.sm_count);
  plan->shrink = LowrankShrinkPlan{};
  plan->smem_bytes = 0;
  if (a->rank > 0) {
    plan->shrink = lowrank_shrink_plan(a->rows, a->n, a->rank, plan->device.sm_count);
    plan->smem_bytes = sizeof(float) * static_cast<size_t>(a->rows) * a->rank;
  }
  if (plan->smem_bytes > plan->device.smem_optin_bytes) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode: rows * rank * 4 = %zu bytes of z must fit one block's shared "
                            "memory (%zu bytes on this device): rows=%d, rank=%d",
                            plan->smem_bytes, plan->device.smem_optin_bytes, a->rows, a->rank);
  }
  return LOWRANK_OPS_OK;
}

template <typename T, int MT>
LowrankOpsStatus launch(const QuantLowrankDecodeArgs* a, const Plan& plan, cudaStream_t stream, char* err,
                        size_t err_len) {
  auto kernel = quant_lowrank_kernel<T, MT>;
  LOWRANK_OPS_CUDA_CHECK(allow_dynamic_smem(kernel, plan.smem_bytes));
  const int words = (a->n + kCodesPerWord - 1) / kCodesPerWord;
  const bool x_vec = a->n % kVec == 0 && a->x_row_stride % kVec == 0 && aligned16(a->x);
  const bool q_vec = words % kWordsPerLoad == 0 && aligned16(a->qweight);
  const bool u_vec = a->rank % kVec == 0 && aligned16(a->u);
  const T* x = static_cast<const T*>(a->x);
  const T* scales = static_cast<const T*>(a->scales);
  const T* zeros = static_cast<const T*>(a->zeros);
  const T* u = static_cast<const T*>(a->u);
  const T* bias = static_cast<const T*>(a->bias);
  T* y = static_cast<T*>(a->y);
  if (a->rank > 0) {
    const LowrankOpsStatus counters =
        lowrank_shrink_check_counters("quant_lowrank_decode", a->rank, a->counters, a->counter_count, err, err_len);
    if (counters != LOWRANK_OPS_OK) {
      return counters;
    }
    const LowrankOpsStatus shrink = lowrank_shrink_launch(a->dtype, a->rows, a->n, a->rank, a->x, a->x_row_stride,
                                                          a->v, a->workspace, a->counters, &plan.shrink, stream, err,
                                                          err_len);
    if (shrink != LOWRANK_OPS_OK) {
      return shrink;
    }
    LOWRANK_OPS_CUDA_CHECK(launch_dependent(kernel, plan.device.pdl, plan.blocks, kQuantThreads, plan.smem_bytes, stream, x,
                                            a->qweight, scales, zeros,
                                            lowrank_shrink_z(a->workspace, &plan.shrink, a->rows, a->rank), u, bias, y,
                                            a->rows, a->n, a->m, a->group_size, a->rank, a->x_row_stride, x_vec,
                                            q_vec, u_vec));
  } else {
    kernel<<<plan.blocks, kQuantThreads, 0, stream>>>(x, a->qweight, scales, zeros, nullptr, nullptr, bias, y,
                                                      a->rows, a->n, a->m, a->group_size, 0, a->x_row_stride,
                                                      x_vec, q_vec, false);
  }
  LOWRANK_OPS_CUDA_CHECK(cudaGetLastError());
  return LOWRANK_OPS_OK;
}

template <typename T>
LowrankOpsStatus launch_tile(const QuantLowrankDecodeArgs* a, const Plan& plan, cudaStream_t stream, char* err,
                             size_t err_len) {
  switch (row_tile(a->rows)) {
    case 1:
      return launch<T, 1>(a, plan, stream, err, err_len);
    case 2:
      return launch<T, 2>(a, plan, stream, err, err_len);
    case 4:
      return launch<T, 4>(a, plan, stream, err, err_len);
    case 8:
      return launch<T, 8>(a, plan, stream, err, err_len);
    default:
      return launch<T, 16>(a, plan, stream, err, err_len);
  }
}

}  // namespace
}  // namespace lowrank_ops_decode

using namespace lowrank_ops_decode;

extern "C" LowrankOpsStatus quant_lowrank_decode_workspace_bytes(const QuantLowrankDecodeArgs* args, size_t* bytes,
                                                                 char* err, size_t err_len) {
  Plan plan;
  const LowrankOpsStatus status = make_plan(args, &plan, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  *bytes = args->rank > 0 ? plan.shrink.workspace_bytes : 0;
  return LOWRANK_OPS_OK;
}

extern "C" LowrankOpsStatus quant_lowrank_decode(const QuantLowrankDecodeArgs* args, cudaStream_t stream, char* err,
                                                 size_t err_len) {
  Plan plan;
  const LowrankOpsStatus status = make_plan(args, &plan, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  if (args->rank > 0 && (args->workspace == nullptr || args->workspace_bytes < plan.shrink.workspace_bytes)) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode: workspace of %zu bytes is smaller than the %zu bytes "
                            "quant_lowrank_decode_workspace_bytes asks for",
                            args->workspace == nullptr ? static_cast<size_t>(0) : args->workspace_bytes,
                            plan.shrink.workspace_bytes);
  }
  return args->dtype == LOWRANK_OPS_FLOAT16 ? launch_tile<__half>(args, plan, stream, err, err_len)
                                            : launch_tile<__nv_bfloat16>(args, plan, stream, err, err_len);
}
