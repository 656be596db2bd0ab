// quantize_harness.cu: validates the NF4 quantize / FP8 double-quant / dequantize CUDA kernels of
// csrc/kernels bit for bit against the CPU reference, then benchmarks them against a device-to-device copy.
// Torch-free: only the kernel library (quantize_cpu.h, quantize_cuda.h) and the CUDA runtime.
//
// Build (from the repository root; see bench/native/README.md):
//   cmake -S . -B build/cmake -G Ninja -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc && cmake --build build/cmake
// or by hand, for one GPU (a single command line):
//   nvcc -O3 -lineinfo -std=c++20 -arch=sm_90 -Xcompiler -ffp-contract=off -Icsrc/kernels -o quantize_harness
//        bench/native/quantize_harness.cu csrc/kernels/quantize_cuda.cu csrc/kernels/quantize_cpu.cpp
// Run:
//   ./build/cmake/quantize_harness [rows [cols [blocksize [--no-bench]]]]   (defaults: 8192 8192 64;
//   --no-bench stops after validation, for compute-sanitizer)
//
// What it does:
//   1. Generates rows x cols bf16 values from N(0, 1) with a fixed seed (plus one all-zero block and one
//      block of subnormal values, so the special cases of the encoder are validated too).
//   2. Runs the CPU reference: quantize_4bit_blocks, the three double-quant steps, absmax_decode, and
//      dequantize_4bit_blocks with fp32 and with FP8 absmax, bf16 output.
//   3. Runs the CUDA launchers on poisoned (0xFF) output buffers and compares every output bit for bit:
//      codes, absmax, chunk sums, FP8 codes, chunk scales, mean, decoded absmax, dequantized bf16.
//      Any mismatch: prints the first few and exits with status 1 before benchmarking.
//   4. Times each launcher with cudaEvents (warm-up, then the median of many reps), flushing L2 before
//      every rep so each one reads from DRAM, and prints GB/s against the same-size device-to-device copy.
//
// Napkin math (8192 x 8192 = 64 Mi elements, blocksize 64): quantize reads 2 B and writes 0.5 + 4/64 B per
// element (~172 MB); dequantize reads 0.5 + 1/64 B (FP8 absmax) and writes 2 B (~169 MB). Both are pure
// streaming kernels, so the copy bandwidth is the ceiling: at ~4 TB/s (an H200) that is ~43 us each.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "cuda_utils.h"
#include "quantize_cpu.h"
#include "quantize_cuda.h"

using qlora::AbsmaxSource;
using qlora::CodeBook;
using qlora::FloatFormat;

// ---- error checking -------------------------------------------------------------------------------
// Every CUDA call goes through CUDA_CHECK: a benchmark that silently times a failed launch is worse
// than none.
static void cuda_check(cudaError_t err, const char* file, int line) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "[CUDA ERROR] at %s:%d: %s (%s)\n", file, line, cudaGetErrorString(err),
                 cudaGetErrorName(err));
    std::exit(EXIT_FAILURE);
  }
}
#define CUDA_CHECK(call) cuda_check((call), __FILE__, __LINE__)

// ---- host helpers ---------------------------------------------------------------------------------
// Runs fn(begin, end) over [0, n) in one contiguous range per hardware thread. The CPU reference is
// single-threaded per block, so splitting by block range gives the same bits as a serial run.
template <class Fn>
static void parallel_ranges(int64_t n, Fn fn) {
  const int64_t threads = std::max(1u, std::thread::hardware_concurrency());
  const int64_t per = (n + threads - 1) / threads;
  std::vector<std::thread> pool;
  for (int64_t begin = 0; begin < n; begin += per) pool.emplace_back(fn, begin, std::min(n, begin + per));
  for (std::thread& t : pool) t.join();
}

// splitmix64: a tiny, well-mixed generator whose output does not depend on the C++ library.
static uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// numel bf16 values from N(0, 1) by Box-Muller. Each run of kRngChunk elements has its own stream seeded
// from (seed, chunk), so the data is the same however many threads generate it.
static std::vector<uint16_t> random_bf16_normal(int64_t numel, uint64_t seed) {
  constexpr int64_t kRngChunk = 1 << 16;  // even, so the Box-Muller pairs never straddle two chunks
  constexpr double kTwoPi = 6.283185307179586;
  std::vector<uint16_t> x(numel);
  parallel_ranges((numel + kRngChunk - 1) / kRngChunk, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      uint64_t state = seed ^ (uint64_t(c) * 0xD1B54A32D192ED03ull);
      const int64_t end = std::min(numel, (c + 1) * kRngChunk);
      for (int64_t i = c * kRngChunk; i < end; i += 2) {
        const double u1 = (double(splitmix64(state) >> 11) + 1.0) * 0x1p-53;  // (0, 1]: log(u1) is finite
        const double u2 = double(splitmix64(state) >> 11) * 0x1p-53;          // [0, 1)
        const double r = std::sqrt(-2.0 * std::log(u1));
        x[i] = qlora::f32_to_bf16_rn(float(r * std::cos(kTwoPi * u2)));
        if (i + 1 < end) x[i + 1] = qlora::f32_to_bf16_rn(float(r * std::sin(kTwoPi * u2)));
      }
    }
  });
  return x;
}

// Bits of a value, for bitwise comparison and for printing mismatches (a NaN from the poison compares
// unequal to everything, as it should, but so would -0.0 == 0.0 compare equal: compare bits instead).
template <class T>
static uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8, "bits_of takes scalars up to 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

// Counts elements whose bits differ, prints the first few, and reports one line per output.
template <class T>
static int64_t compare_bits(const char* what, const T* want, const T* got, int64_t n) {
  constexpr int kShow = 5;
  int64_t mismatches = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (bits_of(want[i]) == bits_of(got[i])) continue;
    if (mismatches < kShow) {
      std::printf("    %s[%" PRId64 "]: cpu 0x%0*" PRIx64 ", cuda 0x%0*" PRIx64 "\n", what, i, int(2 * sizeof(T)),
                  bits_of(want[i]), int(2 * sizeof(T)), bits_of(got[i]));
    }
    ++mismatches;
  }
  std::printf("  %-30s %12" PRId64 " values  %s", what, n, mismatches ? "MISMATCH" : "ok");
  if (mismatches) std::printf(" (%" PRId64 " differ)", mismatches);
  std::printf("\n");
  return mismatches;
}

template <class T>
static std::vector<T> to_host(const T* device, int64_t n) {
  std::vector<T> host(n);
  CUDA_CHECK(cudaMemcpy(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

// ---- problem and buffers ---------------------------------------------------------------------------
struct Problem {
  int64_t numel, nblocks, nchunks, packed;
  int blocksize;
  CodeBook cb;
};

// Everything the ops produce, on the host: once from the CPU reference, once copied back from CUDA.
struct Outputs {
  std::vector<uint8_t> codes;
  std::vector<float> absmax;
  int64_t nonfinite = 0;
  std::vector<double> chunk_sums;
  std::vector<uint8_t> absmax_fp8;
  std::vector<float> chunk_scale;
  float mean = 0.0f;
  std::vector<float> absmax_decoded;
  std::vector<uint16_t> out_absmax_f32;  // dequantized bf16, first-level fp32 absmax
  std::vector<uint16_t> out_absmax_fp8;  // dequantized bf16, double-quantized absmax
};

struct DeviceBuffers {
  uint16_t* x = nullptr;       // [numel] bf16 input
  uint8_t* codes = nullptr;    // [packed] two 4-bit codes per byte
  float* absmax = nullptr;     // [nblocks]
  int32_t* nonfinite = nullptr;
  double* chunk_sums = nullptr;  // [nchunks] double-quant scratch
  uint8_t* absmax_fp8 = nullptr; // [nblocks] E4M3
  float* chunk_scale = nullptr;  // [nchunks]
  float* mean = nullptr;         // [1]
  float* absmax_decoded = nullptr;  // [nblocks]
  uint16_t* out = nullptr;     // [numel] bf16 output
};

// ---- CPU reference --------------------------------------------------------------------------------
static Outputs run_cpu(const Problem& p, const std::vector<uint16_t>& x) {
  qlora::cuda::NvtxRange range("cpu reference");
  Outputs o;
  o.codes.resize(p.packed);
  o.absmax.resize(p.nblocks);
  std::atomic<int64_t> nonfinite{0};
  parallel_ranges(p.nblocks, [&](int64_t b0, int64_t b1) {
    nonfinite += qlora::cpu::quantize_4bit_blocks(x.data(), FloatFormat::BF16, p.numel, p.blocksize, p.cb,
                                                  o.codes.data(), o.absmax.data(), b0, b1);
  });
  o.nonfinite = nonfinite;

  // Double quantization in its three steps (see quantize_cpu.h for the summation order they fix).
  o.chunk_sums.resize(p.nchunks);
  for (int64_t c = 0; c < p.nchunks; ++c) o.chunk_sums[c] = qlora::cpu::absmax_chunk_sum(o.absmax.data(), p.nblocks, c);
  o.mean = qlora::cpu::absmax_mean(o.chunk_sums.data(), p.nchunks, p.nblocks);
  o.absmax_fp8.resize(p.nblocks);
  o.chunk_scale.resize(p.nchunks);
  for (int64_t c = 0; c < p.nchunks; ++c) {
    qlora::cpu::absmax_encode_chunk(o.absmax.data(), p.nblocks, c, o.mean, o.absmax_fp8.data(), o.chunk_scale.data());
  }
  o.absmax_decoded.resize(p.nblocks);
  qlora::cpu::absmax_decode(o.absmax_fp8.data(), o.chunk_scale.data(), o.mean, p.nblocks, o.absmax_decoded.data());

  // The CPU kernels read the mean through a host pointer (the CUDA ones through a device pointer).
  AbsmaxSource f32_src, fp8_src;
  f32_src.f32 = o.absmax.data();
  fp8_src.fp8 = o.absmax_fp8.data();
  fp8_src.chunk_scale = o.chunk_scale.data();
  fp8_src.mean = &o.mean;
  o.out_absmax_f32.resize(p.numel);
  o.out_absmax_fp8.resize(p.numel);
  parallel_ranges(p.nblocks, [&](int64_t b0, int64_t b1) {
    qlora::cpu::dequantize_4bit_blocks(o.codes.data(), f32_src, p.numel, p.blocksize, p.cb, o.out_absmax_f32.data(),
                                       FloatFormat::BF16, b0, b1);
    qlora::cpu::dequantize_4bit_blocks(o.codes.data(), fp8_src, p.numel, p.blocksize, p.cb, o.out_absmax_fp8.data(),
                                       FloatFormat::BF16, b0, b1);
  });
  return o;
}

// ---- CUDA launches --------------------------------------------------------------------------------
// The launchers as the benchmark calls them, so validation and timing run exactly the same code.
static AbsmaxSource device_absmax_f32(const DeviceBuffers& d) {
  AbsmaxSource s;
  s.f32 = d.absmax;
  return s;
}
static AbsmaxSource device_absmax_fp8(const DeviceBuffers& d) {
  AbsmaxSource s;
  s.fp8 = d.absmax_fp8;
  s.chunk_scale = d.chunk_scale;
  s.mean = d.mean;
  return s;
}

static cudaError_t launch_quantize(const Problem& p, const DeviceBuffers& d, cudaStream_t s) {
  return qlora::cuda::quantize_4bit(d.x, FloatFormat::BF16, p.numel, p.blocksize, p.cb, d.codes, d.absmax,
                                    d.nonfinite, s);
}
static cudaError_t launch_quantize_absmax(const Problem& p, const DeviceBuffers& d, cudaStream_t s) {
  return qlora::cuda::quantize_absmax_fp8(d.absmax, p.nblocks, d.absmax_fp8, d.chunk_scale, d.mean, d.chunk_sums, s);
}
static cudaError_t launch_dequantize_absmax(const Problem& p, const DeviceBuffers& d, cudaStream_t s) {
  return qlora::cuda::dequantize_absmax_fp8(d.absmax_fp8, d.chunk_scale, d.mean, p.nblocks, d.absmax_decoded, s);
}
static cudaError_t launch_dequantize(const Problem& p, const DeviceBuffers& d, bool double_quant, cudaStream_t s) {
  return qlora::cuda::dequantize_4bit(d.codes, double_quant ? device_absmax_fp8(d) : device_absmax_f32(d), p.numel,
                                      p.blocksize, p.cb, d.out, FloatFormat::BF16, s);
}

// Fills a buffer with 0xFF before a kernel writes it: every byte the kernel forgets then reads as NaN
// (floats, bf16, E4M3) or code 15, and shows up as a mismatch instead of a stale right answer.
static void poison(void* ptr, int64_t bytes, cudaStream_t s) { CUDA_CHECK(cudaMemsetAsync(ptr, 0xFF, bytes, s)); }

static Outputs run_cuda(const Problem& p, const DeviceBuffers& d, cudaStream_t s) {
  qlora::cuda::NvtxRange range("cuda validation run");
  Outputs o;
  poison(d.codes, p.packed, s);
  poison(d.absmax, p.nblocks * sizeof(float), s);
  CUDA_CHECK(cudaMemsetAsync(d.nonfinite, 0, sizeof(int32_t), s));  // the launcher adds to it: zero, not poison
  CUDA_CHECK(launch_quantize(p, d, s));

  poison(d.chunk_sums, p.nchunks * sizeof(double), s);
  poison(d.absmax_fp8, p.nblocks, s);
  poison(d.chunk_scale, p.nchunks * sizeof(float), s);
  poison(d.mean, sizeof(float), s);
  CUDA_CHECK(launch_quantize_absmax(p, d, s));

  poison(d.absmax_decoded, p.nblocks * sizeof(float), s);
  CUDA_CHECK(launch_dequantize_absmax(p, d, s));

  poison(d.out, p.numel * sizeof(uint16_t), s);
  CUDA_CHECK(launch_dequantize(p, d, /*double_quant=*/false, s));
  CUDA_CHECK(cudaStreamSynchronize(s));  // surfaces any error from inside the kernels here, by name
  o.out_absmax_f32 = to_host(d.out, p.numel);

  poison(d.out, p.numel * sizeof(uint16_t), s);
  CUDA_CHECK(launch_dequantize(p, d, /*double_quant=*/true, s));
  CUDA_CHECK(cudaStreamSynchronize(s));
  o.out_absmax_fp8 = to_host(d.out, p.numel);

  o.codes = to_host(d.codes, p.packed);
  o.absmax = to_host(d.absmax, p.nblocks);
  o.nonfinite = to_host(d.nonfinite, 1)[0];
  o.chunk_sums = to_host(d.chunk_sums, p.nchunks);
  o.absmax_fp8 = to_host(d.absmax_fp8, p.nblocks);
  o.chunk_scale = to_host(d.chunk_scale, p.nchunks);
  o.mean = to_host(d.mean, 1)[0];
  o.absmax_decoded = to_host(d.absmax_decoded, p.nblocks);
  return o;
}

static int64_t validate(const Outputs& cpu, const Outputs& gpu, const Problem& p) {
  int64_t bad = 0;
  bad += compare_bits("codes (packed bytes)", cpu.codes.data(), gpu.codes.data(), p.packed);
  bad += compare_bits("absmax (fp32)", cpu.absmax.data(), gpu.absmax.data(), p.nblocks);
  bad += compare_bits("non-finite count", &cpu.nonfinite, &gpu.nonfinite, 1);
  bad += compare_bits("double quant: chunk sums", cpu.chunk_sums.data(), gpu.chunk_sums.data(), p.nchunks);
  bad += compare_bits("double quant: mean", &cpu.mean, &gpu.mean, 1);
  bad += compare_bits("double quant: chunk scales", cpu.chunk_scale.data(), gpu.chunk_scale.data(), p.nchunks);
  bad += compare_bits("double quant: FP8 codes", cpu.absmax_fp8.data(), gpu.absmax_fp8.data(), p.nblocks);
  bad += compare_bits("dequantize_absmax_fp8", cpu.absmax_decoded.data(), gpu.absmax_decoded.data(), p.nblocks);
  bad += compare_bits("dequantize bf16 (fp32 absmax)", cpu.out_absmax_f32.data(), gpu.out_absmax_f32.data(), p.numel);
  bad += compare_bits("dequantize bf16 (fp8 absmax)", cpu.out_absmax_fp8.data(), gpu.out_absmax_fp8.data(), p.numel);
  return bad;
}

// ---- timing ---------------------------------------------------------------------------------------
struct BenchConfig {
  int warmup = 10;
  int reps = 100;
  void* flush = nullptr;  // a buffer larger than L2
  int64_t flush_bytes = 0;
};

// Median device time in microseconds of `launch`, over cfg.reps runs after cfg.warmup untimed ones.
// Before each rep, a memset of a buffer larger than L2 evicts whatever the previous rep left there, so
// each rep reads its inputs from DRAM as it would in a training step. The events bracket the kernel only;
// and because the memset is still running when the host enqueues the kernel, the host's launch overhead
// is hidden behind it rather than timed.
template <class Launch>
static double median_us(const BenchConfig& cfg, cudaStream_t s, Launch launch) {
  for (int i = 0; i < cfg.warmup; ++i) CUDA_CHECK(launch());
  std::vector<cudaEvent_t> start(cfg.reps), stop(cfg.reps);
  for (int i = 0; i < cfg.reps; ++i) {
    CUDA_CHECK(cudaEventCreate(&start[i]));
    CUDA_CHECK(cudaEventCreate(&stop[i]));
  }
  for (int i = 0; i < cfg.reps; ++i) {
    CUDA_CHECK(cudaMemsetAsync(cfg.flush, i & 0xFF, cfg.flush_bytes, s));
    CUDA_CHECK(cudaEventRecord(start[i], s));
    CUDA_CHECK(launch());
    CUDA_CHECK(cudaEventRecord(stop[i], s));
  }
  CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<double> us(cfg.reps);
  for (int i = 0; i < cfg.reps; ++i) {
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start[i], stop[i]));
    us[i] = 1000.0 * ms;
    CUDA_CHECK(cudaEventDestroy(start[i]));
    CUDA_CHECK(cudaEventDestroy(stop[i]));
  }
  std::nth_element(us.begin(), us.begin() + cfg.reps / 2, us.end());
  return us[cfg.reps / 2];
}

struct Row {
  const char* name;
  double bytes;  // napkin-math bytes read + written
  double us;
};

// ---- main -----------------------------------------------------------------------------------------
static int64_t parse_positive(const char* arg, const char* what) {
  char* end = nullptr;
  const long long v = std::strtoll(arg, &end, 10);
  if (end == arg || *end != '\0' || v <= 0) {
    std::fprintf(stderr, "bad %s '%s': expected a positive integer\n", what, arg);
    std::fprintf(stderr, "usage: quantize_harness [rows [cols [blocksize [--no-bench]]]]   (defaults: 8192 8192 64)\n");
    std::exit(EXIT_FAILURE);
  }
  return v;
}

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? parse_positive(argv[1], "rows") : 8192;
  const int64_t cols = argc > 2 ? parse_positive(argv[2], "cols") : 8192;
  const int64_t blocksize = argc > 3 ? parse_positive(argv[3], "blocksize") : qlora::kDefaultBlocksize;
  const bool no_bench = argc > 4 && std::strcmp(argv[4], "--no-bench") == 0;
  if (!qlora::is_supported_blocksize(blocksize)) {
    std::fprintf(stderr, "blocksize %" PRId64 " is not supported (64, 128 or 256)\n", blocksize);
    return EXIT_FAILURE;
  }

  Problem p;
  p.numel = rows * cols;
  p.blocksize = int(blocksize);
  p.nblocks = qlora::num_blocks(p.numel, blocksize);
  p.nchunks = qlora::num_chunks(p.nblocks);
  p.packed = qlora::packed_bytes(p.numel);
  p.cb = qlora::make_codebook(qlora::QuantType::NF4);

  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  // The kernels use sm_80 warp reductions and bf16: refuse older GPUs with a message, not a launch error.
  if (prop.major < 8) {
    std::fprintf(stderr, "%s is compute capability %d.%d; the kernels need 8.0 or newer\n", prop.name, prop.major,
                 prop.minor);
    return EXIT_FAILURE;
  }
  int mem_clock_khz = 0, bus_bits = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev));
  const double spec_gbs = 2.0 * mem_clock_khz * 1e3 * (bus_bits / 8) / 1e9;  // double data rate
  std::printf("device: %s (sm_%d%d, %d SMs, %.0f MB L2, spec DRAM %.0f GB/s)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, prop.l2CacheSize / 1048576.0, spec_gbs);
  std::printf("problem: %" PRId64 " x %" PRId64 " bf16 = %" PRId64 " elements, NF4, blocksize %d, %" PRId64
              " blocks, %" PRId64 " absmax chunks\n",
              rows, cols, p.numel, p.blocksize, p.nblocks, p.nchunks);
  std::printf("cpu reference: %s path, %u threads\n", qlora::cpu::simd_enabled() ? "AVX2" : "scalar",
              std::max(1u, std::thread::hardware_concurrency()));

  // Input: N(0, 1), with two special blocks up front when there is room for them.
  std::vector<uint16_t> x = random_bf16_normal(p.numel, /*seed=*/42);
  if (p.nblocks > 2) {
    // Block 0 all zeros: absmax 0, inverse 0, every code that of 0.0.
    std::fill(x.begin(), x.begin() + p.blocksize, uint16_t(0));
    // Block 1 scaled by 2^-128: a subnormal absmax, which the encoder prescales by 2^24.
    for (int64_t i = p.blocksize; i < 2 * p.blocksize; ++i) {
      x[i] = qlora::f32_to_bf16_rn(qlora::bf16_to_f32(x[i]) * 0x1p-128f);
    }
  }

  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  DeviceBuffers d;
  CUDA_CHECK(cudaMalloc(&d.x, p.numel * sizeof(uint16_t)));
  CUDA_CHECK(cudaMalloc(&d.codes, p.packed));
  CUDA_CHECK(cudaMalloc(&d.absmax, p.nblocks * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&d.nonfinite, sizeof(int32_t)));
  CUDA_CHECK(cudaMalloc(&d.chunk_sums, p.nchunks * sizeof(double)));
  CUDA_CHECK(cudaMalloc(&d.absmax_fp8, p.nblocks));
  CUDA_CHECK(cudaMalloc(&d.chunk_scale, p.nchunks * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&d.mean, sizeof(float)));
  CUDA_CHECK(cudaMalloc(&d.absmax_decoded, p.nblocks * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&d.out, p.numel * sizeof(uint16_t)));
  CUDA_CHECK(cudaMemcpy(d.x, x.data(), p.numel * sizeof(uint16_t), cudaMemcpyHostToDevice));

  // ---- validation first: a fast wrong kernel is not worth timing ----
  std::printf("\nvalidation (bitwise, CPU reference vs CUDA):\n");
  const Outputs cpu = run_cpu(p, x);
  const Outputs gpu = run_cuda(p, d, stream);
  if (const int64_t bad = validate(cpu, gpu, p)) {
    std::printf("FAILED: %" PRId64 " values differ\n", bad);
    return EXIT_FAILURE;
  }
  std::printf("all outputs bit-identical\n");
  if (no_bench) return EXIT_SUCCESS;  // under compute-sanitizer, timing means nothing

  // ---- benchmark ----
  BenchConfig cfg;
  cfg.flush_bytes = std::max<int64_t>(int64_t(256) << 20, 2 * int64_t(prop.l2CacheSize));
  CUDA_CHECK(cudaMalloc(&cfg.flush, cfg.flush_bytes));

  const double n = double(p.numel), nb = double(p.nblocks), nc = double(p.nchunks);
  const double x_bytes = 2.0 * n, codes_bytes = double(p.packed);
  std::vector<Row> rows_out;
  auto bench = [&](const char* name, double bytes, auto launch) {
    qlora::cuda::NvtxRange range(name);
    rows_out.push_back({name, bytes, median_us(cfg, stream, launch)});
  };
  // The ceiling: a copy of the bf16 tensor, counted as bytes read + written like the kernels.
  bench("memcpy D2D (ceiling)", 2.0 * x_bytes,
        [&] { return cudaMemcpyAsync(d.out, d.x, p.numel * sizeof(uint16_t), cudaMemcpyDeviceToDevice, stream); });
  // quantize: read bf16 (2 B), write codes (0.5 B) and one fp32 absmax per block.
  bench("quantize_4bit bf16", x_bytes + codes_bytes + 4.0 * nb, [&] { return launch_quantize(p, d, stream); });
  // double quant: read fp32 absmax, write FP8 codes, one fp32 scale per chunk and the mean.
  bench("quantize_absmax_fp8", 4.0 * nb + nb + 4.0 * nc + 4.0, [&] { return launch_quantize_absmax(p, d, stream); });
  bench("dequantize_absmax_fp8", nb + 4.0 * nc + 4.0 + 4.0 * nb,
        [&] { return launch_dequantize_absmax(p, d, stream); });
  // dequantize: read codes (0.5 B) and the absmax, write bf16 (2 B).
  bench("dequantize_4bit bf16, fp32 absmax", codes_bytes + 4.0 * nb + x_bytes,
        [&] { return launch_dequantize(p, d, false, stream); });
  bench("dequantize_4bit bf16, fp8 absmax", codes_bytes + nb + 4.0 * nc + 4.0 + x_bytes,
        [&] { return launch_dequantize(p, d, true, stream); });

  const double copy_gbs = rows_out[0].bytes / (rows_out[0].us * 1e3);
  std::printf("\nbenchmark (median of %d reps after %d warm-up, L2 flushed with a %" PRId64
              " MB memset before each rep):\n",
              cfg.reps, cfg.warmup, cfg.flush_bytes >> 20);
  std::printf("  %-36s %10s %10s %10s %10s\n", "kernel", "MB moved", "median us", "GB/s", "% of copy");
  for (const Row& r : rows_out) {
    const double gbs = r.bytes / (r.us * 1e3);
    std::printf("  %-36s %10.2f %10.2f %10.1f %9.1f%%\n", r.name, r.bytes / 1e6, r.us, gbs, 100.0 * gbs / copy_gbs);
  }

  CUDA_CHECK(cudaFree(cfg.flush));
  CUDA_CHECK(cudaFree(d.x));
  CUDA_CHECK(cudaFree(d.codes));
  CUDA_CHECK(cudaFree(d.absmax));
  CUDA_CHECK(cudaFree(d.nonfinite));
  CUDA_CHECK(cudaFree(d.chunk_sums));
  CUDA_CHECK(cudaFree(d.absmax_fp8));
  CUDA_CHECK(cudaFree(d.chunk_scale));
  CUDA_CHECK(cudaFree(d.mean));
  CUDA_CHECK(cudaFree(d.absmax_decoded));
  CUDA_CHECK(cudaFree(d.out));
  CUDA_CHECK(cudaStreamDestroy(stream));
  return EXIT_SUCCESS;
}
