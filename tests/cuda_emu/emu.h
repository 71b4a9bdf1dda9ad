// A CPU emulator of the small part of CUDA that csrc/'s decode kernels use, so that their logic (indexing, masks,
// split-K plans, warp reductions, shared-memory staging, launch checks) runs and is tested on machines without a
// GPU. tests/cuda_emu/build.py compiles the unmodified kernel sources against it with g++ (after rewriting the two
// constructs a host compiler cannot parse: `kernel<<<...>>>(...)` and `extern __shared__ T name[];`).
//
// Execution model. A launch runs its blocks one after another on the calling OS thread; the threads of a block are
// cooperative fibers (ucontext) that run until they reach a barrier: __syncthreads() (all live threads of the block)
// or a warp shuffle (all 32 lanes of the warp; two barriers per shuffle: publish, then read). So every interleaving
// the kernels rely on is forced through their own synchronisation, and code that reads shared memory another
// thread has not written yet reads the NaN poison it starts with.
//
// Programmatic dependent launch (PDL). csrc/ is compiled with LOWRANK_OPS_CUDA_EMU, so its wait / trigger call
// cudaGridDependencySynchronize / cudaTriggerProgrammaticLaunchCompletion here. A PDL launch whose predecessor
// triggered (at any point: PDL lets the dependent start then, and only the wait makes the predecessor's writes
// visible) runs each block with every byte the predecessor wrote (found by diffing the memory a test tracks before
// and after each launch) set to 0xFF -- NaN in fp32, fp16 and bf16 -- until the block's threads wait: a waiting
// thread parks until every live thread of the block has parked or is blocked at a barrier, then the predecessor's
// values are restored. So a read of the predecessor's output before the wait reads poison, while a correct wait
// sees the real values; a predecessor that never triggers runs to completion first, as without PDL.
// Visibility between the blocks of one launch (the split-K handoff of lowrank_decode.cu, issue 19 part 4). In a launch
// that does not overlap a PDL predecessor, what a block writes to tracked memory becomes visible to the blocks after
// it only when the block performs an atomic (atomicAdd) from a thread that has executed __threadfence() since its
// previous atomic: the fence-then-atomic release pattern. The atomic publishes every byte the block has written so
// far. Writes never published that way are hidden from the later blocks (they read the value before the block ran:
// NaN poison in the workspace) until the launch ends. So a handoff without the fence, or with the fence after the
// atomic, hands the last block poison instead of the other blocks' partial sums.
// The sm_80 warp-level instructions (csrc/sm80_intrinsics.cuh calls them under LOWRANK_OPS_CUDA_EMU). mma.sync and
// ldmatrix are warp collectives, run like a shuffle: every lane publishes its operands (fragments, row addresses),
// a warp barrier, each lane computes its own result from all lanes' operands, a second barrier; lanes of one warp in
// different collectives at once fault (divergence). The fragment layouts are the PTX ISA's (see emu.cpp); mma sums
// the exact products and C in float64 and rounds once to fp32 (hardware rounds its internal sum differently in the
// last bits). ldmatrix faults on a row address that is not 16-byte aligned inside the block's dynamic shared memory.
// cp.async is per thread: the source is read (and checked / counted as a load) and the destination set to 0xFF
// poison when the copy is issued; the bytes land when cp.async.wait_group retires its group, so a read of the
// destination before the matching wait (or a wait that leaves the group pending) reads NaN. Copies a thread never
// waits for are dropped when it exits.
// What it does NOT model: concurrent blocks, reordering within a thread, the acquire side (a reader's missing fence
// is not caught), timing; a thread that reads the predecessor's output without ever waiting, after another thread of
// its block waited, sees the restored values. Faults it reports as a failed launch (cudaGetLastError): barrier deadlock or divergence, shuffles with
// exited or non-converged lanes, block size > 1024, an empty grid, dynamic shared memory above the kernel's opt-in,
// and an __ldg / __ldcs outside the buffers a test registered (which also counts the bytes each buffer streams).
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <functional>

// ---------------------------------------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

using std::max;
using std::min;

// ---------------------------------------------------------------------------------------------- vector types
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }

// ---------------------------------------------------------------------------------------------- runtime API subset
typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
} cudaError_t;

typedef struct CUstream_st* cudaStream_t;

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

enum cudaLaunchAttributeID {
  cudaLaunchAttributeProgrammaticStreamSerialization = 5,
};

union cudaLaunchAttributeValue {
  int programmaticStreamSerializationAllowed;
};

struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};

struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};

namespace cuda_emu {

// The emulated device: SM count, the largest dynamic shared memory a kernel may opt in to, compute capability major.
// Device code is compiled without __CUDA_ARCH__, so arch-guarded intrinsics (PDL's wait / trigger) compile to nothing:
// a dependent launch runs after its predecessor has finished, which PDL allows.
void configure(int sm_count, size_t smem_optin_bytes, int cc_major);

struct LaunchRecord {
  unsigned int grid, block;
  size_t smem;
  bool programmatic;  // launched with programmatic stream serialization (PDL)
};
// Launches since the last reset (for tests: how many kernels an op enqueued, and how).
int launch_count();
LaunchRecord launch_record(int i);
void reset_launches();

// Runs `body` as every thread of a (grid, block) launch; returns the launch status.
cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, bool programmatic, const void* kernel,
                     const std::function<void()>& body);

void* dynamic_shared_base();
void sync_block();
void sync_warp(unsigned int mask);
float shuffle_xor(unsigned int mask, float value, int lane_mask);
unsigned int shuffle_idx(unsigned int mask, unsigned int value, int src_lane);
void fence();
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], bool bf16);
void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans);
void cp_async16(void* dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
unsigned int atomic_add(unsigned int* address, unsigned int value);
void record_error(cudaError_t error);

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_base());
}

// `kernel<<<grid, block, smem, stream>>>(args...)` is rewritten to `launch(kernel, grid, block, smem, stream)(args...)`.
template <typename... Params>
struct Launcher {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args&&... args) const {
    record_error(run_grid(grid, block, smem, false, reinterpret_cast<const void*>(kernel),
                          [&] { kernel(static_cast<Params>(args)...); }));
  }
};

template <typename... Params>
Launcher<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem = 0,
                           cudaStream_t stream = nullptr) {
  (void)stream;
  return Launcher<Params...>{kernel, grid, block, smem};
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);

// Memory whose writes the emulator finds by diffing it around every launch (for PDL, see the top of this file).
void track_memory(const void* base, size_t bytes);
void pdl_trigger();
void pdl_wait();

// Global buffers a test hands to a kernel. While any is registered, every __ldg / __ldcs must fall inside one of
// them (else the launch faults, naming the address) and adds its bytes to that buffer's count.
void register_buffer(const char* name, const void* base, size_t bytes);
void clear_buffers();
long long loaded_bytes(const char* name);  // -1 for a name not registered
void note_load(const void* p, size_t bytes);

}  // namespace cuda_emu

// The built-in variables: set by the scheduler before it resumes a thread (one OS thread runs every fiber).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t error);
const char* cudaGetErrorString(cudaError_t error);

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    return cudaErrorInvalidValue;
  }
  return ::cuda_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  bool programmatic = false;
  for (unsigned int i = 0; i < config->numAttrs; ++i) {
    programmatic |= config->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization &&
                    config->attrs[i].val.programmaticStreamSerializationAllowed != 0;
  }
  const cudaError_t status =
      ::cuda_emu::run_grid(config->gridDim, config->blockDim, config->dynamicSmemBytes, programmatic,
                           reinterpret_cast<const void*>(kernel), [&] { kernel(static_cast<Params>(args)...); });
  ::cuda_emu::record_error(status);
  return status;
}

// ---------------------------------------------------------------------------------------------- device builtins
inline void __syncthreads() { ::cuda_emu::sync_block(); }

inline void __syncwarp(unsigned int mask = 0xffffffffu) { ::cuda_emu::sync_warp(mask); }
inline void __threadfence() { ::cuda_emu::fence(); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return ::cuda_emu::atomic_add(address, value);
}

inline void cudaTriggerProgrammaticLaunchCompletion() { ::cuda_emu::pdl_trigger(); }
inline void cudaGridDependencySynchronize() { ::cuda_emu::pdl_wait(); }

inline float __shfl_xor_sync(unsigned int mask, float value, int lane_mask) {
  return ::cuda_emu::shuffle_xor(mask, value, lane_mask);
}
inline unsigned int __shfl_sync(unsigned int mask, unsigned int value, int src_lane) {
  return ::cuda_emu::shuffle_idx(mask, value, src_lane);
}
inline float __shfl_sync(unsigned int mask, float value, int src_lane) {
  unsigned int bits;
  memcpy(&bits, &value, sizeof(bits));
  bits = ::cuda_emu::shuffle_idx(mask, bits, src_lane);
  float out;
  memcpy(&out, &bits, sizeof(out));
  return out;
}

// The read-only / streaming loads every weight and x load of the kernels goes through: checked against the
// registered buffers (a load outside all of them faults) and counted per buffer.
template <typename T>
inline T __ldg(const T* p) {
  ::cuda_emu::note_load(p, sizeof(T));
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  ::cuda_emu::note_load(p, sizeof(T));
  return *p;
}

inline float __uint_as_float(unsigned int bits) {
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

// ---------------------------------------------------------------------------------------------- fp16 / bf16
struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace cuda_emu {

inline uint32_t float_bits(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof(b));
  return b;
}

inline float bits_float(uint32_t b) {
  float f;
  memcpy(&f, &b, sizeof(f));
  return f;
}

// IEEE binary16, round to nearest even (subnormals, overflow to infinity, NaN kept quiet).
inline uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) {
    return sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u);
  }
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half, in units of 2^-24 (the multiply is exact)
    return sign | static_cast<uint16_t>(nearbyintf(bits_float(a) * 16777216.0f));
  }
  uint32_t h = ((((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3FFu));
  const uint32_t rest = a & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) {
    ++h;  // a carry into the exponent is correct, up to infinity (0x7C00)
  }
  return sign | static_cast<uint16_t>(h > 0x7C00u ? 0x7C00u : h);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0) {
    const float f = ldexpf(static_cast<float>(mantissa), -24);
    return sign ? -f : f;
  }
  if (exponent == 31) {
    return bits_float(sign | 0x7F800000u | (mantissa << 13));
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_bfloat16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
    return static_cast<uint16_t>((x >> 16) | 0x40u);
  }
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

inline float bfloat16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace cuda_emu

inline float __half2float(__half h) { return ::cuda_emu::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{::cuda_emu::float_to_half(f)}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return ::cuda_emu::bfloat16_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{::cuda_emu::float_to_bfloat16(f)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return float2{__bfloat162float(b.x), __bfloat162float(b.y)}; }

namespace cuda_emu {

// lop3.b32: bit i of LUT is F at (a, b, c) = (i & 4, i & 2, i & 1), since LUT = F(0xF0, 0xCC, 0xAA) (PTX ISA).
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c, int lut) {
  uint32_t d = 0u;
  for (int i = 0; i < 8; ++i) {
    if ((lut >> i) & 1) {
      d |= ((i & 4) ? a : ~a) & ((i & 2) ? b : ~b) & ((i & 1) ? c : ~c);
    }
  }
  return d;
}

// prmt.b32, default mode: result byte i is byte (sel_i & 7) of {b, a} (a = bytes 0-3), or with sel_i & 8 that
// byte's sign bit replicated, where sel_i is nibble i of the selector (PTX ISA).
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  const uint64_t bytes = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0u;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (selector >> (4 * i)) & 0xFu;
    uint32_t byte = static_cast<uint32_t>(bytes >> (8 * (s & 7u))) & 0xFFu;
    if (s & 8u) {
      byte = (byte & 0x80u) ? 0xFFu : 0u;
    }
    d |= byte << (8 * i);
  }
  return d;
}

// x rounded once, to nearest even, to a binary format with `mantissa` stored bits and smallest normal exponent
// `min_exponent` (fp16: 10, -14; bf16: 7, -126), returned exactly as a double (subnormals included).
inline double round_to_format(double x, int mantissa, int min_exponent) {
  if (!std::isfinite(x) || x == 0.0) {
    return x;
  }
  int e;
  frexp(x, &e);  // |x| in [2^(e-1), 2^e)
  const int quantum = std::max(e - 1, min_exponent) - mantissa;
  return ldexp(nearbyint(ldexp(x, -quantum)), quantum);
}

inline __half to_half(double x) { return __half{float_to_half(static_cast<float>(round_to_format(x, 10, -14)))}; }
inline __nv_bfloat16 to_bfloat16(double x) {
  return __nv_bfloat16{float_to_bfloat16(static_cast<float>(round_to_format(x, 7, -126)))};
}

}  // namespace cuda_emu

// Packed fp16 / bf16 arithmetic: each half computed in float64 (exact unless its terms lie ~30 binades apart) and
// rounded once (an fma is fused), as the hardware rounds.
inline __half2 __hsub2(__half2 a, __half2 b) {
  return __half2{::cuda_emu::to_half(static_cast<double>(__half2float(a.x)) - __half2float(b.x)),
                 ::cuda_emu::to_half(static_cast<double>(__half2float(a.y)) - __half2float(b.y))};
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return __half2{
      ::cuda_emu::to_half(static_cast<double>(__half2float(a.x)) * __half2float(b.x) + __half2float(c.x)),
      ::cuda_emu::to_half(static_cast<double>(__half2float(a.y)) * __half2float(b.y) + __half2float(c.y))};
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __nv_bfloat162{
      ::cuda_emu::to_bfloat16(static_cast<double>(__bfloat162float(a.x)) - __bfloat162float(b.x)),
      ::cuda_emu::to_bfloat16(static_cast<double>(__bfloat162float(a.y)) - __bfloat162float(b.y))};
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return __nv_bfloat162{
      ::cuda_emu::to_bfloat16(static_cast<double>(__bfloat162float(a.x)) * __bfloat162float(b.x) +
                              __bfloat162float(c.x)),
      ::cuda_emu::to_bfloat16(static_cast<double>(__bfloat162float(a.y)) * __bfloat162float(b.y) +
                              __bfloat162float(c.y))};
}
