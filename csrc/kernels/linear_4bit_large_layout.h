// Index formulas of the fused large-M 4-bit GEMMs (linear_4bit_large_cuda.cu with mma.sync, and
// linear_4bit_hopper_cuda.cu with wgmma): tile sizes, which thread copies or decodes which element, the
// shared-memory swizzle, the ldmatrix row addresses and the wgmma descriptors. Plain __host__ __device__
// functions so the kernels and the CPU emulations (tests/test_linear_large_layout.py and
// tests/test_linear_hopper_layout.py, through qlora_ext._C.large_gemm_index) use the very same formulas.
//
// Terms: a CTA computes a kTileM x kTileN tile of the output (forward: y rows m, columns n; input
// gradient: dx rows m, columns k), stepping over the reduction (forward: k; input gradient: n) kTileR at
// a time. Shared-memory tiles are rows of 16-byte chunks (8 bf16/fp16 values); the physical chunk of a
// logical (row, chunk) is chunk ^ (row % 8), so the 8 rows an ldmatrix phase reads, or the 8 chunks a
// copy phase writes, fall in 8 different 16-byte bank groups (no bank conflicts).
#pragma once

#include <cstdint>

#include "quant_format.h"

namespace qlora::large {

constexpr int kTileM = 128;      // output rows per CTA (rows of x / dy)
constexpr int kTileN = 128;      // output columns per CTA (forward: n; input gradient: k)
constexpr int kTileR = 64;       // reduction per main-loop step (forward: k = one quant block; grad: n)
constexpr int kStages = 3;       // cp.async stages of the activation tile
constexpr int kWarps = 8;        // 2 (m) x 4 (n) warps, each 64 x 32 of the output
constexpr int kThreads = kWarps * 32;
constexpr int kWarpTileM = 64, kWarpTileN = 32;
constexpr int kWarpsN = kTileN / kWarpTileN;  // 4
constexpr int kMmaTilesM = kWarpTileM / 16;   // 4 m16 tiles per warp
constexpr int kMmaTilesN = kWarpTileN / 8;    // 4 n8 tiles per warp
constexpr int kChunkElems = 8;                // 16-bit values per 16-byte chunk

// Activation tile (x forward, dy input gradient): kTileM rows x kTileR values = 8 chunks per row.
constexpr int kActChunksPerRow = kTileR / kChunkElems;                        // 8
constexpr int kActCopiesPerThread = kTileM * kActChunksPerRow / kThreads;     // 4
// Weight tile in shared memory, K-major (rows n, k contiguous) in both directions:
// forward kTileN (n) x kTileR (k); input gradient kTileR (n) x kTileN (k).
constexpr int kFwdWChunksPerRow = kTileR / kChunkElems;   // 8
constexpr int kGradWChunksPerRow = kTileN / kChunkElems;  // 16
constexpr int kWeightsPerDecodeThread = kTileN * kTileR / kThreads;  // 32 = 16 code bytes = 4 chunks
constexpr int kTileElems = kTileM * kTileR;  // activation tile = weight tile = 8192 values
constexpr int kSmemBytes = (kStages + 1) * kTileElems * 2;  // 3 activation stages + 1 weight tile = 64 KiB

// ---- shared-memory layout ------------------------------------------------------------------------
// Element offset (in 16-bit values) of logical (row, chunk) in a tile with chunks_per_row chunks per row.
QLORA_HD int swizzle(int row, int chunk, int chunks_per_row) {
  return (row * chunks_per_row + (chunk ^ (row & 7))) * kChunkElems;
}

// swizzle(row + R, chunk + C, chunks_per_row), given lane_offset = swizzle(row, chunk, chunks_per_row), for R a
// multiple of 8, C < chunks_per_row and C sharing no bit with chunk: row % 8 is unchanged and chunk + C =
// chunk ^ C, so the tile offset moves by an XOR and an add the compiler folds into the instruction (the
// ldmatrix addresses of every m/n tile and k step come from one register per lane).
QLORA_HD int swizzle_moved(int lane_offset, int R, int C, int chunks_per_row) {
  return (lane_offset ^ (C * kChunkElems)) + R * chunks_per_row * kChunkElems;
}

// ---- activation copy (cp.async, 16 bytes each) -----------------------------------------------------
// Copy i (0..kActCopiesPerThread-1) of thread tid moves chunk act_copy_chunk of tile row act_copy_row:
// consecutive threads take consecutive chunks of a row (coalesced global reads).
QLORA_HD int act_copy_row(int tid, int i) { return (tid + i * kThreads) / kActChunksPerRow; }
QLORA_HD int act_copy_chunk(int tid, int i) { return (tid + i * kThreads) % kActChunksPerRow; }

// ---- weight decode ---------------------------------------------------------------------------------
// Thread tid decodes 32 consecutive weights (16 code bytes, one 16-byte load) of one weight-tile row:
// row decode_row, weights 32 * decode_part .. +31 of that row (parts_per_row = 2 forward, 4 grad).
QLORA_HD int decode_row(int tid, int parts_per_row) { return tid / parts_per_row; }
QLORA_HD int decode_part(int tid, int parts_per_row) { return tid % parts_per_row; }
// Step s (0..3) of a thread stores its chunk 4 * part + (s ^ rot(part)), rot = 0, 2, 1, 3 for part / 2 = 0..3:
// the rotation keeps the 8 threads of a store phase in 8 different bank groups (two rows of 4 parts, or one
// row of 8 parts in the Hopper kernel's 256-wide input-gradient tile); as an XOR, the kernel gets every step's
// offset from the offset of chunk 4 * part by an XOR (4 * part shares no bit with s ^ rot < 4).
QLORA_HD int decode_store_rotation(int part) { return 2 * ((part >> 1) & 1) + ((part >> 2) & 1); }
QLORA_HD int decode_store_chunk(int part, int s) { return 4 * part + (s ^ decode_store_rotation(part)); }
// Element offset of that chunk in the weight tile, from row_offset, where chunk 4 * part of the row lies (each
// kernel's tile layout gives it): an XOR in both layouts, since chunk - 4 * part < 4 shares no bit with the
// chunk index's other bits.
QLORA_HD int decode_store_offset(int row_offset, int chunk, int part) {
  return row_offset ^ ((chunk - 4 * part) * kChunkElems);
}

// Packed codes: element (n, k) of W [N, K] is nibble (k even: high, odd: low) of byte n * K/2 + k/2;
// its absmax is block n * K/64 + k/64 (blocksize 64 runs along k).
// Index is int64_t in general; the kernel uses uint32_t when the weight has fewer than 2^32 codes bytes
// (fits_32bit_weight_index), which saves registers in its main loop.
template <typename Index>
QLORA_HD Index code_byte(Index n, Index k, Index K) { return n * (K / 2) + k / 2; }
template <typename Index>
QLORA_HD Index absmax_block(Index n, Index k, Index K) { return n * (K / 64) + k / 64; }
QLORA_HD bool fits_32bit_weight_index(int64_t N, int64_t K) {
  return K < (int64_t(1) << 31) && N * (K / 2) + 16 <= (int64_t(1) << 32);
}

// ---- warps and ldmatrix ----------------------------------------------------------------------------
// Warp w owns output rows warp_row0(w) .. +63 and columns warp_col0(w) .. +31 of the CTA tile.
QLORA_HD int warp_row0(int warp) { return (warp / kWarpsN) * kWarpTileM; }
QLORA_HD int warp_col0(int warp) { return (warp % kWarpsN) * kWarpTileN; }

// A fragment (m16 x k16) by one ldmatrix.x4: lanes 0-15 address rows 0-15 at chunk 0 (k 0-7), lanes
// 16-31 rows 0-15 at chunk 1 (k 8-15): matrices 0..3 = a0..a3 of mma.m16n8k16.
QLORA_HD int ldsm_a_row(int lane) { return lane & 15; }
QLORA_HD int ldsm_a_chunk(int lane) { return lane >> 4; }
// Forward B fragments of two n8 tiles by one ldmatrix.x4 (no .trans; W rows n are the B columns):
// matrix j = lane / 8 is n rows 8 * (j / 2) .. +7 at k chunk j % 2, i.e. b0, b1 of n-tile 0, then of 1.
QLORA_HD int ldsm_b_row(int lane) { return ((lane >> 4) << 3) + (lane & 7); }
QLORA_HD int ldsm_b_chunk(int lane) { return (lane >> 3) & 1; }
// Input-gradient B fragments of two n8 tiles (here: 8 columns k each) by one ldmatrix.x4.trans from the
// K-major weight tile: matrix j is reduction rows n 8 * (j % 2) .. +7 at k chunk j / 2, transposed on
// load: b0, b1 of k-tile 0, then of k-tile 1.
QLORA_HD int ldsm_bt_row(int lane) { return (((lane >> 3) & 1) << 3) + (lane & 7); }
QLORA_HD int ldsm_bt_chunk(int lane) { return lane >> 4; }

// ---- Hopper: wgmma (sm_90a) -------------------------------------------------------------------------
// The wgmma kernel keeps the CTA's 128 rows, the 64-deep reduction step, the copies and the decode above; its
// tile width TN (output columns per CTA) is 128 or 256. Its activation tile and its forward weight tile
// (rows of 8 chunks, chunk ^ (row % 8), 1024-byte aligned) are exactly wgmma's K-major 128-byte-swizzle
// canonical layout: 8-row x 128-byte atoms, atoms SBO = 1024 bytes apart, the 16-byte chunk index XORed with
// address bits 7-9. The input gradient reads W [n, k] with the reduction n as wgmma's K, so its weight tile
// (64 rows n x TN k) is stored MN-major: TN / 64 column blocks of 64 k, each 64 rows n of 8 swizzled chunks;
// blocks LBO = 8 KiB apart, 8-row groups SBO = 1024 bytes apart.
constexpr int kHopperWarpgroups = 2;      // warpgroup g computes CTA rows 64 g .. 64 g + 63, all TN columns
constexpr int kHopperWeightBuffers = 2;   // the decode of step s + 1 overlaps the wgmma of step s
constexpr int kHopperSmemAlign = 1024;    // the swizzle is a function of the address: atoms 1024-aligned
constexpr int kGradBlockElems = kTileR * 64;  // one 64-column block of the input-gradient weight tile

QLORA_HD constexpr int hopper_weight_tile_elems(int tile_n) { return tile_n * kTileR; }
QLORA_HD constexpr int hopper_smem_bytes(int tile_n) {
  return kStages * kTileElems * 2 + kHopperWeightBuffers * hopper_weight_tile_elems(tile_n) * 2 + kHopperSmemAlign;
}
QLORA_HD constexpr int hopper_acc_regs(int tile_n) { return tile_n / 2; }  // m64nTN fp32 accumulators per thread
// Decode units of 32 weights (one 16-byte code load) per thread and step: 1 (TN = 128) or 2 (TN = 256). Unit
// u of thread tid is number tid + u * kThreads; its row and part come from decode_row / decode_part.
QLORA_HD constexpr int hopper_decode_units(int tile_n) { return hopper_weight_tile_elems(tile_n) / (32 * kThreads); }
// Parts (32-weight pieces) per weight-tile row: forward rows hold 64 k, input-gradient rows TN k.
QLORA_HD constexpr int hopper_decode_parts(bool grad, int tile_n) { return grad ? tile_n / 32 : kTileR / 32; }

// Element offset of logical (row n, chunk c) in the Hopper input-gradient weight tile (c < TN / 8).
QLORA_HD int hopper_grad_w_offset(int row, int chunk) {
  return (chunk / 8) * kGradBlockElems + swizzle(row, chunk % 8, 8);
}
// Where the decode of unit (row, part) puts chunk 4 * part of its row (decode_weights adds the rest by XOR):
// forward as in the mma.sync kernel; input gradient in the MN-major column blocks.
QLORA_HD int hopper_decode_row_offset(bool grad, int row, int part) {
  return grad ? hopper_grad_w_offset(row, 4 * part) : swizzle(row, 4 * part, kFwdWChunksPerRow);
}

// wgmma shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): bits 0-13 start address >> 4,
// 16-29 leading-dimension byte offset >> 4, 32-45 stride-dimension byte offset >> 4, 49-51 base offset (0:
// atoms are 1024-aligned), 62-63 swizzle mode (1 = 128-byte).
QLORA_HD uint64_t wgmma_desc(uint32_t smem_byte_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return uint64_t((smem_byte_addr & 0x3FFFFu) >> 4) | (uint64_t((lbo_bytes & 0x3FFFFu) >> 4) << 16) |
         (uint64_t((sbo_bytes & 0x3FFFFu) >> 4) << 32) | (uint64_t(1) << 62);
}
// K-major operands (A, forward B): LBO is unused with 128-byte swizzle (one atom spans the tile's 64 k).
constexpr uint32_t kKMajorLbo = 16, kKMajorSbo = 1024;
// The MN-major input-gradient B: LBO = next 64 columns k, SBO = next 8 rows n.
constexpr uint32_t kGradLbo = kGradBlockElems * 2, kGradSbo = 1024;
// Byte offsets from a tile's base of the operands of k16 step ks (0..3): A of warpgroup g starts at its row 64 g
// and moves 32 bytes (16 k) within the swizzled rows, as does the forward B; the MN-major B moves 16 rows n.
QLORA_HD uint32_t hopper_a_offset(int warpgroup, int ks) { return uint32_t(warpgroup * 64 * 128 + 32 * ks); }
QLORA_HD uint32_t hopper_b_offset(bool grad, int ks) { return uint32_t(grad ? ks * 16 * 128 : 32 * ks); }

// The m64nNk16 fp32 accumulator fragment: register r of thread tid holds CTA-tile row hopper_acc_row and
// column hopper_acc_col (warp w of a warpgroup owns rows 16 w .. 16 w + 15; within each n8 block the
// mma.sync C layout: row lane / 4 (+ 8), column 2 (lane % 4) (+ 1)).
QLORA_HD int hopper_acc_row(int tid, int r) {
  return 64 * (tid / 128) + 16 * ((tid % 128) / 32) + (tid % 32) / 4 + 8 * ((r / 2) % 2);
}
QLORA_HD int hopper_acc_col(int tid, int r) { return 8 * (r / 4) + 2 * (tid % 4) + r % 2; }

}  // namespace qlora::large
