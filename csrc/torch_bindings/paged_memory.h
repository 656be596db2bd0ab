// The managed-memory functions of qlora_ext._C (CUDA builds only; defined in optim_cuda_ops.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace qlora::ops {

// Adds managed_empty, managed_prefetch, managed_location and managed_live_bytes to the module.
void register_paged_memory(pybind11::module_& m);

}  // namespace qlora::ops
