"""The 16-value code tables the kernels use, against their definitions (NF4 from SciPy quantiles)."""
import numpy as np
import pytest
import torch

import qlora_ext
from tests import reference as ref


def test_nf4_matches_scipy_quantiles():
    derived = ref.nf4_from_quantiles()
    kernel = qlora_ext.code_table("nf4").double().numpy()
    dev = np.abs(kernel - derived).max()
    print(f"NF4 table vs float64 SciPy derivation: max deviation {dev:.3g}")
    assert dev < 1e-6
    assert kernel[7] == 0.0 and (np.diff(kernel) > 0).all()
    assert (kernel < 0).sum() == 7 and (kernel > 0).sum() == 8  # asymmetric: one more positive value


def test_nf4_is_bitsandbytes_float32_table():
    np.testing.assert_array_equal(qlora_ext.code_table("nf4").numpy(), np.array(ref.BNB_NF4, dtype=np.float32))


def test_fp4_is_bitsandbytes_table_in_code_order():
    np.testing.assert_array_equal(qlora_ext.code_table("fp4").numpy(), ref.table("fp4"))
    t = qlora_ext.code_table("fp4")
    assert torch.equal(t[8:], -t[:8])  # bit 3 is the sign
    assert t.abs().max() == 1.0


def test_int4_is_symmetric():
    t = qlora_ext.code_table("int4").numpy()
    np.testing.assert_array_equal(t[:15], ((np.arange(15, dtype=np.float32) - 7) / np.float32(7)))
    np.testing.assert_array_equal(t[:7], -t[14:7:-1])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_kernels_decode_with_the_exported_table(quant_type):
    """Decode every code with absmax 1: the kernels' table must be the exported one."""
    codes = torch.tensor([(2 * i << 4) | (2 * i + 1) for i in range(8)] * 8, dtype=torch.uint8)  # 128 codes
    absmax = torch.ones(2)
    out = torch.ops.qlora_ext.dequantize_4bit(codes, absmax, None, None, 64, quant_type, [128], torch.float32)
    np.testing.assert_array_equal(out[:16].numpy(), qlora_ext.code_table(quant_type).numpy())


def test_unknown_table():
    with pytest.raises(ValueError, match="quant_type must be"):
        qlora_ext.code_table("nf3")
