"""model/kernels/flash_mla.py: the KV split plan (every chunk once, balanced, distinct slots) at DeepSeek's
shapes up to KV 32K; the log-sum-exp merge of per-segment partials; the Mosaic GPU kernel in interpret
mode against the XLA reference (64-, 32- and 16-token pages in random order, two head blocks, rows split
over parts and parts spanning rows, odd and even chunk counts per segment); its CUDA lowering at DeepSeek's shapes; on a GPU, the compiled
kernel at B = 1..128 and KV up to 32K."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.kernels import lower_for_gpu
from model.kernels.flash_mla import CHUNK, ROW_OVERHEAD, combine, flash_mla_decode, plan_decode
from model.kernels.mla_decode import mla_decode

PLAN = jax.jit(plan_decode, static_argnums=1)


def chunks_of(lengths):
    return -(-np.maximum(np.asarray(lengths), 1) // CHUNK)


def check_plan(lengths, parts):
    plan = jax.tree.map(np.asarray, PLAN(jnp.asarray(lengths, jnp.int32), parts))
    B, n = len(lengths), chunks_of(lengths)
    np.testing.assert_array_equal(plan.row_chunk, np.concatenate([[0], np.cumsum(n)]))
    assert plan.part_chunk[0] == 0 and plan.part_chunk[-1] == n.sum()
    assert np.all(np.diff(plan.part_chunk) >= 0)
    seen, slots, cost = np.zeros(n.sum(), int), [], []
    for p in range(parts):
        g0, g1 = plan.part_chunk[p], plan.part_chunk[p + 1]
        r0, r1 = plan.part_rows[p]
        if g0 == g1:
            assert r1 < r0
            cost.append(0)
            continue
        assert plan.row_chunk[r0] <= g0 < plan.row_chunk[r0 + 1] and plan.row_chunk[r1] < g1 <= plan.row_chunk[r1 + 1]
        seen[g0:g1] += 1
        slots += [p + b for b in range(r0, r1 + 1)]
        cost.append(g1 - g0 + ROW_OVERHEAD * (r1 - r0 + 1))
        for b in range(r0, r1 + 1):  # row b's segment in part p lands in one of row b's slots
            assert plan.row_slot[b, 0] <= p + b <= plan.row_slot[b, 1]
    np.testing.assert_array_equal(seen, 1)  # every chunk of every row exactly once
    assert len(set(slots)) == len(slots) and max(slots) < parts + B - 1  # distinct, within [0, N + B - 1)
    # each row's slot range is exactly its segments
    for b in range(B):
        mine = [p + b for p in range(parts) if plan.part_rows[p, 0] <= b <= plan.part_rows[p, 1]]
        assert mine == list(range(plan.row_slot[b, 0], plan.row_slot[b, 1] + 1))
        assert all(plan.slot_row[s] == b for s in mine)  # what combine merges by, made with the plan
    assert plan.slot_row.shape == (parts + B - 1,) and sum(plan.slot_row < B) == len(slots)  # the rest: unused
    # balance: no part exceeds the even share by more than one row's overhead
    total = n.sum() + ROW_OVERHEAD * B
    assert max(cost) <= -(-total // parts) + ROW_OVERHEAD, (max(cost), total / parts)
    return plan


@pytest.mark.parametrize("lengths,parts", [
    ([4989] * 128, 66),  # DeepSeek's decode step on an H100/H200 (132 SMs, 2 head blocks)
    ([32768], 66), ([32768] * 4 + [1, 65, 64, 63], 66), (list(range(1, 17)), 66),  # KV 32K; B 1..16
    ([1, 100, 333], 4), ([5000, 1, 1, 1, 1, 9000], 7), ([64] * 3, 50),  # more parts than work
])
def test_plan_covers_every_chunk_once_balanced(lengths, parts):
    check_plan(lengths, parts)


def test_combine_of_segment_partials_equals_softmax():
    """Per-segment partials (numpy, from the plan's split) merged by combine == softmax over the row."""
    rng = np.random.default_rng(0)
    lengths, parts, H, R = [32768, 700, 1], 9, 3, 8
    plan = check_plan(lengths, parts)
    scores = [rng.standard_normal((H, n)) * 4 for n in lengths]  # log2 units, as the kernel keeps them
    values = [rng.standard_normal((n, R)) for n in lengths]
    S = plan.num_slots
    o = np.full((S, H, R), np.nan, np.float32)  # slots no segment writes hold garbage: NaN must not leak
    m = np.full((S, H), np.nan, np.float32)
    l = np.full((S, H), np.nan, np.float32)
    for p in range(parts):
        for b in range(plan.part_rows[p, 0], plan.part_rows[p, 1] + 1):
            lo = max(plan.part_chunk[p], plan.row_chunk[b]) - plan.row_chunk[b]
            hi = min(plan.part_chunk[p + 1], plan.row_chunk[b + 1]) - plan.row_chunk[b]
            s = scores[b][:, lo * CHUNK:min(hi * CHUNK, lengths[b])]
            mx = s.max(axis=1)
            e = np.exp2(s - mx[:, None])
            o[p + b], m[p + b], l[p + b] = e @ values[b][lo * CHUNK:hi * CHUNK], mx, e.sum(axis=1)
    got = np.asarray(combine(jnp.asarray(o), jnp.asarray(m), jnp.asarray(l), jax.tree.map(jnp.asarray, plan),
                             jnp.float32))
    for b, (s, v) in enumerate(zip(scores, values)):
        w = np.exp2(s - s.max(axis=1, keepdims=True))
        np.testing.assert_allclose(got[b], (w / w.sum(axis=1, keepdims=True)) @ v, rtol=1e-4, atol=1e-5)


def paged_case(B, H, R, P, BS, lengths, seed=0, dtype=jnp.bfloat16):
    """Random queries and a pool whose pages are scattered in random order; unused table entries hold junk ids."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    MB = int(-(-lengths.max() // BS)) + 1
    NB = B * MB + 5
    pool = rng.standard_normal((NB, BS, R + P)).astype(np.float32)
    table = rng.permutation(NB)[:B * MB].reshape(B, MB).astype(np.int32)
    for b, n in enumerate(lengths):
        table[b, -(-n // BS):] = np.resize([2**30, -1, 7 * NB, 2**31 - 1], MB - (-(-n // BS)))  # never read
    cast = lambda x: jnp.asarray(x, dtype)
    return (cast(rng.standard_normal((B, H, R))), cast(rng.standard_normal((B, H, P))), cast(pool),
            jnp.asarray(table), jnp.asarray(lengths))


# bf16 inputs: both paths round probabilities to bf16 before the context product and the result to bf16
# (2^-9 relative each); observed <= 4e-3 on |context| <~ 1, allowed 1e-2 + 1% as in test_mla_decode.
TOL = dict(atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("B,H,R,BS,lengths,parts", [
    (2, 128, 512, 64, [1, 500], 3),  # DeepSeek's widths (576 = 9 TMA tiles), two head blocks, 64-token pages;
    # an 8-chunk row over 3 parts: the two-stage ring wraps in every part
    (3, 64, 128, 16, [100, 1, 333], 9),  # 16-token pages (four copies per chunk), parts spanning rows, empty parts
    # 32-token pages; 3, 1, 5 and 11 chunks over 5 parts: segments of odd length (the last pair of a row has
    # only warpgroup 0's chunk), a part starting inside a row, a row of one full chunk
    (4, 64, 128, 32, [129, 64, 320, 700], 5),
])
def test_kernel_in_interpret_mode_matches_reference(B, H, R, BS, lengths, parts):
    q_latent, q_pe, pool, table, lengths = paged_case(B, H, R, 64, BS, lengths)
    plan = plan_decode(lengths, parts)
    assert (parts != 9) or (np.diff(np.asarray(plan.part_chunk)) == 0).any()  # the 9-part case has an empty part
    if parts == 5:  # the segments the 5-part case is meant to cover
        seg = [(min(g1, e) - max(g0, s)) for g0, g1 in zip(plan.part_chunk[:-1], plan.part_chunk[1:])
               for s, e in zip(plan.row_chunk[:-1], plan.row_chunk[1:]) if min(g1, e) > max(g0, s)]
        assert any(n % 2 for n in seg) and any(n % 2 == 0 for n in seg)
        assert not set(np.asarray(plan.part_chunk[1:-1])) <= set(np.asarray(plan.row_chunk))  # a part starts mid-row
    got = flash_mla_decode(q_latent, q_pe, pool, table, lengths, 0.07, plan, interpret=True)
    want = mla_decode(q_latent, q_pe, pool, table, lengths, 0.07, block_size=BS, impl="xla")
    assert got.shape == (B, H, R) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL)
    # a length-1 row attends to its single position only: its context is that position's latent
    b = int(np.argmin(np.asarray(lengths)))
    if lengths[b] == 1:
        np.testing.assert_allclose(np.asarray(got[b], np.float32),
                                   np.broadcast_to(np.asarray(pool[table[b, 0], 0, :R], np.float32), (H, R)), atol=1e-6)


def test_lowers_for_cuda_at_deepseek_shapes():
    """The compiled (non-interpret) kernel through Mosaic GPU for sm90a, B=128, 128 heads, 576-wide pages:
    shared memory fits (Mosaic checks it), scores and context are bf16 wgmma, warpgroups specialised."""
    sd = jax.ShapeDtypeStruct
    B, H, MB = 128, 128, 80

    def step(q_latent, q_pe, pool, table, lengths):
        return flash_mla_decode(q_latent, q_pe, pool, table, lengths, 0.1, plan_decode(lengths, 66))
    text = lower_for_gpu(jax.jit(step), sd((B, H, 512), jnp.bfloat16), sd((B, H, 64), jnp.bfloat16),
                         sd((B * MB + 100, 64, 576), jnp.bfloat16), sd((B, MB), jnp.int32),
                         sd((B,), jnp.int32)).as_text()
    assert "mosaic_gpu" in text
    for ptx in ("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16",  # scores: 64 heads x 64 tokens
                "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16",  # context: half of 512 per warpgroup
                "setmaxnreg.inc.sync.aligned.u32 232", "cp.async.bulk.tensor"):
        assert ptx in text, ptx


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Mosaic GPU kernel; needs a Hopper GPU")
@pytest.mark.parametrize("B,kv", [(1, 4989), (4, 4989), (16, 4989), (128, 4989), (1, 32768), (16, 32768)])
def test_compiled_kernel_on_gpu(B, kv):
    from model.kernels.registry import decode_parts
    rng = np.random.default_rng(B)
    lengths = np.clip(rng.integers(kv - 500, kv + 1, B), 1, None)
    args = paged_case(B, 128, 512, 64, 64, lengths, seed=B)
    parts = decode_parts(jax.devices()[0].core_count, 128)
    step = jax.jit(lambda *a: flash_mla_decode(*a, 192 ** -0.5, plan_decode(a[-1], parts)))
    got = np.asarray(step(*args), np.float32)
    want = np.asarray(mla_decode(*args, 192 ** -0.5, block_size=64, impl="xla"), np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("change,match", [
    (dict(pool=jnp.zeros((20, 64, 576), jnp.float32)), "bfloat16 or float16 cache"),
    (dict(q_latent=jnp.zeros((2, 128, 448), jnp.bfloat16), pool=jnp.zeros((20, 64, 512), jnp.bfloat16)),
     "kv_lora_rank a multiple of 128"),
    (dict(pool=jnp.zeros((20, 48, 576), jnp.bfloat16), lengths=jnp.asarray([1, 100], jnp.int32)),
     "pages of 16, 32 or a multiple of 64 tokens, got 48"),
    (dict(plan=plan_decode(jnp.ones(3, jnp.int32), 4)), "plan was made for 3 rows, not 2"),
    (dict(lengths=jnp.asarray([1, 5000], jnp.int32)), "lengths must lie in \\[1, 256\\]"),
])
def test_bad_input_raises_one_sentence(change, match):
    args = dict(q_latent=jnp.zeros((2, 128, 512), jnp.bfloat16), q_pe=jnp.zeros((2, 128, 64), jnp.bfloat16),
                pool=jnp.zeros((20, 64, 576), jnp.bfloat16), page_table=jnp.zeros((2, 4), jnp.int32),
                lengths=jnp.asarray([1, 200], jnp.int32), scale=0.1)
    args["plan"] = plan_decode(args["lengths"], 4)
    args.update(change)
    with pytest.raises(ValueError, match=match) as err:
        flash_mla_decode(**args)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")
