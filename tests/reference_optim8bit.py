"""Independent NumPy reference of the 8-bit-state AdamW step (blockwise dynamic-map states, float32 update in
torch.optim.AdamW's order of operations). Nothing here calls qlora_ext: the maps are built from exact
rationals, the FMAs of the update are emulated in extended precision (np.longdouble: a float32 product is
exact there, and the sum is rounded twice, 64 then 24 bits, which differs from one rounding with
probability ~2^-40)."""
from fractions import Fraction

import numpy as np
import torch

BLOCK = 256
LEVELS = 7  # decimal exponent levels 10^-6 .. 10^0


def _f32_nearest(x: Fraction) -> np.float32:
    """x rounded to the nearest float32 (ties to even), decided in exact arithmetic."""
    f = np.float32(float(x))
    cands = [f, np.nextafter(f, np.float32(np.inf)), np.nextafter(f, np.float32(-np.inf))]
    def key(c):
        return (abs(Fraction(float(c)) - x), int(np.array(c).view(np.uint32)) & 1)
    return min(cands, key=key)


def dynamic_map(signed: bool) -> np.ndarray:
    """float32 [256], sorted: for each level i the midpoints of [0.1, 1] cut into 2^i (signed) or 2^(i+1)
    (unsigned) equal parts, times 10^(i-6); the signed map has their negatives too; then 0 and 1."""
    pos = []
    for i in range(LEVELS):
        parts = 2 ** i if signed else 2 ** (i + 1)
        edges = [Fraction(1, 10) + Fraction(9, 10) * Fraction(k, parts) for k in range(parts + 1)]
        pos += [(edges[k] + edges[k + 1]) / 2 * Fraction(10) ** (i - 6) for k in range(parts)]
    values = pos + [Fraction(0), Fraction(1)] + ([-x for x in pos] if signed else [])
    assert len(values) == 256
    return np.array([_f32_nearest(x) for x in sorted(values)], dtype=np.float32)


def bnb_style_map(signed: bool) -> np.ndarray:
    """The same construction in float32 arithmetic (as bitsandbytes builds it), for a closeness check."""
    data = []
    for i in range(LEVELS):
        n = (2 ** i if signed else 2 ** (i + 1)) + 1
        b = np.linspace(0.1, 1, n).astype(np.float32)
        means = (b[:-1] + b[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (i - 6))
        data += list(scale * means)
        if signed:
            data += list(-scale * means)
    data += [0.0, 1.0]
    return np.sort(np.array(data, dtype=np.float32))


def midpoints(values: np.ndarray) -> np.ndarray:
    return ((values[:-1] + values[1:]) * np.float32(0.5)).astype(np.float32)


def _block_constants(absmax: np.float32):
    """prescale (2^24 for subnormal absmax) and 1/(absmax * prescale) rounded once (0 for a zero block)."""
    pre = np.float32(2.0 ** 24) if absmax < np.float32(2.0 ** -126) else np.float32(1.0)
    inv = np.float32(1.0) / (absmax * pre) if absmax > 0 else np.float32(0.0)
    return pre, np.float32(inv)


def quantize(x: np.ndarray, signed: bool):
    """x float32 (flat, memory order) -> (codes uint8, absmax float32 [ceil(n/256)]): nearest map value by
    float32 midpoints, a value on a midpoint taking the lower code."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    mids = midpoints(dynamic_map(signed))
    nb = -(-x.size // BLOCK)
    codes = np.empty(x.size, dtype=np.uint8)
    absmax = np.empty(nb, dtype=np.float32)
    for b in range(nb):
        blk = x[b * BLOCK:(b + 1) * BLOCK]
        finite = np.abs(blk)[~np.isnan(blk)]
        a = np.float32(finite.max()) if finite.size else np.float32(0.0)
        pre, inv = _block_constants(a)
        s = (blk * pre).astype(np.float32) * inv
        codes[b * BLOCK:(b + 1) * BLOCK] = np.searchsorted(mids, s.astype(np.float32), side="left")
        absmax[b] = a
    return codes, absmax


def dequantize(codes: np.ndarray, absmax: np.ndarray, signed: bool) -> np.ndarray:
    values = dynamic_map(signed)
    scale = np.repeat(absmax.astype(np.float32), BLOCK)[: codes.size]
    return (values[codes.reshape(-1)] * scale).astype(np.float32)


def _fma(a, b, c):
    ld = np.longdouble
    return (ld(a) * ld(b) + ld(c)).astype(np.float32)


def _round_to(p32: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 values rounded (nearest even) to dtype and back."""
    return torch.from_numpy(p32).to(dtype).float().numpy()


def adamw8bit_step(p, g, codes1, absmax1, codes2, absmax2, t, lr, beta1, beta2, eps, weight_decay, maximize,
                   dtype=torch.float32):
    """One step of one tensor, all arrays flat in memory order (p and g as float32 holding dtype values; t the
    incremented step count). Returns (p, codes1, absmax1, codes2, absmax2), p rounded to dtype."""
    f32 = np.float32
    p, g = np.asarray(p, f32), np.asarray(g, f32)
    decay = f32(1.0 - lr * weight_decay)
    w = f32(1.0 - beta1)
    from_grad = not abs(w) < 0.5
    coeff = f32(w - f32(1.0)) if from_grad else w
    b2, omb2, eps32 = f32(beta2), f32(1.0 - beta2), f32(eps)
    neg_step = f32(-(lr / (1.0 - beta1 ** t)))
    bc2 = f32((1.0 - beta2 ** t) ** 0.5)
    g = g * f32(-1.0 if maximize else 1.0)
    p = p * decay
    m = dequantize(codes1, absmax1, True)
    v = dequantize(codes2, absmax2, False)
    m = _fma(coeff, g - m, g if from_grad else m)
    v = _fma(omb2 * g, g, v * b2)
    denom = np.sqrt(v) / bc2 + eps32
    p = (p + (neg_step * m) / denom).astype(f32)
    c1, a1 = quantize(m, True)
    c2, a2 = quantize(v, False)
    return _round_to(p, dtype), c1, a1, c2, a2
