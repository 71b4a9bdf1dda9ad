// Device properties the lowrank-ops CUDA kernels size themselves by, and a launch self-check.
//
// Torch-free on purpose (STYLE rule 21): this header and csrc/device_info.cu include only the CUDA runtime, so
// plain `nvcc -c` compile-checks them on any machine (tests/test_build.py does, for sm_90a). The torch/pybind11
// side lives in csrc/bindings.cpp, which includes this header and nothing of CUDA.
//
// The interface is C-ABI-ish: plain structs, fixed-size buffers, a status code and an error message written into
// a caller-owned buffer. Nothing throws, nothing allocates on the host, so the functions can be called from any
// binding layer (pybind11 today, TORCH_LIBRARY ops in issue 9) without sharing C++ exception or STL ABI.
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// Length of DeviceInfo.name, NUL included; the same as cudaDeviceProp::name.
#define LOWRANK_OPS_DEVICE_NAME_LEN 256

// Suggested size of the caller's error buffer: room for the failing call, file:line, CUDA error name and text.
#define LOWRANK_OPS_ERROR_LEN 512

// Status codes returned by every function below. On anything but LOWRANK_OPS_OK the error buffer holds a
// NUL-terminated, human-readable message (truncated to its length if needed).
typedef enum LowrankOpsStatus {
  LOWRANK_OPS_OK = 0,
  LOWRANK_OPS_BAD_ARGUMENT = 1,  // caller mistake: device index out of range, null pointer (a Python ValueError)
  LOWRANK_OPS_CUDA_ERROR = 2,    // a CUDA runtime call failed: no driver, no device, no kernel image, ...
} LowrankOpsStatus;

// What the decode kernels of issue 9 read to pick grids and tiles. Sizes are in bytes.
typedef struct LowrankOpsDeviceInfo {
  int index;                                // CUDA device ordinal, as in torch.device("cuda", index)
  char name[LOWRANK_OPS_DEVICE_NAME_LEN];   // e.g. "NVIDIA H100 80GB HBM3"
  int cc_major;                             // compute capability, e.g. 9 for Hopper
  int cc_minor;                             // e.g. 0 for Hopper (sm_90 / sm_90a)
  int sm_count;                             // streaming multiprocessors: 132 on H100 SXM, persistent-grid size
  int warp_size;                            // 32 on every NVIDIA GPU so far; read, not assumed
  int max_threads_per_block;                // 1024 on every GPU since Fermi
  size_t shared_memory_per_block;           // default per-block limit without opt-in (48 KiB)
  size_t shared_memory_per_block_optin;     // per-block limit after cudaFuncSetAttribute opt-in (227 KiB on H100)
  size_t shared_memory_per_sm;              // per-SM capacity, bounds blocks per SM (228 KiB on H100)
  size_t l2_cache_bytes;                    // 50 MiB on H100: benchmarks rotate weight buffers beyond this
  size_t max_persisting_l2_bytes;           // largest L2 set-aside for access-policy windows (0 if unsupported)
  size_t total_memory_bytes;                // global memory
} LowrankOpsDeviceInfo;

// Number of visible CUDA devices into *count. LOWRANK_OPS_CUDA_ERROR when no driver or device is usable.
LowrankOpsStatus lowrank_ops_device_count(int* count, char* err, size_t err_len);

// Fills *out for device `index` (0 <= index < device count). Does not change the calling thread's current
// device. Costs one full property query (for the name): callers on a hot path should cache the result.
LowrankOpsStatus lowrank_ops_device_info(int index, LowrankOpsDeviceInfo* out, char* err, size_t err_len);

// Launches a small fill kernel on device `index`, copies the result back and checks every element. Fails with
// a readable message when the extension was built without a kernel image for this device's architecture
// (cudaErrorNoKernelImageForDevice), so a wrong TORCH_CUDA_ARCH_LIST shows up here and not as wrong numbers
// inside an op. Uses the legacy default stream and synchronizes the device; restores the caller's current device.
LowrankOpsStatus lowrank_ops_device_self_check(int index, char* err, size_t err_len);

#ifdef __cplusplus
}  // extern "C"
#endif
