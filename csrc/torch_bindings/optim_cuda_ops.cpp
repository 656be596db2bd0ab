// CUDA implementation of adamw_step_ (one multi-tensor launch per call on PyTorch's current stream, no
// host synchronization), and the managed-memory arenas of the paged optimizer as Python functions of
// qlora_ext._C: states live in cudaMallocManaged memory exposed as CUDA tensors (from_blob with a deleter
// that frees it), paged between GPU and CPU by prefetches on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "../kernels/adamw_cuda.h"
#include "../kernels/paged_memory_cuda.h"
#include "device_table.h"
#include "optim_common.h"
#include "paged_memory.h"

namespace qlora::ops {
namespace {

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
                     double eps, double weight_decay, bool maximize) {
  const AdamWLaunch launch =
      prepare_adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize,
                         c10::DeviceType::CUDA, cuda::kAdamWCudaChunk);
  if (launch.tensors.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor table = upload_table(launch.tensors, params[0].device());
  C10_CUDA_CHECK(cuda::adamw_step_multi_tensor(static_cast<const AdamWTensor*>(table.data_ptr()),
                                               int(launch.tensors.size()), launch.total_chunks, launch.group,
                                               current_sm_count(), stream));
}

at::Tensor managed_empty(int64_t nbytes, int64_t device) {
  TORCH_CHECK_VALUE(nbytes >= 0, "nbytes must be >= 0, got ", nbytes);
  TORCH_CHECK_VALUE(device >= 0 && device < c10::cuda::device_count(), "device must be a CUDA device index in [0, ",
                    int(c10::cuda::device_count()), "), got ", device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* ptr = nullptr;
  C10_CUDA_CHECK(cuda::managed_alloc(&ptr, size_t(nbytes)));
  const size_t size = size_t(nbytes);
  // A CUDA tensor (not a CPU one: torch.compile and opcheck must see the device the kernels use) that frees
  // the arena when its storage dies, i.e. when the optimizer and every state view are gone.
  // The arena's device is made current for the free, and its pending work (a step, a prefetch on any stream)
  // finishes first: cudaFree only "may" synchronize.
  const auto index = static_cast<c10::DeviceIndex>(device);
  // A deleter must not throw (it runs in destructors): a guard that cannot set the device (CUDA torn down at
  // exit) only skips the free.
  auto deleter = [size, index](void* p) {
    try {
      const c10::cuda::CUDAGuard free_guard(index);
      C10_CUDA_CHECK_WARN(cudaDeviceSynchronize());
      C10_CUDA_CHECK_WARN(cuda::managed_free(p, size));
    } catch (...) {
    }
  };
  const c10::Device dev(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
  return at::from_blob(ptr, {nbytes}, deleter, at::TensorOptions().dtype(at::kByte).device(dev), dev);
}

void check_managed_arg(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "arena must be a CUDA tensor from managed_empty, got one on ", t.device());
}

// Returns False (and does nothing) when the device cannot access managed memory concurrently with the
// CPU: pages then migrate on demand.
bool managed_prefetch(const at::Tensor& arena, bool to_gpu) {
  check_managed_arg(arena);
  const c10::cuda::CUDAGuard guard(arena.device());
  bool supported = false;
  C10_CUDA_CHECK(cuda::managed_prefetch_supported(arena.device().index(), &supported));
  if (!supported) return false;
  C10_CUDA_CHECK(cuda::managed_prefetch(arena.data_ptr(), size_t(arena.nbytes()),
                                        to_gpu ? int(arena.device().index()) : -1,
                                        at::cuda::getCurrentCUDAStream()));
  return true;
}

int managed_location(const at::Tensor& arena) {
  check_managed_arg(arena);
  int location = -2;
  C10_CUDA_CHECK(cuda::managed_last_prefetch_location(arena.data_ptr(), size_t(arena.nbytes()), &location));
  return location;
}

}  // namespace

void register_paged_memory(pybind11::module_& m) {
  m.def("managed_empty", &managed_empty,
        "A uint8 CUDA tensor of nbytes of cudaMallocManaged memory (uninitialised), freed with the tensor",
        pybind11::arg("nbytes"), pybind11::arg("device"));
  m.def("managed_prefetch", &managed_prefetch,
        "Enqueue the migration of a managed arena to its GPU (to_gpu=True) or to the CPU on the current stream; "
        "False if the device pages on demand instead",
        pybind11::arg("arena"), pybind11::arg("to_gpu"));
  m.def("managed_location", &managed_location,
        "Where a managed arena was last prefetched: its device index, -1 for the CPU, -2 for nowhere",
        pybind11::arg("arena"));
  m.def("managed_live_bytes", &cuda::managed_live_bytes, "Bytes of managed memory allocated and not yet freed");
}

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) { m.impl("adamw_step_", &adamw_step_cuda); }

}  // namespace qlora::ops
