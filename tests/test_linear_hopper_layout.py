"""CPU emulation of the Hopper wgmma GEMM's data movement (csrc/kernels/linear_4bit_hopper_cuda.cu).

The kernel cannot run without a GPU, so this test replays, per CTA and main-loop step, what its threads write
to shared memory and what its wgmma instructions read, with the kernel's own formulas (csrc/kernels/
linear_4bit_large_layout.h through the test hook qlora_ext._C.large_gemm_index) and the hardware semantics
written down from the PTX ISA and CUTLASS's canonical GMMA layouts (in 16-byte units, T = 8 values):
- the matrix descriptor: bits 0-13 start address >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4, 49-51 base offset,
  62-63 swizzle (1 = 128-byte);
- 128-byte swizzle (Swizzle<3,4,3>): the 16-byte chunk index, address bits 4-6, is XORed with bits 7-9;
- K-major operand ((8,m),(T,2)):((8T,SBO),(1,T)): row r of M/N at (r / 8) SBO + (r % 8) 128 bytes, value k of
  the 16 at 2 k bytes from the start address;
- MN-major operand ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)): column c of M/N at (c / 64) LBO + 2 (c % 64) bytes,
  row k of the 16 at (k / 8) SBO + (k % 8) 128 bytes ("transpose B" = 1);
- m64n128k16: D[64 x 128] += A[64 x 16] B[16 x 128] per warpgroup.
Values are small integers, so float64 sums are exact and the emulated y = x W^T and dx = dy W must equal the
reference exactly for odd shapes. It also checks that every tile element is written exactly once per step and
every wgmma read hits an element written in that step (reads of stale or foreign data would be NaN), that the
tiles sit on 1024-byte boundaries, that the accumulator map covers each output element once, and that the
weight decode's 16-byte store phases are free of bank conflicts in the new MN-major layout.
"""
import functools

import numpy as np
import pytest

from qlora_ext import _C
from tests.test_linear_large_layout import check_phase_conflict_free

C = _C.large_gemm_constants()
TM, TR, STAGES, THREADS = C["tile_m"], C["tile_r"], C["stages"], C["threads"]
TILE = TM * TR                 # values per activation tile
TILE_NS = (128, 256)           # the kernel's two tile widths (output columns per CTA)
BASE = 3 * C["hopper_smem_align"]  # the aligned start of the tiles in the emulated shared memory (bytes)


def f(name, a, b=0, c=0, d=0):
    return _C.large_gemm_index(name, a, b, c, d)


def decode_desc(desc):
    return {"start": (desc & 0x3FFF) << 4, "lbo": ((desc >> 16) & 0x3FFF) << 4,
            "sbo": ((desc >> 32) & 0x3FFF) << 4, "base_offset": (desc >> 49) & 7, "swizzle": (desc >> 62) & 3}


def swizzle_128b(byte_addr):
    return byte_addr ^ (((byte_addr >> 7) & 7) << 4)


def read_index_k_major(desc, rows):
    """Element indices [rows, 16] that wgmma reads for a K-major 128-byte-swizzled operand."""
    d = decode_desc(desc)
    assert d["swizzle"] == 1 and d["base_offset"] == 0
    r = np.arange(rows)[:, None]
    k = np.arange(16)[None, :]
    logical = d["start"] + (r // 8) * d["sbo"] + (r % 8) * 128 + 2 * k
    return swizzle_128b(logical) // 2


def read_index_mn_major(desc, cols):
    """Element indices [16, cols] that wgmma reads for an MN-major 128-byte-swizzled operand."""
    d = decode_desc(desc)
    assert d["swizzle"] == 1 and d["base_offset"] == 0
    k = np.arange(16)[:, None]
    c = np.arange(cols)[None, :]
    logical = d["start"] + (c // 64) * d["lbo"] + 2 * (c % 64) + (k // 8) * d["sbo"] + (k % 8) * 128
    return swizzle_128b(logical) // 2


@functools.lru_cache(maxsize=None)
def act_copies():
    """(row, chunk, element offset in the stage) of every 16-byte activation copy of the CTA."""
    rows, chunks = [], []
    for tid in range(THREADS):
        for i in range(C["act_copies_per_thread"]):
            rows.append(f("act_copy_row", tid, i))
            chunks.append(f("act_copy_chunk", tid, i))
    rows, chunks = np.array(rows), np.array(chunks)
    offs = np.array([f("swizzle", r, c, C["act_chunks_per_row"]) for r, c in zip(rows, chunks)])
    return rows, chunks, offs


@functools.lru_cache(maxsize=None)
def weight_stores(grad, tn):
    """Per decode unit (tid + u * THREADS, u < the units per thread) and store step s: (tile row, first column
    in the row, element offset in the weight tile)."""
    parts = C[f"hopper_decode_parts_{'grad' if grad else 'fwd'}_{tn}"]
    units = C[f"hopper_decode_units_{tn}"] * THREADS
    out = np.zeros((units, 4, 3), dtype=np.int64)
    for unit in range(units):
        row, part = f("decode_row", unit, parts), f("decode_part", unit, parts)
        row_offset = f("hopper_decode_row_offset", int(grad), row, part)
        for s in range(4):
            chunk = f("decode_store_chunk", part, s)
            # decode_weights: the chunk's offset from where chunk 4 part of the row lies
            out[unit, s] = (row, 8 * chunk, f("decode_store_offset", row_offset, chunk, part))
    return out


@functools.lru_cache(maxsize=None)
def acc_map(tn):
    acc = C[f"hopper_acc_regs_{tn}"]
    rows = np.array([[f("hopper_acc_row", tid, r) for r in range(acc)] for tid in range(THREADS)])
    cols = np.array([[f("hopper_acc_col", tid, r) for r in range(acc)] for tid in range(THREADS)])
    return rows, cols


def tile_base_bytes(kind, index, tn):
    """Byte address of activation stage `index` or weight buffer `index` (the kernel's carve-up)."""
    if kind == "act":
        return BASE + index * TILE * 2
    return BASE + STAGES * TILE * 2 + index * tn * TR * 2


def emulate(grad, act, w, tn):
    """The kernel's output for activations act [M, R] and weight w [N, K] (already decoded values)."""
    M = act.shape[0]
    N, K = w.shape
    R, out_cols = (N, K) if grad else (K, N)
    assert act.shape[1] == R
    out = np.full((M, out_cols), np.nan)
    stores = np.zeros((M, out_cols), dtype=np.int64)
    a_rows, a_chunks, a_offs = act_copies()
    ws = weight_stores(grad, tn)
    acc_rows, acc_cols = acc_map(tn)
    w_tile = tn * TR
    smem_elems = (BASE + C[f"hopper_smem_bytes_{tn}"]) // 2
    b_lbo, b_sbo = (C["grad_lbo"], C["grad_sbo"]) if grad else (C["k_major_lbo"], C["k_major_sbo"])
    for m0 in range(0, M, TM):
        for c0 in range(0, out_cols, tn):
            d = np.zeros((TM, tn))
            for s in range((R + TR - 1) // TR):
                smem = np.full(smem_elems, np.nan)
                writes = np.zeros(smem_elems, dtype=np.int64)
                # activation tile (cp.async, zero-filled outside the matrix) into stage s % STAGES
                a_base = tile_base_bytes("act", s % STAGES, tn) // 2
                for r, c, off in zip(a_rows, a_chunks, a_offs):
                    gr, gc = m0 + r, s * TR + 8 * c
                    vals = np.zeros(8)
                    if gr < M:
                        seg = act[gr, gc:min(gc + 8, R)]
                        vals[:len(seg)] = seg
                    smem[a_base + off:a_base + off + 8] = vals
                    writes[a_base + off:a_base + off + 8] += 1
                # decoded weight tile into buffer s % 2: forward rows n, columns k; gradient rows n (reduction)
                w_base = tile_base_bytes("w", s % C["hopper_weight_buffers"], tn) // 2
                for unit in range(len(ws)):
                    for row, col, off in ws[unit]:
                        n, k = (s * TR + row, c0 + col) if grad else (c0 + row, s * TR + col)
                        vals = w[n, k:k + 8] if n < N and k < K else np.zeros(8)
                        smem[w_base + off:w_base + off + 8] = vals
                        writes[w_base + off:w_base + off + 8] += 1
                assert writes.max() == 1, "a shared-memory element written twice in one step"
                assert writes[a_base:a_base + TILE].min() == 1 and writes[w_base:w_base + w_tile].min() == 1
                # the two warpgroups' wgmmas, four k16 steps each
                for g in range(C["hopper_warpgroups"]):
                    for ks in range(TR // 16):
                        da = f("wgmma_desc", tile_base_bytes("act", s % STAGES, tn) + f("hopper_a_offset", g, ks),
                               C["k_major_lbo"], C["k_major_sbo"])
                        db = f("wgmma_desc", tile_base_bytes("w", s % C["hopper_weight_buffers"], tn) +
                               f("hopper_b_offset", int(grad), ks), b_lbo, b_sbo)
                        a = smem[read_index_k_major(da, 64)]                    # [64 m, 16 k]
                        b = smem[read_index_mn_major(db, tn)] if grad else smem[read_index_k_major(db, tn)].T
                        assert not np.isnan(a).any() and not np.isnan(b).any(), "wgmma read an unwritten element"
                        d[64 * g:64 * g + 64] += a @ b
            # epilogue: register r of thread tid is (acc_row, acc_col) of the warpgroup's own rows
            for tid in range(THREADS):
                for r in range(acc_rows.shape[1]):
                    row, col = m0 + acc_rows[tid, r], c0 + acc_cols[tid, r]
                    if row < M and col < out_cols:
                        out[row, col] = d[acc_rows[tid, r], acc_cols[tid, r]]
                        stores[row, col] += 1
    assert (stores == 1).all(), "every output element is stored exactly once"
    return out


def integer_problem(m, n, k, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(-3, 4, size=(m, k)).astype(np.float64), rng.integers(-3, 4, size=(n, k)).astype(np.float64)


@pytest.mark.parametrize("tn", TILE_NS)
@pytest.mark.parametrize("m,n,k", [(1, 1, 64), (130, 65, 128), (257, 300, 192)])
def test_forward_equals_reference(m, n, k, tn):
    x, w = integer_problem(m, n, k, seed=m + n + k)
    np.testing.assert_array_equal(emulate(False, x, w, tn), x @ w.T)


@pytest.mark.parametrize("tn", TILE_NS)
@pytest.mark.parametrize("m,n,k", [(65, 72, 128), (130, 1, 64), (200, 257, 320)])
def test_input_gradient_equals_reference(m, n, k, tn):
    rng = np.random.default_rng(m * n)
    _, w = integer_problem(1, n, k, seed=n + k)
    dy = rng.integers(-3, 4, size=(m, n)).astype(np.float64)
    np.testing.assert_array_equal(emulate(True, dy, w, tn), dy @ w)


@pytest.mark.parametrize("tn", TILE_NS)
def test_tiles_on_1024_byte_boundaries_and_in_budget(tn):
    align = C["hopper_smem_align"]
    for i in range(STAGES):
        assert (tile_base_bytes("act", i, tn) - BASE) % align == 0
    for i in range(C["hopper_weight_buffers"]):
        assert (tile_base_bytes("w", i, tn) - BASE) % align == 0
    used = STAGES * TILE * 2 + C["hopper_weight_buffers"] * tn * TR * 2
    smem = C[f"hopper_smem_bytes_{tn}"]
    assert used + align <= smem  # room to round the dynamic base up to 1024 bytes
    ctas_per_sm = 2 if tn == 128 else 1  # the kernel's launch bounds
    assert ctas_per_sm * (smem + 1024) <= 228 * 1024  # Hopper: 228 KiB per SM, 1 KiB reserved per CTA


@pytest.mark.parametrize("tn", TILE_NS)
def test_accumulator_map_is_a_bijection_owned_by_each_warpgroup(tn):
    rows, cols = acc_map(tn)
    flat = rows * tn + cols
    assert np.array_equal(np.sort(flat.ravel()), np.arange(TM * tn))
    assert ((rows // 64) == (np.arange(THREADS) // 128)[:, None]).all()
    # registers r and r + 1 (r even) are neighbouring columns of one row: the epilogue's paired stores
    assert (rows[:, 0::2] == rows[:, 1::2]).all() and (cols[:, 1::2] == cols[:, 0::2] + 1).all()


@pytest.mark.parametrize("tn", TILE_NS)
def test_accumulator_map_is_the_ptx_fragment_layout(tn):
    """The bijection above would also hold for a wrong map (rows 0 and 8 swapped, say); this is the map itself,
    written from the PTX ISA's figure of the wgmma .m64nNk16 D fragment (fp32 accumulators): warp w of the
    warpgroup holds rows 16 w .. 16 w + 15; its registers go in groups of four per 8-column block, d[4 j] and
    d[4 j + 1] at row lane / 4, columns 8 j + 2 (lane % 4) + {0, 1}, and d[4 j + 2], d[4 j + 3] eight rows
    lower. Warpgroup g of the CTA computes rows 64 g .. 64 g + 63."""
    rows, cols = acc_map(tn)
    for tid in range(THREADS):
        warpgroup, warp, lane = tid // 128, (tid % 128) // 32, tid % 32
        for j in range(tn // 8):
            for i in range(4):
                r = 4 * j + i
                assert rows[tid, r] == 64 * warpgroup + 16 * warp + lane // 4 + (8 if i >= 2 else 0), (tid, r)
                assert cols[tid, r] == 8 * j + 2 * (lane % 4) + i % 2, (tid, r)


def test_descriptor_fields_round_trip():
    desc = f("wgmma_desc", 0x3FC00 + 32, C["grad_lbo"], C["grad_sbo"])
    d = decode_desc(desc)
    assert d == {"start": 0x3FC00 + 32, "lbo": C["grad_lbo"], "sbo": C["grad_sbo"], "base_offset": 0, "swizzle": 1}


@pytest.mark.parametrize("tn", TILE_NS)
@pytest.mark.parametrize("grad", [False, True])
def test_weight_decode_store_phases_are_bank_conflict_free(grad, tn):
    ws = weight_stores(grad, tn)
    for u in range(0, len(ws), THREADS):  # unit u of every thread is one store instruction of the CTA
        for s in range(4):
            for phase in range(u, u + THREADS, 8):  # a 16-byte store is served 8 threads at a time
                check_phase_conflict_free(ws[phase:phase + 8, s, 2])
