// Quantized base plus low-rank residual, decode, int4 kernel v2 (issue 19 part 2; design and budget:
// docs/INT4_V2.md): y = dequant(W_hat) x + U (V x) + b for M = 1 .. 16 rows of fp16 / bf16 x, W_hat in layout v2
// (lowrank_ops.quant_format.to_layout_v2; interface: quant_lowrank_decode_v2.h). NOT in AUTO: no GPU has run it.
//
// Tensor cores instead of FMAs. x is the mma's A (16 rows, those past M zero), W_hat^T its B, y its D:
//   per k16 step a warp issues one ldmatrix.x4 (x from shared memory, shared by its two n16 blocks), and per n16
//   block converts one 32-bit word of 8 codes into the two B fragments of its two n8 tiles (dequant8_centered: the
//   magic-number trick with the zero point folded in, exact c - z in fp16 / bf16) and issues two mma.m16n8k16 into
//   per-group fp32 accumulators; at a group's end acc += s * group accumulators (4 FFMA per n8 tile).
// A lane's codes are one 16-byte vector per (n16 block, k64 block) in layout v2, so each lane copies exactly the
// bytes it will read: the codes need no barrier, only the lane's own cp.async wait.
//
// Pipeline: kV2Stages shared-memory stages of k = 128 (codes of the CTA's 128 outputs: 8 KiB, x: 16 x 128), filled
// by cp.async kV2Stages - 1 stages ahead: 4 x 8 KiB = 32 KiB of codes in flight per CTA, the Little's-law target of
// docs/INT4_V2.md (H200: 4.8 TB/s x 0.8 us / 132 SMs = 28 KiB). One __syncthreads per stage (x is shared).
//
// Split-K: grid = N tiles (128 outputs) x S slices of k; S minimises the busiest SM's k64 blocks (v2_split). Each
// warp of a slice adds its share of the residual expand (U's columns [c0, c1) of the rank, after the PDL wait for
// the shrink's z), stores its fp32 partial (M x 32 outputs) and arrives on its 32 outputs' counter (last_arrival);
// the last warp sums the S partials in slice order (deterministic), adds the bias and writes y.
//
// Scales and zeros are packed per lane and group (layout v2): one 16-byte and one 4-byte load per lane per group,
// issued a group ahead.
//
// Limits (checked): group_size % 16 == 0 (the group accumulators switch between k16 steps) and integer zero points
// 0..15 (the packer checks them: they are folded into the dequantisation constants); qweight and scales 16-byte
// aligned, zeros 4-byte aligned.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_status.h"
#include "decode_common.cuh"
#include "int4_dequant.cuh"
#include "lowrank_decode.h"
#include "quant_lowrank_decode_v2.h"
#include "sm80_intrinsics.cuh"

namespace lowrank_ops_decode {
namespace {

using lowrank_ops_sm80::cp_async16;
using lowrank_ops_sm80::cp_async_commit;
using lowrank_ops_sm80::cp_async_wait;
using lowrank_ops_sm80::dequant8_centered;
using lowrank_ops_sm80::ldmatrix_x4;
using lowrank_ops_sm80::mma_m16n8k16;
using lowrank_ops_sm80::zero_magic;
using lowrank_ops_sm80::ZeroMagic;

constexpr int kV2Threads = 128;
constexpr int kV2Warps = kV2Threads / kWarp;
constexpr int kV2BlocksPerWarp = 2;                          // n16 blocks per warp: 32 outputs
constexpr int kV2TileN = kV2Warps * kV2BlocksPerWarp * 16;   // outputs per CTA
constexpr int kV2StageK64 = 2;                               // k64 blocks per pipeline stage
constexpr int kV2Stages = 5;                                 // 4 stages (32 KiB of codes) in flight
constexpr int kV2MaxSplits = 16;
// x stage: 16 rows x 128 k, the row stride padded by 8 elements (16 bytes) so that the 8 rows an ldmatrix phase
// reads fall in distinct 16-byte bank groups (a 256-byte stride would put all 8 in one).
constexpr int kV2XStride = kV2StageK64 * 64 + 8;
constexpr int kV2CodeVecs = kV2Warps * kV2BlocksPerWarp * kV2StageK64 * kWarp;  // uint4 per stage: 8 KiB
constexpr int kV2XVecs = 16 * kV2XStride * 2 / 16;                                // uint4 per stage: 4352 B
constexpr int kV2StageVecs = kV2CodeVecs + kV2XVecs;
constexpr size_t kV2SmemBytes = sizeof(uint4) * kV2StageVecs * kV2Stages;
// 16-byte chunks of one x stage (16 rows x 16 chunks of 8 elements), two per thread.
constexpr int kV2XChunks = 16 * kV2StageK64 * 64 / kVec;
static_assert(kV2XChunks % kV2Threads == 0, "every thread copies the same number of x chunks");

// ptxas for sm_80 gives the bf16 kernel 96 registers and spills 16 bytes unless told one block per SM is enough
// (then 100, no spills); sm_90a needs no hint (108 / 110 registers, no spills). Up to 3 blocks fit an SM by
// shared memory either way.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define LOWRANK_OPS_V2_LAUNCH_BOUNDS __launch_bounds__(kV2Threads, 1)
#else
#define LOWRANK_OPS_V2_LAUNCH_BOUNDS __launch_bounds__(kV2Threads)
#endif

__device__ __forceinline__ uint32_t word_at(const uint4& q, int j) {
  return j == 0 ? q.x : j == 1 ? q.y : j == 2 ? q.z : q.w;
}

// One lane's view of a group's scale and zero point: per (n16 block b, n8 tile h) the scales of the two accumulator
// columns 2t, 2t + 1 and the dequantisation constants of the B-fragment column g.
template <typename T>
struct GroupConstants {
  float2 scale[kV2BlocksPerWarp][2];
  ZeroMagic magic[kV2BlocksPerWarp][2];
};

// A lane's scales and zeros of one group, as layout v2 stores them for it: one 16-byte vector of 8 scales (word
// 2 b + h: the pair of columns 2t, 2t + 1 of n8 tile h of block b) and one 32-bit word of 4 zeros (byte 2 b + h:
// column g of that tile). Loaded one group ahead, converted when the group starts.
struct GroupRaw {
  uint4 scales;
  uint32_t zeros;
};

__device__ __forceinline__ void load_group(GroupRaw& raw, const uint4* __restrict__ scales,
                                           const uint32_t* __restrict__ zeros, int64_t offset, bool live) {
  raw.scales = live ? __ldg(scales + offset) : make_uint4(0u, 0u, 0u, 0u);
  raw.zeros = live ? __ldg(zeros + offset) : 0u;
}

template <typename T>
__device__ __forceinline__ void start_group(GroupConstants<T>& c, const GroupRaw& raw) {
#pragma unroll
  for (int b = 0; b < kV2BlocksPerWarp; ++b) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      c.scale[b][h] = Convert<T>::pair(word_at(raw.scales, 2 * b + h));
      c.magic[b][h] = zero_magic<T>((raw.zeros >> (8 * (2 * b + h))) & 0xFFu);
    }
  }
}

// kAligned: group_size % 128 == 0 and every slice starts and ends on a 128-wide stage (even k64 blocks per slice and
// in all): a group ends only at a stage's end, so the group check runs once per stage instead of once per k16 step,
// and no stage is partial (the 4096^2 g128 plan). Otherwise the general loop checks every k16 step.
template <typename T, bool kAligned>
__global__ void LOWRANK_OPS_V2_LAUNCH_BOUNDS
    quant_v2_kernel(const T* __restrict__ x,              // (M, n), row stride ldx
                    const uint4* __restrict__ qweight,    // (NB, KB, 32) layout v2
                    const uint4* __restrict__ scales,     // (G, NB32, 32) vectors of 8 scales
                    const uint32_t* __restrict__ zeros,   // (G, NB32, 32) words of 4 uint8 zeros
                    const float* __restrict__ z,          // (M, r) or nullptr when r = 0
                    const T* __restrict__ u,              // (m, r) or nullptr when r = 0
                    const T* __restrict__ bias,           // (m,) or nullptr
                    T* __restrict__ y,                    // (M, m)
                    float* __restrict__ partials,         // (S, M, np) when S > 1
                    unsigned int* __restrict__ counters,  // (np / 32) zero before and after
                    int rows, int n, int m, int group_size, int rank, int64_t ldx, int tiles, int splits,
                    int k64_per_split, bool x_vec, bool u_vec) {
  extern __shared__ uint4 v2_stages[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int g = lane / 4, t = lane % 4;
  const int tile = blockIdx.x % tiles, split = blockIdx.x / tiles;
  const int np = (m + 15) / 16 * 16, nb_count = np / 16, kb_count = (n + 63) / 64;
  const int groups = (n + group_size - 1) / group_size;
  const int nb0 = tile * (kV2TileN / 16) + warp * kV2BlocksPerWarp;  // this warp's first n16 block
  const bool live[kV2BlocksPerWarp] = {nb0 < nb_count, nb0 + 1 < nb_count};
  const int kb0 = split * k64_per_split, kb1 = min(kb_count, kb0 + k64_per_split);
  const int iters = (kb1 - kb0 + kV2StageK64 - 1) / kV2StageK64;

  // Stage `it` (k64 blocks kb0 + 2 it, + 1) into shared-memory slot `slot`: this lane's own code vectors, and the x
  // chunks of this thread (rows past M and columns past n or past the slice are zero: padded codes are not zero
  // weights). The per-thread sources and destinations are fixed here, once: the loop only adds it x the stage stride.
  const uint4* code_src[kV2BlocksPerWarp];
  int code_dst[kV2BlocksPerWarp];
#pragma unroll
  for (int b = 0; b < kV2BlocksPerWarp; ++b) {
    code_src[b] = qweight + (static_cast<int64_t>(nb0 + b) * kb_count + kb0) * kWarp + lane;
    code_dst[b] = (warp * kV2BlocksPerWarp + b) * kV2StageK64 * kWarp + lane;
  }
  constexpr int kXPerThread = kV2XChunks / kV2Threads;
  const T* x_src[kXPerThread];
  int x_dst[kXPerThread], x_col[kXPerThread], x_kk[kXPerThread];
  bool x_row[kXPerThread];
#pragma unroll
  for (int i = 0; i < kXPerThread; ++i) {
    const int c = threadIdx.x + i * kV2Threads, row = c / 16, chunk = c % 16;
    x_col[i] = kb0 * 64 + chunk * kVec;
    x_src[i] = x + row * ldx + x_col[i];
    x_dst[i] = row * kV2XStride + chunk * kVec;
    x_kk[i] = chunk / (64 / kVec);
    x_row[i] = row < rows;
  }
  auto issue = [&](int it, int slot) {
    uint4* stage = v2_stages + slot * kV2StageVecs;
    const int kb = kb0 + it * kV2StageK64;
#pragma unroll
    for (int b = 0; b < kV2BlocksPerWarp; ++b) {
#pragma unroll
      for (int kk = 0; kk < kV2StageK64; ++kk) {
        const bool valid = live[b] && kb + kk < kb1;
        cp_async16(stage + code_dst[b] + kk * kWarp, valid ? code_src[b] + (it * kV2StageK64 + kk) * kWarp : qweight,
                   valid ? 16 : 0);
      }
    }
    T* xs = reinterpret_cast<T*>(stage + kV2CodeVecs);
#pragma unroll
    for (int i = 0; i < kXPerThread; ++i) {
      const int col = x_col[i] + it * kV2StageK64 * 64;
      const int valid = x_row[i] && kb + x_kk[i] < kb1 ? min(n - col, kVec) : 0;
      const T* src = x_src[i] + it * kV2StageK64 * 64;
      if (x_vec) {
        cp_async16(xs + x_dst[i], valid > 0 ? src : x, valid > 0 ? 16 : 0);
      } else {
        *reinterpret_cast<uint4*>(xs + x_dst[i]) = load8(src, valid, false, false);
      }
    }
  };

  float acc[kV2BlocksPerWarp][2][4] = {};
  float part[kV2BlocksPerWarp][2][4] = {};  // the current group's sums of x (c - z)
  GroupConstants<T> cur;
  GroupRaw next;
  int group = kb0 * 64 / group_size;
  int steps_left = ((group + 1) * group_size - kb0 * 64) / 16;  // k16 steps to the group's end
  // This lane's scales / zeros of group q are at q stride + lane_offset (in vectors / words); `next_at` walks them.
  const int group_stride = (nb_count + 1) / 2 * kWarp;
  int64_t next_at = static_cast<int64_t>(group) * group_stride + nb0 / kV2BlocksPerWarp * kWarp + lane;
  load_group(next, scales, zeros, next_at, live[0]);
  start_group(cur, next);
  next_at += group_stride;
  load_group(next, scales, zeros, next_at, live[0] && group + 1 < groups);
  auto flush = [&]() {
#pragma unroll
    for (int b = 0; b < kV2BlocksPerWarp; ++b) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[b][h][i] = fmaf(i % 2 == 0 ? cur.scale[b][h].x : cur.scale[b][h].y, part[b][h][i], acc[b][h][i]);
          part[b][h][i] = 0.0f;
        }
      }
    }
  };

  // Branch-free: past the last group `next` is zero (scale 0), which only ever meets x's zero padding past n.
  auto end_group = [&]() {
    flush();
    steps_left = group_size / 16;
    start_group(cur, next);
    ++group;
    next_at += group_stride;
    load_group(next, scales, zeros, next_at, live[0] && group + 1 < groups);
  };

#pragma unroll
  for (int s = 0; s < kV2Stages - 1; ++s) {
    if (s < iters) {
      issue(s, s);
    }
    cp_async_commit();
  }
  int read_slot = 0, write_slot = kV2Stages - 1;  // stage it lives in slot it % kV2Stages, counted without a modulo
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kV2Stages - 2>();  // this thread's copies of stage `it` have landed
    __syncthreads();                 // everyone's x of stage `it`; everyone is done with stage it - 1
    if (it + kV2Stages - 1 < iters) {
      issue(it + kV2Stages - 1, write_slot);  // into the slot of stage it - 1
    }
    cp_async_commit();
    write_slot = read_slot;
    const uint4* stage = v2_stages + read_slot * kV2StageVecs;
    read_slot = read_slot == kV2Stages - 1 ? 0 : read_slot + 1;
    const T* xs = reinterpret_cast<const T*>(stage + kV2CodeVecs);
    const int kb = kb0 + it * kV2StageK64;
#pragma unroll
    for (int kk = 0; kk < kV2StageK64; ++kk) {
      if (!kAligned && kb + kk >= kb1) {
        break;  // the slice's last stage holds one k64 block
      }
      uint4 q[kV2BlocksPerWarp];
#pragma unroll
      for (int b = 0; b < kV2BlocksPerWarp; ++b) {
        q[b] = stage[((warp * kV2BlocksPerWarp + b) * kV2StageK64 + kk) * kWarp + lane];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t a[4];
        ldmatrix_x4<false>(a, xs + (lane % 16) * kV2XStride + kk * 64 + j * 16 + 8 * (lane / 16));
#pragma unroll
        for (int b = 0; b < kV2BlocksPerWarp; ++b) {  // a block past m multiplies zero codes: no branch around the mma
          uint32_t pairs[4];
          dequant8_centered<T>(word_at(q[b], j), cur.magic[b][0], cur.magic[b][1], pairs);
          const uint32_t b0[2] = {pairs[0], pairs[1]}, b1[2] = {pairs[2], pairs[3]};
          mma_m16n8k16<T>(part[b][0], a, b0, part[b][0]);
          mma_m16n8k16<T>(part[b][1], a, b1, part[b][1]);
        }
        if (!kAligned && --steps_left == 0) {  // the group ends with this k16 step
          end_group();
        }
      }
    }
    if (kAligned) {
      steps_left -= kV2StageK64 * 4;
      if (steps_left == 0) {  // the group ends with this stage
        end_group();
      }
    }
  }
  cp_async_wait<0>();
  flush();  // a group cut by the slice's end
  if (!live[0]) {
    return;  // past m: no outputs, no counter (no barrier follows)
  }

  // This slice's share of the residual, columns [c0, c1) of the rank (a multiple of 8 wide: 16-byte U loads). Lane l
  // computes output column nb0 16 + l for every row, so each byte of U is loaded once; the sums then move by shuffle
  // to the lanes whose accumulators hold (row, column).
  if (rank > 0) {
    wait_for_producer();  // the shrink's z is complete and visible
    const int share = ((rank + splits - 1) / splits + kVec - 1) / kVec * kVec;
    const int c0 = split * share, c1 = min(rank, c0 + share);
    const int o = nb0 * 16 + lane;
    float res[kMaxRows] = {};
    if (o < m) {
      for (int c = c0; c < c1; c += kVec) {
        float uf[kVec];
        to_float8<T>(load8(u + static_cast<int64_t>(o) * rank + c, c1 - c, u_vec, true), uf);
#pragma unroll
        for (int row = 0; row < kMaxRows; ++row) {
          if (row < rows) {
            for (int k = 0; k < kVec && c + k < c1; ++k) {
              res[row] = fmaf(uf[k], z[row * rank + c + k], res[row]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int row = 0; row < kMaxRows; ++row) {
      if (row >= rows) {
        break;  // uniform: every lane leaves together
      }
#pragma unroll
      for (int b = 0; b < kV2BlocksPerWarp; ++b) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float v = __shfl_sync(0xffffffffu, res[row], 16 * b + 8 * h + 2 * t + e);
            if (g == row) {
              acc[b][h][e] += v;
            } else if (g + 8 == row) {
              acc[b][h][2 + e] += v;
            }
          }
        }
      }
    }
  }

  // acc[b][h][i] is output (row g + 8 (i / 2), column (nb0 + b) 16 + 8 h + 2 t + i % 2).
  auto each_output = [&](auto&& visit) {
#pragma unroll
    for (int b = 0; b < kV2BlocksPerWarp; ++b) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = g + 8 * (i / 2), o = (nb0 + b) * 16 + 8 * h + 2 * t + i % 2;
          if (row < rows && o < m) {
            visit(acc[b][h][i], row, o);
          }
        }
      }
    }
  };
  if (splits > 1) {
    each_output([&](float v, int row, int o) { partials[(static_cast<int64_t>(split) * rows + row) * np + o] = v; });
    if (!last_arrival(counters + nb0 / kV2BlocksPerWarp, splits, lane)) {
      return;
    }
    each_output([&](float& v, int row, int o) {
      v = 0.0f;
      for (int s = 0; s < splits; ++s) {
        v += partials[(static_cast<int64_t>(s) * rows + row) * np + o];
      }
    });
  }
  each_output([&](float v, int row, int o) {
    const float bv = bias != nullptr ? Convert<T>::to_float(bias[o]) : 0.0f;
    y[static_cast<int64_t>(row) * m + o] = Convert<T>::from_float(v + bv);
  });
}

struct V2Plan {
  LowrankDecodeDevice device;
  LowrankShrinkPlan shrink;  // used when rank > 0
  int tiles, splits, k64_per_split;
  size_t partial_bytes;  // (S, M, np) fp32 after the shrink's workspace, when S > 1
};

LowrankOpsStatus check_v2_args(const QuantLowrankDecodeArgs* a, char* err, size_t err_len) {
  if (a == nullptr) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len, "quant_lowrank_decode_v2: args must not be null");
  }
  LowrankOpsStatus status = check_dtype_and_rows("quant_lowrank_decode_v2", a->dtype, a->rows, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  if (a->n < 1 || a->m < 1 || a->rank < 0) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode_v2: n=%d and m=%d must be >= 1, rank=%d >= 0", a->n, a->m,
                            a->rank);
  }
  if (a->group_size < 16 || a->group_size % 16 != 0) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode_v2: group_size=%d must be a positive multiple of 16 (layout v2 "
                            "scales whole k16 mma steps); use layout v1",
                            a->group_size);
  }
  status = check_x_stride("quant_lowrank_decode_v2", a->rows, a->n, a->x_row_stride, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  if (a->x == nullptr || a->qweight == nullptr || a->scales == nullptr || a->zeros == nullptr || a->y == nullptr ||
      (a->rank > 0 && (a->v == nullptr || a->u == nullptr))) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode_v2: x, qweight, scales, zeros, y (and v, u when rank=%d > 0) must "
                            "not be null",
                            a->rank);
  }
  if (!aligned16(a->qweight) || !aligned16(a->scales) || reinterpret_cast<uintptr_t>(a->zeros) % 4 != 0) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode_v2: qweight and scales must be 16-byte aligned, zeros 4-byte aligned "
                            "(one vector load per lane and group)");
  }
  return LOWRANK_OPS_OK;
}

// S minimising the busiest SM's k64 blocks, ceil(tiles S / SMs) waves x ceil(KB / S) blocks each (a tie goes to the
// smaller S: fewer partials to reduce). 4096^2 on 132 SMs: 32 tiles x 4 slices of 16 k64 blocks = 128 CTAs.
void v2_split(int tiles, int kb_count, int sm_count, V2Plan* plan) {
  long long best = -1;
  for (int s = 1; s <= min(kb_count, kV2MaxSplits); ++s) {
    const int per = (kb_count + s - 1) / s;
    const int used = (kb_count + per - 1) / per;  // slices that are not empty
    const long long waves = (static_cast<long long>(tiles) * used + sm_count - 1) / sm_count;
    const long long busiest = waves * per;
    if (best < 0 || busiest < best) {
      best = busiest;
      plan->splits = used;
      plan->k64_per_split = per;
    }
  }
}

LowrankOpsStatus make_v2_plan(const QuantLowrankDecodeArgs* a, V2Plan* plan, char* err, size_t err_len) {
  const LowrankOpsStatus status = check_v2_args(a, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  const LowrankOpsStatus device_status = lowrank_decode_device(&plan->device, err, err_len);
  if (device_status != LOWRANK_OPS_OK) {
    return device_status;
  }
  if (kV2SmemBytes > plan->device.smem_optin_bytes) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode_v2: its %zu bytes of pipeline stages exceed this device's %zu bytes "
                            "of shared memory per block",
                            kV2SmemBytes, plan->device.smem_optin_bytes);
  }
  const int np = (a->m + 15) / 16 * 16;
  plan->tiles = (a->m + kV2TileN - 1) / kV2TileN;
  v2_split(plan->tiles, (a->n + 63) / 64, plan->device.sm_count, plan);
  plan->partial_bytes = plan->splits > 1 ? sizeof(float) * static_cast<size_t>(plan->splits) * a->rows * np : 0;
  plan->shrink = LowrankShrinkPlan{};
  if (a->rank > 0) {
    plan->shrink = lowrank_shrink_plan(a->rows, a->n, a->rank, plan->device.sm_count);
  }
  return LOWRANK_OPS_OK;
}

size_t v2_workspace_bytes(const QuantLowrankDecodeArgs* a, const V2Plan& plan) {
  return (a->rank > 0 ? plan.shrink.workspace_bytes : 0) + plan.partial_bytes;
}

template <typename T, bool kAligned>
LowrankOpsStatus launch_v2(const QuantLowrankDecodeArgs* a, const V2Plan& plan, cudaStream_t stream, char* err,
                           size_t err_len) {
  auto kernel = quant_v2_kernel<T, kAligned>;
  LOWRANK_OPS_CUDA_CHECK(allow_dynamic_smem(kernel, kV2SmemBytes));
  const bool x_vec = a->n % kVec == 0 && a->x_row_stride % kVec == 0 && aligned16(a->x);
  const bool u_vec = a->rank % kVec == 0 && aligned16(a->u);
  const int shrink_counters = a->rank > 0 ? lowrank_shrink_counters(a->rank) : 0;
  const size_t shrink_bytes = a->rank > 0 ? plan.shrink.workspace_bytes : 0;
  float* partials = a->workspace + shrink_bytes / sizeof(float);
  const float* z = nullptr;
  if (a->rank > 0) {
    const LowrankOpsStatus shrink = lowrank_shrink_launch(a->dtype, a->rows, a->n, a->rank, a->x, a->x_row_stride,
                                                          a->v, a->workspace, a->counters, &plan.shrink, stream, err,
                                                          err_len);
    if (shrink != LOWRANK_OPS_OK) {
      return shrink;
    }
    z = lowrank_shrink_z(a->workspace, &plan.shrink, a->rows, a->rank);
  }
  LOWRANK_OPS_CUDA_CHECK(launch_dependent(
      kernel, a->rank > 0 ? plan.device.pdl : 0, plan.tiles * plan.splits, kV2Threads, kV2SmemBytes, stream,
      static_cast<const T*>(a->x), reinterpret_cast<const uint4*>(a->qweight),
      static_cast<const uint4*>(a->scales), static_cast<const uint32_t*>(a->zeros), z, static_cast<const T*>(a->u), static_cast<const T*>(a->bias),
      static_cast<T*>(a->y), partials, a->counters + shrink_counters, a->rows, a->n, a->m, a->group_size, a->rank,
      a->x_row_stride, plan.tiles, plan.splits, plan.k64_per_split, x_vec, u_vec));
  LOWRANK_OPS_CUDA_CHECK(cudaGetLastError());
  return LOWRANK_OPS_OK;
}

}  // namespace
}  // namespace lowrank_ops_decode

using namespace lowrank_ops_decode;

extern "C" int quant_lowrank_decode_v2_counters(int m, int rank) {
  return (rank > 0 ? lowrank_shrink_counters(rank) : 0) + ((m + 15) / 16 + kV2BlocksPerWarp - 1) / kV2BlocksPerWarp;
}

extern "C" LowrankOpsStatus quant_lowrank_decode_v2_workspace_bytes(const QuantLowrankDecodeArgs* args, size_t* bytes,
                                                                    char* err, size_t err_len) {
  V2Plan plan;
  const LowrankOpsStatus status = make_v2_plan(args, &plan, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  *bytes = v2_workspace_bytes(args, plan);
  return LOWRANK_OPS_OK;
}

extern "C" LowrankOpsStatus quant_lowrank_decode_v2(const QuantLowrankDecodeArgs* args, cudaStream_t stream,
                                                    char* err, size_t err_len) {
  V2Plan plan;
  const LowrankOpsStatus status = make_v2_plan(args, &plan, err, err_len);
  if (status != LOWRANK_OPS_OK) {
    return status;
  }
  const size_t need = v2_workspace_bytes(args, plan);
  if (need > 0 && (args->workspace == nullptr || args->workspace_bytes < need)) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode_v2: workspace of %zu bytes is smaller than the %zu bytes "
                            "quant_lowrank_decode_v2_workspace_bytes asks for",
                            args->workspace == nullptr ? static_cast<size_t>(0) : args->workspace_bytes, need);
  }
  const size_t counters = static_cast<size_t>(quant_lowrank_decode_v2_counters(args->m, args->rank));
  if (args->counters == nullptr || args->counter_count < counters) {
    return lowrank_ops_fail(LOWRANK_OPS_BAD_ARGUMENT, err, err_len,
                            "quant_lowrank_decode_v2: %zu arrival counters given, quant_lowrank_decode_v2_counters = "
                            "%zu needed (zeroed once; the kernels leave them zero)",
                            args->counters == nullptr ? static_cast<size_t>(0) : args->counter_count, counters);
  }
  const bool aligned = args->group_size % (64 * kV2StageK64) == 0 && plan.k64_per_split % kV2StageK64 == 0 &&
                       ((args->n + 63) / 64) % kV2StageK64 == 0;
  if (args->dtype == LOWRANK_OPS_FLOAT16) {
    return aligned ? launch_v2<__half, true>(args, plan, stream, err, err_len)
                   : launch_v2<__half, false>(args, plan, stream, err, err_len);
  }
  return aligned ? launch_v2<__nv_bfloat16, true>(args, plan, stream, err, err_len)
                 : launch_v2<__nv_bfloat16, false>(args, plan, stream, err, err_len);
}
