// Test kernels of csrc/sm80_intrinsics.cuh and csrc/int4_dequant.cuh: one source that nvcc compiles for sm_90a
// (compile-only, tests/test_sm80_intrinsics.py) and that tests/cuda_emu/build.py compiles for the CPU emulator. Each
// extern "C" entry point launches one kernel on the pointers it is given (host memory under the emulator, device
// memory on a GPU) and returns the launch's cudaError_t. Matrices are row-major; b16 values travel as raw bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <utility>

#include "int4_dequant.cuh"
#include "sm80_intrinsics.cuh"

namespace {

using namespace lowrank_ops_sm80;

// One warp: d (16 x 8 fp32) = a (16 x 16) b (16 x 8, K x N) + c (16 x 8 fp32), every fragment gathered from global
// memory by the PTX ISA's m16n8k16 formulas (g = lane / 4, t = lane % 4).
template <typename T>
__global__ void mma_direct_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  uint32_t fa[4], fb[2];
  float fc[4], fd[4];
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
    fa[r] = a[row * 16 + col] | static_cast<uint32_t>(a[row * 16 + col + 1]) << 16;
  }
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * t + 8 * r;
    fb[r] = b[k * 8 + g] | static_cast<uint32_t>(b[(k + 1) * 8 + g]) << 16;
  }
  for (int i = 0; i < 4; ++i) {
    fc[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  }
  mma_m16n8k16<T>(fd, fa, fb, fc);
  for (int i = 0; i < 4; ++i) {
    d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = fd[i];
  }
}

// One warp, as a v2 kernel will feed the tensor cores: a (16 x 16) and b (16 x 16, K x N) copied to shared memory
// with cp.async (one 16-byte chunk of each per lane), the A fragment by ldmatrix.x4, the B fragments of both n8
// halves by ldmatrix.x4.trans; d (16 x 16 fp32) = a b + c as two m16n8k16.
template <typename T>
__global__ void mma_ldmatrix_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  extern __shared__ uint4 tiles[];
  uint16_t* as = reinterpret_cast<uint16_t*>(tiles);
  uint16_t* bs = as + 256;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  cp_async16(as + 8 * lane, a + 8 * lane);
  cp_async16(bs + 8 * lane, b + 8 * lane);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t fa[4], fb[4];
  ldmatrix_x4<false>(fa, as + (lane % 16) * 16 + 8 * (lane / 16));
  ldmatrix_x4<true>(fb, bs + (lane % 16) * 16 + 8 * (lane / 16));
  for (int half = 0; half < 2; ++half) {
    float fc[4], fd[4];
    for (int i = 0; i < 4; ++i) {
      fc[i] = c[(g + 8 * (i / 2)) * 16 + 8 * half + 2 * t + i % 2];
    }
    const uint32_t fbh[2] = {fb[2 * half], fb[2 * half + 1]};
    mma_m16n8k16<T>(fd, fa, fbh, fc);
    for (int i = 0; i < 4; ++i) {
      d[(g + 8 * (i / 2)) * 16 + 8 * half + 2 * t + i % 2] = fd[i];
    }
  }
}

// One warp: rows (32 x 8 b16, 512 bytes) staged in shared memory; lane l passes the address of row order[l]; r[i] of
// lane l goes to out[4 l + i].
template <bool kTrans>
__global__ void ldmatrix_kernel(const uint4* rows, const int* order, uint32_t* out) {
  extern __shared__ uint4 staged[];
  const int lane = threadIdx.x % 32;
  staged[lane] = rows[lane];
  __syncthreads();
  uint32_t r[4];
  ldmatrix_x4<kTrans>(r, staged + order[lane]);
  for (int i = 0; i < 4; ++i) {
    out[4 * lane + i] = r[i];
  }
}

// out[0 .. chunks * 4 * blockDim.x) = in[0 .. n) then zeros, through a two-stage shared ring filled by cp.async:
// chunk c + 1 is in flight while chunk c is read. The last chunk's tail is zero-filled by src_bytes < 16.
__global__ void cp_async_ring_kernel(const float* in, int n, float* out) {
  extern __shared__ uint4 ring[];
  const int tid = threadIdx.x, width = 4 * blockDim.x, chunks = (n + width - 1) / width;
  auto issue = [&](int chunk) {
    const int first = chunk * width + 4 * tid;
    const int bytes = 4 * min(max(n - first, 0), 4);
    cp_async16(ring + (chunk % 2) * blockDim.x + tid, bytes > 0 ? in + first : in, bytes);
  };
  issue(0);
  cp_async_commit();
  for (int chunk = 0; chunk < chunks; ++chunk) {
    if (chunk + 1 < chunks) {
      issue(chunk + 1);
    }
    cp_async_commit();
    cp_async_wait<1>();  // every group but the newest has landed: chunk `chunk` is here
    __syncthreads();
    const float* stage = reinterpret_cast<const float*>(ring + (chunk % 2) * blockDim.x);
    for (int e = 0; e < 4; ++e) {
      out[chunk * width + 4 * tid + e] = stage[4 * tid + e];
    }
    __syncthreads();  // the stage is read before chunk + 2 overwrites it
  }
}

template <int... kLuts>
__device__ void every_lop3(uint32_t a, uint32_t b, uint32_t c, uint32_t* out, int stride,
                           std::integer_sequence<int, kLuts...>) {
  ((out[kLuts * stride] = lop3<kLuts>(a, b, c)), ...);
}

// out[lut * n + i] = lop3<lut>(a[i], b[i], c[i]) for all 256 truth tables.
__global__ void lop3_kernel(const uint32_t* a, const uint32_t* b, const uint32_t* c, int n, uint32_t* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    every_lop3(a[i], b[i], c[i], out + i, n, std::make_integer_sequence<int, 256>{});
  }
}

__global__ void prmt_kernel(const uint32_t* a, const uint32_t* b, const uint32_t* selector, int n, uint32_t* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    out[i] = prmt(a[i], b[i], selector[i]);
  }
}

// out[4 i + j] = pair j of dequant8(q[i]).
template <typename T>
__global__ void dequant_kernel(const uint32_t* q, int n, uint32_t* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    uint32_t pairs[4];
    dequant8<T>(q[i], pairs);
    for (int j = 0; j < 4; ++j) {
      out[4 * i + j] = pairs[j];
    }
  }
}

// The dequantisation alone for the SASS count: one word from a kernel parameter, one 16-byte store.
template <typename T>
__global__ void dequant_sass_kernel(uint32_t q, uint4* out) {
  uint32_t pairs[4];
  dequant8<T>(q, pairs);
  *out = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
}

int blocks_for(int n) { return (n + 127) / 128; }

}  // namespace

extern "C" {

// kind: 0 gathered fragments (d 16 x 8), 1 cp.async + ldmatrix (b and d 16 x 16).
int sm80_mma(int kind, int bf16, const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  if (kind == 0) {
    if (bf16) {
      mma_direct_kernel<__nv_bfloat16><<<1, 32>>>(a, b, c, d);
    } else {
      mma_direct_kernel<__half><<<1, 32>>>(a, b, c, d);
    }
  } else if (bf16) {
    mma_ldmatrix_kernel<__nv_bfloat16><<<1, 32, 1024>>>(a, b, c, d);
  } else {
    mma_ldmatrix_kernel<__half><<<1, 32, 1024>>>(a, b, c, d);
  }
  return cudaGetLastError();
}

int sm80_ldmatrix(int trans, const uint4* rows, const int* order, uint32_t* out) {
  if (trans) {
    ldmatrix_kernel<true><<<1, 32, 512>>>(rows, order, out);
  } else {
    ldmatrix_kernel<false><<<1, 32, 512>>>(rows, order, out);
  }
  return cudaGetLastError();
}

int sm80_cp_async_ring(const float* in, int n, int threads, float* out) {
  cp_async_ring_kernel<<<1, threads, 2 * 16 * threads>>>(in, n, out);
  return cudaGetLastError();
}

int sm80_lop3(const uint32_t* a, const uint32_t* b, const uint32_t* c, int n, uint32_t* out) {
  lop3_kernel<<<blocks_for(n), 128>>>(a, b, c, n, out);
  return cudaGetLastError();
}

int sm80_prmt(const uint32_t* a, const uint32_t* b, const uint32_t* selector, int n, uint32_t* out) {
  prmt_kernel<<<blocks_for(n), 128>>>(a, b, selector, n, out);
  return cudaGetLastError();
}

int sm80_dequant(int bf16, const uint32_t* q, int n, uint32_t* out) {
  if (bf16) {
    dequant_kernel<__nv_bfloat16><<<blocks_for(n), 128>>>(q, n, out);
  } else {
    dequant_kernel<__half><<<blocks_for(n), 128>>>(q, n, out);
  }
  return cudaGetLastError();
}

int sm80_dequant_sass(int bf16, uint32_t q, uint4* out) {
  if (bf16) {
    dequant_sass_kernel<__nv_bfloat16><<<1, 1>>>(q, out);
  } else {
    dequant_sass_kernel<__half><<<1, 1>>>(q, out);
  }
  return cudaGetLastError();
}

}  // extern "C"
