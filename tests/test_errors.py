"""Bad inputs get clear errors naming the argument and what was expected."""
import pytest
import torch

import qlora_ext
from tests.conftest import DEVICES, HAS_CUDA

ops = torch.ops.qlora_ext


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_input_says_how_many(device):
    w = torch.randn(10, 64, device=device)
    w[0, 3] = float("nan")
    w[5, 1] = float("inf")
    w[9, 63] = -float("inf")
    with pytest.raises(ValueError, match="3 non-finite value"):
        qlora_ext.quantize(w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_bad_input_dtype(dtype):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        qlora_ext.quantize(torch.zeros(64, dtype=dtype))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.quantize_4bit(torch.zeros(64, dtype=dtype), 64, "nf4")


@pytest.mark.parametrize("blocksize", [0, 32, 65, 512, 4096])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be"):
        qlora_ext.quantize(torch.zeros(64), blocksize=blocksize)
    with pytest.raises(ValueError, match="blocksize must be 64, 128 or 256"):
        ops.quantize_4bit(torch.zeros(64), blocksize, "nf4")


def test_bad_quant_type():
    with pytest.raises(ValueError, match="quant_type must be"):
        qlora_ext.quantize(torch.zeros(64), quant_type="nf8")
    with pytest.raises(ValueError, match="quant_type must be 'nf4', 'fp4' or 'int4', got 'af4'"):
        ops.quantize_4bit(torch.zeros(64), 64, "af4")


def test_not_a_tensor():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        qlora_ext.quantize([1.0, 2.0])


def test_dequantize_bad_dtype():
    q = qlora_ext.quantize(torch.randn(64))
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        qlora_ext.dequantize(q, torch.float64)


def test_dequantize_wrong_sizes():
    q = qlora_ext.quantize(torch.randn(200), double_quant=False)
    with pytest.raises(ValueError, match="codes must have 50 elements"):
        ops.dequantize_4bit(q.codes, q.absmax, None, None, 64, "nf4", [100], torch.float32)
    with pytest.raises(ValueError, match="absmax must have 4 elements"):
        ops.dequantize_4bit(q.codes, q.absmax[:3], None, None, 64, "nf4", [200], torch.float32)
    with pytest.raises(ValueError, match="shape must not have negative sizes"):
        ops.dequantize_4bit(q.codes, q.absmax, None, None, 64, "nf4", [-200], torch.float32)


def test_dequantize_double_quant_arguments():
    q = qlora_ext.quantize(torch.randn(600), double_quant=True)
    with pytest.raises(TypeError, match="absmax must be float32"):
        ops.dequantize_4bit(q.codes, q.absmax, None, None, 64, "nf4", [600], torch.float32)
    with pytest.raises(ValueError, match="needs both absmax_scale and absmax_mean"):
        ops.dequantize_4bit(q.codes, q.absmax, q.absmax_scale, None, 64, "nf4", [600], torch.float32)
    with pytest.raises(ValueError, match="absmax_scale must have 1 elements"):
        ops.dequantize_4bit(q.codes, q.absmax, q.absmax_scale[:0], q.absmax_mean, 64, "nf4", [600], torch.float32)
    with pytest.raises(TypeError, match="absmax_mean must be Float"):
        ops.dequantize_4bit(q.codes, q.absmax, q.absmax_scale, q.absmax_mean.half(), 64, "nf4", [600],
                            torch.float32)
    plain = qlora_ext.quantize(torch.randn(600), double_quant=False)
    with pytest.raises(TypeError, match="absmax \\(FP8 E4M3 codes, double quantized\\) must be Byte"):
        ops.dequantize_4bit(plain.codes, plain.absmax, q.absmax_scale, q.absmax_mean, 64, "nf4", [600],
                            torch.float32)
    with pytest.raises(TypeError, match="absmax must be float32"):
        ops.dequantize_4bit(plain.codes, plain.absmax.half(), None, None, 64, "nf4", [600], torch.float32)
    with pytest.raises(TypeError, match="codes must be Byte"):
        ops.dequantize_4bit(plain.codes.char(), plain.absmax, None, None, 64, "nf4", [600], torch.float32)


def test_absmax_fp8_arguments():
    with pytest.raises(TypeError, match="absmax must be Float"):
        ops.quantize_absmax_fp8(torch.ones(10, dtype=torch.float16))
    codes, scale, mean = ops.quantize_absmax_fp8(torch.rand(600))
    with pytest.raises(ValueError, match="scale must have 3 elements"):
        ops.dequantize_absmax_fp8(codes, scale[:2], mean)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
def test_device_mismatch():
    q = qlora_ext.quantize(torch.randn(600, device="cuda"), double_quant=True)
    with pytest.raises(RuntimeError, match=r"absmax must be on the same device as codes \(cuda:0\), got cpu"):
        ops.dequantize_4bit(q.codes, q.absmax.cpu(), q.absmax_scale, q.absmax_mean, 64, "nf4", [600], torch.float32)
    with pytest.raises(RuntimeError, match="absmax_mean must be on"):
        ops.dequantize_4bit(q.codes, q.absmax, q.absmax_scale, q.absmax_mean.cpu(), 64, "nf4", [600],
                            torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs and a CUDA build")
def test_inputs_on_two_gpus_are_rejected_not_dereferenced():
    """A kernel on one GPU must never get another GPU's pointers: the device index is checked, not only the type."""
    q = qlora_ext.quantize(torch.randn(128, 64, device="cuda:0"), double_quant=True)
    with pytest.raises(RuntimeError, match=r"absmax_mean must be on the same device as codes \(cuda:0\), got cuda:1"):
        ops.dequantize_4bit(q.codes, q.absmax, q.absmax_scale, q.absmax_mean.to("cuda:1"), 64, "nf4", [128, 64],
                            torch.float32)
    x = torch.randn(3, 64, device="cuda:1", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"codes must be on the same device as x \(cuda:1\), got cuda:0"):
        ops.linear_4bit(x, q.codes, q.absmax, q.absmax_scale, q.absmax_mean, None, 64, "nf4", 128)
    bias = torch.zeros(128, device="cuda:1", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"bias must be on the same device as x \(cuda:0\), got cuda:1"):
        ops.linear_4bit(x.to("cuda:0"), q.codes, q.absmax, q.absmax_scale, q.absmax_mean, bias, 64, "nf4", 128)
