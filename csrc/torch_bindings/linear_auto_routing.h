// The "auto" backend's routing table: for a GPU (by compute capability), a direction (forward, input gradient)
// and a range of M, the fixed linear_4bit backend that was measured fastest there. Rules come from Python
// (qlora_ext/routing.py, which loads qlora_ext/auto_routing.json, written from bench/bench_linear_cuda.py's
// measurements); where the table has no rule, "auto" is dequantize + cuBLAS, the path that needs nothing
// measured. Device-independent C++: the CPU build has the table too, so its selection is tested on CPU.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace qlora::ops {

// The backends "auto" can route to, as bench/bench_linear_cuda.py names them: "dequant", "fused" (the fused
// kernels with their own tile width and split), "fused_tn128" (Hopper's 128-column tile; elsewhere as "fused"),
// "fused_grid" (the small-M kernels' grid-only split; for M > 64 as "fused"), "fused_mma" (mma.sync large-M).
enum class RoutedBackend : int { Dequant = 0, Fused, FusedTn128, FusedGrid, FusedMma };

// One rule: on compute capability `capability` (major * 10 + minor), direction "fwd" or "bwd", M up to `max_m`
// (and above the same direction's previous rule) runs `backend`.
using AutoRoutingRule = std::tuple<int64_t, std::string, int64_t, std::string>;

// Replaces the table. Within one capability and direction max_m must increase strictly in the given order;
// anything else (unknown backend or direction, max_m < 1, capability outside 10..199) is a ValueError naming
// the rule, and leaves the table as it was.
void set_auto_routing(const std::vector<AutoRoutingRule>& rules);
void check_auto_routing(const std::vector<AutoRoutingRule>& rules);  // the same checks, installing nothing
std::vector<AutoRoutingRule> auto_routing();

// The backend for M rows in a direction (grad: the input gradient) on a capability: the first of the
// direction's rules with m <= max_m; above the last rule's max_m the last rule (the largest M measured speaks
// for the larger ones); Dequant where the capability or direction has no rule.
RoutedBackend auto_route(int64_t capability, bool grad, int64_t m);
std::string routed_backend_name(RoutedBackend backend);

}  // namespace qlora::ops
