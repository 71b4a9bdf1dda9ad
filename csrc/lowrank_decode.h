// Low-rank decode GEMV y = U (V x) + b for M <= 16 rows of x (interface of csrc/lowrank_decode.cu).
//
// Torch-free like device_info.h: plain structs, raw pointers, a status code and a message in a caller-owned buffer
// (LOWRANK_OPS_ERROR_LEN). The caller (csrc/bindings.cpp) allocates the output and the fp32 workspace, sets the
// current device and passes its stream; nothing here allocates, synchronizes or throws.
#pragma once

#include <cuda_runtime_api.h>

#include <stddef.h>
#include <stdint.h>

#include "device_info.h"

#ifdef __cplusplus
extern "C" {
#endif

// Rows of x the decode kernels take (the op's DECODE_MAX_M); more rows belong to the Triton / cuBLAS paths.
#define LOWRANK_OPS_DECODE_MAX_ROWS 16

// Activation dtypes of the decode kernels; accumulation is fp32 in every case.
typedef enum LowrankOpsDtype {
  LOWRANK_OPS_FLOAT16 = 0,
  LOWRANK_OPS_BFLOAT16 = 1,
} LowrankOpsDtype;

// y (rows, m) = x (rows, n) V^T (r, n)^T U^T (m, r)^T + b. All tensors in `dtype` except the workspace.
typedef struct LowrankDecodeArgs {
  LowrankOpsDtype dtype;
  int rows;                // M: 1 .. LOWRANK_OPS_DECODE_MAX_ROWS
  int n;                   // in features, >= 1
  int m;                   // out features, >= 1
  int rank;                // r, >= 1
  const void* x;           // (rows, n), column stride 1, row stride x_row_stride >= n elements
  int64_t x_row_stride;
  const void* v;           // (r, n) contiguous
  const void* u;           // (m, r) contiguous
  const void* bias;        // (m,) contiguous, or NULL
  void* y;                 // (rows, m) contiguous, written entirely
  float* workspace;        // split-K partial sums, then z; contents need not be initialised
  size_t workspace_bytes;  // >= lowrank_decode_workspace_bytes(...)
  unsigned int* counters;  // split-K arrival counters: zero before the first call, left zero by every call; one
                           // buffer per stream (two launches running at once must not share counters)
  size_t counter_count;    // >= lowrank_shrink_counters(rank)
} LowrankDecodeArgs;

// Bytes of fp32 workspace `lowrank_decode` needs for these shapes on the current device (> 0). Depends on the
// device's SM count: query it on the device that will run the launch.
LowrankOpsStatus lowrank_decode_workspace_bytes(const LowrankDecodeArgs* args, size_t* bytes, char* err,
                                                size_t err_len);

// Enqueues the two decode kernels on `stream` (current device). LOWRANK_OPS_BAD_ARGUMENT for shapes or pointers
// outside the rules above, LOWRANK_OPS_CUDA_ERROR when a launch fails (e.g. no kernel image for the device).
LowrankOpsStatus lowrank_decode(const LowrankDecodeArgs* args, cudaStream_t stream, char* err, size_t err_len);

// ---- Shared with csrc/quant_lowrank_decode.cu: the split-K shrink partial[s] = x V_s^T over slice s of n. ----

// The device limits the decode launches size themselves by (current device).
typedef struct LowrankDecodeDevice {
  int sm_count;             // grids are sized in SMs
  size_t smem_optin_bytes;  // largest dynamic shared memory a block may opt in to (z = x V^T lives there)
  int pdl;                  // 1: programmatic dependent launch is available (compute capability >= 9.0)
} LowrankDecodeDevice;

LowrankOpsStatus lowrank_decode_device(LowrankDecodeDevice* out, char* err, size_t err_len);

typedef struct LowrankShrinkPlan {
  int splits;             // S slices of n; partial sums (S, rows, r) fp32, then z (rows, r)
  int chunks_per_slice;   // 512-column chunks each slice covers
  int blocks;             // grid of the shrink kernel
  size_t workspace_bytes;  // (S + 1) * rows * r * 4
} LowrankShrinkPlan;

// Split count of the shrink (see lowrank_decode.cu for the rule).
LowrankShrinkPlan lowrank_shrink_plan(int rows, int n, int rank, int sm_count);

// Arrival counters the shrink needs (one per group of rows of V).
int lowrank_shrink_counters(int rank);

// LOWRANK_OPS_BAD_ARGUMENT (naming `op`) unless `counters` holds at least lowrank_shrink_counters(rank) counters.
LowrankOpsStatus lowrank_shrink_check_counters(const char* op, int rank, const unsigned int* counters,
                                               size_t counter_count, char* err, size_t err_len);

// z (rows, r) = x V^T in a workspace the shrink of `plan` wrote: after the S partial sums.
static inline const float* lowrank_shrink_z(const float* workspace, const LowrankShrinkPlan* plan, int rows,
                                            int rank) {
  return workspace + (size_t)plan->splits * (size_t)rows * (size_t)rank;
}

// Enqueues the shrink (a plain launch: it is the first kernel of an op and may read x written just before it):
// partial sums of x V^T over S slices of n, reduced into z by the last-arriving warp of each group (`counters`,
// zero before and after). It lets the next kernel in the stream start early (PDL); that kernel must be launched
// with launch_dependent and read z only after wait_for_producer().
LowrankOpsStatus lowrank_shrink_launch(LowrankOpsDtype dtype, int rows, int n, int rank, const void* x,
                                       int64_t x_row_stride, const void* v, float* partial, unsigned int* counters,
                                       const LowrankShrinkPlan* plan, cudaStream_t stream, char* err,
                                       size_t err_len);

#ifdef __cplusplus
}  // extern "C"
#endif
