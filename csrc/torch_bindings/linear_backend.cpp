// The process-wide linear_4bit backend switch (see linear_backend.h).
#include "linear_backend.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace qlora::ops {
namespace {
std::atomic<int> g_backend{static_cast<int>(LinearBackend::Auto)};
std::atomic<int> g_hopper_tile_n{0};
std::atomic<int> g_fused_split{0};
constexpr const char* kFusedSplitNames[] = {"auto", "cta", "grid"};
}  // namespace

int hopper_tile_n() { return g_hopper_tile_n.load(std::memory_order_relaxed); }

void set_hopper_tile_n(int64_t tile_n) {
  TORCH_CHECK_VALUE(tile_n == 0 || tile_n == 128 || tile_n == 256,
                    "tile_n must be 0 (automatic), 128 or 256, got ", tile_n);
  g_hopper_tile_n.store(int(tile_n));
}

int fused_split() { return g_fused_split.load(std::memory_order_relaxed); }

std::string fused_split_name() { return kFusedSplitNames[fused_split()]; }

void set_fused_split(const std::string& mode) {
  for (int i = 0; i < 3; ++i) {
    if (mode == kFusedSplitNames[i]) {
      g_fused_split.store(i);
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "fused split mode must be 'auto', 'cta' or 'grid', got '", mode, "'");
}

LinearBackend linear_backend() { return static_cast<LinearBackend>(g_backend.load(std::memory_order_relaxed)); }

void set_linear_backend(const std::string& name) {
  LinearBackend b;
  if (name == "auto") b = LinearBackend::Auto;
  else if (name == "fused") b = LinearBackend::Fused;
  else if (name == "fused_mma") b = LinearBackend::FusedMma;
  else if (name == "dequant") b = LinearBackend::Dequant;
  else if (name == "tune") b = LinearBackend::Tune;
  else TORCH_CHECK_VALUE(false, "backend must be 'auto', 'fused', 'fused_mma', 'dequant' or 'tune', got '", name, "'");
  g_backend.store(static_cast<int>(b));
}

std::string linear_backend_name() {
  switch (linear_backend()) {
    case LinearBackend::Fused: return "fused";
    case LinearBackend::FusedMma: return "fused_mma";
    case LinearBackend::Dequant: return "dequant";
    case LinearBackend::Tune: return "tune";
    default: return "auto";
  }
}

}  // namespace qlora::ops
