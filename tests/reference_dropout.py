"""Independent reference for the counter-based dropout op: Philox4x32-10 in NumPy (uint64 arithmetic, all
counters at once) and the element order and scaling the op documents. Nothing here calls qlora_ext."""
import numpy as np
import torch

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = np.uint64(0xFFFFFFFF)

# Random123's published known answers: (counter, key) -> output.
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox4x32_10(counters, key):
    """counters: uint64 array [n, 4] of 32-bit words; key: two ints. Returns uint64 [n, 4]."""
    c = [np.asarray(counters, dtype=np.uint64)[:, i].copy() for i in range(4)]
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
        p0, p1 = M0 * c[0], M1 * c[2]  # < 2^64: exact in uint64
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & MASK32, (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1),
             p0 & MASK32]
    return np.stack(c, axis=1)


def dropout_words(numel, seed):
    """uint64 [numel]: the 32-bit random word of each element. Elements come in batches of 64 served by 16
    Philox groups: element 64b + 16w + l takes word w of group 16b + l (counter (g, g >> 32, 0, 0), key
    (seed, seed >> 32))."""
    seed &= (1 << 64) - 1
    i = np.arange(numel, dtype=np.int64)
    group = (i // 64) * 16 + i % 16
    word = (i % 64) // 16
    counters = np.zeros((numel, 4), dtype=np.uint64)
    counters[:, 0] = group.astype(np.uint64) & MASK32
    counters[:, 1] = group.astype(np.uint64) >> np.uint64(32)
    out = philox4x32_10(counters, (seed & 0xFFFFFFFF, seed >> 32))
    return out[np.arange(numel), word]


def dropout(x, seed, p):
    """torch tensor x (any float dtype, CPU) -> the op's output: keep where word >= round(p * 2^32), scale by
    1/(1-p) rounded to float32 (float64 for float64 x), one multiply in float32 (float64), rounded once."""
    words = dropout_words(x.numel(), seed)
    if p >= 1.0:
        keep = np.zeros(x.numel(), dtype=bool)
        scale = 0.0
    else:
        threshold = min(int(p * 2.0**32 + 0.5), 0xFFFFFFFF)
        keep = words >= np.uint64(threshold)
        scale = 1.0 / (1.0 - p)
    flat = x.detach().reshape(-1)
    if x.dtype == torch.float64:
        factor = np.where(keep, scale, 0.0)
        y = flat.numpy() * factor
        return torch.from_numpy(y).reshape(x.shape)
    factor = np.where(keep, np.float32(scale), np.float32(0.0)).astype(np.float32)
    y32 = flat.float().numpy() * factor  # float32 * float32, rounded once
    return torch.from_numpy(y32).to(x.dtype).reshape(x.shape)  # round once more to a 16-bit dtype (RNE)
