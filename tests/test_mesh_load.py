"""Loading straight onto a mesh: each device gets only its shard, and the math is unchanged."""


import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tiny import save_tiny
from model import DeepseekV3
from sharding import make_mesh
from sharding.deployment import Deployment



@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh")
    return path, save_tiny(path, 3)


@pytest.mark.parametrize("dp,tp", [(8, 1), (4, 2)])
def test_from_pretrained_on_mesh(saved, dp, tp):
    path, reference = saved
    deployment = Deployment(name="t", dp=dp, tp=tp, dispatch_dtype="fp32", combine_dtype="fp32")
    net = DeepseekV3.from_pretrained(path, mesh=make_mesh(dp, tp), deployment=deployment)
    experts = net.moe_layers.mlp.experts.down_proj.weight[...]
    assert experts.sharding.spec == P(None, ("dp", "tp"), None, None)
    # each device holds 16 / 8 = 2 of the 16 experts of every MoE layer
    assert {s.data.shape for s in experts.addressable_shards} == {(2, 2, 64, 32)}
    assert net.moe_layers.mlp.phy2log[...].sharding.spec == P(None, None)
    q_b = net.dense_layers.self_attn.q_b_proj.weight[...]
    assert q_b.sharding.spec == P(None, "tp", None)
    assert {s.data.shape[1] for s in q_b.addressable_shards} == {q_b.shape[1] // tp}
    tokens = np.random.default_rng(0).integers(0, 128, (2, 9), dtype=np.int32)
    np.testing.assert_allclose(np.asarray(net(tokens)), np.asarray(reference(tokens)), atol=1e-5, rtol=0)


def test_mesh_larger_than_devices():
    with pytest.raises(ValueError, match=r"mesh dp=16 x tp=1 needs 16 devices, only 8 available"):
        make_mesh(16)
