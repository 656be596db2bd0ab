"""CPU emulation of the fused large-M 4-bit GEMM's data movement (csrc/kernels/linear_4bit_large_cuda.cu).

The kernel cannot run without a GPU, so this test replays what its threads do, with the kernel's own index
formulas (csrc/kernels/linear_4bit_large_layout.h, reached through the test hook
qlora_ext._C.large_gemm_index), and the hardware semantics written down from the PTX ISA:
- cp.async of 16 bytes with a source size (the rest zero-filled) into the swizzled activation stages, in the
  kernel's pipeline order (stage = step % kStages, loaded kStages - 1 steps ahead);
- the weight decode: each thread's 16 code bytes (packed layout: even k in the high nibble), its absmax block,
  and where its 4 chunks land in the swizzled weight tile;
- ldmatrix.x4 (thread l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix i in register i; .trans: the
  transposed element) from the addresses lanes provide (lanes 8i..8i+7 address the rows of matrix i);
- mma.m16n8k16 .row.col fragments: a0..a3 = A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..];
  b0, b1 = B[2t..2t+1][g], B[2t+8..2t+9][g]; c = D[g][2t..2t+1], D[g+8][2t..2t+1] (g = lane/4, t = lane%4);
- the epilogue's bounds-checked stores.
Values are small integers (integer code book and absmax), so every product and sum is exact in float64 and
the emulated y = x W^T and dx = dy W must equal the reference exactly, for odd shapes. It also checks that
every shared-memory tile element is written exactly once per step, that reads outside the matrices never
happen (out-of-range rows/columns must be predicated off), that every output element is stored exactly
once, and that the ldmatrix phases and the copy/decode store phases are free of bank conflicts.
"""
import functools

import numpy as np
import pytest

from qlora_ext import _C

C = _C.large_gemm_constants()
TM, TN, TR, STAGES, THREADS = C["tile_m"], C["tile_n"], C["tile_r"], C["stages"], C["threads"]
ACT_CPR = C["act_chunks_per_row"]
TILE = TM * TR


def f(name, a, b=0, c=0, d=0):
    return _C.large_gemm_index(name, a, b, c, d)


@functools.lru_cache(maxsize=None)
def tables():
    t = {}
    t["act_row"] = np.array([[f("act_copy_row", tid, i) for i in range(C["act_copies_per_thread"])]
                             for tid in range(THREADS)])
    t["act_chunk"] = np.array([[f("act_copy_chunk", tid, i) for i in range(C["act_copies_per_thread"])]
                               for tid in range(THREADS)])
    for parts in (2, 4):
        t[f"drow{parts}"] = np.array([f("decode_row", tid, parts) for tid in range(THREADS)])
        t[f"dpart{parts}"] = np.array([f("decode_part", tid, parts) for tid in range(THREADS)])
    t["dstore"] = np.array([[f("decode_store_chunk", p, s) for s in range(4)] for p in range(4)])
    for cpr, rows in ((ACT_CPR, TM), (C["fwd_w_chunks_per_row"], TN), (C["grad_w_chunks_per_row"], TR)):
        t[("swz", cpr)] = np.array([[f("swizzle", r, c, cpr) for c in range(cpr)] for r in range(rows)])
    t["lane_a"] = np.array([f("swizzle", f("ldsm_a_row", l), f("ldsm_a_chunk", l), ACT_CPR) for l in range(32)])
    t["lane_b"] = np.array([f("swizzle", f("ldsm_b_row", l), f("ldsm_b_chunk", l), C["fwd_w_chunks_per_row"])
                            for l in range(32)])
    t["lane_bt"] = np.array([f("swizzle", f("ldsm_bt_row", l), f("ldsm_bt_chunk", l), C["grad_w_chunks_per_row"])
                             for l in range(32)])
    t["wrow0"] = np.array([f("warp_row0", w) for w in range(THREADS // 32)])
    t["wcol0"] = np.array([f("warp_col0", w) for w in range(THREADS // 32)])
    for name in ("ldsm_a_row", "ldsm_a_chunk", "ldsm_b_row", "ldsm_b_chunk", "ldsm_bt_row", "ldsm_bt_chunk"):
        t[name] = np.array([f(name, lane) for lane in range(32)])
    return t


@functools.lru_cache(maxsize=None)
def _moved(lanes, R, Cc, cpr):
    return np.array([f("swizzle_moved", lane, R, Cc, cpr) for lane in lanes])


def moved(lane_offsets, R, Cc, cpr):
    """The kernel's swizzle_moved applied to every lane's first-tile offset."""
    return _moved(tuple(int(v) for v in lane_offsets), int(R), int(Cc), cpr)


def bank_group(elem_offset):
    """The 16-byte bank group (0..7) of a 16-byte-aligned shared-memory address, in 16-bit elements."""
    return (np.asarray(elem_offset) * 2 // 16) % 8


def check_phase_conflict_free(offsets):
    """offsets: element offsets of 16-byte accesses, one per thread of an 8-thread phase."""
    groups = bank_group(offsets)
    assert len(set(groups.tolist())) == len(groups), f"bank conflict among 16-byte accesses {offsets}"


def ldmatrix_x4(smem, addrs, trans):
    """PTX ldmatrix.sync.aligned.m8n8.x4[.trans].b16: addrs[32] element offsets (lanes 8i..8i+7 give the rows of
    matrix i). Returns regs [32 lanes, 4 registers, 2 halves]."""
    addrs = np.asarray(addrs)
    assert (addrs % 8 == 0).all(), "ldmatrix rows must be 16-byte aligned"
    regs = np.empty((32, 4, 2))
    lanes = np.arange(32)
    for i in range(4):
        check_phase_conflict_free(addrs[8 * i: 8 * i + 8])
        mat = np.stack([smem[a: a + 8] for a in addrs[8 * i: 8 * i + 8]])  # [8 rows, 8 columns]
        assert not np.isnan(mat).any(), "ldmatrix read shared memory no copy or decode wrote this step"
        r, c = lanes // 4, 2 * (lanes % 4)
        if trans:
            regs[:, i, 0], regs[:, i, 1] = mat[c, r], mat[c + 1, r]
        else:
            regs[:, i, 0], regs[:, i, 1] = mat[r, c], mat[r, c + 1]
    return regs


def mma_m16n8k16(acc, a, b0, b1):
    """PTX mma.m16n8k16.row.col: acc [32, 4] += A [16 x 16] B [16 x 8] from per-lane fragments
    a [32, 4, 2], b0/b1 [32, 2]."""
    lanes = np.arange(32)
    g, t = lanes // 4, lanes % 4
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    for h in range(2):
        A[g, 2 * t + h] = a[:, 0, h]
        A[g + 8, 2 * t + h] = a[:, 1, h]
        A[g, 2 * t + 8 + h] = a[:, 2, h]
        A[g + 8, 2 * t + 8 + h] = a[:, 3, h]
        B[2 * t + h, g] = b0[:, h]
        B[2 * t + 8 + h, g] = b1[:, h]
    assert not np.isnan(A).any() and not np.isnan(B).any()
    D = A @ B
    acc[:, 0] += D[g, 2 * t]
    acc[:, 1] += D[g, 2 * t + 1]
    acc[:, 2] += D[g + 8, 2 * t]
    acc[:, 3] += D[g + 8, 2 * t + 1]


class Weight:
    """A quantized weight with an integer code book: packed codes (even k in the high nibble), one absmax per
    64 weights along k, and its exact dense value."""

    def __init__(self, n, k, rng):
        self.N, self.K = n, k
        self.table = np.arange(16, dtype=np.float64) - 8.0
        codes = rng.integers(0, 16, size=(n, k))
        self.packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).astype(np.uint8).reshape(-1)
        self.absmax = rng.integers(1, 4, size=n * (k // 64)).astype(np.float64)
        self.dense = self.table[codes] * np.repeat(self.absmax.reshape(n, k // 64), 64, axis=1)


def decode_into(wtile, w, tid, n, k, parts, cpr, writes, store_log):
    """The kernel's fetch_weights + decode_weights for thread tid (weight row n, columns k..k+31)."""
    t = tables()
    row, part = t[f"drow{parts}"][tid], t[f"dpart{parts}"][tid]
    if n < w.N and k < w.K:
        byte = f("code_byte", n, k, w.K)
        assert byte % 16 == 0, "16-byte code loads must be aligned"
        codes = w.packed[byte: byte + 16]
        assert codes.size == 16 and byte + 16 <= (n + 1) * (w.K // 2), "code load leaves its weight row"
        am = w.absmax[f("absmax_block", n, k, w.K)]
    else:
        codes, am = np.zeros(16, dtype=np.uint8), 0.0
    for s in range(4):
        chunk = t["dstore"][part, s]
        j = chunk - 4 * part  # code word j = weights 8j..8j+7 of the thread's 32
        vals = np.empty(8)
        for b in range(4):
            byte = int(codes[4 * j + b])
            vals[2 * b], vals[2 * b + 1] = w.table[byte >> 4] * am, w.table[byte & 15] * am
        # the kernel (decode_weights): decode_store_offset from where chunk 4 * part of the row lies
        off = f("decode_store_offset", f("swizzle", row, 4 * part, cpr), chunk, part)
        assert off == t[("swz", cpr)][row, chunk], "decode_store_offset disagrees with swizzle"
        wtile[off: off + 8] = vals
        writes[off: off + 8] += 1
        store_log.setdefault(s, {})[tid] = off


def load_act(stage, act, rows, cols, row0, col0, writes, copy_log):
    """The kernel's load_act_tile: 16-byte copies with a source size, zero-filled past the matrix."""
    t = tables()
    for tid in range(THREADS):
        for i in range(C["act_copies_per_thread"]):
            r, c = t["act_row"][tid, i], t["act_chunk"][tid, i]
            gr, gc = row0 + r, col0 + 8 * c
            valid = min(max(cols - gc, 0), 8) if gr < rows else 0
            vals = np.zeros(8)
            if valid:
                assert gr < act.shape[0] and gc + valid <= act.shape[1]
                vals[:valid] = act[gr, gc: gc + valid]
            off = t[("swz", ACT_CPR)][r, c]
            stage[off: off + 8] = vals
            writes[off: off + 8] += 1
            copy_log.setdefault(i, {})[tid] = off


def emulate(act, w, grad, bias=None):
    """Runs every CTA of the kernel. act: x [M, K] (forward) or dy [M, N] (grad). Returns the output and a
    count of stores per output element."""
    t = tables()
    M = act.shape[0]
    R = w.N if grad else w.K
    out_cols = w.K if grad else w.N
    parts = 4 if grad else 2
    cpr = C["grad_w_chunks_per_row"] if grad else C["fwd_w_chunks_per_row"]
    out = np.full((M, out_cols), np.nan)
    stores = np.zeros((M, out_cols), dtype=int)
    steps = -(-R // TR)
    lanes = np.arange(32)
    g, tq = lanes // 4, lanes % 4
    for by in range(-(-M // TM)):
        for bx in range(-(-out_cols // TN)):
            m0, c0 = by * TM, bx * TN
            stages = np.full((STAGES, TILE), np.nan)
            acc = np.zeros((THREADS // 32, C["mma_tiles_m"], C["mma_tiles_n"], 32, 4))

            def load_stage(s):
                writes = np.zeros(TILE, dtype=int)
                stages[s % STAGES] = np.nan
                log = {}
                load_act(stages[s % STAGES], act, M, R, m0, s * TR, writes, log)
                assert (writes == 1).all(), "activation tile not covered exactly once"
                for offs in log.values():  # 8-thread phases of one copy instruction
                    for p in range(0, THREADS, 8):
                        check_phase_conflict_free([offs[tid] for tid in range(p, p + 8)])

            for s in range(STAGES - 1):
                if s < steps:
                    load_stage(s)
            for s in range(steps):
                if s + STAGES - 1 < steps:
                    load_stage(s + STAGES - 1)
                wtile = np.full(TILE, np.nan)
                writes = np.zeros(TILE, dtype=int)
                log = {}
                for tid in range(THREADS):
                    row, part = t[f"drow{parts}"][tid], t[f"dpart{parts}"][tid]
                    n = s * TR + row if grad else c0 + row
                    k = c0 + 32 * part if grad else s * TR + 32 * part
                    decode_into(wtile, w, tid, n, k, parts, cpr, writes, log)
                assert (writes == 1).all(), "weight tile not covered exactly once"
                for offs in log.values():
                    for p in range(0, THREADS, 8):
                        check_phase_conflict_free([offs[tid] for tid in range(p, p + 8)])
                a_tile = stages[s % STAGES]
                for warp in range(THREADS // 32):
                    wr0, wc0 = t["wrow0"][warp], t["wcol0"][warp]
                    for ks in range(TR // 16):
                        a = []
                        for mt in range(C["mma_tiles_m"]):
                            # the kernel: swizzle_moved(a_lane, wr0 + 16 mt, 2 ks); must equal the plain swizzle
                            addrs = moved(t["lane_a"], wr0 + 16 * mt, 2 * ks, ACT_CPR)
                            want = t[("swz", ACT_CPR)][wr0 + mt * 16 + t["ldsm_a_row"], 2 * ks + t["ldsm_a_chunk"]]
                            np.testing.assert_array_equal(addrs, want)
                            a.append(ldmatrix_x4(a_tile, addrs, trans=False))
                        b = []
                        for npair in range(C["mma_tiles_n"] // 2):
                            if grad:  # swizzle_moved(b_lane, 16 ks, (wc0 + 16 np) / 8)
                                addrs = moved(t["lane_bt"], 16 * ks, (wc0 + 16 * npair) // 8, cpr)
                                want = t[("swz", cpr)][16 * ks + t["ldsm_bt_row"],
                                                       (wc0 + 16 * npair) // 8 + t["ldsm_bt_chunk"]]
                            else:  # swizzle_moved(b_lane, wc0 + 16 np, 2 ks)
                                addrs = moved(t["lane_b"], wc0 + 16 * npair, 2 * ks, cpr)
                                want = t[("swz", cpr)][wc0 + 16 * npair + t["ldsm_b_row"], 2 * ks + t["ldsm_b_chunk"]]
                            np.testing.assert_array_equal(addrs, want)
                            r = ldmatrix_x4(wtile, addrs, trans=grad)
                            b += [(r[:, 0], r[:, 1]), (r[:, 2], r[:, 3])]
                        for mt in range(C["mma_tiles_m"]):
                            for nt in range(C["mma_tiles_n"]):
                                mma_m16n8k16(acc[warp, mt, nt], a[mt], *b[nt])
            # epilogue
            for warp in range(THREADS // 32):
                wr0, wc0 = t["wrow0"][warp], t["wcol0"][warp]
                for mt in range(C["mma_tiles_m"]):
                    for nt in range(C["mma_tiles_n"]):
                        for h in range(2):
                            rows = m0 + wr0 + mt * 16 + g + 8 * h
                            cols = c0 + wc0 + nt * 8 + 2 * tq
                            for lane in range(32):
                                for e in range(2):
                                    r, c = rows[lane], cols[lane] + e
                                    if r < M and c < out_cols:
                                        v = acc[warp, mt, nt, lane, 2 * h + e]
                                        out[r, c] = v + (bias[c] if bias is not None else 0.0)
                                        stores[r, c] += 1
    return out, stores


def test_constants_match_the_design():
    assert C["smem_bytes"] == (STAGES + 1) * TILE * 2 <= 48 * 1024 * 2  # 64 KiB: two CTAs fit on sm_80
    assert C["weights_per_decode_thread"] * THREADS == TN * TR
    assert TR == 64  # one quant block per weight row and step (forward)


def test_32bit_weight_index_limit():
    assert f("fits_32bit_weight_index", 65536, 65536)  # 2^31 code bytes
    assert not f("fits_32bit_weight_index", 65536, 131072)
    assert not f("fits_32bit_weight_index", 1, 2 ** 31)  # K itself must fit
    assert f("code_byte", 65535, 65536 - 32, 65536) + 16 <= 2 ** 32


def test_swizzle_is_a_permutation_within_rows():
    t = tables()
    for cpr, rows in ((ACT_CPR, TM), (C["grad_w_chunks_per_row"], TR)):
        offs = t[("swz", cpr)]
        assert sorted(offs.reshape(-1).tolist()) == list(range(0, rows * cpr * 8, 8))
        assert ((offs // (cpr * 8)) == np.arange(rows)[:, None]).all()


@pytest.mark.parametrize("m,n,k", [(65, 1, 64), (130, 197, 192), (97, 65, 128), (129, 128, 64)])
def test_forward_emulation_exact(m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    w = Weight(n, k, rng)
    x = rng.integers(-3, 4, size=(m, k)).astype(np.float64)
    bias = rng.integers(-5, 6, size=n).astype(np.float64)
    y, stores = emulate(x, w, grad=False, bias=bias)
    assert (stores == 1).all()
    np.testing.assert_array_equal(y, x @ w.dense.T + bias)


@pytest.mark.parametrize("m,n,k", [(65, 1, 64), (97, 65, 192), (130, 136, 128), (66, 200, 64)])
def test_grad_input_emulation_exact(m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k + 1)
    w = Weight(n, k, rng)
    dy = rng.integers(-3, 4, size=(m, n)).astype(np.float64)
    dx, stores = emulate(dy, w, grad=True)
    assert (stores == 1).all()
    np.testing.assert_array_equal(dx, dy @ w.dense)


def pipeline_intervals(steps, stages):
    """The kernel's main loop (large_gemm_kernel) as barrier intervals: for each interval the shared buffers it
    reads and writes, with cp.async copies counted as writes from their issue until the cp.async.wait_group that
    retires them. Mirrors the kernel: prologue copies steps 0..stages-2; step s: __syncthreads (1), copy step
    s + stages - 1 into stage (s + stages - 1) % stages, commit, decode the weight tile, wait_group(stages - 1),
    __syncthreads (2), mma reading stage s % stages and the weight tile."""
    intervals = []
    cur = {"reads": set(), "writes": set()}
    in_flight = []  # (group, stage, step)
    content = {}  # stage -> the step whose copy has landed there
    committed = 0
    for s in range(min(stages - 1, steps)):
        in_flight.append((committed, s % stages, s))
        committed += 1
    committed = stages - 1  # the kernel commits an (empty) group even when there is no step left
    for s in range(steps):
        cur["writes"] |= {("act", g[1]) for g in in_flight}
        intervals.append(cur)  # __syncthreads (1)
        cur = {"reads": set(), "writes": {"w"}}
        nxt = s + stages - 1
        if nxt < steps:
            in_flight.append((committed, nxt % stages, nxt))
        committed += 1
        cur["writes"] |= {("act", g[1]) for g in in_flight}
        # cp.async.wait_group(stages - 1): every group but the newest stages - 1 has landed
        for g in [g for g in in_flight if g[0] < committed - (stages - 1)]:
            content[g[1]] = g[2]
            in_flight.remove(g)
        intervals.append(cur)  # __syncthreads (2)
        cur = {"reads": {("act", s % stages), "w"}, "writes": set()}
        assert content.get(s % stages) == s, f"step {s} reads stage {s % stages} holding {content.get(s % stages)}"
        cur["writes"] |= {("act", g[1]) for g in in_flight}
    intervals.append(cur)
    return intervals


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
def test_pipeline_has_no_shared_memory_hazards(steps):
    """No barrier interval both reads and writes a buffer (a cp.async in flight counts as a write), and each
    step's mma reads the stage holding that step's copy."""
    for iv in pipeline_intervals(steps, STAGES):
        assert not (iv["reads"] & iv["writes"]), iv
