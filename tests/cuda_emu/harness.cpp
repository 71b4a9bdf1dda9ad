// C entry points for tests/test_cuda_emulated.py (ctypes): the decode ops of csrc/ run under the emulator with flat
// arguments, the fp32 workspace allocated here and poisoned with NaN (its contents "need not be initialised"), the
// split-K arrival counters kept here from call to call, zeroed once, as a caller keeps them per stream.
#include <math.h>

#include <algorithm>
#include <vector>

#include "emu.h"
#include "lowrank_decode.h"
#include "quant_lowrank_decode.h"
#include "quant_lowrank_decode_v2.h"

namespace {

// ---- emulator self-checks: kernels with the faults the emulator claims to catch, and one that is right ----

// out[t] = sum over the warp of (t % 32), by a butterfly of shuffles: every lane must read 496.
__global__ void warp_sum_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x % 32);
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Thread t reads the shared value thread (t + 1) writes, with or without the barrier between write and read.
__global__ void neighbour_kernel(float* out, bool synchronise) {
  float* cells = ::cuda_emu::dynamic_shared<float>();
  cells[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (synchronise) {
    __syncthreads();
  }
  out[threadIdx.x] = cells[(threadIdx.x + 1) % blockDim.x];
}

// Only the even threads reach the barrier: a deadlock on a GPU, a reported fault here.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Lane 0 leaves before the others shuffle with a full mask.
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 0) {
    return;
  }
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Every thread loads its own element through __ldg; the buffer registered is one element short.
__global__ void overrun_kernel(float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = __ldg(out + i) + 1.0f;
}

// Block b's lane 0 writes b + 1 into cells[b] (tracked memory), then (with `fence`: after __threadfence()) the warp
// arrives at `counter`; the last block to arrive writes the sum of the cells into cells[gridDim.x] and resets the
// counter. With the fence every cell reaches the last block; without it the cells are not published and it reads NaN.
__global__ void handoff_kernel(float* cells, unsigned int* counter, bool fence) {
  const int lane = threadIdx.x % 32;
  if (lane == 0) {
    cells[blockIdx.x] = static_cast<float>(blockIdx.x + 1);
  }
  if (fence) {
    __threadfence();
  }
  __syncwarp();
  unsigned int ticket = lane == 0 ? atomicAdd(counter, 1u) : 0u;
  ticket = __shfl_sync(0xffffffffu, ticket, 0);
  if (ticket == gridDim.x - 1) {
    __threadfence();
    __syncwarp();
    if (lane == 0) {
      *counter = 0u;
      float sum = 0.0f;
      for (unsigned int b = 0; b < gridDim.x; ++b) {
        sum += cells[b];
      }
      cells[gridDim.x] = sum;
    }
  }
}

std::vector<float> poisoned_workspace(size_t bytes) { return std::vector<float>(bytes / sizeof(float) + 1, NAN); }

// The split-K arrival counters every call uses: zeroed once, grown with zeros, never reset here (the kernels must
// leave them zero).
std::vector<unsigned int>& counters(size_t count) {
  static std::vector<unsigned int> buffer;
  if (buffer.size() < count) {
    buffer.resize(count, 0u);
  }
  return buffer;
}

// x (rows, n) at row stride ld: the bytes from its first to its last element.
size_t strided_bytes(int rows, int n, long long ld, size_t item) {
  return (static_cast<size_t>(rows - 1) * static_cast<size_t>(ld) + static_cast<size_t>(n)) * item;
}

constexpr size_t kItem = 2;  // fp16 / bf16

// Registers x and, with a residual, V and U as the buffers the call may load from (see emu.h).
void register_activations_and_factors(const void* x, int rows, int n, long long x_row_stride, const void* v,
                                      const void* u, int rank, int m) {
  cuda_emu::register_buffer("x", x, strided_bytes(rows, n, x_row_stride, kItem));
  if (rank > 0) {
    cuda_emu::register_buffer("v", v, static_cast<size_t>(rank) * n * kItem);
    cuda_emu::register_buffer("u", u, static_cast<size_t>(m) * rank * kItem);
  }
}

// The argument struct of both quantized-base entry points (layouts v1 and v2), with x, V and U registered.
QuantLowrankDecodeArgs quant_args(int dtype, int rows, int n, int m, int group_size, int rank, const void* x,
                                  long long x_row_stride, const int32_t* qweight, const void* scales,
                                  const void* zeros, const void* v, const void* u, const void* bias, void* y) {
  QuantLowrankDecodeArgs a{};
  a.dtype = static_cast<LowrankOpsDtype>(dtype);
  a.rows = rows;
  a.n = n;
  a.m = m;
  a.group_size = group_size;
  a.rank = rank;
  a.x = x;
  a.x_row_stride = x_row_stride;
  a.qweight = qweight;
  a.scales = scales;
  a.zeros = zeros;
  a.v = v;
  a.u = u;
  a.bias = bias;
  a.y = y;
  cuda_emu::clear_buffers();
  register_activations_and_factors(x, rows, n, x_row_stride, v, u, rank, m);
  return a;
}

// Asks `workspace_bytes` for the size, hands `run` a NaN-poisoned workspace of that size and `count` arrival counters
// (default: the shrink's).
template <typename Args, typename Query, typename Run>
int with_workspace(Args* a, Query workspace_bytes, Run run, char* err, size_t err_len, int count = -1) {
  size_t bytes = 0;
  const LowrankOpsStatus status = workspace_bytes(a, &bytes, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  std::vector<float> workspace = poisoned_workspace(bytes);
  a->workspace = bytes > 0 ? workspace.data() : nullptr;
  a->workspace_bytes = bytes;
  if (count < 0) {
    count = a->rank > 0 ? lowrank_shrink_counters(a->rank) : 0;
  }
  a->counters = counters(static_cast<size_t>(count)).data();
  a->counter_count = static_cast<size_t>(count);
  if (bytes > 0) {
    cuda_emu::track_memory(workspace.data(), bytes);  // the shrink's output: poison to the expand until its wait
  }
  return run(a, nullptr, err, err_len);
}

}  // namespace

extern "C" {

void emu_configure(int sm_count, long long smem_optin_bytes, int cc_major) {
  cuda_emu::configure(sm_count, static_cast<size_t>(smem_optin_bytes), cc_major);
}

// Runs self-check `which` (0 warp sum, 1 neighbour with barrier, 2 neighbour without, 3 divergent barrier,
// 4 exited lane, 5 a load one element past a registered buffer, 6 / 7 the last-block handoff with / without the
// fence, on out[0 .. blocks] as tracked memory) with `blocks` x `threads`, writing `out`; returns the cudaError_t of
// the launch.
int emu_selftest(int which, int blocks, int threads, float* out) {
  (void)cudaGetLastError();
  cuda_emu::clear_buffers();
  const size_t smem = sizeof(float) * static_cast<size_t>(threads);
  switch (which) {
    case 0:
      ::cuda_emu::launch(warp_sum_kernel, blocks, threads)(out);
      break;
    case 1:
    case 2:
      ::cuda_emu::launch(neighbour_kernel, blocks, threads, smem)(out, which == 1);
      break;
    case 3:
      ::cuda_emu::launch(divergent_barrier_kernel, blocks, threads)(out);
      break;
    case 4:
      ::cuda_emu::launch(exited_lane_kernel, blocks, threads)(out);
      break;
    case 5:
      cuda_emu::register_buffer("out", out, sizeof(float) * (static_cast<size_t>(blocks) * threads - 1));
      ::cuda_emu::launch(overrun_kernel, blocks, threads)(out);
      break;
    default: {
      static unsigned int counter = 0u;
      cuda_emu::track_memory(out, sizeof(float) * (static_cast<size_t>(blocks) + 1));
      ::cuda_emu::launch(handoff_kernel, blocks, threads)(out, &counter, which == 6);
      out[blocks + 1] = static_cast<float>(counter);  // the counter the launch left behind
      cuda_emu::clear_buffers();
      break;
    }
  }
  return cudaGetLastError();
}

// The emulator's fp16 / bf16 conversions, checked against torch's.
float emu_half_to_float(unsigned short bits) { return __half2float(__half{bits}); }
unsigned short emu_float_to_half(float f) { return __float2half_rn(f).bits; }
float emu_bfloat16_to_float(unsigned short bits) { return __bfloat162float(__nv_bfloat16{bits}); }
unsigned short emu_float_to_bfloat16(float f) { return __float2bfloat16_rn(f).bits; }

void emu_reset_launches() { cuda_emu::reset_launches(); }

// Bytes the last decode call loaded through __ldg / __ldcs from buffer `name` ("x", "v", "u", "qweight"), -1 if
// that call had no such buffer.
long long emu_loaded_bytes(const char* name) { return cuda_emu::loaded_bytes(name); }

int emu_launch_count() { return cuda_emu::launch_count(); }

// (grid, block, dynamic shared bytes, programmatic) of launch i.
void emu_launch_record(int i, long long* out4) {
  const cuda_emu::LaunchRecord r = cuda_emu::launch_record(i);
  out4[0] = r.grid;
  out4[1] = r.block;
  out4[2] = static_cast<long long>(r.smem);
  out4[3] = r.programmatic ? 1 : 0;
}

// Split-K arrival counters of the decode calls that are not zero (the kernels must leave every one at zero).
int emu_counters_set() {
  const std::vector<unsigned int>& all = counters(0);
  return static_cast<int>(std::count_if(all.begin(), all.end(), [](unsigned int c) { return c != 0u; }));
}

// (splits, chunks_per_slice, blocks, workspace bytes) of lowrank_shrink_plan.
void emu_shrink_plan(int rows, int n, int rank, int sm_count, long long* out4) {
  const LowrankShrinkPlan p = lowrank_shrink_plan(rows, n, rank, sm_count);
  out4[0] = p.splits;
  out4[1] = p.chunks_per_slice;
  out4[2] = p.blocks;
  out4[3] = static_cast<long long>(p.workspace_bytes);
}

int emu_lowrank_decode(int dtype, int rows, int n, int m, int rank, const void* x, long long x_row_stride,
                       const void* v, const void* u, const void* bias, void* y, char* err, size_t err_len) {
  LowrankDecodeArgs a{};
  a.dtype = static_cast<LowrankOpsDtype>(dtype);
  a.rows = rows;
  a.n = n;
  a.m = m;
  a.rank = rank;
  a.x = x;
  a.x_row_stride = x_row_stride;
  a.v = v;
  a.u = u;
  a.bias = bias;
  a.y = y;
  cuda_emu::clear_buffers();
  register_activations_and_factors(x, rows, n, x_row_stride, v, u, rank, m);
  cuda_emu::track_memory(y, static_cast<size_t>(rows) * m * kItem);
  return with_workspace(&a, lowrank_decode_workspace_bytes, lowrank_decode, err, err_len);
}

// Layout v2 (quant_lowrank_decode_v2.h): qweight (ceil(m / 16), ceil(n / 64), 32, 4) int32, scales (G, ceil(m / 32),
// 32, 8) in the activation dtype, zeros (G, ceil(m / 32), 32, 4) uint8; loaded through __ldg, so registered.
int emu_quant_lowrank_decode_v2(int dtype, int rows, int n, int m, int group_size, int rank, const void* x,
                                long long x_row_stride, const int32_t* qweight, const void* scales,
                                const void* zeros, const void* v, const void* u, const void* bias, void* y, char* err,
                                size_t err_len) {
  QuantLowrankDecodeArgs a = quant_args(dtype, rows, n, m, group_size, rank, x, x_row_stride, qweight, scales, zeros,
                                        v, u, bias, y);
  const size_t lanes = static_cast<size_t>((m + 31) / 32) * 32;  // per group: one slot per lane of each warp
  const size_t groups = static_cast<size_t>((n + group_size - 1) / group_size);
  cuda_emu::register_buffer("qweight", qweight, static_cast<size_t>((m + 15) / 16) * ((n + 63) / 64) * 512);
  cuda_emu::register_buffer("scales", scales, groups * lanes * 8 * kItem);
  cuda_emu::register_buffer("zeros", zeros, groups * lanes * 4);
  cuda_emu::track_memory(y, static_cast<size_t>(rows) * m * kItem);
  return with_workspace(&a, quant_lowrank_decode_v2_workspace_bytes, quant_lowrank_decode_v2, err, err_len,
                        quant_lowrank_decode_v2_counters(m, rank));
}

int emu_quant_lowrank_decode(int dtype, int rows, int n, int m, int group_size, int rank, const void* x,
                             long long x_row_stride, const int32_t* qweight, const void* scales, const void* zeros,
                             const void* v, const void* u, const void* bias, void* y, char* err, size_t err_len) {
  QuantLowrankDecodeArgs a = quant_args(dtype, rows, n, m, group_size, rank, x, x_row_stride, qweight, scales, zeros,
                                        v, u, bias, y);
  cuda_emu::register_buffer("qweight", qweight, static_cast<size_t>(m) * ((n + 7) / 8) * sizeof(int32_t));
  cuda_emu::track_memory(y, static_cast<size_t>(rows) * m * kItem);
  return with_workspace(&a, quant_lowrank_decode_workspace_bytes, quant_lowrank_decode, err, err_len);
}

}  // extern "C"
