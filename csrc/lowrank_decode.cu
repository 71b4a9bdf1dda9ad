// Low-rank decode GEMV y = U (V x) + b, M = 1 .. 16 rows, fp16 / bf16 in, fp32 accumulation (lowrank_decode.h).
//
// Shapes: x (M, n), V (r, n), U (m, r), b (m,), y (M, m). At decode the op is a pure byte stream: 4096^2 with
// r = 256 moves V and U once, 4 MB, 1.25 us at the H100's 3.0 TB/s (docs/FACTS.md); the FLOPs (2 M r (m + n)) are
// noise at M = 1. The kernels are built to keep ~all of those bytes in flight at once:
//
//   shrink  partial[s, i, j] = sum_{k in slice s} x[i, k] V[j, k]     (S, M, r) fp32, S slices of n
//           z[i, j] = sum_s partial[s, i, j]                            (M, r), by the last-arriving warp of each j
//   expand  y[i, o] = sum_j U[o, j] z[i, j] + b[o]                      z staged in shared memory
//
// Shrink: one warp owns kShrinkRows rows of V and one slice of n; each lane issues kShrinkVecs 16-byte loads per
// row per 512-column chunk before any arithmetic (evict-first: V is read once), then multiplies them with the M
// rows of x (normal loads: x is re-read by every warp and stays in L1 / L2). Split-K (S > 1) exists because r rows
// of V are too few warps to stream V at full bandwidth: r = 256 gives 128 warps, one per SM; S = 8 gives 1024.
// S is sized from the SM count (kShrinkWarpsPerSm). Split-K handoff (issue 19, part 4): the S warps of one group of
// rows each store their partial sums and count their arrival on the group's counter (`last_arrival`: fence,
// atomicAdd); the last to arrive sums the S partials in the fixed order s = 0 .. S - 1 (deterministic, whichever
// warp is last), writes z and resets the counter. Counters are zero before and after every launch (one buffer per
// stream, zeroed once by the caller: no memset per call, CUDA graph replays included). Before, every consumer
// block re-read all S partials (S * M * r * 4 bytes per block), which capped S at 4 for M = 16 on 4096^2, r = 256.
//
// Expand: one warp owns R rows of U (4 at M <= 4, 8 above: the z loads from shared memory are shared by R rows);
// the block stages z (M, r) fp32 in shared memory. At r <= kExpandChunk (256) a warp's first chunk of U is all of
// its rows of U, fetched before wait_for_producer().
//
// Why two kernels chained with programmatic dependent launch (PDL, sm_90+; on sm_80 the same two kernels run in plain
// stream order) and not one kernel with a grid-wide handoff:
// the expand grid is launched while the shrink runs (the shrink triggers at its first instruction) and each warp
// loads its first chunk of U -- all of U, half of the op's bytes, at r = 256 -- before wait_for_producer(), so
// the launch gap and the U fetch overlap the shrink. A single kernel would need every block co-resident (a
// cooperative launch, or a grid capped at occupancy) plus a device-scope barrier (a counter in memory that must be
// reset, spinning warps that hold SM slots the V stream needs), and would tie the shrink and expand grid sizes
// together; PDL needs none of that and works inside CUDA graphs. Measuring the two against each other is left to
// the H100 session (benchmarks/bench_lowrank_matmul.py, provider lowrank_ops_cuda).
// The shrink itself is a plain launch (not PDL), so it can never read an x, V or U that the previous kernel in the
// stream is still writing (an optimizer step right before a forward); the expand's early U loads are safe because
// the expand can only start once the shrink has started, i.e. after everything before it finished.
//
// Awkward shapes: the 16-byte path needs n % 8 == 0 (shrink) or r % 8 == 0 (expand) and 16-byte aligned base
// pointers and row strides; otherwise the same loops run with masked 2-byte loads (n = 4095, r = 1 / 24 / 200 are
// all legal). Every chunk masks its tail, rows beyond r or m are masked, M < M-tile rows compute on zeros.
// Offsets into V, U, x are int64. Every launch is checked: cudaLaunchKernelEx's return value and cudaGetLastError().

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_status.h"
#include "decode_common.cuh"
#include "lowrank_decode.h"

namespace lowrank_ops_decode {
namespace {

// Shrink: 4 warps per block -- small blocks spread a few hundred warp tasks over all 132 SMs instead of a few.
constexpr int kShrinkThreads = 128;
constexpr int kShrinkWarps = kShrinkThreads / kWarp;
// 2 rows of V per warp: each x vector loaded from L1 serves two rows (at M = 16 x traffic is 16x V's per row).
constexpr int kShrinkRows = 2;
// 2 vectors per lane per row per chunk: 4 independent 16-byte loads in flight per lane, 2 KB per warp.
constexpr int kShrinkVecs = 2;
constexpr int kShrinkChunk = kWarp * kVec * kShrinkVecs;  // 512 columns of n
// Target warp tasks per SM: 16 x 2 KB = 32 KB in flight per SM, 4.2 MB on 132 SMs -- above the ~2.4 MB that
// 3 TB/s x ~0.8 us of DRAM latency needs in flight to sustain bandwidth.
constexpr int kShrinkWarpsPerSm = 16;

// Expand: 8 warps per block share one copy of z in shared memory.
constexpr int kExpandThreads = 256;
constexpr int kExpandWarps = kExpandThreads / kWarp;
// Expand blocks per SM the grid is capped at: every block re-reads the S partials, so the grid stays near the
// SM count and loops over row tiles beyond that.
constexpr int kExpandBlocksPerSm = 2;

__host__ __device__ constexpr int expand_rows(int tile) { return tile <= 4 ? 4 : 8; }

static_assert(kMaxRows * kShrinkRows <= kWarp, "the last-arrival reduction gives each lane one (row, column) of z");

template <typename T, int MT>
__global__ void __launch_bounds__(kShrinkThreads)
    lowrank_shrink_kernel(const T* __restrict__ x,             // (M, n), row stride ldx
                          const T* __restrict__ v,             // (r, n)
                          float* __restrict__ partial,         // (S, M, r) partial sums, then z (M, r)
                          unsigned int* __restrict__ counters,  // (ceil(r / kShrinkRows),) zero before and after
                          int rows, int n, int rank, int64_t ldx, int splits, int chunks_per_slice, bool x_vec,
                          bool v_vec) {
  // The consumer (expand / quant kernel) may launch now: before its wait_for_producer() it only reads weights,
  // which this kernel does not write; the wait covers this whole grid and its writes.
  allow_dependent_launch();
  const int lane = threadIdx.x % kWarp;
  const int groups = (rank + kShrinkRows - 1) / kShrinkRows;
  const int task = blockIdx.x * kShrinkWarps + threadIdx.x / kWarp;
  if (task >= groups * splits) {
    return;
  }
  const int group = task % groups;  // neighbouring warps: neighbouring rows of V, the same slice of x (L1 reuse)
  const int slice = task / groups;
  const int j0 = group * kShrinkRows;
  const int k_begin = slice * chunks_per_slice * kShrinkChunk;
  const int k_end = min(n, k_begin + chunks_per_slice * kShrinkChunk);

  float acc[MT][kShrinkRows] = {};
  for (int k0 = k_begin; k0 < k_end; k0 += kShrinkChunk) {
    uint4 w[kShrinkRows][kShrinkVecs];
#pragma unroll
    for (int i = 0; i < kShrinkRows; ++i) {
#pragma unroll
      for (int c = 0; c < kShrinkVecs; ++c) {
        const int k = k0 + (c * kWarp + lane) * kVec;
        w[i][c] = load8(v + static_cast<int64_t>(j0 + i) * n + k, j0 + i < rank ? n - k : 0, v_vec, true);
      }
    }
    float wf[kShrinkRows][kShrinkVecs][kVec];
#pragma unroll
    for (int i = 0; i < kShrinkRows; ++i) {
#pragma unroll
      for (int c = 0; c < kShrinkVecs; ++c) {
        to_float8<T>(w[i][c], wf[i][c]);
      }
    }
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
      for (int c = 0; c < kShrinkVecs; ++c) {
        const int k = k0 + (c * kWarp + lane) * kVec;
        float xf[kVec];
        to_float8<T>(load8(x + mi * ldx + k, mi < rows ? n - k : 0, x_vec, false), xf);
#pragma unroll
        for (int i = 0; i < kShrinkRows; ++i) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            acc[mi][i] = fmaf(wf[i][c][e], xf[e], acc[mi][i]);
          }
        }
      }
    }
  }

  warp_reduce_and_store(acc, lane, [&](int mi, int i, float sum) {
    const int j = j0 + i;
    if (mi < rows && j < rank) {
      partial[(static_cast<int64_t>(slice) * rows + mi) * rank + j] = sum;
    }
  });
  if (!last_arrival(counters + group, splits, lane)) {
    return;
  }
  // The last of the group's S warps: z[mi, j] = sum_s partial[s, mi, j] in the fixed order s = 0 .. S - 1, so the
  // bits do not depend on which warp arrived last. rows x kShrinkRows <= 32 sums: one per lane.
  float* z = partial + static_cast<int64_t>(splits) * rows * rank;
  const int mi = lane / kShrinkRows;
  const int j = j0 + lane % kShrinkRows;
  if (mi < rows && j < rank) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) {
      sum += partial[(static_cast<int64_t>(s) * rows + mi) * rank + j];
    }
    z[static_cast<int64_t>(mi) * rank + j] = sum;
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kExpandThreads)
    lowrank_expand_kernel(const float* __restrict__ z,  // (M, r), written by the shrink
                          const T* __restrict__ u,      // (m, r)
                          const T* __restrict__ bias,   // (m,) or nullptr
                          T* __restrict__ y,            // (M, m)
                          int rows, int m, int rank, bool u_vec) {
  constexpr int R = expand_rows(MT);
  extern __shared__ float zs[];  // (M, r): z = x V^T
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int tiles = (m + kExpandWarps * R - 1) / (kExpandWarps * R);

  // U does not depend on the shrink: fetch the first chunk while the shrink still runs.
  uint4 w[R][kExpandVecs];
  load_u_chunk<T, R>(w, u, (blockIdx.x * kExpandWarps + warp) * R, m, rank, 0, lane, u_vec);
  wait_for_producer();
  load_z(zs, z, rows * rank);
  __syncthreads();

  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int row0 = (tile * kExpandWarps + warp) * R;
    float acc[MT][R] = {};
    for (int c0 = 0; c0 < rank; c0 += kExpandChunk) {
      if (tile != static_cast<int>(blockIdx.x) || c0 != 0) {
        load_u_chunk<T, R>(w, u, row0, m, rank, c0, lane, u_vec);
      }
      fma_u_chunk<T, MT, R>(acc, w, zs, rows, rank, c0, lane);
    }
    store_output_rows<T, MT, R>(acc, lane, row0, rows, m, bias, y);
  }
}

int expand_blocks(int m, int tile, int sm_count) {
  const int rows_per_block = kExpandWarps * expand_rows(tile);
  return min((m + rows_per_block - 1) / rows_per_block, kExpandBlocksPerSm * sm_count);
}

LowrankOpsStatus check_args(const LowrankDecodeArgs* a, char* err, size_t err_len) {
  if (a == nullptr) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len, "lowrank_decode: args must not be null");
  }
  LowrankOpsStatus status = check_dtype_and_rows("lowrank_decode", a->dtype, a->rows, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  if (a->n < 1 || a->m < 1 || a->rank < 1) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "lowrank_decode: n=%d, m=%d and rank=%d must all be >= 1", a->n, a->m, a->rank);
  }
  status = check_x_stride("lowrank_decode", a->rows, a->n, a->x_row_stride, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  if (a->x == nullptr || a->v == nullptr || a->u == nullptr || a->y == nullptr) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len, "lowrank_decode: x, v, u and y must not be null");
  }
  return LOWRANK_OPS_OK;
}

struct Plan {
  LowrankDecodeDevice device;
  LowrankShrinkPlan shrink;
  int tile;
  int expand_blocks;
  size_t smem_bytes;
};

LowrankOpsStatus make_plan(const LowrankDecodeArgs* a, Plan* plan, char* err, size_t err_len) {
  const LowrankOpsStatus status = check_args(a, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  const LowrankOpsStatus device_status = lowrank_decode_device(&plan->device, err, err_len);
  if (device_status != LOWRANK_OPS_OK) {
    return device_status;
  }
  plan->tile = row_tile(a->rows);
  plan->expand_blocks = expand_blocks(a->m, plan->tile, plan->device.sm_count);
  plan->shrink = lowrank_shrink_plan(a->rows, a->n, a->rank, plan->device.sm_count);
  plan->smem_bytes = sizeof(float) * static_cast<size_t>(a->rows) * a->rank;
  if (plan->smem_bytes > plan->device.smem_optin_bytes) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "lowrank_decode: rows * rank * 4 = %zu bytes of z must fit one block's shared memory "
                            "(%zu bytes on this device): rows=%d, rank=%d",
                            plan->smem_bytes, plan->device.smem_optin_bytes, a->rows, a->rank);
  }
  return LOWRANK_OPS_OK;
}

template <typename T, int MT>
LowrankOpsStatus launch_expand(const LowrankDecodeArgs* a, const Plan& plan, cudaStream_t stream, char* err,
                               size_t err_len) {
  auto kernel = lowrank_expand_kernel<T, MT>;
  LOWRANK_OPS_CUDA_CHECK(allow_dynamic_smem(kernel, plan.smem_bytes));
  const bool u_vec = a->rank % kVec == 0 && aligned16(a->u);
  LOWRANK_OPS_CUDA_CHECK(launch_dependent(kernel, plan.device.pdl, plan.expand_blocks, kExpandThreads, plan.smem_bytes, stream,
                                          lowrank_shrink_z(a->workspace, &plan.shrink, a->rows, a->rank),
                                          static_cast<const T*>(a->u), static_cast<const T*>(a->bias),
                                          static_cast<T*>(a->y), a->rows, a->m, a->rank, u_vec));
  LOWRANK_OPS_CUDA_CHECK(cudaGetLastError());
  return LOWRANK_OPS_OK;
}

template <typename T>
LowrankOpsStatus launch_expand_tile(const LowrankDecodeArgs* a, const Plan& plan, cudaStream_t stream, char* err,
                                    size_t err_len) {
  switch (plan.tile) {
    case 1:
      return launch_expand<T, 1>(a, plan, stream, err, err_len);
    case 2:
      return launch_expand<T, 2>(a, plan, stream, err, err_len);
    case 4:
      return launch_expand<T, 4>(a, plan, stream, err, err_len);
    case 8:
      return launch_expand<T, 8>(a, plan, stream, err, err_len);
    default:
      return launch_expand<T, 16>(a, plan, stream, err, err_len);
  }
}

template <typename T, int MT>
cudaError_t launch_shrink(int rows, int n, int rank, const void* x, int64_t ldx, const void* v, float* partial,
                          unsigned int* counters, const LowrankShrinkPlan& plan, cudaStream_t stream) {
  const bool x_vec = n % kVec == 0 && ldx % kVec == 0 && aligned16(x);
  const bool v_vec = n % kVec == 0 && aligned16(v);
  lowrank_shrink_kernel<T, MT><<<plan.blocks, kShrinkThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(v), partial, counters, rows, n, rank, ldx, plan.splits,
      plan.chunks_per_slice, x_vec, v_vec);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_shrink_tile(int rows, int n, int rank, const void* x, int64_t ldx, const void* v, float* partial,
                               unsigned int* counters, const LowrankShrinkPlan& plan, cudaStream_t stream) {
  switch (row_tile(rows)) {
    case 1:
      return launch_shrink<T, 1>(rows, n, rank, x, ldx, v, partial, counters, plan, stream);
    case 2:
      return launch_shrink<T, 2>(rows, n, rank, x, ldx, v, partial, counters, plan, stream);
    case 4:
      return launch_shrink<T, 4>(rows, n, rank, x, ldx, v, partial, counters, plan, stream);
    case 8:
      return launch_shrink<T, 8>(rows, n, rank, x, ldx, v, partial, counters, plan, stream);
    default:
      return launch_shrink<T, 16>(rows, n, rank, x, ldx, v, partial, counters, plan, stream);
  }
}

}  // namespace
}  // namespace lowrank_ops_decode

using namespace lowrank_ops_decode;

extern "C" LowrankOpsStatus lowrank_decode_device(LowrankDecodeDevice* out, char* err, size_t err_len) {
  int device = 0, sms = 0, smem_optin = 0, major = 0;
  LOWRANK_OPS_CUDA_CHECK(cudaGetDevice(&device));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  out->sm_count = sms;
  out->smem_optin_bytes = static_cast<size_t>(smem_optin);
  out->pdl = major >= 9 ? 1 : 0;
  return LOWRANK_OPS_OK;
}

// S = the number of slices of n:
// - enough warp tasks for the SMs: groups * S >= kShrinkWarpsPerSm * sm_count (groups = ceil(r / 2));
// - at most one slice per 512-column chunk; then the chunks are spread evenly (S recomputed so no slice is empty).
// Nothing else caps S: the last-arriving warp of each group reduces the S partial sums once (S * rows * r * 4 bytes
// read from L2 in all), and each consumer block reads z alone. (Before, every consumer block re-read all S partials,
// so S was capped at (m + n) / (2 rows consumer_blocks): 4 at M = 16 on 4096^2, r = 256.)
extern "C" LowrankShrinkPlan lowrank_shrink_plan(int rows, int n, int rank, int sm_count) {
  const int chunks = (n + kShrinkChunk - 1) / kShrinkChunk;
  const int groups = lowrank_shrink_counters(rank);
  const int want = (kShrinkWarpsPerSm * sm_count + groups - 1) / groups;
  const int splits = max(1, min(want, chunks));
  LowrankShrinkPlan plan;
  plan.chunks_per_slice = (chunks + splits - 1) / splits;
  plan.splits = (chunks + plan.chunks_per_slice - 1) / plan.chunks_per_slice;
  plan.blocks = (groups * plan.splits + kShrinkWarps - 1) / kShrinkWarps;
  plan.workspace_bytes = sizeof(float) * static_cast<size_t>(plan.splits + 1) * rows * rank;
  return plan;
}

extern "C" int lowrank_shrink_counters(int rank) { return (rank + kShrinkRows - 1) / kShrinkRows; }

extern "C" LowrankOpsStatus lowrank_shrink_check_counters(const char* op, int rank, const unsigned int* counters,
                                                          size_t counter_count, char* err, size_t err_len) {
  const size_t needed = static_cast<size_t>(lowrank_shrink_counters(rank));
  if (counters == nullptr || counter_count < needed) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "%s: %zu arrival counters given, lowrank_shrink_counters(rank=%d) = %zu needed (zeroed "
                            "once, left zero by every call)",
                            op, counters == nullptr ? static_cast<size_t>(0) : counter_count, rank, needed);
  }
  return LOWRANK_OPS_OK;
}

extern "C" LowrankOpsStatus lowrank_shrink_launch(LowrankOpsDtype dtype, int rows, int n, int rank, const void* x,
                                                  int64_t x_row_stride, const void* v, float* partial,
                                                  unsigned int* counters, const LowrankShrinkPlan* plan,
                                                  cudaStream_t stream, char* err, size_t err_len) {
  if (dtype == LOWRANK_OPS_FLOAT16) {
    LOWRANK_OPS_CUDA_CHECK(
        launch_shrink_tile<__half>(rows, n, rank, x, x_row_stride, v, partial, counters, *plan, stream));
  } else {
    LOWRANK_OPS_CUDA_CHECK(
        launch_shrink_tile<__nv_bfloat16>(rows, n, rank, x, x_row_stride, v, partial, counters, *plan, stream));
  }
  return LOWRANK_OPS_OK;
}

extern "C" LowrankOpsStatus lowrank_decode_workspace_bytes(const LowrankDecodeArgs* args, size_t* bytes, char* err,
                                                           size_t err_len) {
  Plan plan;
  const LowrankOpsStatus status = make_plan(args, &plan, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  *bytes = plan.shrink.workspace_bytes;
  return LOWRANK_OPS_OK;
}

extern "C" LowrankOpsStatus lowrank_decode(const LowrankDecodeArgs* args, cudaStream_t stream, char* err,
                                           size_t err_len) {
  Plan plan;
  const LowrankOpsStatus status = make_plan(args, &plan, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  if (args->workspace == nullptr || args->workspace_bytes < plan.shrink.workspace_bytes) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "lowrank_decode: workspace of %zu bytes is smaller than the %zu bytes "
                            "lowrank_decode_workspace_bytes asks for",
                            args->workspace == nullptr ? static_cast<size_t>(0) : args->workspace_bytes,
                            plan.shrink.workspace_bytes);
  }
  const LowrankOpsStatus counters =
      lowrank_shrink_check_counters("lowrank_decode", args->rank, args->counters, args->counter_count, err, err_len);
  if (counters != LOWRANK_OPS_OK) {
    return counters;
  }
  const LowrankOpsStatus shrink =
      lowrank_shrink_launch(args->dtype, args->rows, args->n, args->rank, args->x, args->x_row_stride, args->v,
                            args->workspace, args->counters, &plan.shrink, stream, err, err_len);
  if (shrink != LOWRANK_OPS_OK) {
    return shrink;
  }
  return args->dtype == LOWRANK_OPS_FLOAT16 ? launch_expand_tile<__half>(args, plan, stream, err, err_len)
                                            : launch_expand_tile<__nv_bfloat16>(args, plan, stream, err, err_len);
}
