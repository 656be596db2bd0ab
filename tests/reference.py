"""Independent references for the quantization ops, in NumPy/SciPy (float32 where the spec is float32,
float64 elsewhere). Nothing here calls qlora_ext."""
import numpy as np
import torch
from scipy.stats import norm

# bitsandbytes' NF4 values as it publishes them (float32 values printed as decimals).
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]

# bitsandbytes' FP4 (E2M1 variant, bias 3): codes 0..7 positive, 8..15 the same magnitudes negative.
BNB_FP4_UNNORMALISED = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def nf4_from_quantiles(offset=0.9677083):
    """NF4 as the paper defines it, in float64: 8 positive and 7 negative N(0,1) quantiles, normalised."""
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return v / v.max()


def table(quant_type):
    """float32 [16] table by code."""
    if quant_type == "nf4":
        return np.array(BNB_NF4, dtype=np.float32)
    if quant_type == "fp4":
        t = np.array(BNB_FP4_UNNORMALISED, dtype=np.float32)
        return t / np.float32(12.0)
    if quant_type == "int4":
        c = np.arange(16, dtype=np.float32)
        t = (c - np.float32(7)) / np.float32(7)
        t[15] = 0.0  # unused code
        return t.astype(np.float32)
    raise ValueError(quant_type)


def _encode(s, quant_type):
    """Nearest code of normalised float32 values s (ties: the lower code; FP4: the smaller magnitude)."""
    t = table(quant_type)
    if quant_type == "fp4":
        order = np.array([0, 1, 6, 7, 4, 5, 2, 3])             # magnitude rank -> code
        mags = t[order]
        mids = ((mags[:-1] + mags[1:]) * np.float32(0.5)).astype(np.float32)
        rank = np.searchsorted(mids, np.abs(s), side="left")  # number of midpoints strictly below |s|
        return (order[rank] | np.where(s < 0, 8, 0)).astype(np.uint8)
    used = 15 if quant_type == "int4" else 16
    mids = ((t[: used - 1] + t[1:used]) * np.float32(0.5)).astype(np.float32)
    return np.searchsorted(mids, s, side="left").astype(np.uint8)


def quantize(x, blocksize, quant_type):
    """x: float32 ndarray (any shape). Returns (packed codes uint8 [ceil(n/2)], absmax float32 [nblocks])."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = flat.size
    nblocks = -(-n // blocksize)
    padded = np.zeros(nblocks * blocksize, dtype=np.float32)
    padded[:n] = flat
    blocks = padded.reshape(nblocks, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    # Subnormal absmax: scale the block by 2^24 first (exact) so the reciprocal is finite.
    pre = np.where(absmax < np.float32(2.0 ** -126), np.float32(2.0 ** 24), np.float32(1.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax > 0, np.float32(1.0) / (absmax * pre), np.float32(0.0)).astype(np.float32)
    s = ((blocks * pre[:, None]).astype(np.float32) * inv[:, None]).astype(np.float32)
    codes = _encode(s.reshape(-1)[:n], quant_type)
    if n % 2:
        codes = np.concatenate([codes, np.zeros(1, dtype=np.uint8)])
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)
    return packed, absmax


def unpack(packed, n):
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0xF
    return codes[:n]


def dequantize(packed, absmax, blocksize, quant_type, shape, dtype):
    """float32 product table[code] * absmax, then one rounding to dtype (by torch's own cast)."""
    n = int(np.prod(shape)) if len(shape) else 1
    codes = unpack(np.asarray(packed), n)
    am = np.repeat(np.asarray(absmax, dtype=np.float32), blocksize)[:n]
    vals = (table(quant_type)[codes] * am).astype(np.float32)
    return torch.from_numpy(vals.reshape(shape)).to(dtype)


def fp8_e4m3(values):
    """FP8 E4M3 codes by torch's own float8_e4m3fn cast (uint8 bit patterns)."""
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def double_quantize(absmax, mean):
    """Given the tensor mean (float32), the per-256 scales and FP8 codes of the absmax."""
    a = np.asarray(absmax, dtype=np.float32)
    n = a.size
    nchunks = -(-n // 256)
    dev = np.abs(a - np.float32(mean)).astype(np.float32)
    padded = np.zeros(nchunks * 256, dtype=np.float32)
    padded[:n] = dev
    scale = (padded.reshape(nchunks, 256).max(axis=1) / np.float32(448.0)).astype(np.float32)
    s = np.repeat(scale, 256)[:n]
    with np.errstate(divide="ignore", invalid="ignore"):
        v = ((a - np.float32(mean)).astype(np.float32) / s).astype(np.float32)
    codes = np.where(s > 0, fp8_e4m3(np.nan_to_num(v)), 0).astype(np.uint8)
    return scale, codes


def decode_absmax(codes, scale, mean):
    vals = torch.from_numpy(np.asarray(codes, dtype=np.uint8)).view(torch.float8_e4m3fn).float().numpy()
    s = np.repeat(np.asarray(scale, dtype=np.float32), 256)[: vals.size]
    out = ((vals * s).astype(np.float32) + np.float32(mean)).astype(np.float32)
    return np.maximum(out, np.float32(0.0))
