// Host-side error reporting shared by the torch-free csrc/*.cu files: a printf-style message into the caller's
// buffer plus a LowrankOpsStatus (device_info.h), and LOWRANK_OPS_CUDA_CHECK for CUDA runtime calls.
//
// Internal to csrc/ (bindings.cpp never includes it): every function is `static inline`, so each .cu file gets its
// own copy and no symbol leaks out of the extension.
#pragma once

#include <cuda_runtime.h>

#include <stdarg.h>
#include <stdio.h>

#include "device_info.h"

// Writes a printf-style message into the caller's buffer (always NUL-terminated, truncated if too long).
static inline LowrankOpsStatus lowrank_ops_fail(LowrankOpsStatus status, char* err, size_t err_len, const char* fmt,
                                                ...) {
  if (err != nullptr && err_len > 0) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(err, err_len, fmt, args);
    va_end(args);
  }
  return status;
}

static inline LowrankOpsStatus lowrank_ops_fail_cuda(cudaError_t error, const char* call, const char* file, int line,
                                                     char* err, size_t err_len) {
  (void)cudaGetLastError();  // clear the non-sticky error this call recorded
  return lowrank_ops_fail(LOWRANK_OPS_CUDA_ERROR, err, err_len, "lowrank_ops: %s failed: %s (%s) [%s:%d]", call,
                          cudaGetErrorName(error), cudaGetErrorString(error), file, line);
}

// Turns a failing CUDA call into LOWRANK_OPS_CUDA_ERROR plus a message naming the call, the CUDA error and the
// source line, and clears the runtime's "last error" so a later, unrelated launch check (e.g. torch's
// C10_CUDA_KERNEL_LAUNCH_CHECK) does not report our failure as its own. Only usable inside functions that return
// LowrankOpsStatus and have `err` / `err_len` in scope.
#define LOWRANK_OPS_CUDA_CHECK(call)                                                              \
  do {                                                                                            \
    const cudaError_t lowrank_ops_status_ = (call);                                               \
    if (lowrank_ops_status_ != cudaSuccess) {                                                     \
      return lowrank_ops_fail_cuda(lowrank_ops_status_, #call, __FILE__, __LINE__, err, err_len); \
    }                                                                                             \
  } while (0)
