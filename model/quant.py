"""FP8 e4m3 with one scale per block: DeepSeek's format for weights (128x128) and activations (1x128).

One quantiser serves both: `xp` is numpy on the host (checkpoint I/O) or jax.numpy inside jit.
A block's scale is its max |value| / 448 (e4m3's largest finite value); `scale_inv`, in
DeepSeek's naming, is the factor that turns stored FP8 back into real values.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(FP8).max)  # 448
WEIGHT_BLOCK = (128, 128)
ACTIVATION_BLOCK = (1, 128)


def _blocked(x, block, xp):
    """[..., M, N] -> zero-padded [..., M/bm, bm, N/bn, bn]."""
    *lead, M, N = x.shape
    bm, bn = block
    pm, pn = math.ceil(M / bm) * bm, math.ceil(N / bn) * bn
    if (pm, pn) != (M, N):
        x = xp.pad(x, [(0, 0)] * len(lead) + [(0, pm - M), (0, pn - N)])
    return x.reshape(*lead, pm // bm, bm, pn // bn, bn)


def quantize_blocks(x, block=WEIGHT_BLOCK, xp=np):
    """x float[..., M, N] -> (e4m3 [..., M, N], scale_inv float32[..., ceil(M/bm), ceil(N/bn)])."""
    *lead, M, N = x.shape
    blocks = _blocked(x.astype(xp.float32), block, xp)
    amax = xp.max(xp.abs(blocks), axis=(-3, -1))
    scale_inv = xp.where(amax > 0, amax / FP8_MAX, 1.0).astype(xp.float32)
    q = xp.clip(blocks / scale_inv[..., :, None, :, None], -FP8_MAX, FP8_MAX).astype(FP8)
    q = q.reshape(*lead, blocks.shape[-4] * block[0], blocks.shape[-2] * block[1])[..., :M, :N]
    return q, scale_inv


def dequantize_blocks(q, scale_inv, block=WEIGHT_BLOCK, dtype=np.float32, xp=np):
    """Inverse of quantize_blocks: e4m3 [..., M, N] x scale_inv [..., M/bm, N/bn] -> dtype[..., M, N]."""
    *lead, M, N = q.shape
    blocks = _blocked(q.astype(xp.float32), block, xp)
    x = blocks * scale_inv.astype(xp.float32)[..., :, None, :, None]
    return x.reshape(*lead, blocks.shape[-4] * block[0], blocks.shape[-2] * block[1])[..., :M, :N].astype(dtype)


def scale_shape(shape, block=WEIGHT_BLOCK) -> tuple[int, ...]:
    *lead, M, N = shape
    return (*lead, math.ceil(M / block[0]), math.ceil(N / block[1]))
