// Quantized base plus low-rank residual, decode, with the base in layout v2 (the int4 kernel v2 of
// csrc/quant_lowrank_decode_v2.cu; docs/INT4_V2.md). Torch-free, same conventions as quant_lowrank_decode.h, whose
// argument struct it takes, with these tensors in layout v2 (lowrank_ops.quant_format.to_layout_v2):
//   qweight  int32 (NB, KB, 32, 4), NB = ceil(m / 16), KB = ceil(n / 64), 16-byte aligned: per n16 block and k64
//            block, lane l's 4 words (one per k16 step) hold the codes of its two mma B fragments (docs/INT4_V2.md)
//   scales   (G, NB32, 32, 8) in the activation dtype, NB32 = ceil(m / 32), 16-byte aligned: per group, warp w (output
//            columns 32 w ..) and lane 4 g + t, scale 4 b + 2 h + e of column 32 w + 16 b + 8 h + 2 t + e (past m: 0)
//   zeros    (G, NB32, 32, 4) uint8, integer values 0 .. 15, 4-byte aligned: zero 2 b + h of column 32 w + 16 b + 8 h + g
// group_size must be a multiple of 16. counters: quant_lowrank_decode_v2_counters(m, rank) of them, zero before the
// first call (the kernels leave them zero). workspace: quant_lowrank_decode_v2_workspace_bytes.
#pragma once

#include <cuda_runtime_api.h>

#include <stddef.h>

#include "quant_lowrank_decode.h"

#ifdef __cplusplus
extern "C" {
#endif

// Split-K arrival counters for an (m, n) base with a rank-r residual (the shrink's, then one per 32 outputs).
int quant_lowrank_decode_v2_counters(int m, int rank);

// Bytes of fp32 workspace for these shapes on the current device (the shrink's z, then the split-K partials).
LowrankOpsStatus quant_lowrank_decode_v2_workspace_bytes(const QuantLowrankDecodeArgs* args, size_t* bytes, char* err,
                                                         size_t err_len);

// Enqueues the kernels on `stream` (current device): with a residual the split-K shrink of lowrank_decode.cu, then
// the v2 kernel PDL-chained behind it; without, the v2 kernel alone.
LowrankOpsStatus quant_lowrank_decode_v2(const QuantLowrankDecodeArgs* args, cudaStream_t stream, char* err,
                                         size_t err_len);

#ifdef __cplusplus
}  // extern "C"
#endif
