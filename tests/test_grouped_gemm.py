"""model/kernels/grouped_gemm.py: the Pallas grouped GEMM (interpret mode on CPU) against lax.ragged_dot.

Shapes: M=96 rows, K=N=256, G=5 groups of [20, 0, 33, 11, 22] (sum 86 < M: 10 tail rows). With
block_m=16 the boundaries at rows 20, 53 and 86 fall inside tiles (two groups share a tile) and
the empty group 1 sits at an unaligned offset, the cases megablox-style tiling must get right.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.kernels import lower_for_gpu
from model.kernels.grouped_gemm import group_metadata, grouped_matmul
from model.quant import dequantize_blocks, quantize_blocks

M, K, N = 96, 256, 256
SIZES = [20, 0, 33, 11, 22]
TILES = dict(block_m=16, block_n=64, block_k=64)  # small tiles: several visits, K steps, N tiles


def inputs(m=M, k=K, n=N, sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((len(sizes), k, n)).astype(np.float32)
    return x, w, jnp.asarray(sizes, jnp.int32)


def truth(x, w, group_sizes):
    """The reference: lax.ragged_dot in f32 at full precision on the (already rounded) inputs."""
    return np.asarray(jax.lax.ragged_dot(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                         group_sizes, precision=jax.lax.Precision.HIGHEST))


def pallas(x, w, group_sizes, w_scale=None, **tiles):
    # jit with traced group_sizes: the tile -> group map must be built from traced values.
    f = jax.jit(functools.partial(grouped_matmul, impl="pallas", interpret=True, **(tiles or TILES)))
    return f(x, w, group_sizes, w_scale)


# Tolerances. f32: only the summation order differs from the reference; a random-walk bound
# sqrt(K) * eps32 * |out| ~ 16 * 6e-8 * 16 ~ 2e-5, so atol 1e-4. bf16 output: one rounding of an
# f32 accumulator, at most 2^-9 relative; rtol 2^-8 leaves 2x margin (atol for values near 0).
F32_TOL = dict(rtol=1e-5, atol=1e-4)
BF16_TOL = dict(rtol=2**-8, atol=1e-3)


def test_group_metadata_partitions_rows():
    """Every row is stored by exactly one visit, inside its own tile and its own group."""
    bm = 16
    metadata = jax.jit(group_metadata, static_argnums=(1, 2))
    cases = [SIZES, [16, 0, 0, 48, 32], [96, 0, 0], [0, 0, 0], [1, 1, 1, 1, 1], [7, 30, 0, 17, 42]]
    for sizes in cases:
        g, row0, lo, hi = map(np.asarray, metadata(jnp.asarray(sizes, jnp.int32), M, bm))
        assert g.shape == (M // bm + len(sizes),)
        bounds = np.concatenate([[0], np.cumsum(sizes), [M]])  # group G = the tail [sum, M)
        covered = np.zeros(M, int)
        for gi, r0, a, b in zip(g, row0, lo, hi):
            if a == b:
                continue
            assert r0 % bm == 0 and r0 <= a < b <= r0 + bm, (sizes, r0, a, b)
            assert bounds[gi] <= a and b <= bounds[gi + 1], (sizes, gi, a, b)
            covered[a:b] += 1
        np.testing.assert_array_equal(covered, np.ones(M, int), err_msg=str(sizes))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)], ids=["f32", "bf16"])
def test_pallas_matches_ragged_dot(dtype, tol):
    x, w, gs = inputs()
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    out = pallas(x, w, gs)
    assert out.shape == (M, N) and out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), truth(x, w, gs), **tol)
    assert not np.any(np.asarray(out[sum(SIZES):], np.float32))  # tail rows: exact zeros


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)], ids=["f32", "bf16"])
def test_pallas_fp8_matches_dequantised_reference(dtype, tol):
    x, w, gs = inputs(seed=1)
    q, scale = quantize_blocks(w * np.linspace(0.01, 3.0, N, dtype=np.float32))  # scales differ per block
    x = jnp.asarray(x, dtype)
    out = pallas(x, jnp.asarray(q), gs, jnp.asarray(scale))
    # The kernel multiplies exact e4m3 values and applies the scale to f32 partial sums, so it
    # meets the dequantised-weights reference at the output dtype's tolerance.
    np.testing.assert_allclose(np.asarray(out, np.float32), truth(x, dequantize_blocks(q, scale), gs), **tol)
    # impl="xla" dequantises to x.dtype first (bf16 rounds w * s): same result up to that rounding.
    xla = grouped_matmul(x, jnp.asarray(q), gs, jnp.asarray(scale), impl="xla")
    ref = np.abs(truth(x, dequantize_blocks(q, scale), gs)).max()
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(xla, np.float32), rtol=0, atol=0.02 * ref)


def test_pallas_fp8_unaligned_shapes():
    """K, N not multiples of the tiles or of 128 (partial scale blocks), M not a multiple of block_m."""
    m, k, n, sizes = 50, 200, 136, [9, 0, 25, 13]
    x, w, gs = inputs(m, k, n, sizes, seed=2)
    q, scale = quantize_blocks(w)
    assert scale.shape == (4, 2, 2)
    out = pallas(jnp.asarray(x), jnp.asarray(q), gs, jnp.asarray(scale))
    assert out.shape == (m, n)
    np.testing.assert_allclose(np.asarray(out), truth(x, dequantize_blocks(q, scale), gs), **F32_TOL)
    assert not np.any(np.asarray(out[sum(sizes):]))


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_rows_past_sum_are_zero(impl):
    x, w, gs = inputs()
    x[sum(SIZES):] = 1e4  # large, so any leak into the tail rows shows
    kw = dict(interpret=True, **TILES) if impl == "pallas" else {}
    out = np.asarray(grouped_matmul(jnp.asarray(x), jnp.asarray(w), gs, impl=impl, **kw))
    assert np.all(out[sum(SIZES):] == 0)
    assert np.all(np.abs(out[:sum(SIZES)]).max(axis=1) > 0)  # and the grouped rows are not


def test_auto_is_xla_on_cpu():
    assert jax.default_backend() != "gpu"
    x, w, gs = inputs()
    x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(grouped_matmul)(x, w, gs))
    assert "ragged_dot" in jaxpr and "pallas_call" not in jaxpr
    out = grouped_matmul(x, w, gs)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(grouped_matmul(x, w, gs, impl="xla")))
    np.testing.assert_allclose(np.asarray(out, np.float32), truth(x, w, gs), **BF16_TOL)


@pytest.mark.parametrize("x_dtype,w_dtype", [(jnp.bfloat16, jnp.float8_e4m3fn), (jnp.float32, jnp.float32)],
                         ids=["bf16-fp8", "f32"])
def test_pallas_lowers_to_triton_for_cuda(x_dtype, w_dtype):
    """Without a GPU, lower the compiled (non-interpret) kernel for CUDA: this runs the Pallas ->
    Triton IR lowering of every op in the kernel (masked loads/stores, scalar reads of the tile
    map, cond + static K loop, fp8 -> bf16 cast, tl.dot); only Triton's own PTX compile is left."""
    m, k, n, g = 512, 512, 256, 4
    scale = jnp.ones((g, k // 128, n // 128), jnp.float32) if w_dtype == jnp.float8_e4m3fn else None
    f = jax.jit(functools.partial(grouped_matmul, impl="pallas"))
    args = (jnp.zeros((m, k), x_dtype), jnp.zeros((g, k, n), w_dtype), jnp.zeros((g,), jnp.int32), scale)
    hlo = lower_for_gpu(f, *args).as_text()
    assert "__gpu$xla.gpu.triton" in hlo


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernel; needs a GPU")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_pallas_compiled_on_gpu(fp8):
    sizes = [700, 0, 1, 513, 1200, 129, 0, 800]  # sum 3343 < 4096, uneven, unaligned, empty
    x, w, gs = inputs(4096, 1024, 2048, sizes, seed=3)
    if fp8:
        q, scale = quantize_blocks(w)
        w_arg, w_ref, scale = jnp.asarray(q), dequantize_blocks(q, scale), jnp.asarray(scale)
    else:
        w_arg = w_ref = jnp.asarray(w, jnp.bfloat16)
        scale = None
    x = jnp.asarray(x, jnp.bfloat16)
    out = jax.jit(functools.partial(grouped_matmul, impl="pallas"))(x, w_arg, gs, scale)
    np.testing.assert_allclose(np.asarray(out, np.float32), truth(x, w_ref, gs), **BF16_TOL)
    assert not np.any(np.asarray(out[sum(sizes):], np.float32))
    auto = grouped_matmul(x, w_arg, gs, scale)  # "auto" is the kernel on GPU
    np.testing.assert_array_equal(np.asarray(auto, np.float32), np.asarray(out, np.float32))


def _bad(name):
    x, w, gs = inputs(m=32, k=256, n=128, sizes=[10, 22])
    q, scale = quantize_blocks(w)
    x, q, scale = jnp.asarray(x), jnp.asarray(q), jnp.asarray(scale)
    return {
        "mismatched K": lambda: grouped_matmul(x[:, :200], q, gs, scale),
        "wrong scale shape": lambda: grouped_matmul(x, q, gs, scale[:, :1]),
        "group_sizes length": lambda: grouped_matmul(x, q, gs[:1], scale),
        "fp8 without scale": lambda: grouped_matmul(x, q, gs),
        "fp8 tile wider than a scale block": lambda: grouped_matmul(x, q, gs, scale, impl="pallas", block_n=256),
        "tile not a power of two": lambda: grouped_matmul(x, jnp.asarray(w), gs, impl="pallas", block_m=24),
        "unknown impl": lambda: grouped_matmul(x, q, gs, scale, impl="cuda"),
    }[name]


@pytest.mark.parametrize("name", ["mismatched K", "wrong scale shape", "group_sizes length", "fp8 without scale",
                                  "fp8 tile wider than a scale block", "tile not a power of two", "unknown impl"])
def test_bad_input_raises(name):
    with pytest.raises(ValueError) as err:
        _bad(name)()
    msg = str(err.value)
    assert msg.endswith(".") and msg.count(". ") == 0, msg  # one clear sentence
