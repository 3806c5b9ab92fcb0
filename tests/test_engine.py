"""The serving engine: parity with transformers' generate, continuous batching, prefix cache,
compilation buckets, sampling, bad requests."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_reference import make_checkpoint, tiny_config
from serving import LLM, SamplingParams
from serving.stats import xla_compilations
from sharding.deployment import Deployment

ROOT = Path(__file__).resolve().parents[1]
# Small buckets so a 20-token prompt is prefilled in chunks of 8.
SERVING = {"block_size": 4, "prefill_tokens": [4, 8], "prefill_rows": [1, 4], "decode_batch": [2, 8],
           "max_model_len": 48, "kv_dtype": "fp32"}
PROMPTS = [[5, 9, 13, 2, 7, 30, 31], [8, 4], list(range(40, 60))]


def deployment(dp, **serving):
    """The default deployment's precision (dispatch and combine "auto": in quantization none, the
    model's own float32), with small buckets."""
    return Deployment(name=f"test-dp{dp}", dp=dp, serving={**SERVING, **serving})


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine")
    return path, make_checkpoint(path, tiny_config(), seed=2)


@pytest.fixture(scope="module")
def llm(hf):
    return LLM(hf[0], deployment=deployment(1))


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llm8(hf):
    return LLM(hf[0], deployment=deployment(8))


@pytest.mark.parametrize("dp", [1, 8], ids=["one-device", "EP8-mesh"])
def test_greedy_generate_equals_transformers(hf, llm, llm8, dp):
    path, model = hf
    engine_llm = llm if dp == 1 else llm8
    outs = engine_llm.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(model, prompt, 10), prompt
        assert out.finish_reason == "length"
    assert engine_llm.stats()["prefill_steps"] >= 3  # the 20-token prompt took several chunks


def test_default_ep8_logits_equal_transformers(hf, llm8):
    """Quantization none (the CPU default for any checkpoint) on 8 devices with the default dispatch
    and combine adds no error: float32 logits within 1e-4 of transformers'."""
    from hf_reference import hf_logits
    net = llm8.engine.net
    assert (net.quantization, net.ep.dispatch_dtype, net.ep.combine_dtype) == ("none", "auto", "auto")
    tokens = np.random.default_rng(6).integers(0, net.config.vocab_size, (8, 9)).astype(np.int32)
    assert np.abs(np.asarray(net(tokens)) - hf_logits(hf[1], tokens)).max() <= 1e-4


def test_parameter_bytes_in_stats_and_metrics(llm, llm8):
    from serving.metrics import ServerMetrics, engine_snapshot
    stats, net = llm8.stats(), llm8.engine.net
    assert stats["quantization"] == "none"
    assert stats["parameter_bytes"] == net.parameter_bytes > 0
    # replicated weights on every device, routed experts split over 8: a device holds less than all
    assert net.parameter_bytes > stats["parameter_bytes_per_device"] > net.parameter_bytes / 8
    assert llm.stats()["parameter_bytes_per_device"] == llm.stats()["parameter_bytes"]  # one device holds all
    text = ServerMetrics().render(engine_snapshot(llm8.engine)).decode()
    assert f"jaxseek_parameter_bytes {float(net.parameter_bytes)}" in text


def test_continuous_batching_and_prefix_cache_change_no_output(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    system = list(range(60, 72))  # a shared 12-token "system prompt": 3 full blocks
    alone = [llm.generate([system + [i, i + 1]], params)[0].token_ids for i in (3, 5, 7)]
    hits_before = engine.counters["cached_prompt_tokens"]
    # now the same three requests arrive while others are mid-decode
    first = engine.add_request(PROMPTS[2], params)
    for _ in range(3):
        engine.step()
    late = [engine.add_request(system + [i, i + 1], params) for i in (3, 5, 7)]
    while not engine.idle:
        engine.step()
    assert [r.output for r in late] == alone
    assert first.output == llm.generate([PROMPTS[2]], params)[0].token_ids
    assert engine.counters["cached_prompt_tokens"] - hits_before >= 3 * 12  # the system prompt hit the cache
    pool = engine.scheduler.pools[0]
    assert pool.refs.sum() == 0 and pool.available == pool.num_blocks  # every block is free again


def test_no_recompilation_after_warmup_over_120_requests(hf):
    llm = LLM(hf[0], deployment=deployment(1, decode_batch=[4, 16], prefill_rows=[4], prefill_tokens=[8, 32],
                                           block_size=8, max_model_len=32))
    compiled = llm.engine.warmup()
    # context buckets 1, 2, 4 blocks; a 32-token chunk holds > 8 tokens, so never fewer than 2 blocks
    assert llm.engine.context_buckets == (1, 2, 4) and compiled == 3 + 2 + 2 * 3  # prefill 8, 32; decode 4, 16
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 96, rng.integers(1, 21)).tolist() for _ in range(120)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 12)), ignore_eos=True) for _ in prompts]
    before = llm.engine.compilations
    outs = llm.generate(prompts, params)
    assert all(o.finish_reason == "length" and len(o.token_ids) == p.max_tokens for o, p in zip(outs, params))
    assert llm.engine.compilations == before


def test_bad_requests_rejected_while_others_complete(llm):
    good = [5, 6, 7]
    outs = llm.generate(
        [good, [], list(range(2, 60)), [3, 96], good, good],
        [SamplingParams(max_tokens=3), None, None, None, {"max_tokens": 0}, {"max_tokens": 2, "beam_width": 4}])
    assert outs[0].finish_reason in ("length", "stop") and outs[0].token_ids
    assert "empty prompt" in outs[1].error
    assert "does not fit the context of 48" in outs[2].error
    assert "token id 96 is outside the vocabulary [0, 96)" in outs[3].error
    assert "max_tokens must be a positive integer" in outs[4].error
    assert "unknown sampling option(s) ['beam_width']" in outs[5].error
    assert all(o.finish_reason == "error" for o in outs[1:])


def test_sampling_seeds_topk_and_stop(llm):
    prompt = [11, 12, 13]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    top1 = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.5, top_k=1, ignore_eos=True))[0]
    assert top1.token_ids == greedy  # top-k 1 leaves only the argmax
    hot = dict(max_tokens=8, temperature=5.0, ignore_eos=True)
    a, b, c = llm.generate([prompt] * 3, [SamplingParams(seed=1, **hot), SamplingParams(seed=1, **hot),
                                          SamplingParams(seed=2, **hot)])
    assert a.token_ids == b.token_ids  # a seed fixes the draw whatever the batch
    assert a.token_ids != c.token_ids
    stop = llm.generate([prompt], SamplingParams(max_tokens=8, stop_token_ids=(greedy[2],), ignore_eos=True))[0]
    assert stop.token_ids == greedy[:greedy.index(greedy[2]) + 1] and stop.finish_reason == "stop"


def test_stream_deltas_add_up_to_generate(llm):
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    deltas = list(llm.stream([21, 22, 23], params))
    assert [t for d in deltas for t in d.token_ids] == llm.generate([[21, 22, 23]], params)[0].token_ids
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_abort_frees_blocks(llm):
    engine = llm.engine
    req = engine.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    assert engine.scheduler.pools[0].refs.sum() > 0
    engine.abort(req.id)
    assert req.finish_reason == "abort" and engine.scheduler.pools[0].refs.sum() == 0


def test_generate_cli(hf, tmp_path):
    dep = tmp_path / "one.json"
    dep.write_text(json.dumps({"mesh": {"dp": 1}, "dispatch": {"dtype": "fp32", "combine_dtype": "fp32"},
                               "serving": SERVING}))
    run = subprocess.run([sys.executable, "-m", "serving.generate", "--model", str(hf[0]), "--deployment", str(dep),
                          "--prompt-ids", "5,9,13,2,7,30,31", "--max-tokens", "4", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    first = json.loads(run.stdout.splitlines()[0])
    assert len(first["token_ids"]) <= 4 and first["error"] is None
    assert first["token_ids"] == hf_greedy(hf[1], PROMPTS[0], 4)[:len(first["token_ids"])]


def test_statistics_record_counts_what_was_served(llm, tmp_path):
    """The record the cost report prices (serving/stats.py -> serving/economics.py) counts what the engine
    served: the tokens the requests got back, their prompt tokens, and as cache hits exactly the full
    prompt pages a later prompt shared (4-token pages: 8 of 12; the last prompt token is always computed)."""
    from serving.economics import load, report
    first = list(range(70, 79))
    second = first + [80, 81, 82]
    t0 = time.perf_counter()
    before = llm.engine.statistics_record()
    outs = llm.generate([first], SamplingParams(max_tokens=3, ignore_eos=True))
    outs += llm.generate([second], SamplingParams(max_tokens=4, ignore_eos=True))
    after = llm.engine.statistics_record()
    wall = time.perf_counter() - t0  # spans the two records' clock readings
    delta = {k: after[k] - before[k] for k in ("output_tokens", "input_tokens_cache_hit", "input_tokens_cache_miss",
                                               "gpu_seconds")}
    assert delta["output_tokens"] == sum(len(o.token_ids) for o in outs) == 7
    assert delta["input_tokens_cache_hit"] == 8
    assert delta["input_tokens_cache_hit"] + delta["input_tokens_cache_miss"] == len(first) + len(second)
    assert 0 < delta["gpu_seconds"] <= wall * llm.stats()["devices"]
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(after))
    out = report(load(path).stats, load(ROOT / "configs/economics/deepseek-2025-02-27.json").prices)
    assert out["cost_usd"] > 0 and out["output_tokens"] == after["output_tokens"]


def test_warmup_covers_the_first_real_step(hf):
    """The pool and expert-load arrays start in the layout every step returns, so a warmed-up
    engine compiles nothing when the first real request lands in the first bucket."""
    llm = LLM(hf[0], deployment=deployment(1, decode_batch=[2], prefill_rows=[1], prefill_tokens=[8],
                                           max_model_len=16))
    llm.engine.warmup()
    before = llm.engine.compilations
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert llm.engine.compilations == before


@pytest.fixture(params=["jitted", "serialized"])
def steps_kept(request, tmp_path, monkeypatch):
    """How the engine holds its compiled steps: jitted, or saved to and loaded from a fresh directory
    (serving/aot.py, as the server runs them)."""
    if request.param == "serialized":
        import jax
        from jax.experimental.compilation_cache import compilation_cache
        monkeypatch.setenv("JAXSEEK_SERIALIZED_STEPS", "1")
        old = jax.config.jax_compilation_cache_dir
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        yield request.param
        jax.config.update("jax_compilation_cache_dir", old)
        compilation_cache.reset_cache()  # JAX's cache back at the suite's directory
    else:
        yield request.param


def test_host_arrays_packed_as_one_buffer_come_back_exactly():
    """pack_rows / unpack_rows (serving/transfer.py): every row-shaped leaf of these dtypes (bool and
    int8 widened, float32 and int32 bit-cast) goes into one int32 buffer and comes back bit for bit
    inside a jitted function; leaves of another row count, or 8-byte ones, are passed beside it."""
    import jax

    from serving.transfer import pack_rows, unpack_rows
    rng = np.random.default_rng(0)
    tree = {"tokens": rng.integers(-5, 1000, (4, 3)).astype(np.int32), "mask": rng.random(4) > 0.5,
            "temp": np.array([0.0, -1.5, np.inf, np.nan], np.float32), "small": np.int8([-128, -1, 0, 127]),
            "nested": (rng.random((4, 2, 2)).astype(np.float32), np.uint8([0, 1, 254, 255])),
            "seeds": np.arange(4, dtype=np.int64), "other_rows": np.arange(3, dtype=np.int32)}
    buffer, kept, layout = pack_rows(tree, 4)
    assert buffer.dtype == np.int32 and buffer.shape == (4, 3 + 1 + 1 + 1 + 4 + 1) and len(kept) == 2
    out = jax.jit(lambda b, k: unpack_rows(b, k, layout))(buffer, kept)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(out)):
        got = np.asarray(got)
        if any(want is k for k in kept):  # (passed as they are: jax.jit makes int64 int32)
            assert np.array_equal(got, want), path
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert want.tobytes() == got.tobytes(), path


def test_capacity_window_doubles_when_the_skew_comes_back_and_resets_when_it_passed():
    """A raised level steps down after `first` clean steps; an overflow within a window of that step
    down doubles the window (up to growth x first), one after it starts again at `first`."""
    from serving.runner import CapacityWindow
    w = CapacityWindow(4, growth=4)

    def steps_to_step_down():
        for n in range(1, 100):
            if w.landed(raised=True):
                w.stepped_down()
                return n
    w.overflowed()
    assert steps_to_step_down() == 4
    for expected in (8, 16, 16):  # the skew is back at once, each time: doubled, then capped at 4 x 4
        w.overflowed()
        assert steps_to_step_down() == expected
    assert not any(w.landed(raised=False) for _ in range(16))  # at level 0 nothing steps down
    w.overflowed()  # 16 steps after the last step down: a new skew, the first window again
    assert steps_to_step_down() == 4


def test_capacity_level_rises_and_steps_back_down_with_nothing_compiled_after_warmup(hf, steps_kept):
    """A capacity bucket far too small: every prefill step overflows after warm-up and re-runs at the
    next EP capacity level, which warm-up compiled (the compilation counter does not move); the decode
    steps fit, and a window of them brings the level back down. No token changes. Serialized steps:
    the raised level's programs are unloaded after warm-up, loaded again (not compiled) for the retry,
    and unloaded when the level steps down."""
    dep = Deployment(name="capacity", dp=2, dispatch_dtype="fp32", combine_dtype="fp32",
                     capacity_factors=(0.01, None), capacity_window=2,
                     serving={"block_size": 32, "max_model_len": 32, "prefill_tokens": [16], "prefill_rows": [1],
                              "decode_batch": [2], "kv_dtype": "fp32"})
    capped = LLM(hf[0], deployment=dep)
    assert capped.engine.warmup() == 2 * 2  # (prefill, decode) x 2 capacity levels, one context bucket
    compiled, runner, xla = capped.engine.compilations, capped.engine.runner, xla_compilations()
    held = lambda: sorted(len(step.compiled) for step in runner._steps.values())  # noqa: E731
    if steps_kept == "serialized":
        assert held() == [0, 2] and runner.programs_loaded == 0  # level 0's two programs only
    prompts = [list(range(40, 52)), list(range(70, 81))]  # 12 and 11 tokens: ~12 rows per peer, capacity 8
    outs = capped.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    stats = capped.stats()
    assert stats["ep_overflow_retries"] >= 1 and stats["ep_capacity_steps_down"] >= 1
    assert stats["ep_capacity_level"] == 0  # the decode steps since fit the small bucket again
    assert capped.engine.compilations == compiled and xla_compilations() == xla  # (nor anything else)
    # every routed token counted once, though overflowing steps ran twice: the prompts' tokens and
    # each decode step's (a request's first token comes from its prefill), top-k slots per MoE layer
    load = np.asarray(capped.engine.expert_load)
    tokens = sum(map(len, prompts)) + sum(len(o.token_ids) - 1 for o in outs)
    assert load.sum() == load.shape[0] * capped.engine.net.config.num_experts_per_tok * tokens
    if steps_kept == "serialized":
        assert runner.programs_loaded >= 1 and held() == [0, 2]
    assert [o.token_ids for o in outs] == [hf_greedy(hf[1], p, 6) for p in prompts]
    if steps_kept == "serialized":  # a second start: loads level 0's two programs, compiles nothing
        again = LLM(hf[0], deployment=dep)
        assert again.engine.warmup() == 0 and again.engine.programs_loaded == 2
        assert [o.token_ids for o in again.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))] == \
            [o.token_ids for o in outs]
        assert again.engine.compilations == 0 and again.engine.programs_loaded >= 3  # + the raised level's


def test_bf16_cache_write_is_in_place():
    """The cache write costs what it writes: a bfloat16 pool is scattered into as bfloat16, with no
    float32 copy of a rank's pool in the compiled program (docs/DESIGN_NOTES.md)."""
    import jax
    import jax.numpy as jnp

    from serving.kv_cache import PagedCache, new_pool
    from sharding import make_mesh
    mesh = make_mesh(2)
    pool = new_pool(3, 2, 64, 4, 48, jnp.bfloat16, mesh)  # per rank [3, 64, 4, 48]
    write = jax.jit(lambda pool, table, slots, rows: PagedCache(pool, table, mesh).write(1, slots, rows).pool,
                    donate_argnums=0)
    table, slots = np.arange(8, dtype=np.int32).reshape(4, 2), np.array([[5], [-1], [2], [7]], np.int32)
    rows = np.ones((4, 1, 48), np.float32)
    hlo = write.lower(pool, table, slots, rows).compile().as_text()
    assert "bf16[3,64,4,48]" in hlo and "f32[3,64,4,48]" not in hlo
    out = np.asarray(write(pool, table, slots, rows).astype(jnp.float32))
    # row 0 -> rank 0's block 1, offset 1; row 1 is padding; rows 2, 3 -> rank 1's blocks 4 and 7
    assert out[1, 1, 1].sum() == out[1, 64 + 4, 2].sum() == out[1, 64 + 7, 3].sum() == 48 and out.sum() == 3 * 48
