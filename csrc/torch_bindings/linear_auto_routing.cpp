// The "auto" backend's routing table (see linear_auto_routing.h): set rarely (at import, by the benchmark),
// read on every CUDA linear_4bit call, so one mutex suffices.
#include "linear_auto_routing.h"

#include <c10/util/Exception.h>

#include <iterator>
#include <mutex>

namespace qlora::ops {
namespace {

constexpr const char* kRoutedNames[] = {"dequant", "fused", "fused_tn128", "fused_grid", "fused_mma"};

struct Rule {
  int64_t capability;
  bool grad;
  int64_t max_m;
  RoutedBackend backend;
};

std::mutex g_mutex;
std::vector<Rule> g_rules;  // in the order given: within (capability, direction) max_m increases

std::string describe(const AutoRoutingRule& r) {
  return "(" + std::to_string(std::get<0>(r)) + ", '" + std::get<1>(r) + "', " + std::to_string(std::get<2>(r)) +
         ", '" + std::get<3>(r) + "')";
}

}  // namespace

std::string routed_backend_name(RoutedBackend backend) { return kRoutedNames[int(backend)]; }

namespace {

std::vector<Rule> parse_rules(const std::vector<AutoRoutingRule>& rules) {
  std::vector<Rule> table;
  table.reserve(rules.size());
  for (const AutoRoutingRule& r : rules) {
    const auto& [capability, direction, max_m, backend] = r;
    TORCH_CHECK_VALUE(capability >= 10 && capability < 200, "auto routing rule ", describe(r),
                      ": capability must be a compute capability as major * 10 + minor (e.g. 90), got ",
                      capability);
    TORCH_CHECK_VALUE(direction == "fwd" || direction == "bwd", "auto routing rule ", describe(r),
                      ": direction must be 'fwd' or 'bwd', got '", direction, "'");
    TORCH_CHECK_VALUE(max_m >= 1, "auto routing rule ", describe(r), ": max_m must be at least 1, got ", max_m);
    int b = -1;
    for (int i = 0; i < int(std::size(kRoutedNames)); ++i) {
      if (backend == kRoutedNames[i]) b = i;
    }
    TORCH_CHECK_VALUE(b >= 0, "auto routing rule ", describe(r), ": backend must be 'dequant', 'fused', ",
                      "'fused_tn128', 'fused_grid' or 'fused_mma', got '", backend, "'");
    const Rule rule{capability, direction == "bwd", max_m, static_cast<RoutedBackend>(b)};
    for (const Rule& earlier : table) {
      TORCH_CHECK_VALUE(earlier.capability != rule.capability || earlier.grad != rule.grad ||
                            earlier.max_m < rule.max_m,
                        "auto routing rule ", describe(r), ": max_m must increase within a capability and ",
                        "direction, but an earlier rule has max_m ", earlier.max_m);
    }
    table.push_back(rule);
  }
  return table;
}

}  // namespace

void check_auto_routing(const std::vector<AutoRoutingRule>& rules) { parse_rules(rules); }

void set_auto_routing(const std::vector<AutoRoutingRule>& rules) {
  std::vector<Rule> table = parse_rules(rules);
  const std::lock_guard<std::mutex> lock(g_mutex);
  g_rules = std::move(table);
}

std::vector<AutoRoutingRule> auto_routing() {
  const std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<AutoRoutingRule> out;
  out.reserve(g_rules.size());
  for (const Rule& r : g_rules) {
    out.emplace_back(r.capability, r.grad ? "bwd" : "fwd", r.max_m, routed_backend_name(r.backend));
  }
  return out;
}

RoutedBackend auto_route(int64_t capability, bool grad, int64_t m) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  const Rule* last = nullptr;
  for (const Rule& r : g_rules) {
    if (r.capability != capability || r.grad != grad) continue;
    if (m <= r.max_m) return r.backend;
    last = &r;
  }
  return last != nullptr ? last->backend : RoutedBackend::Dequant;
}

}  // namespace qlora::ops
