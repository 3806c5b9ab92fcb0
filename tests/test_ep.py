"""Expert parallelism on the 8-device CPU mesh, against the single-device model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tiny import CONFIGS, TINY, save_tiny
from model import DeepseekV3, ModelConfig
from model.moe import MoE
from model.quant import ACTIVATION_BLOCK, dequantize_blocks, quantize_blocks
from sharding import make_mesh
from sharding.deployment import Deployment
from model.experts import ExpertWeights
from model.experts import grouped_ffn as ffn
from model.ep import ep_routed_experts, plan_dispatch, slots_by_key
from sharding.ep import EPConfig



def exact(name, dp, tp=1, redundant=8, capacity_factors=(None,)):
    """fp32 on the wire. One capacity bucket by default, the worst case (it cannot overflow): a test
    of the numbers then compiles each program once; the buckets and their escalation are tested
    where they are the point (EP8 below, the skewed routing)."""
    return Deployment(name=name, dp=dp, tp=tp, redundant_experts=redundant, dispatch_dtype="fp32",
                      combine_dtype="fp32", capacity_factors=capacity_factors)


BUCKETED = (2.0, 4.0, None)  # the default buckets: level 0 can overflow


@pytest.fixture(scope="module")
def nets(saved):
    """Nets loaded on a deployment's mesh, shared by the tests of this module (compiled programs are
    cached per net's structure, so reusing a net reuses its programs)."""
    path, _ = saved
    loaded = {}

    def get(deployment, devices=8):
        key = repr(deployment)
        if key not in loaded:
            mesh = make_mesh(deployment.dp, deployment.tp, jax.devices()[:devices])
            loaded[key] = DeepseekV3.from_pretrained(path, mesh=mesh, deployment=deployment)
        return loaded[key]
    return get


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ep")
    return path, save_tiny(path, 11)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 128, (4, 12), dtype=np.int32)


@pytest.mark.parametrize("deployment,devices", [
    (exact("ep8", 8, capacity_factors=BUCKETED), 8), (exact("ep4", 4), 4), (exact("dp4xtp2", 4, 2), 8),
    (exact("ep8-no-redundant", 8, 1, 0), 8),
], ids=["EP8", "EP4", "dp4xtp2", "EP8-no-redundant"])
def test_ep_logits_equal_single_device(saved, nets, tokens, deployment, devices):
    _, reference = saved
    net = nets(deployment, devices)
    assert net.n_physical_experts == 16 + deployment.redundant_experts
    ref = np.asarray(reference(tokens))
    err = np.abs(np.asarray(net(tokens)) - ref).max()
    print(f"{deployment.name}: max abs logits error vs single device {err:.2e}")
    assert err <= 1e-5


def test_ep_odd_batch_prefill_and_absorbed_decode(saved, nets, tokens):
    """dp4 x tp2: the tp ranks of a dp group split its tokens; a batch that is not a multiple of
    dp, and prefill + absorbed decode over a batch-sharded cache."""
    _, reference = saved
    net = nets(exact("dp4xtp2", 4, 2))
    ref = np.asarray(reference(tokens))
    np.testing.assert_allclose(np.asarray(net(tokens[:3, :5])), ref[:3, :5], atol=1e-5, rtol=0)
    cache = net.init_cache(4, 16)
    logits, cache = net.prefill(tokens[:, :6], np.full(4, 6), cache)
    logits, cache = net.decode(tokens[:, 6], np.full(4, 6), cache)
    np.testing.assert_allclose(np.asarray(logits), ref[:, 6], atol=1e-5, rtol=0)


def _skew(net, experts):
    """Every token's gate prefers these experts (a huge correction bias): the hot-expert case."""
    for stack in (net.moe_layers, net.mtp):
        bias = stack.mlp.gate.e_score_correction_bias
        bias[...] = bias[...].at[:, jnp.asarray(experts)].set(100.0)


def test_skewed_routing_overflows_retries_and_matches(saved, tokens):
    path, reference = saved
    ref_net = DeepseekV3.from_pretrained(path)
    skewed = exact("ep8", 8, capacity_factors=(2.0, None))  # one bucket that overflows, then the worst case
    net = DeepseekV3.from_pretrained(path, deployment=skewed)
    _skew(ref_net, [0, 1, 2, 3])  # group 0: every token takes all four (top-4)
    _skew(net, [0, 1, 2, 3])
    # At the first bucket the hot rank's rows do not fit: the step reports it rather than drop.
    B, S = tokens.shape
    positions = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
    _, _, stats = net.run("_step_logits", jnp.asarray(tokens), jnp.asarray(positions), net.init_cache(B, S),
                          absorbed=False)
    assert net.ep.level > 0  # run() escalated past the overflowing bucket
    first = DeepseekV3.from_pretrained(path, deployment=skewed)
    _skew(first, [0, 1, 2, 3])
    from model.transformer import _jit_method
    _, _, first_stats = _jit_method(first, "_step_logits", jnp.asarray(tokens), jnp.asarray(positions),
                                    first.init_cache(B, S), absorbed=False)
    assert bool(first_stats["overflow"])
    # Nothing dropped: per-expert counts add up to every token's 4 choices, in every MoE layer.
    load = np.asarray(stats["expert_load"])  # [L, P]
    assert (load.sum(axis=1) == B * S * 4).all()
    per_rank = load.reshape(load.shape[0], 8, -1).sum(-1)
    assert (per_rank == 0).any()  # some ranks receive nothing at all
    np.testing.assert_allclose(np.asarray(net(tokens)), np.asarray(ref_net(tokens)), atol=1e-5, rtol=0)


def test_rows_sent_are_deduplicated(nets, tokens):
    net = nets(exact("ep8", 8))
    B, S = tokens.shape
    positions = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
    _, _, stats = net.run("_step_logits", jnp.asarray(tokens), jnp.asarray(positions), net.init_cache(B, S),
                          absorbed=False)
    rows = np.asarray(stats["rows_sent"]).sum(axis=1)  # per layer, over all ranks
    assert (rows <= B * S * min(4, 8)).all()
    assert (rows < B * S * 4).all()  # some tokens had two experts on one rank and sent one row


def test_plan_dispatch_sends_one_row_per_token_and_rank():
    rng = np.random.default_rng(3)
    ids = np.stack([rng.choice(24, 4, replace=False) for _ in range(50)]).astype(np.int32)
    valid = rng.random(50) > 0.1
    pair_dest, pair_ids = jax.jit(plan_dispatch, static_argnums=(2, 3))(jnp.asarray(ids), jnp.asarray(valid), 3, 8)
    pair_dest, pair_ids = np.asarray(pair_dest), np.asarray(pair_ids).reshape(50, 4, 4)
    for t in range(50):
        dests = {int(e) // 3 for e in ids[t]} if valid[t] else set()
        sent = [int(d) for d in pair_dest[t * 4:(t + 1) * 4] if d < 8]
        assert sorted(sent) == sorted(dests)  # each destination rank exactly once
        for j in range(4):
            if pair_dest[t * 4 + j] < 8:
                carried = sorted(int(i) for i in pair_ids[t, j] if i >= 0)
                assert carried == sorted(int(e) % 3 for e in ids[t] if e // 3 == pair_dest[t * 4 + j])
    slots, counts = jax.jit(slots_by_key, static_argnums=1)(jnp.asarray(pair_dest), 8)
    assert np.asarray(counts).sum() == sum(1 for d in pair_dest if d < 8)
    for d in range(8):  # slots within one destination are 0..count-1
        assert sorted(np.asarray(slots)[pair_dest == d]) == list(range(int(counts[d])))


def test_padded_grouped_ffn_equals_ragged_and_flags_overflow():
    rng = np.random.default_rng(5)
    M, k, El, D, F = 40, 3, 4, 16, 8
    rows = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
    ids = jnp.asarray(np.where(rng.random((M, k)) < 0.3, -1, rng.integers(0, El, (M, k))), jnp.int32)
    w = jnp.asarray(rng.random((M, k)), jnp.float32)
    wg, wu = (jnp.asarray(rng.normal(size=(El, F, D)), jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.normal(size=(El, D, F)), jnp.float32)
    experts = ExpertWeights(wg, wu, wd)
    grouped_ffn = jax.jit(ffn, static_argnums=4, static_argnames="capacity")  # one program, not op by op
    ref, ref_counts, _ = grouped_ffn(rows, ids, w, experts, "contiguous")  # lax.ragged_dot
    out, counts, overflow = grouped_ffn(rows, ids, w, experts, "masked", capacity=M)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)
    assert np.array_equal(counts, ref_counts) and not bool(overflow)
    assert bool(grouped_ffn(rows, ids, w, experts, "masked", capacity=int(np.max(counts)) - 1)[2])


def test_fp8_dispatch_is_exactly_quantised_input_and_within_e4m3_bound(saved):
    """FP8 dispatch == the single-device experts applied to the 1x128-quantised activations; and the
    error that quantisation adds stays within what e4m3's 3 mantissa bits allow."""
    _, reference = saved
    moe = nnx.merge(*nnx.split(reference.moe_layers))  # one MoE layer's weights: the first
    layer = jax.tree.map(lambda a: a[0], nnx.state(moe))
    graphdef = nnx.graphdef(moe)
    block: MoE = nnx.merge(graphdef, layer).mlp
    x = jnp.asarray(np.random.default_rng(7).normal(size=(64, 64)) * 3, jnp.float32)
    weights, ids = block.gate(x)
    valid = jnp.ones(64, bool)
    mesh = make_mesh(8)

    @functools.cache
    def program(dispatch, combine):  # one per wire precision, reused for both inputs
        ep = EPConfig(mesh=mesh, dispatch_dtype=dispatch, combine_dtype=combine)
        return jax.jit(lambda a, w: ep_routed_experts(a, ids, weights, valid, w, ep)[0])

    def routed(inp, dispatch, combine):
        return np.asarray(program(dispatch, combine)(inp, block.experts.weights()))

    q, s = quantize_blocks(x, ACTIVATION_BLOCK, jnp)
    x_q = dequantize_blocks(q, s, ACTIVATION_BLOCK, jnp.float32, jnp)
    np.testing.assert_allclose(routed(x, "fp8", "fp32"), routed(x_q, "fp32", "fp32"), atol=1e-5, rtol=0)
    exact_out = routed(x, "fp32", "fp32")
    fp8_out = routed(x, "fp8", "bf16")
    # e4m3 rounds each input to within 2^-4 relative; SwiGLU is a product of two linear maps of
    # x, so to first order its relative error at most doubles (2^-3); the bf16 combine adds 2^-8.
    rel = np.linalg.norm(fp8_out - exact_out, axis=1) / np.linalg.norm(exact_out, axis=1)
    print(f"FP8 dispatch + BF16 combine: per-token relative error max {rel.max():.3e}, mean {rel.mean():.3e}")
    assert rel.max() <= 2 ** -3 + 2 ** -8
    assert rel.max() > 0  # the payload really was quantised


def test_bad_deployments(tmp_path):
    cfg = ModelConfig.from_json(TINY)
    with pytest.raises(ValueError, match=r"20 physical experts \(16 routed \+ 4 redundant\) do not divide over EP8"):
        Deployment(name="x", dp=8, redundant_experts=4).n_physical_experts(cfg.n_routed_experts)
    f = tmp_path / "bad.json"
    f.write_text('{"mesh": {"dp": 16}}')
    with pytest.raises(ValueError, match=r"mesh dp=16 x tp=1 needs 16 devices, only 8 available"):
        Deployment.from_json(f).make_mesh()
    f.write_text('{"mesh": {"dp": 2, "pp": 2}}')
    with pytest.raises(ValueError, match=r"bad\.json: section 'mesh' may hold only"):
        Deployment.from_json(f)
    f.write_text('{"dispatch": {"dtype": "int4"}}')
    with pytest.raises(ValueError, match=r"bad\.json: dispatch_dtype 'int4' is not one of"):
        Deployment.from_json(f)


@pytest.mark.parametrize("name,ep,per_gpu", [("deepseek-prefill-ep32", 32, 9), ("deepseek-decode-ep144", 144, 2)])
def test_deepseek_production_deployments_validate(name, ep, per_gpu):
    import json
    dep = Deployment.from_json(CONFIGS / "deploy" / f"{name}.json")
    v3 = ModelConfig.from_dict(json.loads((CONFIGS / "deepseek-v3-671b" / "config.json").read_text()))
    assert dep.ep_size == ep and dep.dispatch_dtype == "fp8" and dep.combine_dtype == "bf16"
    assert dep.n_physical_experts(v3.n_routed_experts) == 288 == ep * per_gpu


def _emulate_ragged_all_to_all(operands, outputs, args):
    """ragged_all_to_all's documented semantics, rank by rank, in numpy."""
    outputs = [o.copy() for o in outputs]
    for i, (op, (in_off, send, out_off, _)) in enumerate(zip(operands, args)):
        for j in range(len(operands)):
            outputs[j][out_off[j]:out_off[j] + send[j]] = op[in_off[j]:in_off[j] + send[j]]
    return outputs


def test_ragged_transport_offsets_reproduce_the_padded_layout():
    """CPU sibling of the GPU transport test: the offsets ragged_exchange passes to
    ragged_all_to_all put every used row where padded_exchange puts it."""
    from model.ep import exchange_counts, padded_exchange, ragged_offsets
    R, C, D = 8, 5, 3
    rng = np.random.default_rng(9)
    rows = rng.normal(size=(R, R, C, D)).astype(np.float32)  # [source, dest, slot, D]
    counts = rng.integers(0, C + 1, (R, R)).astype(np.int32)
    mesh = make_mesh(8)
    spec = jax.sharding.PartitionSpec(("dp", "tp"))

    def body(r, c):
        recv = exchange_counts(c[0], ("dp", "tp"))
        offs = ragged_offsets(c[0], recv, jax.lax.axis_index(("dp", "tp")), C)
        return padded_exchange(r[0], c[0], recv, ("dp", "tp"))[None], *(o[None] for o in offs)

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=(spec,) * 5))(rows, counts)
    padded, offs = np.asarray(out[0]), [np.asarray(o) for o in out[1:]]
    np.testing.assert_array_equal(offs[3], counts.T)  # recv sizes: what each source sends me
    ragged = _emulate_ragged_all_to_all([rows[i].reshape(R * C, D) for i in range(R)],
                                        [np.zeros((R * C, D), np.float32)] * R,
                                        [tuple(o[i] for o in offs) for i in range(R)])
    for j in range(R):
        got = ragged[j].reshape(R, C, D)
        used = np.arange(C)[None, :] < counts[:, j][:, None]
        np.testing.assert_array_equal(got[used], padded[j][used])
        assert not got[~used].any()


def test_one_wire_buffer_round_trips_every_piece():
    """pack / unpack: FP8 bytes, float32 scales, int32 ids (-1 included) and weights in one uint8 buffer."""
    from model.ep import pack, unpack
    rng = np.random.default_rng(4)
    pieces = [jnp.asarray(rng.integers(0, 256, (3, 5, 256)), jnp.uint8),
              jnp.asarray(rng.normal(size=(3, 5, 2)), jnp.float32),
              jnp.asarray(rng.integers(-1, 9, (3, 5, 8)), jnp.int32),
              jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.bfloat16)]
    buf = pack(pieces)
    assert buf.dtype == jnp.uint8 and buf.shape == (3, 5, 256 + 8 + 32 + 16)
    for got, want in zip(unpack(buf, [(p.shape, p.dtype) for p in pieces]), pieces):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="ragged_all_to_all needs a GPU (XLA:CPU lacks it)")
def test_ragged_transport_on_gpu_matches_padded(saved, tokens):
    path, _ = saved
    n = len(jax.devices())
    outs = []
    for transport in ("padded", "ragged"):
        net = DeepseekV3.from_pretrained(path, deployment=exact(f"ep{n}", n, 1, 0))
        net.set_expert_parallel(EPConfig(mesh=net.ep.mesh, dispatch_dtype="fp32", combine_dtype="fp32",
                                         transport=transport))
        outs.append(np.asarray(net(tokens)))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=0)
