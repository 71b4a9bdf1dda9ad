// Thin binding for the lowrank-ops C++/CUDA extension `lowrank_ops._C` (built by setup.py, loaded by
// lowrank_ops/_C_loader.py). The only file in csrc/ that includes torch or pybind11 headers: kernel files stay
// torch-free so plain nvcc compile-checks them on any machine (tests/test_build.py).
//
// Two kinds of entry point live here:
// - pybind11 functions for non-op utilities (device properties, the launch self-check), below.
// - ops (issue 9): each CUDA kernel registers here with TORCH_LIBRARY_IMPL(lowrank_ops, CUDA, m). Caution: the
//   public ops (lowrank_ops/ops/*.py) are torch.library.custom_op's whose Python body runs select_backend; an
//   impl registered on the CUDA key of the public op itself would replace that body for every CUDA tensor and
//   bypass select_backend. So give each kernel a backend-private op that the Python Backend.CUDA branch calls:
//     TORCH_LIBRARY_FRAGMENT(lowrank_ops, m) {
//       m.def("lowrank_matmul_cuda(Tensor x, Tensor v, Tensor u, Tensor? bias) -> Tensor");
//     }
//     TORCH_LIBRARY_IMPL(lowrank_ops, CUDA, m) { m.impl("lowrank_matmul_cuda", &lowrank_matmul_cuda); }
//   Each wrapper checks its tensors (naming the tensor, its shape and the rule), sets a c10::cuda::CUDAGuard,
//   takes the stream from c10::cuda::getCurrentCUDAStream(), and calls a torch-free launcher declared in a
//   csrc/*.h header. Then add the public op's name to CUDA_OPS in lowrank_ops/_C_loader.py.

#include <torch/extension.h>

#include <stdexcept>
#include <string>

#include "device_info.h"

namespace {

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowrank-ops C++/CUDA extension: device utilities (the CUDA ops register through TORCH_LIBRARY_IMPL)";
  m.def("device_info", &device_info, pybind11::arg("index"),
        "Properties of CUDA device `index` the kernels size themselves by, as a dict (sizes in bytes).\n"
        "ValueError for an index out of range, RuntimeError when a CUDA call fails.");
  m.def("self_check", &self_check, pybind11::arg("index"),
        "Launch a small fill kernel on CUDA device `index` and verify its output; raises RuntimeError naming\n"
        "the CUDA error (e.g. no kernel image for this architecture) if it fails.");
}
