// Device helpers shared by the decode kernels (lowrank_decode.cu, quant_lowrank_decode.cu): 16-byte loads with a
// scalar fallback, fp16 / bf16 <-> fp32 conversion, the warp reduction of many accumulators, the residual expand
// y += U z over a z held in shared memory, and the template dispatch on the row count M. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>
#include <string.h>

#include "cuda_status.h"
#include "lowrank_decode.h"

namespace lowrank_ops_decode {

constexpr int kWarp = 32;
// fp16 / bf16 elements in one 16-byte vector, the widest load a thread can issue (LDG.E.128).
constexpr int kVec = 8;
// Decode means M <= kMaxRows rows of x (the op's DECODE_MAX_M); templates exist for M tiles 1, 2, 4, 8, 16.
constexpr int kMaxRows = 16;

template <typename T>
struct Convert;

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float2 pair(uint32_t bits) {
    __half2 h;
    memcpy(&h, &bits, sizeof(h));
    return __half22float2(h);
  }
  static __device__ __forceinline__ __half from_float(float f) { return __float2half_rn(f); }
  static __device__ __forceinline__ float to_float(__half h) { return __half2float(h); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float2 pair(uint32_t bits) {
    __nv_bfloat162 h;
    memcpy(&h, &bits, sizeof(h));
    return __bfloat1622float2(h);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float f) { return __float2bfloat16_rn(f); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 h) { return __bfloat162float(h); }
};

// Elements p[0 .. valid) (valid clamped to [0, 8]) as the raw bits of one 16-byte vector, zero bits (+0.0) beyond.
// vec: one 16-byte load, legal only when p is 16-byte aligned and valid is 0 or 8 (the caller proves both for the
// whole launch: n % 8 == 0, aligned base pointers and row strides); else up to 8 masked 2-byte loads. `stream`
// loads with the evict-first hint (weights are read once; keep L1 / L2 for x and the partial sums).
template <typename T>
__device__ __forceinline__ uint4 load8(const T* p, int valid, bool vec, bool stream) {
  uint4 out = make_uint4(0u, 0u, 0u, 0u);
  if (valid <= 0) {
    return out;
  }
  if (vec) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    return stream ? __ldcs(q) : __ldg(q);
  }
  const unsigned short* s = reinterpret_cast<const unsigned short*>(p);
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    if (e < valid) {
      w[e / 2] |= static_cast<uint32_t>(__ldg(s + e)) << (16 * (e % 2));
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T>
__device__ __forceinline__ void to_float8(const uint4& raw, float (&f)[kVec]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = Convert<T>::pair(w[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

// Sums each of the N accumulators of every lane over the warp. A butterfly per value would cost 5 N shuffles; this
// halves the live values at each step instead (a lane keeps one half, sends the other to its partner at `offset`),
// N / 2 + N / 4 + ... shuffles in all (62 for N = 64), then finishes with a butterfly once one value is left.
// Afterwards lane l holds reduced_count<N>() values; value j is the warp sum of accumulator reduced_index(l, j), and
// lanes for which reduced_writer(l) is false hold duplicates.
template <int N, int ACTIVE = N, int OFFSET = kWarp / 2>
__device__ __forceinline__ void warp_reduce_many(float (&v)[N], int lane) {
  if constexpr (OFFSET > 0) {
    if constexpr (ACTIVE == 1) {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], OFFSET);
      warp_reduce_many<N, 1, OFFSET / 2>(v, lane);
    } else {
      constexpr int kHalf = ACTIVE / 2;
      const bool upper = (lane & OFFSET) != 0;
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFFSET);
      }
      warp_reduce_many<N, kHalf, OFFSET / 2>(v, lane);
    }
  }
}

template <int N>
__host__ __device__ constexpr int reduced_count() {
  return N >= kWarp ? N / kWarp : 1;
}

// Accumulator index of value j held by `lane` after warp_reduce_many<N>: each halving step at `offset` moved the
// upper half to the lanes with that bit set.
template <int N>
__device__ __forceinline__ int reduced_index(int lane, int j) {
  int index = j;
  int active = N;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    if (active > 1) {
      active /= 2;
      index += (lane & offset) ? active : 0;
    }
  }
  return index;
}

// True for the one lane of each group of duplicates (the butterfly steps made the lanes differing in those bits
// equal); it writes the result.
template <int N>
__device__ __forceinline__ bool reduced_writer(int lane) {
  int active = N;
  bool writer = true;
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    if (active > 1) {
      active /= 2;
    } else if (lane & offset) {
      writer = false;
    }
  }
  return writer;
}

// Residual expand over one chunk of the rank: columns c0 + (v * 32 + lane) * 8 + e of R rows of U, row0 .. row0 + R.
// kExpandVecs 16-byte vectors per lane per row: one, so a chunk is 256 columns and R rows put R x 512 B per warp in
// flight (the kernels pick R to have enough of them resident).
constexpr int kExpandVecs = 1;
constexpr int kExpandChunk = kWarp * kVec * kExpandVecs;

template <typename T, int R>
__device__ __forceinline__ void load_u_chunk(uint4 (&w)[R][kExpandVecs], const T* __restrict__ u,  // (m, r)
                                             int row0, int m, int r, int c0, int lane, bool vec) {
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int v = 0; v < kExpandVecs; ++v) {
      const int col = c0 + (v * kWarp + lane) * kVec;
      const int valid = row0 + i < m ? r - col : 0;
      w[i][v] = load8(u + static_cast<int64_t>(row0 + i) * r + col, valid, vec, true);
    }
  }
}

// acc[mi][i] += sum_c U[row0 + i, c] z[mi, c] over the chunk's columns; z (M, r) fp32 in shared memory.
template <typename T, int MT, int R>
__device__ __forceinline__ void fma_u_chunk(float (&acc)[MT][R], const uint4 (&w)[R][kExpandVecs],
                                            const float* zs,  // (M, r) shared
                                            int rows, int r, int c0, int lane) {
#pragma unroll
  for (int v = 0; v < kExpandVecs; ++v) {
    const int col = c0 + (v * kWarp + lane) * kVec;
    const int valid = min(r - col, kVec);
    if (valid <= 0) {
      continue;
    }
    float uf[R][kVec];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      to_float8<T>(w[i][v], uf[i]);
    }
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      if (mi >= rows) {
        break;
      }
      float z[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        z[e] = e < valid ? zs[mi * r + col + e] : 0.0f;  // U's zero bits beyond r make z's value irrelevant
      }
#pragma unroll
      for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          acc[mi][i] = fmaf(uf[i][e], z[e], acc[mi][i]);
        }
      }
    }
  }
}

// The epilogue of every decode kernel: acc[mi][i] holds this lane's partial sums of output (mi, i) of a warp
// tile; reduce them over the warp and call store(mi, i, sum) once per output, from one lane (bounds checks are the
// store's).
template <int MT, int R, typename Store>
__device__ __forceinline__ void warp_reduce_and_store(const float (&acc)[MT][R], int lane, Store store) {
  constexpr int kN = MT * R;
  float flat[kN];
#pragma unroll
  for (int t = 0; t < kN; ++t) {
    flat[t] = acc[t / R][t % R];
  }
  warp_reduce_many<kN>(flat, lane);
  if (!reduced_writer<kN>(lane)) {
    return;
  }
#pragma unroll
  for (int t = 0; t < reduced_count<kN>(); ++t) {
    const int index = reduced_index<kN>(lane, t);
    store(index / R, index % R, flat[t]);
  }
}

// The kernels that write y (M, m): y[mi, row0 + i] = sum + b (b optional), in T.
template <typename T, int MT, int R>
__device__ __forceinline__ void store_output_rows(const float (&acc)[MT][R], int lane, int row0, int rows, int m,
                                                  const T* __restrict__ bias, T* __restrict__ y) {
  warp_reduce_and_store(acc, lane, [&](int mi, int i, float sum) {
    const int o = row0 + i;
    if (mi < rows && o < m) {
      const float b = bias != nullptr ? Convert<T>::to_float(bias[o]) : 0.0f;
      y[static_cast<int64_t>(mi) * m + o] = Convert<T>::from_float(sum + b);
    }
  });
}

// Split-K handoff (the shrink of lowrank_decode.cu, the int4 v2 kernel of quant_lowrank_decode_v2.cu). Each of the
// `arrivals` warps that computed one slice of a group's partial sums calls this after storing them; it returns true,
// in every lane, for the warp that arrives last, which then sees every other slice's partial sums, and sets the
// counter back to 0 for the next launch (CUDA graph replays included): counters are zero before and after every
// launch, so no memset is needed. The fence before the arrival publishes this lane's stores device-wide (release);
// the fence after it orders the last warp's reads after the other arrivals (acquire); __syncwarp orders the lanes'
// fences and reads around lane 0's atomic.
__device__ __forceinline__ bool last_arrival(unsigned int* counter, int arrivals, int lane) {
  __threadfence();
  __syncwarp();
  unsigned int ticket = 0u;
  if (lane == 0) {
    ticket = atomicAdd(counter, 1u);
  }
  ticket = __shfl_sync(0xffffffffu, ticket, 0);
  if (ticket != static_cast<unsigned int>(arrivals - 1)) {
    return false;
  }
  if (lane == 0) {
    *counter = 0u;
  }
  __threadfence();
  __syncwarp();
  return true;
}

// Dynamic shared memory above the default 48 KB per block needs a per-kernel opt-in.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) {
    return cudaSuccess;
  }
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// zs[i] = z[i] for i < count = M r: z = x V^T, reduced once from its split-K partial sums by the shrink
// (lowrank_decode.cu), read by the whole block.
__device__ __forceinline__ void load_z(float* zs, const float* __restrict__ z, int count) {
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    zs[i] = z[i];
  }
}

// The M tile a launch with `rows` rows of x instantiates: the smallest of 1, 2, 4, 8, 16 that holds them, so the
// accumulators acc[MT][R] stay in registers (fully unrolled, compile-time indices); 0 when rows is outside
// 1 .. kMaxRows.
inline int row_tile(int rows) {
  if (rows < 1 || rows > kMaxRows) {
    return 0;
  }
  int tile = 1;
  while (tile < rows) {
    tile *= 2;
  }
  return tile;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Argument checks every decode entry point (`op` names it in the message) makes: the activation dtype and the row
// count a template exists for.
inline LowrankOpsStatus check_dtype_and_rows(const char* op, LowrankOpsDtype dtype, int rows, char* err,
                                             size_t err_len) {
  if (dtype != LOWRANK_OPS_FLOAT16 && dtype != LOWRANK_OPS_BFLOAT16) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "%s: dtype=%d must be LOWRANK_OPS_FLOAT16 or LOWRANK_OPS_BFLOAT16", op,
                            static_cast<int>(dtype));
  }
  if (row_tile(rows) == 0) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len, "%s: rows=%d must be in 1 .. %d", op, rows,
                            kMaxRows);
  }
  return LOWRANK_OPS_OK;
}

// Rows of x (row stride x_row_stride elements) must not overlap.
inline LowrankOpsStatus check_x_stride(const char* op, int rows, int n, int64_t x_row_stride, char* err,
                                       size_t err_len) {
  if (x_row_stride < n && rows > 1) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "%s: x_row_stride=%lld must be >= n=%d (rows of x must not overlap)", op,
                            static_cast<long long>(x_row_stride), n);
  }
  return LOWRANK_OPS_OK;
}

// Programmatic dependent launch (PDL) exists from sm_90 on. The device side compiles to nothing for older
// architectures (the sm_80 image), where the host never asks for it (`launch_dependent` with programmatic = false),
// so the consumer simply starts after the producer has finished, as any stream-ordered launch. The CPU emulator
// (tests/cuda_emu, LOWRANK_OPS_CUDA_EMU) models PDL: a dependent's reads of its producer's writes before the wait
// see poison.
//
// Producer: the next kernel in the stream may launch now (it must still wait before reading our writes).
__device__ __forceinline__ void allow_dependent_launch() {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(LOWRANK_OPS_CUDA_EMU)
  cudaTriggerProgrammaticLaunchCompletion();
#endif
}

// Consumer: wait until the previous grid has finished and its writes are visible.
__device__ __forceinline__ void wait_for_producer() {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(LOWRANK_OPS_CUDA_EMU)
  cudaGridDependencySynchronize();
#endif
}

// Launches `kernel`; with `programmatic` (sm_90+ devices) as a PDL launch: the grid may start while the previous
// kernel in the stream still runs, once every block of that kernel has called allow_dependent_launch() (or exited);
// the kernel must call wait_for_producer() before it reads anything that kernel writes.
template <typename... Params, typename... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), int programmatic, int blocks, int threads, size_t smem_bytes,
                             cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = programmatic != 0 ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

}  // namespace lowrank_ops_decode
