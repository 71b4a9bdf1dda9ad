// Device properties and a launch self-check for the lowrank-ops CUDA extension (interface: device_info.h).
//
// Torch-free: CUDA runtime and the C/C++ standard library only, so `nvcc -std=c++17
// -gencode=arch=compute_90a,code=sm_90a -c csrc/device_info.cu` compiles it on a machine with no GPU and no torch
// (tests/test_build.py runs exactly that). The __global__ kernel below makes that check cover device code too.
//
// Every CUDA call goes through LOWRANK_OPS_CUDA_CHECK (cuda_status.h): a failure becomes LOWRANK_OPS_CUDA_ERROR plus a
// message naming the call, the CUDA error and the source line.

#include <cuda_runtime.h>

#include <stdio.h>

#include "cuda_status.h"
#include "device_info.h"

namespace {

// Self-check launch shape. 256 threads = 8 warps: a multiple of the warp size (32) and well under the 1024-thread
// block limit, the usual default for an elementwise kernel.
constexpr int kSelfCheckBlockThreads = 256;
// 1031 is prime, so the last block is partial (1031 = 4 * 256 + 7) and the bounds mask is exercised; 4 KB, so the
// host copy fits on the stack.
constexpr int kSelfCheckElements = 1031;
// Arbitrary nonzero start value, so neither zeroed nor 0xFF-poisoned memory can pass for a kernel that ran.
constexpr int kSelfCheckBase = 0x5eed;

// out[i] = base + i for i < n; grid-stride, so any grid size covers n.
__global__ void self_check_fill_kernel(int* __restrict__ out,  // (n,)
                                       int n, int base) {
  const int stride = gridDim.x * blockDim.x;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = base + i;
  }
}

// Restores the calling thread's current device on scope exit (declare before any device allocation, so
// allocations are freed first, on the device they were made on).
struct CurrentDeviceGuard {
  int previous = -1;
  ~CurrentDeviceGuard() {
    if (previous >= 0) {
      (void)cudaSetDevice(previous);
    }
  }
};

struct DeviceBuffer {
  int* ptr = nullptr;
  ~DeviceBuffer() {
    if (ptr != nullptr) {
      (void)cudaFree(ptr);
    }
  }
};

LowrankOpsStatus check_index(int index, char* err, size_t err_len) {
  int count = 0;
  const LowrankOpsStatus status = lowrank_ops_device_count(&count, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  if (index < 0 || index >= count) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "lowrank_ops: device index %d is out of range: %d CUDA device(s) visible, so "
                            "0 <= index < %d",
                            index, count, count);
  }
  return LOWRANK_OPS_OK;
}

}  // namespace

extern "C" LowrankOpsStatus lowrank_ops_device_count(int* count, char* err, size_t err_len) {
  if (count == nullptr) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "lowrank_ops: device_count: count must not be null");
  }
  *count = 0;
  LOWRANK_OPS_CUDA_CHECK(cudaGetDeviceCount(count));
  return LOWRANK_OPS_OK;
}

extern "C" LowrankOpsStatus lowrank_ops_device_info(int index, LowrankOpsDeviceInfo* out, char* err,
                                                    size_t err_len) {
  if (out == nullptr) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "lowrank_ops: device_info: out must not be null");
  }
  *out = LowrankOpsDeviceInfo{};
  const LowrankOpsStatus status = check_index(index, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  out->index = index;

  // cudaDeviceGetAttribute is cheap (no full property query) and does not change the current device.
  int smem_per_block = 0, smem_optin = 0, smem_per_sm = 0, l2 = 0, persisting_l2 = 0;
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&out->cc_major, cudaDevAttrComputeCapabilityMajor, index));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&out->cc_minor, cudaDevAttrComputeCapabilityMinor, index));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&out->sm_count, cudaDevAttrMultiProcessorCount, index));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&out->warp_size, cudaDevAttrWarpSize, index));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&out->max_threads_per_block, cudaDevAttrMaxThreadsPerBlock, index));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&smem_per_block, cudaDevAttrMaxSharedMemoryPerBlock, index));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, index));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, index));
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceGetAttribute(&persisting_l2, cudaDevAttrMaxPersistingL2CacheSize, index));
  out->shared_memory_per_block = static_cast<size_t>(smem_per_block);
  out->shared_memory_per_block_optin = static_cast<size_t>(smem_optin);
  out->shared_memory_per_sm = static_cast<size_t>(smem_per_sm);
  out->l2_cache_bytes = static_cast<size_t>(l2);
  out->max_persisting_l2_bytes = static_cast<size_t>(persisting_l2);

  // The name and total memory are not device attributes; one full property query supplies both.
  cudaDeviceProp prop{};
  LOWRANK_OPS_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  snprintf(out->name, sizeof(out->name), "%s", prop.name);
  out->total_memory_bytes = prop.totalGlobalMem;
  return LOWRANK_OPS_OK;
}

extern "C" LowrankOpsStatus lowrank_ops_device_self_check(int index, char* err, size_t err_len) {
  const LowrankOpsStatus status = check_index(index, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  CurrentDeviceGuard guard;  // before `buffer`: destroyed after it, so cudaFree runs on `index`
  LOWRANK_OPS_CUDA_CHECK(cudaGetDevice(&guard.previous));
  LOWRANK_OPS_CUDA_CHECK(cudaSetDevice(index));

  DeviceBuffer buffer;
  const size_t bytes = sizeof(int) * kSelfCheckElements;
  LOWRANK_OPS_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&buffer.ptr), bytes));
  LOWRANK_OPS_CUDA_CHECK(cudaMemset(buffer.ptr, 0xFF, bytes));  // poison: every int reads -1

  const int blocks = (kSelfCheckElements + kSelfCheckBlockThreads - 1) / kSelfCheckBlockThreads;
  self_check_fill_kernel<<<blocks, kSelfCheckBlockThreads>>>(buffer.ptr, kSelfCheckElements, kSelfCheckBase);
  // Launch-configuration errors and a missing kernel image (built for another arch) surface here ...
  LOWRANK_OPS_CUDA_CHECK(cudaGetLastError());
  // ... faults during execution surface at the synchronization.
  LOWRANK_OPS_CUDA_CHECK(cudaDeviceSynchronize());

  int host[kSelfCheckElements];
  LOWRANK_OPS_CUDA_CHECK(cudaMemcpy(host, buffer.ptr, bytes, cudaMemcpyDeviceToHost));
  for (int i = 0; i < kSelfCheckElements; ++i) {
    if (host[i] != kSelfCheckBase + i) {
      return lowrank_ops_fail(LOWRANK_OPS_CUDA_ERROR, err, err_len,
                              "lowrank_ops: device self-check on device %d read out[%d] = %d, expected %d (the fill "
                              "kernel launched without error but did not write its output)",
                              index, i, host[i], kSelfCheckBase + i);
    }
  }
  return LOWRANK_OPS_OK;
}
