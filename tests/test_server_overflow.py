"""No compilation after warm-up under any load: skewed routing (every token's gate prefers the
same experts, so the hot EP rank's rows overflow the first capacity bucket) driven through the
HTTP server after warm-up must neither compile (jaxseek_compilations_total stays put) nor stall a
request's first token; half the requests are grammar-constrained (token masks on both dp ranks'
rows, in the same compiled steps), and their outputs follow the grammar.

This needs the engine to warm up every EP capacity level a step can escalate to and to step back
down (issue 23's engine split); until that lands the escalation compiles a new program mid-serve and
this test fails, as it should."""

import asyncio
import re

import jax.numpy as jnp
import pytest

from serving import LLM
from serving.server import create_app, warm_up
from serving.stats import xla_compilations
from server_util import TINY_MODEL, serving, value, write_deployment

# EP over 2 ranks, a first capacity bucket that skewed routing overflows, compact buckets. A prefill
# step holds one 16-token row per rank, so each local expert's first bucket holds 8 (row, expert)
# pairs (sharding/ep.py capacities: 1.0 x 16 x 4 / 8): any one prompt here (11 tokens, all routed to
# experts 0-3) overflows it, however the requests happen to be batched.
DEPLOYMENT = {"mesh": {"dp": 2, "tp": 1}, "experts": {"redundant": 0},
              "dispatch": {"dtype": "bf16", "combine_dtype": "bf16", "capacity_factors": [1.0, 2.0, None]},
              "serving": {"block_size": 16, "prefill_tokens": [16], "prefill_rows": [1], "decode_batch": [8],
                          "max_model_len": 16, "kv_cache_mb": 4}}  # one context bucket: 2 programs a level
TTFT_BOUND_S = 2.0  # a step here takes milliseconds; compiling one takes seconds


def skew(net, experts) -> None:
    """Every token's gate prefers these experts (a huge correction bias): the hot-expert case."""
    bias = net.moe_layers.mlp.gate.e_score_correction_bias
    bias[...] = bias[...].at[:, jnp.asarray(experts)].set(100.0)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    llm = LLM(TINY_MODEL, deployment=write_deployment(tmp_path_factory.mktemp("overflow") / "d.json", DEPLOYMENT))
    warm_up(llm.engine)
    return llm


def test_skewed_routing_after_warm_up_compiles_nothing(llm):
    engine = llm.engine
    assert engine.net.ep is not None and engine.net.ep.ranks == 2
    skew(engine.net, [0, 1, 2, 3])  # group 0, all on rank 0: that rank receives every token's 4 choices
    engine.runner.refresh_weights()  # same tree: the compiled steps still apply
    compiled = engine.compilations
    with serving(create_app(llm, "jaxseek-tiny")) as server:
        before = server.metrics()
        assert value(before, "jaxseek_compilations_total") == compiled
        xla = value(before, "jaxseek_xla_compilations_total")

        async def one(client, i):
            extra = {"ignore_eos": True, **({"structured_outputs": {"regex": "[a-f]{4}"}} if i % 2 else {})}
            stream = await client.completions.create(model="jaxseek-tiny", prompt=f"sort {4321 + i}=", max_tokens=4,
                                                     temperature=0, stream=True, extra_body=extra)
            loop = asyncio.get_running_loop()
            start, first, finish, text = loop.time(), None, None, ""
            async for chunk in stream:  # (a chunk per engine step: with MTP drafts, up to 1 + k tokens)
                if chunk.choices and chunk.choices[0].text:
                    first = first or loop.time() - start
                    text += chunk.choices[0].text
                if chunk.choices:
                    finish = chunk.choices[0].finish_reason or finish
            assert not i % 2 or re.fullmatch("[a-f]{4}", text), text
            return first, finish

        async def burst():
            async with server.async_client() as client:
                return await asyncio.gather(*(one(client, i) for i in range(8)))

        results = [r for _ in range(3) for r in asyncio.run(burst())]
        after = server.metrics()
    assert value(after, "jaxseek_ep_overflow_retries_total") > 0  # the skew did overflow the first bucket
    assert value(after, "jaxseek_compilations_total") == compiled  # ... and nothing compiled
    assert value(after, "jaxseek_xla_compilations_total") == xla  # (nothing else in the process either)
    assert all(finish == "length" for _, finish in results)  # every request got its 4 tokens
    ttft = [first for first, _ in results]
    assert max(ttft) < TTFT_BOUND_S, ttft
