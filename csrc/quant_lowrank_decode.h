// Quantized base plus low-rank residual, decode: y = dequant(W_hat) x + U (V x) + b for M <= 16 rows of x
// (interface of csrc/quant_lowrank_decode.cu). Torch-free, same conventions as lowrank_decode.h.
//
// W_hat is read in lowrank_ops.quant_format LAYOUT_VERSION 1 with 4-bit slots (bits 2, 3, 4): qweight int32
// (m, ceil(n / 8)), the code of column k in bits 4 (k % 8) .. 4 (k % 8) + 3 of word k / 8; scales and zeros (m, G),
// G = ceil(n / group_size), in the activation dtype; W_hat[o, k] = (q[o, k] - zeros[o, k / g]) * scales[o, k / g].
#pragma once

#include <cuda_runtime_api.h>

#include <stddef.h>
#include <stdint.h>

#include "device_info.h"
#include "lowrank_decode.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct QuantLowrankDecodeArgs {
  LowrankOpsDtype dtype;
  int rows;                // M: 1 .. LOWRANK_OPS_DECODE_MAX_ROWS
  int n;                   // in features, >= 1
  int m;                   // out features, >= 1
  int group_size;          // >= 8, a multiple of 8 (an int32 word never straddles two groups)
  int rank;                // r >= 0; 0 = no residual (v, u ignored)
  const void* x;           // (rows, n), column stride 1, row stride x_row_stride >= n elements
  int64_t x_row_stride;
  const int32_t* qweight;  // (m, ceil(n / 8)) contiguous
  const void* scales;      // (m, G) contiguous
  const void* zeros;       // (m, G) contiguous
  const void* v;           // (r, n) contiguous, or NULL when rank = 0
  const void* u;           // (m, r) contiguous, or NULL when rank = 0
  const void* bias;        // (m,) contiguous, or NULL
  void* y;                 // (rows, m) contiguous, written entirely
  float* workspace;        // split-K partial sums of x V^T, then z (rank > 0); contents need not be initialised
  size_t workspace_bytes;  // >= quant_lowrank_decode_workspace_bytes(...)
  unsigned int* counters;  // rank > 0: split-K arrival counters, as in LowrankDecodeArgs
  size_t counter_count;    // >= lowrank_shrink_counters(rank) when rank > 0
} QuantLowrankDecodeArgs;

// Bytes of fp32 workspace for these shapes on the current device (0 when rank = 0).
LowrankOpsStatus quant_lowrank_decode_workspace_bytes(const QuantLowrankDecodeArgs* args, size_t* bytes, char* err,
                                                      size_t err_len);

// Enqueues the kernels on `stream` (current device): with a residual the split-K shrink of lowrank_decode.cu, then
// the fused dequantising GEMV + expand (PDL-chained); without, the GEMV alone.
LowrankOpsStatus quant_lowrank_decode(const QuantLowrankDecodeArgs* args, cudaStream_t stream, char* err,
                                      size_t err_len);

#ifdef __cplusplus
}  // extern "C"
#endif
