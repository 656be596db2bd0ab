// Declares the qlora_ext op library and the Python module qlora_ext._C with the build facts.
// Schemas live in *_schema.cpp, device implementations in *_cpu_ops.cpp and *_cuda_ops.cpp.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>
#include <vector>

#include "../kernels/adamw8bit_core.h"
#include "../kernels/linear_4bit_large_layout.h"
#include "../kernels/linear_4bit_split.h"
#include "../kernels/quantize_cpu.h"
#include "linear_auto_routing.h"
#include "linear_backend.h"
#include "op_checks.h"

#if defined(QLORA_WITH_CUDA)
#include <cuda_runtime_api.h>

#include "linear_autotune_cuda.h"
#include "paged_memory.h"
#endif

#define QLORA_STR_(x) #x
#define QLORA_STR(x) QLORA_STR_(x)

// The library itself; each op family declares its schemas with TORCH_LIBRARY_FRAGMENT in its own
// *_schema.cpp file, next to its implementations.
TORCH_LIBRARY(qlora_ext, m) {}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
#if defined(QLORA_WITH_CUDA)
  d["cuda"] = true;
  std::string archs = QLORA_STR(QLORA_CUDA_ARCHS);
  for (char& c : archs) c = c == '_' ? ';' : c;  // setup.py encodes "8.0;9.0+PTX" as 8.0_9.0_PTX
  for (size_t at = archs.find(";PTX"); at != std::string::npos; at = archs.find(";PTX")) archs.replace(at, 1, "+");
  d["cuda_arch_list"] = archs;
  d["cuda_runtime_version"] = CUDART_VERSION;
#else
  d["cuda"] = false;
  d["cuda_arch_list"] = "";
  d["cuda_runtime_version"] = 0;
#endif
  d["torch_version"] = std::string(TORCH_VERSION);
  d["cpu_simd"] = qlora::cpu::simd_enabled();
  d["cpu_avx512"] = qlora::cpu::avx512_enabled();
  return d;
}

std::vector<float> code_table(const std::string& quant_type) {
  const float* t = qlora::code_table(qlora::ops::parse_quant_type(quant_type));
  return std::vector<float>(t, t + 16);
}

// Test hook: the FP8 E4M3 encoder of the numeric core (the one both kernels use), on host floats.
std::vector<int> fp8_e4m3_encode(const std::vector<float>& values) {
  std::vector<int> out;
  out.reserve(values.size());
  for (float v : values) out.push_back(qlora::fp8_e4m3_encode(v));
  return out;
}

std::vector<float> fp8_e4m3_decode(const std::vector<int>& codes) {
  std::vector<float> out;
  out.reserve(codes.size());
  for (int c : codes) out.push_back(qlora::fp8_e4m3_decode(uint8_t(c)));
  return out;
}

// Test hook: the index formulas and constants of the fused large-M GEMMs (linear_4bit_large_layout.h), so
// tests/test_linear_large_layout.py (mma.sync) and tests/test_linear_hopper_layout.py (wgmma) emulate the
// kernels' data movement with the formulas the kernels use.
pybind11::dict large_gemm_constants() {
  namespace L = qlora::large;
  pybind11::dict d;
  d["tile_m"] = L::kTileM;
  d["tile_n"] = L::kTileN;
  d["tile_r"] = L::kTileR;
  d["stages"] = L::kStages;
  d["threads"] = L::kThreads;
  d["mma_tiles_m"] = L::kMmaTilesM;
  d["mma_tiles_n"] = L::kMmaTilesN;
  d["act_chunks_per_row"] = L::kActChunksPerRow;
  d["act_copies_per_thread"] = L::kActCopiesPerThread;
  d["fwd_w_chunks_per_row"] = L::kFwdWChunksPerRow;
  d["grad_w_chunks_per_row"] = L::kGradWChunksPerRow;
  d["weights_per_decode_thread"] = L::kWeightsPerDecodeThread;
  d["smem_bytes"] = L::kSmemBytes;
  d["hopper_warpgroups"] = L::kHopperWarpgroups;
  d["hopper_weight_buffers"] = L::kHopperWeightBuffers;
  d["hopper_smem_align"] = L::kHopperSmemAlign;
  for (int tn : {128, 256}) {
    const std::string s = std::to_string(tn);
    d[("hopper_smem_bytes_" + s).c_str()] = L::hopper_smem_bytes(tn);
    d[("hopper_acc_regs_" + s).c_str()] = L::hopper_acc_regs(tn);
    d[("hopper_decode_units_" + s).c_str()] = L::hopper_decode_units(tn);
    d[("hopper_decode_parts_fwd_" + s).c_str()] = L::hopper_decode_parts(false, tn);
    d[("hopper_decode_parts_grad_" + s).c_str()] = L::hopper_decode_parts(true, tn);
  }
  d["k_major_lbo"] = L::kKMajorLbo;
  d["k_major_sbo"] = L::kKMajorSbo;
  d["grad_lbo"] = L::kGradLbo;
  d["grad_sbo"] = L::kGradSbo;
  return d;
}

int64_t large_gemm_index(const std::string& f, int64_t a, int64_t b, int64_t c, int64_t d) {
  namespace L = qlora::large;
  const int ia = int(a), ib = int(b), ic = int(c);
  if (f == "swizzle") return L::swizzle(ia, ib, ic);
  if (f == "act_copy_row") return L::act_copy_row(ia, ib);
  if (f == "act_copy_chunk") return L::act_copy_chunk(ia, ib);
  if (f == "decode_row") return L::decode_row(ia, ib);
  if (f == "decode_part") return L::decode_part(ia, ib);
  if (f == "decode_store_chunk") return L::decode_store_chunk(ia, ib);
  if (f == "decode_store_rotation") return L::decode_store_rotation(ia);
  if (f == "decode_store_offset") return L::decode_store_offset(ia, ib, ic);
  if (f == "swizzle_moved") return L::swizzle_moved(ia, ib, ic, int(d));
  if (f == "code_byte") return L::code_byte<int64_t>(a, b, c);
  if (f == "absmax_block") return L::absmax_block<int64_t>(a, b, c);
  if (f == "fits_32bit_weight_index") return L::fits_32bit_weight_index(a, b);
  if (f == "warp_row0") return L::warp_row0(ia);
  if (f == "warp_col0") return L::warp_col0(ia);
  if (f == "ldsm_a_row") return L::ldsm_a_row(ia);
  if (f == "ldsm_a_chunk") return L::ldsm_a_chunk(ia);
  if (f == "ldsm_b_row") return L::ldsm_b_row(ia);
  if (f == "ldsm_b_chunk") return L::ldsm_b_chunk(ia);
  if (f == "ldsm_bt_row") return L::ldsm_bt_row(ia);
  if (f == "ldsm_bt_chunk") return L::ldsm_bt_chunk(ia);
  if (f == "hopper_grad_w_offset") return L::hopper_grad_w_offset(ia, ib);
  if (f == "hopper_decode_row_offset") return L::hopper_decode_row_offset(ia != 0, ib, ic);
  if (f == "wgmma_desc") return int64_t(L::wgmma_desc(uint32_t(a), uint32_t(b), uint32_t(c)));
  if (f == "hopper_a_offset") return L::hopper_a_offset(ia, ib);
  if (f == "hopper_b_offset") return L::hopper_b_offset(ia != 0, ib);
  if (f == "hopper_acc_row") return L::hopper_acc_row(ia, ib);
  if (f == "hopper_acc_col") return L::hopper_acc_col(ia, ib);
  throw pybind11::value_error("unknown large-GEMM layout function " + f);
}

qlora::split::SplitMode parse_split_mode(const std::string& mode) {
  namespace S = qlora::split;
  TORCH_CHECK_VALUE(mode == "auto" || mode == "cta" || mode == "grid", "mode must be 'auto', 'cta' or 'grid'");
  return mode == "cta" ? S::SplitMode::Cta : mode == "grid" ? S::SplitMode::Grid : S::SplitMode::Auto;
}

// Test hooks: the fused kernels' split choices and the small-M warp slices (linear_4bit_split.h), for
// tests/test_linear_split.py.
pybind11::dict small_m_split_plan(int64_t tiles, int64_t units, int64_t reduction, int64_t m, int64_t resident,
                                  const std::string& mode) {
  namespace S = qlora::split;
  TORCH_CHECK_VALUE(m >= 1 && m <= 64 && tiles >= 1 && units >= 1 && reduction >= 1 && resident >= 1,
                    "small_m_split_plan: needs 1 <= m <= 64 and positive tiles, units, reduction, resident");
  const S::SplitMode sm = parse_split_mode(mode);
  const int m_tiles = m <= 16 ? 1 : m <= 32 ? 2 : 4;
  const S::Split s = S::choose_split(tiles, units, reduction, m, m_tiles, resident, sm);
  pybind11::dict d;
  d["splits"] = s.splits;
  d["per_split"] = s.per_split;
  d["warp_split"] = s.warp_split;
  d["tiles_per_cta"] = s.tiles_per_cta;
  d["cta_warps"] = S::cta_warps(s);
  d["max_warp_split"] = S::max_warp_split(m_tiles);
  d["reduce_smem_bytes_per_float"] = S::reduce_smem_bytes(s, 1);
  return d;
}

pybind11::dict large_split_plan(int64_t ctas, int64_t slots, int64_t steps, int64_t reduction, int64_t m,
                                const std::string& mode) {
  namespace S = qlora::split;
  TORCH_CHECK_VALUE(m >= 1 && ctas >= 1 && slots >= 1 && steps >= 1 && reduction >= 1,
                    "large_split_plan: needs positive ctas, slots, steps, reduction and m");
  const S::SplitMode sm = parse_split_mode(mode);
  const S::LargeSplit s = S::large_split(ctas, slots, steps, reduction, m, sm);
  pybind11::dict d;
  d["splits"] = s.splits;
  d["steps_per_split"] = s.steps_per_split;
  d["min_steps"] = S::kMinLargeSplitSteps;
  return d;
}

std::pair<int64_t, int64_t> small_m_warp_slice(int64_t begin, int64_t end, int warp_split, int slice) {
  TORCH_CHECK_VALUE(warp_split >= 1 && slice >= 0 && slice < warp_split && begin <= end,
                    "small_m_warp_slice: needs 0 <= slice < warp_split and begin <= end");
  int64_t lo = 0, hi = 0;
  qlora::split::warp_slice(begin, end, warp_split, slice, lo, hi);
  return {lo, hi};
}

// The 256 float32 values of the 8-bit optimizer states' dynamic map, by code (adamw8bit_core.h).
std::vector<float> dynamic_map(bool is_signed) {
  std::vector<float> out;
  out.reserve(qlora::kDynamicMapSize);
  for (int c = 0; c < qlora::kDynamicMapSize; ++c) out.push_back(qlora::dynamic_map_value(c, is_signed));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qlora_ext native extension: ops are registered under torch.ops.qlora_ext";
  m.def("build_info", &build_info, "Facts about how this extension was built");
  m.def("code_table", &code_table, "The 16 float32 values of a 4-bit code table, by code", pybind11::arg("quant_type"));
  m.def("fp8_e4m3_encode", &fp8_e4m3_encode, "FP8 E4M3 codes of float32 values (numeric core, host)");
  m.def("fp8_e4m3_decode", &fp8_e4m3_decode, "float32 values of FP8 E4M3 codes (numeric core, host)");
  m.def("dynamic_map", &dynamic_map,
        "The 256 float32 values of the 8-bit optimizer states' dynamic map by code: signed (exp_avg) or "
        "unsigned (exp_avg_sq)", pybind11::arg("is_signed"));
  m.attr("ADAMW8BIT_BLOCK") = qlora::kAdamW8bitBlock;
  m.def("set_linear_backend", &qlora::ops::set_linear_backend,
        "CUDA linear_4bit implementation: 'auto' (by shape), 'fused' (fused kernels where they apply), "
        "'fused_mma' (fused, mma.sync for large M), 'dequant' (dequantize + cuBLAS) or 'tune' (the fastest, "
        "measured once per class of problem)", pybind11::arg("backend"));
  m.def("large_gemm_constants", &large_gemm_constants, "Test hook: the fused large-M GEMM's tile constants");
  m.def("large_gemm_index", &large_gemm_index, "Test hook: one index formula of the fused large-M GEMM",
        pybind11::arg("function"), pybind11::arg("a"), pybind11::arg("b") = 0, pybind11::arg("c") = 0,
        pybind11::arg("d") = 0);
  m.def("linear_backend", &qlora::ops::linear_backend_name, "The current linear_4bit backend");
  m.def("set_auto_routing", &qlora::ops::set_auto_routing,
        "Replaces the 'auto' backend's routing table (qlora_ext.routing loads it): rules (capability as major * 10 "
        "+ minor, 'fwd' or 'bwd', max_m, backend), max_m increasing within a capability and direction",
        pybind11::arg("rules"));
  m.def("check_auto_routing", &qlora::ops::check_auto_routing,
        "set_auto_routing's checks of a routing table, installing nothing", pybind11::arg("rules"));
  m.def("auto_routing", &qlora::ops::auto_routing, "The 'auto' backend's routing table, as set_auto_routing takes it");
  m.def(
      "auto_route",
      [](int64_t capability, const std::string& direction, int64_t m) {
        TORCH_CHECK_VALUE(direction == "fwd" || direction == "bwd", "direction must be 'fwd' or 'bwd', got '",
                          direction, "'");
        return qlora::ops::routed_backend_name(qlora::ops::auto_route(capability, direction == "bwd", m));
      },
      "Test hook: the backend 'auto' routes M rows in a direction to on a GPU of this compute capability",
      pybind11::arg("capability"), pybind11::arg("direction"), pybind11::arg("m"));
  m.def("set_hopper_tile_n", &qlora::ops::set_hopper_tile_n,
        "Test/benchmark hook: the Hopper large-M kernels' tile width, 0 (their choice by shape), 128 or 256",
        pybind11::arg("tile_n"));
  m.def("hopper_tile_n", &qlora::ops::hopper_tile_n, "The Hopper large-M kernels' tile width setting (0: automatic)");
  m.def("set_fused_split", &qlora::ops::set_fused_split,
        "Test/benchmark hook: how the fused kernels split their reduction: 'auto', 'cta' (never over the grid: "
        "one launch; small M among a CTA's warps) or 'grid' (small M over the grid only: partial sums and a "
        "reduce kernel; large M split-K as in 'auto')",
        pybind11::arg("mode"));
  m.def("fused_split", &qlora::ops::fused_split_name, "The fused kernels' split mode setting");
  m.def("small_m_split_plan", &small_m_split_plan,
        "Test hook: the small-M kernels' split (linear_4bit_split.h) of `tiles` output tiles over `units` "
        "reduction units (of `reduction` values) at M = m, for `resident` warps and a mode",
        pybind11::arg("tiles"), pybind11::arg("units"), pybind11::arg("reduction"), pybind11::arg("m"),
        pybind11::arg("resident"), pybind11::arg("mode"));
  m.def("large_split_plan", &large_split_plan,
        "Test hook: the large-M kernels' split-K (linear_4bit_split.h) of `ctas` output tiles with `slots` CTAs "
        "resident, over `steps` 64-value steps (of `reduction` values) at M = m, in a mode",
        pybind11::arg("ctas"), pybind11::arg("slots"), pybind11::arg("steps"), pybind11::arg("reduction"),
        pybind11::arg("m"), pybind11::arg("mode"));
  m.def("small_m_warp_slice", &small_m_warp_slice,
        "Test hook: the units [lo, hi) of [begin, end) that warp `slice` of `warp_split` reduces",
        pybind11::arg("begin"), pybind11::arg("end"), pybind11::arg("warp_split"), pybind11::arg("slice"));
  m.def("set_cpu_simd", &qlora::cpu::set_simd_enabled, "Use (True) or bypass (False) the AVX2 CPU paths");
  m.def("set_cpu_avx512", &qlora::cpu::set_avx512_enabled, "Use (True) or bypass (False) the AVX-512 CPU paths");
#if defined(QLORA_WITH_CUDA)
  m.def("linear_tuning_cache", &qlora::ops::tuning_cache,
        "The 'tune' backend's choices: (problem class, fastest implementation, its time in microseconds)");
  m.def("clear_linear_tuning_cache", &qlora::ops::clear_tuning_cache, "Forgets the 'tune' backend's choices");
  m.def("fused_large_kernel", &qlora::ops::fused_large_kernel,
        "The large-M kernel backend 'fused' runs on a CUDA device: 'wgmma' (Hopper, sm_90a) or 'mma.sync'",
        pybind11::arg("device"));
  qlora::ops::register_paged_memory(m);  // managed-memory arenas of the paged optimizer
#endif
}
