"""How the fused GEMMs split their reduction (csrc/kernels/linear_4bit_split.h), on the CPU.

The small-M kernels (csrc/kernels/linear_4bit_cuda.cu) take the split the launcher computes with choose_split
and give each warp the slice warp_slice returns; the large-M kernels (linear_4bit_large_cuda.cu, mma.sync, and
linear_4bit_hopper_cuda.cu, wgmma) take large_split's split-K. All are reached here through test hooks, so these
tests check the functions the kernels use: every reduction unit of every tile is reduced by exactly one warp of
one split, the CTA shapes and the shared memory stay inside the kernels' launch bounds, decode sizes get one
launch, splits never pass one wave nor the partial sums' traffic cap, and the "grid" mode keeps the two-kernel
scheme of the small-M kernels for comparison. The arithmetic itself runs in the CUDA tests (test_linear_4bit.py,
every split mode).
"""
import itertools

import pytest

from qlora_ext import _C

H200_SMS = 132
FORWARD_ROWS_PER_WARP = 32  # one forward tile: 32 weight rows
GRAD_COLS_PER_WARP = 64     # one input-gradient tile: 64 output columns (one quant block)


def floats_per_lane(m, grad):
    m_tiles = 1 if m <= 16 else 2 if m <= 32 else 4
    return m_tiles * (32 if grad else 16)  # acc[MT][8][4] in the gradient, acc[MT][4][4] forward


def plan(tiles, units, reduction, m, resident, mode="auto"):
    return _C.small_m_split_plan(tiles, units, reduction, m, resident, mode)


def forward_plan(n, k, m, resident, mode="auto"):
    return plan(-(-n // FORWARD_ROWS_PER_WARP), k // 64, k, m, resident, mode)


def grad_plan(n, k, m, resident, mode="auto"):
    return plan(k // GRAD_COLS_PER_WARP, -(-n // 16), n, m, resident, mode)


def covered_units(p, units):
    """How often each reduction unit is reduced, over grid splits and the warps of each split's slice."""
    count = [0] * units
    for y in range(p["splits"]):
        begin, end = y * p["per_split"], min((y + 1) * p["per_split"], units)
        previous_hi = begin
        for s in range(p["warp_split"]):
            lo, hi = _C.small_m_warp_slice(begin, end, p["warp_split"], s)
            assert begin <= lo <= hi <= end
            assert lo == previous_hi, "slices are contiguous and in order (the fixed reduction order)"
            previous_hi = hi
            for u in range(lo, hi):
                count[u] += 1
        assert previous_hi == end
    return count


SIZES = [1, 3, 16, 17, 33, 64]
SHAPES = [(1, 64), (65, 128), (97, 4160), (256, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (11008, 256)]
RESIDENT = [H200_SMS * 16, H200_SMS * 28, 108 * 8, 1]  # H200 at 16 and 28 warps per SM, A100 at 8, one warp


@pytest.mark.parametrize("mode", ["auto", "cta", "grid"])
def test_every_unit_is_reduced_exactly_once(mode):
    for (n, k), m, resident in itertools.product(SHAPES, SIZES, RESIDENT):
        for grad in (False, True):
            p = (grad_plan if grad else forward_plan)(n, k, m, resident, mode)
            units = -(-n // 16) if grad else k // 64
            assert covered_units(p, units) == [1] * units, (n, k, m, resident, grad, p)


@pytest.mark.parametrize("mode", ["auto", "cta", "grid"])
def test_cta_shape_and_shared_memory_fit_the_launch_bounds(mode):
    for (n, k), m, resident in itertools.product(SHAPES, SIZES, RESIDENT):
        for grad in (False, True):
            p = (grad_plan if grad else forward_plan)(n, k, m, resident, mode)
            ws = p["warp_split"]
            assert ws in (1, 2, 4, 8, 16) and ws <= p["max_warp_split"]
            assert p["max_warp_split"] == (16 if m <= 16 else 4)  # __launch_bounds__ of the kernels: 512 / 128
            assert p["tiles_per_cta"] == max(1, 4 // ws)
            assert p["cta_warps"] == p["tiles_per_cta"] * ws
            assert p["cta_warps"] * 32 <= (512 if m <= 16 else 128)
            smem = p["reduce_smem_bytes_per_float"] * floats_per_lane(m, grad)
            assert smem == p["tiles_per_cta"] * (ws // 2) * floats_per_lane(m, grad) * 32 * 4
            assert smem <= 48 * 1024, "static limit: the kernels do not opt in to more dynamic shared memory"
            if mode == "cta":
                assert p["splits"] == 1
            if mode == "grid":
                assert ws == 1 and p["tiles_per_cta"] == 4


def test_decode_sizes_take_one_launch_on_an_h200():
    """K = N = 8192 and the Llama-7B MLP shapes at M = 1 and 16: enough warps for one wave come from the CTA
    split alone (16 warps per SM resident: the forward kernel's occupancy), so no partial sums, no second kernel.
    The input gradient of the 11008 x 4096 weight has only 64 column tiles: 16 warps each are 1024 warps, under
    half a wave, so it also splits over the grid, twice."""
    resident = H200_SMS * 16
    for (n, k), m in itertools.product([(8192, 8192), (11008, 4096), (4096, 11008)], [1, 16]):
        f = forward_plan(n, k, m, resident)
        g = grad_plan(n, k, m, resident)
        assert f["splits"] == 1 and -(-n // 32) * f["warp_split"] * 2 > resident, (n, k, m, f)
        if (n, k) == (11008, 4096):
            assert g["warp_split"] == 16 and g["splits"] == 2, g  # 2048 warps of 2112
        else:
            assert g["splits"] == 1 and k // 64 * g["warp_split"] * 2 > resident, (n, k, m, g)
    f = forward_plan(8192, 8192, 1, resident)
    assert f["warp_split"] == 8 and f["cta_warps"] == 8  # 256 tiles x 8 warps = 2048 of 2112 resident
    g = grad_plan(8192, 8192, 1, resident)
    assert g["warp_split"] == 16 and g["cta_warps"] == 16  # 128 tiles x 16 warps


def test_auto_uses_the_grid_only_below_half_a_wave():
    # 2 tiles of 32 rows, K = 8192: even 16 warps per tile are 32 of 2112 -> grid split as well
    # (66 splits would fill the wave; 8 leave every warp one of the 128 units)
    p = plan(2, 128, 8192, 1, H200_SMS * 16)
    assert (p["warp_split"], p["splits"], p["per_split"]) == (16, 8, 16)
    assert _C.small_m_split_plan(2, 128, 8192, 1, H200_SMS * 16, "cta")["splits"] == 1
    # enough tiles: the CTA split stops where one more doubling would pass one wave, no grid split
    p = plan(1024, 128, 8192, 1, H200_SMS * 16)
    assert (p["warp_split"], p["splits"]) == (2, 1)  # 2048 warps of 2112
    p = plan(1100, 128, 8192, 1, H200_SMS * 16)
    assert (p["warp_split"], p["splits"]) == (1, 1)  # 1100: above half a wave already


def test_grid_mode_is_the_two_kernel_scheme():
    """warp_split 1, and as many grid splits as the warps fit in one wave (the launcher before the CTA split
    rounded up: a partial second wave), at most reduction / (16 M) (the partial sums' traffic equals the weight's
    4 bits there), at most `units`."""
    for tiles, units, reduction, m, resident in [(256, 128, 8192, 1, 2112), (4, 65, 4160, 64, 2112),
                                                 (344, 64, 4096, 16, 3696), (128, 512, 8192, 33, 1056),
                                                 (3000, 128, 8192, 1, 2112)]:
        p = plan(tiles, units, reduction, m, resident, "grid")
        splits = min(resident // tiles, reduction // (16 * m), units)
        splits = max(splits, 1)
        per = -(-units // splits)
        assert (p["warp_split"], p["per_split"], p["splits"]) == (1, per, -(-units // per)), p


def test_warp_slices_of_short_ranges_leave_the_last_warps_empty():
    assert [_C.small_m_warp_slice(10, 13, 8, s) for s in range(8)] == \
        [(10, 11), (11, 12), (12, 13)] + [(13, 13)] * 5
    assert [_C.small_m_warp_slice(0, 64, 4, s) for s in range(4)] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    with pytest.raises(ValueError, match="0 <= slice < warp_split"):
        _C.small_m_warp_slice(0, 64, 0, 0)


def test_split_mode_switch_and_bad_input():
    assert _C.fused_split() == "auto"
    with pytest.raises(ValueError, match="fused split mode must be 'auto', 'cta' or 'grid', got 'warp'"):
        _C.set_fused_split("warp")
    try:
        for mode in ("cta", "grid", "auto"):
            _C.set_fused_split(mode)
            assert _C.fused_split() == mode
    finally:
        _C.set_fused_split("auto")
    with pytest.raises(ValueError, match="mode must be 'auto', 'cta' or 'grid'"):
        plan(1, 1, 64, 1, 1, "fast")
    with pytest.raises(ValueError, match="1 <= m <= 64"):
        plan(1, 1, 64, 65, 1)


# ---- large M: split-K over blockIdx.z -------------------------------------------------------------------------
def large_plan(ctas, slots, steps, reduction, m, mode="auto"):
    return _C.large_split_plan(ctas, slots, steps, reduction, m, mode)


@pytest.mark.parametrize("mode", ["auto", "cta", "grid"])
def test_large_split_covers_every_step_once_within_its_limits(mode):
    for ctas, slots, m, reduction in itertools.product([1, 2, 31, 64, 132, 264, 5000], [132, 264],
                                                       [65, 128, 200, 257, 4097], [64, 192, 4096, 8256, 11008]):
        steps = -(-reduction // 64)
        p = large_plan(ctas, slots, steps, reduction, m, mode)
        z, per = p["splits"], p["steps_per_split"]
        # the kernel: split z reduces steps z * per .. min((z + 1) * per, steps) - 1, none empty
        covered = [s for i in range(z) for s in range(i * per, min((i + 1) * per, steps))]
        assert covered == list(range(steps)) and (z - 1) * per < steps, (ctas, slots, m, reduction, p)
        if mode == "cta" or ctas >= slots:
            assert z == 1
        if z > 1:
            assert ctas * z <= slots, "at most one wave"
            assert z <= steps // p["min_steps"], "every split keeps the pipeline's prologue amortized"
            assert z <= reduction // (16 * m), "partials' traffic at most the weight's"


def test_large_split_at_m128_fills_the_h200():
    """K = N = 8192, M = 128: mma.sync 128 x 128 tiles (2 CTAs per SM: 264 slots) make 64 CTAs, wgmma 128 x 256
    (1 per SM) 32: both split 4 ways (the traffic cap, 8192 / (16 * 128), is 4 as well). M = 4096: no split."""
    assert large_plan(64, 264, 128, 8192, 128)["splits"] == 4
    assert large_plan(32, 132, 128, 8192, 128)["splits"] == 4
    assert large_plan(64, 264, 128, 8192, 128, "cta")["splits"] == 1
    assert large_plan(64 * 32, 264, 128, 8192, 4096)["splits"] == 1
    # M = 256 with 128-wide tiles: 128 CTAs of 264 slots -> 2; a 4096-column input gradient over N = 11008 at
    # M = 65 with 256-wide tiles: 16 CTAs, one wave of 132 slots -> 8 (the traffic cap, 11008 / 1040, is 10),
    # 172 steps -> 8 splits of 22 steps (the last one 18)
    assert large_plan(128, 264, 128, 8192, 256)["splits"] == 2
    assert large_plan(16, 132, 172, 11008, 65) == {"splits": 8, "steps_per_split": 22, "min_steps": 4}


def test_large_split_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="mode must be"):
        large_plan(1, 1, 1, 64, 65, "z")
    with pytest.raises(ValueError, match="positive"):
        large_plan(0, 1, 1, 64, 65)
