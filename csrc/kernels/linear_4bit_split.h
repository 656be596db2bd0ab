// How the fused GEMMs divide their reduction among warps and CTAs when the output alone has too few tiles to
// fill the GPU: torch-free, host and device, so that the launchers, the kernels and the CPU tests (through
// test hooks) use one copy.
//
// Small M (linear_4bit_cuda.cu): one tile = one warp's 32 output rows in the forward, 64 output columns in the
// input gradient; too few warps keep too few weight bytes in flight. Two ways to add warps:
// - in the CTA: warp_split warps share one tile, each reducing a contiguous slice of the range; they add
//   their fp32 accumulators in shared memory by a fixed pairwise tree (deterministic) and one warp stores.
//   One launch, no global scratch: what decode (M = 1) needs, where a second kernel costs ~20% of the time.
// - over the grid: blockIdx.y splits the range again, each split writes fp32 partial sums, and a second kernel
//   adds them in a fixed order. Used only where the in-CTA split cannot reach half a wave of warps.
// Large M (linear_4bit_large_cuda.cu, linear_4bit_hopper_cuda.cu): one CTA per 128 x TN output tile, so
// M = 128 at N = 8192 makes 32-64 CTAs for 132 SMs; blockIdx.z splits the reduction's 64-value steps (split-K)
// into fp32 partial sums that the same reduce kernel adds, up to one wave of CTAs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_SPLIT_HD __host__ __device__ __forceinline__
#else
#define QLORA_SPLIT_HD inline
#endif

namespace qlora::split {

// Which splits the launchers may use (qlora_ext._C.set_fused_split, for tests and benchmarks).
enum class SplitMode : int {
  Auto = 0,  // small M: in the CTA first, over the grid as well where that fills less than half a wave;
             // large M: split-K where the tiles fill less than a wave
  Cta = 1,   // never over the grid: always one launch (small M: in the CTA only; large M: no split-K)
  Grid = 2,  // small M: over the grid only (warp_split 1), the two-kernel scheme; large M: as Auto
};

// The mode a problem carries as an int (Linear4bitProblem::split_mode); anything unknown is Auto.
QLORA_SPLIT_HD SplitMode split_mode_of(int mode) {
  return mode == int(SplitMode::Cta) ? SplitMode::Cta : mode == int(SplitMode::Grid) ? SplitMode::Grid
                                                                                      : SplitMode::Auto;
}

// Warps per CTA when warp_split < 4: four tiles of one warp each, as many as warp_split allows.
constexpr int kTileWarps = 4;

// The largest in-CTA split: 16 warps (512 threads) for the one-m-tile kernels, which fit 128 registers;
// the 32- and 64-row kernels use up to 213 and keep 4-warp CTAs.
QLORA_SPLIT_HD constexpr int max_warp_split(int m_tiles) { return m_tiles == 1 ? 16 : kTileWarps; }

struct Split {
  int64_t splits = 1;     // grid.y: CTAs that share one tile's reduction (fp32 partials + a reduce kernel if > 1)
  int64_t per_split = 1;  // reduction units per grid split (forward: quant blocks of k; gradient: 16-row steps)
  int warp_split = 1;     // warps of one CTA that share one tile: 1, 2, 4, 8 or 16
  int tiles_per_cta = kTileWarps;  // kTileWarps / warp_split, at least 1
};

QLORA_SPLIT_HD int cta_warps(const Split& s) { return s.tiles_per_cta * s.warp_split; }

// Bytes of dynamic shared memory for the in-CTA reduction: half of each tile's warps park their
// accumulators (floats_per_lane per lane) while the other half add them.
QLORA_SPLIT_HD int reduce_smem_bytes(const Split& s, int floats_per_lane) {
  return s.tiles_per_cta * (s.warp_split / 2) * floats_per_lane * 32 * int(sizeof(float));
}

// Units [lo, hi) of the range [begin, end) that warp `slice` of warp_split reduces: contiguous, in order,
// empty for the last slices when the range is shorter than warp_split.
QLORA_SPLIT_HD void warp_slice(int64_t begin, int64_t end, int warp_split, int slice, int64_t& lo, int64_t& hi) {
  const int64_t per = (end - begin + warp_split - 1) / warp_split;
  lo = begin + per * slice;
  hi = lo + per;
  if (lo > end) lo = end;
  if (hi > end) hi = end;
}

// The split of `tiles` output tiles whose reduction has `units` units (over `reduction` values), at M = m
// rows in m_tiles 16-row tensor-core tiles, when the GPU holds `resident` warps of this kernel at once.
// The warps should fill one wave. The in-CTA split doubles while the warps still fit in it (no extra traffic,
// no extra launch; past one wave the slices would only get shorter). Where that cannot reach half a wave (or
// in Grid mode), the grid split multiplies the warps as often as they fit in one wave, capped at
// reduction / (16 m), where the fp32 partials (written and read back, 8 bytes per output element per split)
// cost as much as the weight's own 4 bits per element (unbounded, M = 64 would move several times the
// weight's bytes), and at one unit per warp.
QLORA_SPLIT_HD Split choose_split(int64_t tiles, int64_t units, int64_t reduction, int64_t m, int m_tiles,
                                  int64_t resident, SplitMode mode) {
  Split s;
  if (mode != SplitMode::Grid) {
    while (s.warp_split < max_warp_split(m_tiles) && 2 * s.warp_split * tiles <= resident &&
           2 * s.warp_split <= units)
      s.warp_split *= 2;
  }
  s.tiles_per_cta = s.warp_split < kTileWarps ? kTileWarps / s.warp_split : 1;
  const int64_t warps = tiles * s.warp_split;
  int64_t splits = 1;
  if (mode == SplitMode::Grid || (mode == SplitMode::Auto && 2 * warps < resident)) {
    splits = resident / warps;  // at most one wave: a partial second one would only add a tail
    const int64_t traffic_cap = reduction / (16 * m);
    if (splits > traffic_cap) splits = traffic_cap;
    const int64_t unit_cap = units / s.warp_split;  // every warp keeps at least one unit
    if (splits > unit_cap) splits = unit_cap;
    if (splits < 1) splits = 1;
  }
  s.per_split = (units + splits - 1) / splits;
  s.splits = (units + s.per_split - 1) / s.per_split;
  return s;
}

// The large-M kernels' split-K: `ctas` output tiles, `slots` CTAs resident at once, `steps` reduction steps of
// 64 values (over `reduction` values) at M = m. Splits fill at most one wave and stop at reduction / (16 m),
// where the fp32 partials' traffic equals the weight's 4 bits per element (as for small M); that also leaves
// every split at least 16 m / 64 steps, so the floor of kMinLargeSplitSteps (the pipeline's prologue and
// epilogue amortized) binds only for M < 16, which the binding never sends here. SplitMode::Cta: never.
constexpr int64_t kMinLargeSplitSteps = 4;

struct LargeSplit {
  int64_t splits = 1;           // grid.z
  int64_t steps_per_split = 1;  // the last split may have fewer
};

QLORA_SPLIT_HD LargeSplit large_split(int64_t ctas, int64_t slots, int64_t steps, int64_t reduction, int64_t m,
                                      SplitMode mode) {
  LargeSplit s;
  int64_t splits = 1;
  if (mode != SplitMode::Cta && ctas > 0 && ctas < slots) {
    splits = slots / ctas;
    if (splits > steps / kMinLargeSplitSteps) splits = steps / kMinLargeSplitSteps;
    if (splits > reduction / (16 * m)) splits = reduction / (16 * m);
    if (splits < 1) splits = 1;
  }
  s.steps_per_split = (steps + splits - 1) / splits;
  s.splits = (steps + s.steps_per_split - 1) / s.steps_per_split;
  return s;
}

}  // namespace qlora::split
