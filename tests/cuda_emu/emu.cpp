// The emulator's runtime: fibers per block, barriers, shuffles, launch checks (see emu.h for the model).
#include "emu.h"

#include <stdio.h>
#include <ucontext.h>

#include <deque>
#include <map>
#include <string>
#include <vector>

namespace cuda_emu {
namespace {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;  // kernel locals are a few KB; generous so -O0 builds fit too
constexpr size_t kSharedGuardBytes = 4096;  // NaN poison past the dynamic shared memory: overruns read NaN
constexpr size_t kDefaultSmemLimit = 48 * 1024;
constexpr unsigned int kMaxThreadsPerBlock = 1024;

// A cp.async in flight: the 16 bytes it will write (read from the source when issued).
struct AsyncCopy {
  unsigned char* dst;
  unsigned char bytes[16];
};

struct Thread {
  ucontext_t context;
  uint3 index;
  bool done = false;
  bool parked = false;  // waiting in cudaGridDependencySynchronize for the predecessor's writes
  bool fenced = false;  // executed __threadfence() since its last atomic (see emu.h: visibility between blocks)
  std::vector<AsyncCopy> uncommitted;           // cp.async copies since the last commit_group
  std::deque<std::vector<AsyncCopy>> groups;    // committed groups, oldest first
};

// Bytes a launch changed in tracked memory: their address and the value after the launch.
struct Run {
  unsigned char* begin;
  std::vector<unsigned char> values;
};

struct Region {
  unsigned char* begin;
  size_t bytes;
};

struct Barrier {
  int total = 0;     // threads that take part
  int live = 0;      // threads that have not exited
  int arrived = 0;   // threads waiting in the current round
  unsigned generation = 0;
};

constexpr int kCollectiveWords = 10;  // mma.sync: 4 words of A, 2 of B, 4 of C per lane

struct Warp {
  Barrier barrier;
  uint32_t slots[kWarpSize];  // the 32 bits each lane publishes in a shuffle
  int lane_masks[kWarpSize];  // xor shuffles: the lane mask; index shuffles / collectives: a negative tag below
  uint32_t words[kWarpSize][kCollectiveWords];  // the operands each lane publishes in a collective
};

constexpr int kIndexShuffle = -1;
constexpr int kMmaF16 = -2, kMmaBf16 = -3, kLdmatrix = -4, kLdmatrixTrans = -5;

struct Buffer {
  std::string name;
  uintptr_t begin, end;
  long long loaded = 0;
};

struct Device {
  int sm_count = 4;
  size_t smem_optin = 227 * 1024;
  int cc_major = 9;
};

struct State {
  // launch
  dim3 grid, block;
  std::vector<unsigned char> shared;
  size_t shared_bytes = 0;  // the dynamic shared memory the launch asked for (shared adds a poison guard)
  // block
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  Barrier block_barrier;
  Thread* current = nullptr;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  unsigned long long progress = 0;  // arrivals, completed barriers and exits: a pass without any is a deadlock
  std::string failure;
  // process
  Device device;
  std::map<const void*, int> max_dynamic_smem;
  std::vector<LaunchRecord> launches;
  cudaError_t last_error = cudaSuccess;
  std::vector<std::vector<char>> stacks;
  std::vector<Buffer> buffers;
  // PDL (see emu.h)
  std::vector<Region> tracked;
  std::vector<Run> previous_writes;  // what the previous launch wrote
  bool previous_triggered = false;   // whether it let its dependent start early
  bool current_triggered = false;
  bool pdl_poisoned = false;         // this block reads poison where the previous launch wrote
  // visibility between blocks (see emu.h)
  bool visibility = false;                              // modelled in this launch
  std::vector<std::vector<unsigned char>> block_start;  // tracked memory as the current block found it
  std::vector<std::vector<char>> published;             // bytes the current block has published
  std::vector<std::pair<unsigned char*, unsigned char>> hidden;  // unpublished writes, applied when the launch ends
};

State& state() {
  static State s;
  return s;
}

// Leaves the current fiber for the scheduler until it resumes this one.
void yield() {
  State& s = state();
  Thread* self = s.current;
  swapcontext(&self->context, &s.scheduler);
}

// A fault inside a kernel: remembered, and the fiber never runs again (its stack holds no destructors).
[[noreturn]] void fail(const std::string& what) {
  State& s = state();
  if (s.failure.empty()) {
    s.failure = what;
  }
  for (;;) {
    yield();
  }
}

void arrive_and_wait(Barrier& b) {
  State& s = state();
  ++s.progress;
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  const unsigned generation = b.generation;
  while (b.generation == generation && s.failure.empty()) {
    yield();
  }
  if (!s.failure.empty()) {
    fail(s.failure);
  }
}

// A thread exits. Barriers are strict: CUDA leaves a __syncthreads() or full-mask shuffle that some threads never
// reach undefined, so exiting while others wait at one, or arriving after some have exited, is a fault.
void leave(Barrier& b, const char* what) {
  --b.live;
  if (b.arrived > 0 && state().failure.empty()) {
    state().failure = std::string("a thread exited while others wait at ") + what;
  }
}

int warp_of(const Thread* t) {
  const State& s = state();
  const unsigned linear = t->index.x + s.block.x * (t->index.y + s.block.y * t->index.z);
  return static_cast<int>(linear / kWarpSize);
}

int lane_of(const Thread* t) {
  const State& s = state();
  return static_cast<int>((t->index.x + s.block.x * (t->index.y + s.block.y * t->index.z)) % kWarpSize);
}

void trampoline() {
  State& s = state();
  (*s.body)();
  Thread* self = s.current;
  self->done = true;
  ++s.progress;
  leave(s.warps[warp_of(self)].barrier, "a warp shuffle");
  leave(s.block_barrier, "__syncthreads()");
  // returning resumes uc_link: the scheduler
}

void poison(const std::vector<Run>& runs) {
  for (const Run& r : runs) {
    memset(r.begin, 0xFF, r.values.size());
  }
}

void restore(const std::vector<Run>& runs) {
  for (const Run& r : runs) {
    memcpy(r.begin, r.values.data(), r.values.size());
  }
}

std::vector<std::vector<unsigned char>> snapshot();

// Marks every tracked byte the current block has changed as published (visible to the blocks after it).
void publish_block_writes() {
  State& s = state();
  for (size_t t = 0; t < s.tracked.size(); ++t) {
    const unsigned char* now = s.tracked[t].begin;
    for (size_t i = 0; i < s.tracked[t].bytes; ++i) {
      if (now[i] != s.block_start[t][i]) {
        s.published[t][i] = 1;
      }
    }
  }
}

// At the end of a block: its unpublished writes are taken back (the later blocks read what was there before) and
// kept for the end of the launch.
void hide_unpublished_writes() {
  State& s = state();
  for (size_t t = 0; t < s.tracked.size(); ++t) {
    unsigned char* now = s.tracked[t].begin;
    for (size_t i = 0; i < s.tracked[t].bytes; ++i) {
      if (now[i] != s.block_start[t][i] && !s.published[t][i]) {
        s.hidden.emplace_back(now + i, now[i]);
        now[i] = s.block_start[t][i];
      }
    }
  }
}

std::vector<std::vector<unsigned char>> snapshot() {
  std::vector<std::vector<unsigned char>> copies;
  for (const Region& r : state().tracked) {
    copies.emplace_back(r.begin, r.begin + r.bytes);
  }
  return copies;
}

// The byte runs of tracked memory that differ from `before`, with their new values.
std::vector<Run> changed_since(const std::vector<std::vector<unsigned char>>& before) {
  std::vector<Run> runs;
  const std::vector<Region>& tracked = state().tracked;
  for (size_t t = 0; t < tracked.size() && t < before.size(); ++t) {
    const Region& r = tracked[t];
    size_t i = 0;
    while (i < r.bytes) {
      if (r.begin[i] == before[t][i]) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < r.bytes && r.begin[j] != before[t][j]) {
        ++j;
      }
      runs.push_back(Run{r.begin + i, std::vector<unsigned char>(r.begin + i, r.begin + j)});
      i = j;
    }
  }
  return runs;
}

cudaError_t run_block(size_t threads) {
  State& s = state();
  s.threads.assign(threads, Thread{});
  s.warps.assign((threads + kWarpSize - 1) / kWarpSize, Warp{});
  for (size_t w = 0; w < s.warps.size(); ++w) {
    s.warps[w].barrier.total = s.warps[w].barrier.live =
        static_cast<int>(std::min<size_t>(kWarpSize, threads - w * kWarpSize));
  }
  s.block_barrier = Barrier{};
  s.block_barrier.total = s.block_barrier.live = static_cast<int>(threads);
  if (s.stacks.size() < threads) {
    s.stacks.resize(threads);
  }
  for (size_t i = 0; i < threads; ++i) {
    Thread& t = s.threads[i];
    t.index = uint3{static_cast<unsigned>(i % s.block.x), static_cast<unsigned>((i / s.block.x) % s.block.y),
                    static_cast<unsigned>(i / (s.block.x * s.block.y))};
    if (s.stacks[i].size() < kStackBytes) {
      s.stacks[i].resize(kStackBytes);
    }
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = s.stacks[i].data();
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &s.scheduler;
    makecontext(&t.context, trampoline, 0);
  }
  size_t live = threads;
  while (live > 0) {
    const unsigned long long before = s.progress;
    live = 0;
    for (Thread& t : s.threads) {
      if (t.done) {
        continue;
      }
      s.current = &t;
      threadIdx = t.index;
      swapcontext(&s.scheduler, &t.context);
      s.current = nullptr;
      if (!s.failure.empty()) {
        return cudaErrorLaunchFailure;
      }
      live += t.done ? 0 : 1;
    }
    if (live > 0 && s.progress == before && s.pdl_poisoned &&
        std::any_of(s.threads.begin(), s.threads.end(), [](const Thread& t) { return t.parked && !t.done; })) {
      // Every live thread waits for the predecessor or at a barrier: the predecessor is done, its writes visible.
      restore(s.previous_writes);
      s.pdl_poisoned = false;
      ++s.progress;
      continue;
    }
    if (live > 0 && s.progress == before) {
      s.failure = "deadlock: every live thread waits at a barrier the others never reach (divergent "
                  "__syncthreads or shuffle)";
      return cudaErrorLaunchFailure;
    }
  }
  return cudaSuccess;
}

}  // namespace

void configure(int sm_count, size_t smem_optin_bytes, int cc_major) {
  State& s = state();
  s.device.sm_count = sm_count;
  s.device.smem_optin = smem_optin_bytes;
  s.device.cc_major = cc_major;
}

int launch_count() { return static_cast<int>(state().launches.size()); }
LaunchRecord launch_record(int i) { return state().launches.at(static_cast<size_t>(i)); }
void reset_launches() { state().launches.clear(); }

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  State& s = state();
  if (bytes < 0 || static_cast<size_t>(bytes) > s.device.smem_optin) {
    return cudaErrorInvalidValue;
  }
  s.max_dynamic_smem[kernel] = bytes;
  return cudaSuccess;
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, bool programmatic, const void* kernel,
                     const std::function<void()>& body) {
  State& s = state();
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  const size_t blocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || blocks == 0) {
    return cudaErrorInvalidConfiguration;
  }
  const auto opt_in = s.max_dynamic_smem.find(kernel);
  const size_t limit = opt_in == s.max_dynamic_smem.end() ? kDefaultSmemLimit
                                                          : std::max<size_t>(kDefaultSmemLimit, opt_in->second);
  if (smem_bytes > limit) {
    return cudaErrorInvalidValue;
  }
  s.launches.push_back(LaunchRecord{grid.x, block.x, smem_bytes, programmatic});
  s.grid = grid;
  s.block = block;
  gridDim = grid;
  blockDim = block;
  s.body = &body;
  s.failure.clear();
  // PDL: this launch may start as soon as a triggering predecessor triggered, before its writes are visible.
  const bool overlaps = programmatic && s.previous_triggered && !s.previous_writes.empty();
  const std::vector<std::vector<unsigned char>> before = snapshot();
  s.visibility = !overlaps && !s.tracked.empty();  // PDL poisoning and this model are not combined
  s.hidden.clear();
  s.current_triggered = false;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        s.shared.assign(smem_bytes + kSharedGuardBytes, 0xFF);  // every float reads NaN until written
        s.shared_bytes = smem_bytes;
        if (overlaps) {
          poison(s.previous_writes);
          s.pdl_poisoned = true;
        }
        if (s.visibility) {
          s.block_start = snapshot();
          s.published.assign(s.tracked.size(), {});
          for (size_t t = 0; t < s.tracked.size(); ++t) {
            s.published[t].assign(s.tracked[t].bytes, 0);
          }
        }
        const cudaError_t status = run_block(threads);
        if (s.visibility) {
          hide_unpublished_writes();
        }
        if (s.pdl_poisoned) {  // no thread of the block waited
          restore(s.previous_writes);
          s.pdl_poisoned = false;
        }
        if (status != cudaSuccess) {
          fprintf(stderr, "cuda_emu: block (%u, %u, %u): %s\n", x, y, z, s.failure.c_str());
          s.previous_writes.clear();
          return status;
        }
      }
    }
  }
  for (const auto& [address, value] : s.hidden) {
    *address = value;
  }
  s.hidden.clear();
  s.previous_writes = changed_since(before);
  s.previous_triggered = s.current_triggered;
  return cudaSuccess;
}

void* dynamic_shared_base() { return state().shared.data(); }

void sync_block() {
  Barrier& b = state().block_barrier;
  if (b.live != b.total) {
    fail("__syncthreads() after threads of the block exited");
  }
  arrive_and_wait(b);
}

namespace {

// Every lane of the calling thread's warp must call this with a full mask and none may have exited.
Warp& full_warp(unsigned int mask, const char* what) {
  State& s = state();
  Warp& warp = s.warps[warp_of(s.current)];
  if (mask != 0xFFFFFFFFu) {
    fail(std::string(what) + ": only the full-warp mask is emulated");
  }
  if (warp.barrier.live != kWarpSize) {
    fail(std::string(what) + " with a full mask while lanes of the warp have exited");
  }
  return warp;
}

// One shuffle round: publish `bits` with the lane's `lane_mask`, read lane `source`'s, which must have taken part in
// the same kind of shuffle.
uint32_t shuffle(Warp& warp, uint32_t bits, int lane_mask, int source, const char* what) {
  const int lane = lane_of(state().current);
  warp.slots[lane] = bits;
  warp.lane_masks[lane] = lane_mask;
  arrive_and_wait(warp.barrier);  // every lane has published
  if (warp.lane_masks[source] != lane_mask) {
    fail(std::string(what) + ": lanes of one warp pass different lane masks in the same shuffle (divergence)");
  }
  const uint32_t result = warp.slots[source];
  arrive_and_wait(warp.barrier);  // every lane has read before anyone publishes again
  return result;
}

}  // namespace

float shuffle_xor(unsigned int mask, float value, int lane_mask) {
  Warp& warp = full_warp(mask, "__shfl_xor_sync");
  const int partner = (lane_of(state().current) ^ lane_mask) & (kWarpSize - 1);
  return bits_float(shuffle(warp, float_bits(value), lane_mask, partner, "__shfl_xor_sync"));
}

unsigned int shuffle_idx(unsigned int mask, unsigned int value, int src_lane) {
  Warp& warp = full_warp(mask, "__shfl_sync");
  return shuffle(warp, value, kIndexShuffle, src_lane & (kWarpSize - 1), "__shfl_sync");
}

void sync_warp(unsigned int mask) { arrive_and_wait(full_warp(mask, "__syncwarp").barrier); }

namespace {

// A warp-collective instruction: every lane publishes `count` words under `tag`; after the barrier every lane must be
// in the same instruction, and `compute` reads all lanes' words; the second barrier keeps them until all have read.
template <typename Compute>
void collective(const char* what, int tag, const uint32_t* words, int count, Compute compute) {
  Warp& warp = full_warp(0xFFFFFFFFu, what);
  const int lane = lane_of(state().current);
  memcpy(warp.words[lane], words, sizeof(uint32_t) * count);
  warp.lane_masks[lane] = tag;
  arrive_and_wait(warp.barrier);
  for (int l = 0; l < kWarpSize; ++l) {
    if (warp.lane_masks[l] != tag) {
      fail(std::string(what) + ": lanes of one warp are in different warp-level instructions (divergence)");
    }
  }
  compute(warp.words, lane);
  arrive_and_wait(warp.barrier);
}

// The m16n8k16 fragment layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"),
// with g = lane / 4, t = lane % 4; element i of a fragment is half i % 2 (low first) of register i / 2.
// A (16 x 16, elements a0..a7): row g + 8 * ((i / 2) % 2), column 2t + i % 2 + 8 * (i / 4).
int a_row(int lane, int i) { return lane / 4 + 8 * ((i / 2) % 2); }
int a_col(int lane, int i) { return 2 * (lane % 4) + i % 2 + 8 * (i / 4); }
// B (16 x 8, K x N, elements b0..b3): row 2t + i % 2 + 8 * (i / 2), column g.
int b_row(int lane, int i) { return 2 * (lane % 4) + i % 2 + 8 * (i / 2); }
int b_col(int lane, int) { return lane / 4; }
// C and D (16 x 8, fp32 c0..c3): row g + 8 * (i / 2), column 2t + i % 2.
int c_row(int lane, int i) { return lane / 4 + 8 * (i / 2); }
int c_col(int lane, int i) { return 2 * (lane % 4) + i % 2; }

double b16_value(uint32_t word, int half, bool bf16) {
  const uint16_t bits = static_cast<uint16_t>(word >> (16 * half));
  return bf16 ? bfloat16_to_float(bits) : half_to_float(bits);
}

// p .. p + bytes lies inside the block's dynamic shared memory.
bool in_shared(const void* p, size_t bytes) {
  const State& s = state();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return c >= s.shared.data() && c + bytes <= s.shared.data() + s.shared_bytes;
}

}  // namespace

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], bool bf16) {
  uint32_t words[kCollectiveWords];
  memcpy(words, a, sizeof(a));
  memcpy(words + 4, b, sizeof(b));
  memcpy(words + 6, c, sizeof(c));
  collective("mma.sync.m16n8k16", bf16 ? kMmaBf16 : kMmaF16, words, kCollectiveWords,
             [&](const uint32_t (*all)[kCollectiveWords], int lane) {
               double A[16][16], B[16][8], C[16][8];
               for (int l = 0; l < kWarpSize; ++l) {
                 for (int i = 0; i < 8; ++i) {
                   A[a_row(l, i)][a_col(l, i)] = b16_value(all[l][i / 2], i % 2, bf16);
                 }
                 for (int i = 0; i < 4; ++i) {
                   B[b_row(l, i)][b_col(l, i)] = b16_value(all[l][4 + i / 2], i % 2, bf16);
                   C[c_row(l, i)][c_col(l, i)] = bits_float(all[l][6 + i]);
                 }
               }
               for (int i = 0; i < 4; ++i) {
                 double sum = C[c_row(lane, i)][c_col(lane, i)];
                 for (int k = 0; k < 16; ++k) {
                   sum += A[c_row(lane, i)][k] * B[k][c_col(lane, i)];
                 }
                 d[i] = static_cast<float>(sum);
               }
             });
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  uint32_t words[2];
  memcpy(words, &row, sizeof(row));
  collective(trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", trans ? kLdmatrixTrans : kLdmatrix, words, 2,
             [&](const uint32_t (*all)[kCollectiveWords], int lane) {
               const uint16_t* rows[kWarpSize];
               for (int l = 0; l < kWarpSize; ++l) {
                 memcpy(&rows[l], all[l], sizeof(rows[l]));
                 if (reinterpret_cast<uintptr_t>(rows[l]) % 16 != 0 || !in_shared(rows[l], 16)) {
                   char message[160];
                   snprintf(message, sizeof(message),
                            "ldmatrix: lane %d's row address %p is not a 16-byte aligned row of shared memory", l,
                            static_cast<const void*>(rows[l]));
                   fail(message);
                 }
               }
               // Matrix i's rows are the addresses of lanes 8i .. 8i + 7 (PTX ISA, ldmatrix).
               for (int i = 0; i < 4; ++i) {
                 uint32_t word = 0u;
                 for (int h = 0; h < 2; ++h) {
                   const uint16_t e = trans ? rows[8 * i + 2 * (lane % 4) + h][lane / 4]
                                            : rows[8 * i + lane / 4][2 * (lane % 4) + h];
                   word |= static_cast<uint32_t>(e) << (16 * h);
                 }
                 r[i] = word;
               }
             });
}

void cp_async16(void* dst, const void* src, int src_bytes) {
  Thread* self = state().current;
  if (src_bytes < 0 || src_bytes > 16) {
    fail("cp.async: src_bytes=" + std::to_string(src_bytes) + " must be in 0 .. 16");
  }
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || !in_shared(dst, 16) ||
      (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)) {
    fail("cp.async: the destination must be 16 aligned bytes of shared memory and the source 16-byte aligned");
  }
  AsyncCopy copy{static_cast<unsigned char*>(dst), {}};
  if (src_bytes > 0) {
    note_load(src, static_cast<size_t>(src_bytes));
    memcpy(copy.bytes, src, static_cast<size_t>(src_bytes));
  }
  memset(copy.bytes + src_bytes, 0, 16 - static_cast<size_t>(src_bytes));
  memset(dst, 0xFF, 16);  // poison until the wait that retires its group
  self->uncommitted.push_back(copy);
}

void cp_async_commit() {
  Thread* self = state().current;
  self->groups.push_back(std::move(self->uncommitted));
  self->uncommitted.clear();
}

void cp_async_wait(int pending) {
  Thread* self = state().current;
  while (self->groups.size() > static_cast<size_t>(pending)) {
    for (const AsyncCopy& copy : self->groups.front()) {
      memcpy(copy.dst, copy.bytes, sizeof(copy.bytes));
    }
    self->groups.pop_front();
  }
}

void fence() { state().current->fenced = true; }

unsigned int atomic_add(unsigned int* address, unsigned int value) {
  State& s = state();
  if (s.current->fenced && s.visibility) {
    publish_block_writes();
  }
  s.current->fenced = false;
  const unsigned int old = *address;
  *address = old + value;
  return old;
}

void track_memory(const void* base, size_t bytes) {
  state().tracked.push_back(Region{static_cast<unsigned char*>(const_cast<void*>(base)), bytes});
}

void pdl_trigger() { state().current_triggered = true; }

void pdl_wait() {
  State& s = state();
  Thread* self = s.current;
  while (s.pdl_poisoned) {
    self->parked = true;
    yield();
  }
  self->parked = false;
}

void register_buffer(const char* name, const void* base, size_t bytes) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(base);
  state().buffers.push_back(Buffer{name, begin, begin + bytes, 0});
}

void clear_buffers() {
  state().buffers.clear();
  state().tracked.clear();
  state().previous_writes.clear();
  state().previous_triggered = false;
}

long long loaded_bytes(const char* name) {
  for (const Buffer& b : state().buffers) {
    if (b.name == name) {
      return b.loaded;
    }
  }
  return -1;
}

void note_load(const void* p, size_t bytes) {
  State& s = state();
  if (s.buffers.empty()) {
    return;
  }
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  for (Buffer& b : s.buffers) {
    if (begin >= b.begin && begin + bytes <= b.end) {
      b.loaded += static_cast<long long>(bytes);
      return;
    }
  }
  char message[160];
  snprintf(message, sizeof(message), "a %zu-byte load at %p lies outside every buffer of the launch (thread %u)",
           bytes, p, threadIdx.x);
  fail(message);
}

void record_error(cudaError_t error) {
  if (error != cudaSuccess) {
    state().last_error = error;
  }
}

}  // namespace cuda_emu

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim;
dim3 gridDim;

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const auto& d = cuda_emu::state().device;
  if (device != 0) {
    return cudaErrorInvalidValue;
  }
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = d.sm_count;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(d.smem_optin);
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = d.cc_major;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::state().last_error;
  cuda_emu::state().last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return cuda_emu::state().last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaErrorLaunchFailure && !cuda_emu::state().failure.empty() ? cuda_emu::state().failure.c_str()
                                                                                : cudaGetErrorName(error);
}
