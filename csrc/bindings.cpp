// Thin binding for the lowrank-ops C++/CUDA extension `lowrank_ops._C` (built by setup.py, loaded by
// lowrank_ops/_C_loader.py). The only file in csrc/ that includes torch or pybind11 headers: kernel files stay
// torch-free so plain nvcc compile-checks them on any machine (tests/test_build.py).
//
// Two kinds of entry point live here:
// - pybind11 functions for non-op utilities (device properties, the launch self-check), below.
// - backend-private ops (issue 9): lowrank_ops::lowrank_matmul_cuda and lowrank_ops::quant_lowrank_matmul_cuda,
//   defined with TORCH_LIBRARY_FRAGMENT and implemented for the CUDA key only. Caution: the public ops
//   (lowrank_ops/ops/*.py) are torch.library.custom_op's whose Python body runs select_backend; an impl registered
//   on the CUDA key of the public op itself would replace that body for every CUDA tensor and bypass
//   select_backend. So each kernel gets a private op that the public op's Backend.CUDA branch calls, and
//   lowrank_ops/_C_loader.py lists a public op as CUDA-capable only when its private op is registered.
//   Each wrapper checks its tensors (naming the tensor, its shape and the rule: TypeError for dtypes, ValueError
//   for the rest), sets a c10::cuda::CUDAGuard on x's device, takes the current stream and calls a torch-free
//   launcher declared in csrc/lowrank_decode.h / csrc/quant_lowrank_decode.h.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "device_info.h"
#include "lowrank_decode.h"
#include "quant_lowrank_decode.h"
#include "quant_lowrank_decode_v2.h"

namespace {

// At least `count` split-K arrival counters for launches on `stream` of the current device, all zero: one buffer per
// (device, stream), zeroed when allocated and left zero by every decode call (csrc/lowrank_decode.cu), so a call
// needs no memset and a captured CUDA graph replays with the buffer it captured. A buffer that grows stays
// referenced (a graph may still use it). Allocate outside graph capture (a warm-up call), or the zeroing is captured.
unsigned int* arrival_counters(const at::Tensor& like, cudaStream_t stream, int64_t count) {
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, at::Tensor> buffers;
  static std::vector<at::Tensor> grown_out_of;
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = buffers[{like.get_device(), stream}];
  if (!buffer.defined() || buffer.numel() < count) {
    if (buffer.defined()) {
      grown_out_of.push_back(buffer);
    }
    const int64_t size = std::max(count, buffer.defined() ? 2 * buffer.numel() : int64_t{0});
    buffer = at::zeros({size}, like.options().dtype(at::kInt));
  }
  return reinterpret_cast<unsigned int*>(buffer.data_ptr<int32_t>());
}

// LOWRANK_OPS_BAD_ARGUMENT becomes ValueError, anything else RuntimeError; the message comes from device_info.cu.
void raise_on_error(LowrankOpsStatus status, const char* err) {
  if (status == LOWRANK_OPS_OK) {
    return;
  }
  if (status == LOWRANK_OPS_BAD_ARGUMENT) {
    throw pybind11::value_error(err);
  }
  throw std::runtime_error(err);
}

pybind11::dict device_info(int index) {
  LowrankOpsDeviceInfo info{};
  char err[LOWRANK_OPS_ERROR_LEN] = {0};
  raise_on_error(lowrank_ops_device_info(index, &info, err, sizeof(err)), err);

  pybind11::dict d;
  d["index"] = info.index;
  d["name"] = std::string(info.name);
  d["compute_capability"] = pybind11::make_tuple(info.cc_major, info.cc_minor);
  d["sm_count"] = info.sm_count;
  d["warp_size"] = info.warp_size;
  d["max_threads_per_block"] = info.max_threads_per_block;
  d["shared_memory_per_block"] = info.shared_memory_per_block;
  d["shared_memory_per_block_optin"] = info.shared_memory_per_block_optin;
  d["shared_memory_per_sm"] = info.shared_memory_per_sm;
  d["l2_cache_bytes"] = info.l2_cache_bytes;
  d["max_persisting_l2_bytes"] = info.max_persisting_l2_bytes;
  d["total_memory_bytes"] = info.total_memory_bytes;
  return d;
}

void self_check(int index) {
  char err[LOWRANK_OPS_ERROR_LEN] = {0};
  raise_on_error(lowrank_ops_device_self_check(index, err, sizeof(err)), err);
}

// ---- ops ----------------------------------------------------------------------------------------------------------

std::string shape_str(const at::Tensor& t) {
  std::ostringstream out;
  out << "(";
  for (int64_t d = 0; d < t.dim(); ++d) {
    out << (d ? ", " : "") << t.size(d);
  }
  out << (t.dim() == 1 ? ",)" : ")");
  return out.str();
}

// Same device as x, x's dtype, `dims` dimensions, contiguous (row-major): the rules every weight follows.
void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t dims,
                   at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
                    "; all tensors must share a CUDA device");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, ".dtype=", t.scalar_type(), " must be ", dtype);
  TORCH_CHECK_VALUE(t.dim() == dims, op, ": ", name, " must be ", dims, "-D, got ", name, ".shape=", shape_str(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous (row-major), got ", name,
                    ".shape=", shape_str(t), " with strides ", t.strides());
}

// x: a 2-D (M, n) fp16 / bf16 CUDA tensor with unit column stride and 1 <= M <= 16.
LowrankOpsDtype check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op, ": x.dtype=",
                   x.scalar_type(), " must be torch.float16 or torch.bfloat16");
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (M, n), got x.shape=", shape_str(x));
  TORCH_CHECK_VALUE(x.size(0) >= 1 && x.size(0) <= LOWRANK_OPS_DECODE_MAX_ROWS, op, ": x.shape[0]=M=", x.size(0),
                    " must be in 1 .. ", LOWRANK_OPS_DECODE_MAX_ROWS, " (decode kernels), x.shape=", shape_str(x));
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(1) <= INT32_MAX, op, ": x.shape[1]=n=", x.size(1),
                    " must be in 1 .. 2^31 - 1");
  TORCH_CHECK_VALUE(x.stride(1) == 1 && (x.size(0) == 1 || x.stride(0) >= x.size(1)), op,
                    ": x must have unit column stride and non-overlapping rows, got x.shape=", shape_str(x),
                    " with strides ", x.strides());
  return x.scalar_type() == at::kHalf ? LOWRANK_OPS_FLOAT16 : LOWRANK_OPS_BFLOAT16;
}

// LOWRANK_OPS_BAD_ARGUMENT becomes ValueError, anything else RuntimeError (c10 errors, so the dispatcher keeps
// the Python type).
void check_status(LowrankOpsStatus status, const char* err) {
  TORCH_CHECK_VALUE(status != LOWRANK_OPS_BAD_ARGUMENT, err);
  TORCH_CHECK(status == LOWRANK_OPS_OK, err);
}

at::Tensor lowrank_matmul_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& u,
                               const std::optional<at::Tensor>& bias) {
  const char* op = "lowrank_matmul_cuda";
  LowrankDecodeArgs args{};
  args.dtype = check_x(op, x);
  check_operand(op, "v", v, x, 2, x.scalar_type());
  check_operand(op, "u", u, x, 2, x.scalar_type());
  TORCH_CHECK_VALUE(v.size(1) == x.size(1), op, ": v.shape[1]=", v.size(1), " must equal n=x.shape[1]=", x.size(1),
                    " (v.shape=", shape_str(v), ")");
  TORCH_CHECK_VALUE(v.size(0) >= 1 && u.size(1) == v.size(0), op, ": u.shape=", shape_str(u),
                    " must be (m, r) with r=v.shape[0]=", v.size(0), " >= 1");
  TORCH_CHECK_VALUE(u.size(0) >= 1 && u.size(0) <= INT32_MAX, op, ": u.shape[0]=m=", u.size(0),
                    " must be in 1 .. 2^31 - 1");
  if (bias.has_value()) {
    check_operand(op, "bias", *bias, x, 1, x.scalar_type());
    TORCH_CHECK_VALUE(bias->size(0) == u.size(0), op, ": bias.shape=", shape_str(*bias), " must be (",
                      u.size(0), ",) (m = u.shape[0])");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), u.size(0)}, x.options());
  args.rows = static_cast<int>(x.size(0));
  args.n = static_cast<int>(x.size(1));
  args.m = static_cast<int>(u.size(0));
  args.rank = static_cast<int>(v.size(0));
  args.x = x.data_ptr();
  args.x_row_stride = x.stride(0);
  args.v = v.data_ptr();
  args.u = u.data_ptr();
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  args.y = y.data_ptr();

  char err[LOWRANK_OPS_ERROR_LEN] = {0};
  check_status(lowrank_decode_workspace_bytes(&args, &args.workspace_bytes, err, sizeof(err)), err);
  at::Tensor workspace = at::empty({static_cast<int64_t>(args.workspace_bytes / sizeof(float))},
                                   x.options().dtype(at::kFloat));
  args.workspace = workspace.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  args.counter_count = static_cast<size_t>(lowrank_shrink_counters(args.rank));
  args.counters = arrival_counters(x, stream, static_cast<int64_t>(args.counter_count));
  check_status(lowrank_decode(&args, stream, err, sizeof(err)), err);
  return y;
}

// The residual and bias checks, the launch and its workspace / counters, shared by the quantized-base ops (layouts
// v1 and v2; `args` carries the base). counters(m, rank): the arrival counters the launcher needs.
template <typename Bytes, typename Decode, typename Counters>
at::Tensor run_quant(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& v,
                     const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& bias, int64_t m,
                     QuantLowrankDecodeArgs& args, Bytes workspace_bytes, Decode decode, Counters counters) {
  const int64_t n = x.size(1);
  TORCH_CHECK_VALUE(v.has_value() == u.has_value(), op, ": v and u must both be given or both be None");
  int64_t rank = 0;
  if (v.has_value()) {
    check_operand(op, "v", *v, x, 2, x.scalar_type());
    check_operand(op, "u", *u, x, 2, x.scalar_type());
    rank = v->size(0);
    TORCH_CHECK_VALUE(v->size(1) == n, op, ": v.shape[1]=", v->size(1), " must equal n=x.shape[1]=", n,
                      " (v.shape=", shape_str(*v), ")");
    TORCH_CHECK_VALUE(u->size(0) == m && u->size(1) == rank, op, ": u.shape=", shape_str(*u), " must be (m, r) = (",
                      m, ", ", rank, ")");
  }
  if (bias.has_value()) {
    check_operand(op, "bias", *bias, x, 1, x.scalar_type());
    TORCH_CHECK_VALUE(bias->size(0) == m, op, ": bias.shape=", shape_str(*bias), " must be (", m,
                      ",) (m = the base's output count)");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), m}, x.options());
  args.rows = static_cast<int>(x.size(0));
  args.n = static_cast<int>(n);
  args.m = static_cast<int>(m);
  args.rank = static_cast<int>(rank);
  args.x = x.data_ptr();
  args.x_row_stride = x.stride(0);
  args.v = rank > 0 ? v->data_ptr() : nullptr;
  args.u = rank > 0 ? u->data_ptr() : nullptr;
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  args.y = y.data_ptr();

  char err[LOWRANK_OPS_ERROR_LEN] = {0};
  check_status(workspace_bytes(&args, &args.workspace_bytes, err, sizeof(err)), err);
  at::Tensor workspace = at::empty({static_cast<int64_t>(args.workspace_bytes / sizeof(float))},
                                   x.options().dtype(at::kFloat));
  args.workspace = args.workspace_bytes > 0 ? workspace.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  args.counter_count = static_cast<size_t>(counters(args.m, args.rank));
  if (args.counter_count > 0) {
    args.counters = arrival_counters(x, stream, static_cast<int64_t>(args.counter_count));
  }
  check_status(decode(&args, stream, err, sizeof(err)), err);
  return y;
}

at::Tensor quant_lowrank_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                     const at::Tensor& zeros, const std::optional<at::Tensor>& v,
                                     const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& bias,
                                     int64_t bits, int64_t group_size) {
  const char* op = "quant_lowrank_matmul_cuda";
  QuantLowrankDecodeArgs args{};
  args.dtype = check_x(op, x);
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 4, op, ": bits=", bits,
                    " must be 2, 3 or 4 (codes in 4-bit slots of int32 words, layout v1)");
  TORCH_CHECK_VALUE(group_size >= 8 && group_size % 8 == 0 && group_size <= INT32_MAX, op, ": group_size=",
                    group_size, " must be a positive multiple of 8 (an int32 word of 8 codes never straddles groups)");
  const int64_t n = x.size(1);
  const int64_t words = (n + 7) / 8;
  const int64_t groups = (n + group_size - 1) / group_size;
  check_operand(op, "qweight", qweight, x, 2, at::kInt);
  TORCH_CHECK_VALUE(qweight.size(0) >= 1 && qweight.size(0) <= INT32_MAX && qweight.size(1) == words, op,
                    ": qweight.shape=", shape_str(qweight), " must be (m, ceil(n / 8)) = (m, ", words, ") for n=", n,
                    " with m >= 1");
  const int64_t m = qweight.size(0);
  check_operand(op, "scales", scales, x, 2, x.scalar_type());
  check_operand(op, "zeros", zeros, x, 2, x.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"scales", scales}, {"zeros", zeros}}) {
    TORCH_CHECK_VALUE(t.size(0) == m && t.size(1) == groups, op, ": ", name, ".shape=", shape_str(t),
                      " must be (m, ceil(n / group_size)) = (", m, ", ", groups, ") for n=", n,
                      ", group_size=", group_size);
  }
  args.group_size = static_cast<int>(group_size);
  args.qweight = qweight.data_ptr<int32_t>();
  args.scales = scales.data_ptr();
  args.zeros = zeros.data_ptr();
  return run_quant(op, x, v, u, bias, m, args, quant_lowrank_decode_workspace_bytes, quant_lowrank_decode,
                   [](int, int rank) { return rank > 0 ? lowrank_shrink_counters(rank) : 0; });
}

// layout v2 (lowrank_ops.quant_format.to_layout_v2; the int4 kernel v2, csrc/quant_lowrank_decode_v2.cu): m is the
// base's output count (qweight is padded to whole n16 blocks). Not chosen by AUTO: no GPU has measured it yet.
at::Tensor quant_lowrank_matmul_v2_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                        const at::Tensor& zeros, const std::optional<at::Tensor>& v,
                                        const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& bias,
                                        int64_t m, int64_t group_size) {
  const char* op = "quant_lowrank_matmul_v2_cuda";
  QuantLowrankDecodeArgs args{};
  args.dtype = check_x(op, x);
  TORCH_CHECK_VALUE(group_size >= 16 && group_size % 16 == 0 && group_size <= INT32_MAX, op, ": group_size=",
                    group_size, " must be a positive multiple of 16 (layout v2)");
  TORCH_CHECK_VALUE(m >= 1 && m <= INT32_MAX, op, ": m=", m, " must be >= 1");
  const int64_t n = x.size(1);
  const int64_t groups = (n + group_size - 1) / group_size, warps = (m + 31) / 32;
  check_operand(op, "qweight", qweight, x, 4, at::kInt);
  check_operand(op, "scales", scales, x, 4, x.scalar_type());
  check_operand(op, "zeros", zeros, x, 4, at::kByte);
  const std::vector<std::pair<const char*, std::pair<const at::Tensor*, std::vector<int64_t>>>> shapes = {
      {"qweight", {&qweight, {(m + 15) / 16, (n + 63) / 64, 32, 4}}},
      {"scales", {&scales, {groups, warps, 32, 8}}},
      {"zeros", {&zeros, {groups, warps, 32, 4}}}};
  for (const auto& [name, tensor_and_shape] : shapes) {
    const auto& [t, want] = tensor_and_shape;
    TORCH_CHECK_VALUE(t->sizes().vec() == want, op, ": ", name, ".shape=", shape_str(*t), " must be ",
                      c10::IntArrayRef(want), " in layout v2 for m=", m, ", n=", n, ", group_size=", group_size);
  }
  args.group_size = static_cast<int>(group_size);
  args.qweight = qweight.data_ptr<int32_t>();
  args.scales = scales.data_ptr();
  args.zeros = zeros.data_ptr();
  return run_quant(op, x, v, u, bias, m, args, quant_lowrank_decode_v2_workspace_bytes, quant_lowrank_decode_v2,
                   quant_lowrank_decode_v2_counters);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowrank_ops, m) {
  m.def("lowrank_matmul_cuda(Tensor x, Tensor v, Tensor u, Tensor? bias) -> Tensor");
  m.def(
      "quant_lowrank_matmul_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? v, Tensor? u, "
      "Tensor? bias, int bits, int group_size) -> Tensor");
  m.def(
      "quant_lowrank_matmul_v2_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? v, Tensor? u, "
      "Tensor? bias, int m, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowrank_ops, CUDA, m) {
  m.impl("lowrank_matmul_cuda", &lowrank_matmul_cuda);
  m.impl("quant_lowrank_matmul_cuda", &quant_lowrank_matmul_cuda);
  m.impl("quant_lowrank_matmul_v2_cuda", &quant_lowrank_matmul_v2_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowrank-ops C++/CUDA extension: device utilities (the CUDA ops register through TORCH_LIBRARY_IMPL)";
  m.def("device_info", &device_info, pybind11::arg("index"),
        "Properties of CUDA device `index` the kernels size themselves by, as a dict (sizes in bytes).\n"
        "ValueError for an index out of range, RuntimeError when a CUDA call fails.");
  m.def("self_check", &self_check, pybind11::arg("index"),
        "Launch a small fill kernel on CUDA device `index` and verify its output; raises RuntimeError naming\n"
        "the CUDA error (e.g. no kernel image for this architecture) if it fails.");
}
