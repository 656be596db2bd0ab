// Vector stores to global memory that stay vector stores. The optimizer kernels have a whole-vector path and
// a per-element tail path that write the same addresses; nvcc 13.0 merges the two into four predicated scalar
// stores (STG.E x4 instead of one STG.E.128: four times the store instructions and L2 write requests), so the
// vector path writes through these explicit st.global.v* instructions. Addresses must be aligned to the
// vector's size (the callers check it before taking the vector path).
#pragma once

#include <cstdint>

namespace qlora::cuda {

__device__ __forceinline__ void store_global_v4(float* p, float a, float b, float c, float d) {
  asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}

__device__ __forceinline__ void store_global_v4(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

__device__ __forceinline__ void store_global_v2(void* p, uint32_t a, uint32_t b) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};\n" ::"l"(p), "r"(a), "r"(b) : "memory");
}

}  // namespace qlora::cuda
