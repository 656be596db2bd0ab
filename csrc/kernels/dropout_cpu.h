// CPU dropout kernel (counter-based, see dropout_core.h). Torch-free: raw pointers and a range of
// 64-element batches; the binding splits the batch range over threads.
#pragma once

#include <cstdint>

#include "dropout_core.h"

namespace qlora::cpu {

// y[i] = x[i] * factor(seed, i) for the elements of batches [batch_begin, batch_end) (batch b holds elements
// 64b .. 64b+63, clipped to numel). x and y hold numel contiguous elements of `dtype`.
void dropout_batches(const void* x, void* y, int64_t numel, DropoutDtype dtype, const DropoutParams& d,
                     int64_t batch_begin, int64_t batch_end);

}  // namespace qlora::cpu
