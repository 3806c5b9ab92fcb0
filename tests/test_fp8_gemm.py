"""model/kernels/fp8_gemm.py: the FP8 x FP8 GEMM (Mosaic GPU, interpret mode on CPU) against a plain numpy
implementation of DeepSeek's block-scaled semantics and model/quant.py's XLA reference, in the dense, contiguous
and masked layouts, with M, N and K tails and split K; its CUDA lowering at DeepSeek's shapes (FP8 wgmma); on a
GPU, the compiled kernel; bad input.

The reference (written here, independent of the kernel): for each row m of group g and each 128-wide K
block kb, (x_q[m, kb] . w_q[g, :, kb]) * x_scale[m, kb] * w_scale[g, n // 128, kb], summed in float32.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from model import quant
from model.kernels import lower_for_gpu
from model.kernels.fp8_gemm import fp8_grouped_matmul, fp8_masked_matmul, fp8_matmul

E4M3 = ml_dtypes.float8_e4m3fn


def reference(x_q, x_scale, w_q, w_scale, group_of_row):
    """numpy, float64 products of the exact e4m3 values; group_of_row[m] = -1: a zero row."""
    x, w = np.asarray(x_q).astype(np.float64), np.asarray(w_q).astype(np.float64)
    out = np.zeros((x.shape[0], w.shape[1]))
    for m, g in enumerate(group_of_row):
        if g < 0:
            continue
        for kb in range(-(-x.shape[1] // 128)):  # the last block may be partial
            ks = slice(kb * 128, (kb + 1) * 128)
            out[m] += (w[g, :, ks] @ x[m, ks]) * x_scale[m, kb] * np.repeat(w_scale[g, :, kb], 128)[:w.shape[1]]
    return out


def operands(rows, G, N, K, seed):
    """Activations and weights as quantised e4m3 values with scales that differ per row, block and group."""
    rng = np.random.default_rng(seed)
    x_q = (rng.standard_normal((rows, K)) * 3).astype(E4M3)
    x_scale = rng.uniform(0.5, 2.0, (rows, -(-K // 128))).astype(np.float32)
    w_q = (rng.standard_normal((G, N, K)) * 3).astype(E4M3)
    w_scale = rng.uniform(1e-3, 1e-2, (G, -(-N // 128), -(-K // 128))).astype(np.float32)
    return x_q, x_scale, w_q, w_scale


# f32 output: the kernel sums exact e4m3 products in f32 per 128-block, then scales and adds in f32;
# against a float64 reference that is ~K * 2^-24 relative: 1e-5 of the largest output leaves margin.
def assert_close(got, want):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("M,N,K,block_m,k_splits", [
    (70, 200, 272, 64, None),  # tails everywhere: 6 rows of a second row tile, 72 columns, 16 of a third K block
    (130, 256, 512, 128, 3),  # split K: three f32 partials summed; 2 rows of a second 128-row tile
    (3, 576, 1024, 64, None),  # decode-like: 3 rows in a 64-row tile, N = 4.5 weight tiles (kv_a_proj's 576),
])                             # split K chosen to fill the GPU; its scales in the held layout ([5, 8] -> [5, 64])
def test_dense_in_interpret_mode_matches_reference(M, N, K, block_m, k_splits):
    x_q, x_scale, w_q, w_scale = operands(M, 1, N, K, seed=M)
    held = quant.hold_scales(w_scale[0]) if M == 3 else w_scale[0]  # padding past the real K blocks: never read
    assert M != 3 or held.shape == (5, 64)
    args = tuple(map(jnp.asarray, (x_q, x_scale, w_q[0], held)))
    got = fp8_matmul(*args, jnp.float32, block_m=block_m, k_splits=k_splits, interpret=True)
    assert got.shape == (M, N) and got.dtype == jnp.float32
    assert_close(got, reference(x_q, x_scale, w_q, w_scale, np.zeros(M, int)))
    # model/quant.py's XLA implementation of the same op (what the registry falls back to) agrees
    assert_close(got, np.asarray(quant.fp8_matmul(*args, jnp.float32), np.float64))


def test_contiguous_layout_in_interpret_mode():
    # 64-row tiles: group 0 ends inside tile 0, group 1 is empty, group 2 spans tiles 0-1, rows 150.. are past the sum
    sizes, M, G, N, K = [37, 0, 113], 160, 3, 128, 256
    x_q, x_scale, w_q, w_scale = operands(M, G, N, K, seed=0)
    x_q[150:] = E4M3(448)  # large, so a leak into the zero tail would show
    group_of_row = np.full(M, -1)
    group_of_row[:37], group_of_row[37:150] = 0, 2
    got = fp8_grouped_matmul(*map(jnp.asarray, (x_q, x_scale, w_q, w_scale)), jnp.asarray(sizes, jnp.int32),
                             jnp.float32, block_m=64, interpret=True)
    assert got.shape == (M, N) and got.dtype == jnp.float32
    want = reference(x_q, x_scale, w_q, w_scale, group_of_row)
    assert_close(got, want)
    assert not np.any(np.asarray(got[150:]))  # exact zeros past the sum


def test_masked_layout_in_interpret_mode():
    G, Mmax, N, K, counts = 2, 128, 256, 256, [5, 128]  # a nearly empty group and a full one; two N tiles
    x_q, x_scale, w_q, w_scale = operands(G * Mmax, G, N, K, seed=1)
    group_of_row = np.concatenate([np.where(np.arange(Mmax) < c, g, -1) for g, c in enumerate(counts)])
    got = fp8_masked_matmul(jnp.asarray(x_q.reshape(G, Mmax, K)), jnp.asarray(x_scale.reshape(G, Mmax, -1)),
                            jnp.asarray(w_q), jnp.asarray(w_scale), jnp.asarray(counts, jnp.int32), jnp.bfloat16,
                            block_m=128, interpret=True)
    assert got.shape == (G, Mmax, N) and got.dtype == jnp.bfloat16
    want = reference(x_q, x_scale, w_q, w_scale, group_of_row).reshape(G, Mmax, N)
    # bf16 output: one rounding of the f32 result, 2^-9 relative
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8, atol=1e-3 * np.abs(want).max())
    assert not np.any(np.asarray(got[0, 5:], np.float32))  # rows at or past a group's count are exact zeros


@pytest.mark.parametrize("layout", ["contiguous", "masked", "dense"])
def test_lowers_for_cuda_with_fp8_wgmma(layout):
    """DeepSeek's shapes (prefill: 9 experts, 16K x 8 rows, 7168 -> 4096; decode: 2 experts x 512 rows,
    2048 -> 7168; dense: kv_a_proj 7168 -> 576 at 128 decode rows, split K) through Mosaic GPU for sm90a:
    FP8 x FP8 wgmma (e4m3 . e4m3 -> f32), shared memory fits."""
    sd, f8 = jax.ShapeDtypeStruct, jnp.float8_e4m3fn
    if layout == "dense":
        M, N, K = 128, 576, 7168
        text = lower_for_gpu(jax.jit(lambda *a: fp8_matmul(*a, jnp.bfloat16)), sd((M, K), f8), sd((M, K // 128), jnp.float32),
                             sd((N, K), f8), sd((5, K // 128), jnp.float32)).as_text()
        assert "mosaic_gpu" in text and "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in text
        return
    if layout == "contiguous":
        G, N, K, rows = 9, 4096, 7168, (16384,)
        fn = functools.partial(fp8_grouped_matmul, out_dtype=jnp.bfloat16, block_m=128, stages=5)
    else:
        G, N, K, rows = 2, 7168, 2048, (2, 512)
        fn = functools.partial(fp8_masked_matmul, out_dtype=jnp.bfloat16, block_m=128, stages=5)
    text = lower_for_gpu(jax.jit(fn), sd((*rows, K), f8), sd((*rows, K // 128), jnp.float32), sd((G, N, K), f8),
                         sd((G, N // 128, K // 128), jnp.float32), sd((G,), jnp.int32)).as_text()
    assert "mosaic_gpu" in text and "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Mosaic GPU kernel; needs a Hopper GPU")
@pytest.mark.parametrize("block_m", [64, 128])
def test_compiled_kernel_on_gpu(block_m):
    sizes, G, N, K = [700, 0, 1, 513, 1200, 129, 0, 800], 8, 512, 1024
    M = 4096
    x_q, x_scale, w_q, w_scale = operands(M, G, N, K, seed=3)
    group_of_row = np.full(M, -1)
    group_of_row[:sum(sizes)] = np.repeat(np.arange(G), sizes)
    want = reference(x_q, x_scale, w_q, w_scale, group_of_row)
    args = tuple(map(jnp.asarray, (x_q, x_scale, w_q, w_scale)))
    got = fp8_grouped_matmul(*args, jnp.asarray(sizes, jnp.int32), jnp.float32, block_m=block_m)
    assert_close(got, want)
    counts = [3, 512]
    xm = (x_q[:1024].reshape(2, 512, K), x_scale[:1024].reshape(2, 512, -1))
    masked = fp8_masked_matmul(jnp.asarray(xm[0]), jnp.asarray(xm[1]), args[2][:2], args[3][:2],
                               jnp.asarray(counts, jnp.int32), jnp.float32, block_m=block_m)
    rows = np.concatenate([np.where(np.arange(512) < c, g, -1) for g, c in enumerate(counts)])
    assert_close(masked, reference(x_q[:1024], x_scale[:1024], w_q[:2], w_scale[:2], rows).reshape(2, 512, N))
    for M, n, k in ((1, 384, 1024), (200, 448, 1008)):  # dense with tails, split K at one row
        d = fp8_matmul(args[0][:M, :k], args[1][:M, :-(-k // 128)], args[2][0, :n, :k], args[3][0, :-(-n // 128),
                       :-(-k // 128)], jnp.float32, block_m=block_m)
        assert_close(d, reference(x_q[:M, :k], x_scale[:M], w_q[:1, :n, :k], w_scale[:1], np.zeros(M, int)))


@pytest.mark.parametrize("change,match", [
    (dict(x_q=np.zeros((64, 256), np.float32)), "must be float8_e4m3fn"),
    (dict(x_q=np.zeros((64, 200), E4M3), w_q=np.zeros((2, 128, 200), E4M3)), "K a multiple of 16"),
    (dict(x_scale=np.zeros((64, 1), np.float32)), "x_scale must be float32 \\(64, 2\\)"),
    (dict(w_scale=np.zeros((2, 1, 1), np.float32)), "w_scale \\(2, 1, 1\\) must hold one scale per 128x128 block"),
    (dict(group_sizes=np.zeros(3, np.int32)), "int32\\[2\\], one per group"),
    (dict(block_m=96), "block_m must be 64 or 128"),
])
def test_bad_input_raises_one_sentence(change, match):
    args = dict(x_q=np.zeros((64, 256), E4M3), x_scale=np.ones((64, 2), np.float32), w_q=np.zeros((2, 128, 256), E4M3),
                w_scale=np.ones((2, 1, 2), np.float32), group_sizes=np.array([10, 20], np.int32), block_m=64)
    args.update(change)
    with pytest.raises(ValueError, match=match) as err:
        fp8_grouped_matmul(**{k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in args.items()})
    assert "\n" not in str(err.value) and str(err.value).endswith(".")
