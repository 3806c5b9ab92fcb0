"""The OpenAI-compatible HTTP server (serving/server/): a real server on a loopback port, the real
`openai` client. Its outputs equal LLM.generate's; concurrent requests share engine steps; /metrics
counts what was sent; a client that goes away frees its KV blocks; bad requests get OpenAI errors;
DeepSeek's tool-call and reasoning tokens are parsed out of the output (--tool-call-parser
deepseek_v3, --reasoning-parser deepseek_v3), streamed and not.

The checkpoint is built here (random weights for configs/tiny, a character-level tokenizer whose
last ids are DeepSeek's <think>, </think> and tool-call tokens, a DeepSeek-style chat template that
renders tools), so the tests need nothing else on disk."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from serving import LLM, SamplingParams
from serving.server import Options, create_app, warm_up
from serving.server.parsers import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, THINK_END, THINK_START, TOOL_SEP
from server_util import ROOT, free_port, serving, value
from tiny import save_tiny

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
# DeepSeek's reasoning and tool-call tokens (plain added tokens, as in DeepSeek's tokenizer.json)
MARKERS = [THINK_START, THINK_END, CALLS_BEGIN, CALL_BEGIN, TOOL_SEP, CALL_END, CALLS_END]
# ids 4..127: printable ASCII, newline, tab, Latin-1 letters, then the markers: every id is one piece of text
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"] + [chr(c) for c in range(0xC0, 0xC0 + 20)] + MARKERS
TEMPLATE = ("{{ bos_token }}{% for t in tools or [] %}{{ t['function']['name'] }} {% endfor %}"
            "{% for m in messages %}"
            "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
            "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
# One shape bucket per kind, so the whole file compiles the engine step only a few times.
DEPLOYMENT = {"mesh": {"dp": 1}, "serving": {"block_size": 16, "prefill_tokens": [32], "prefill_rows": [8],
                                             "decode_batch": [64], "max_model_len": 128, "kv_cache_mb": 16}}
TEXT = "The quick brown fox"
IDS = [5, 9, 13, 2, 7, 30, 31, 44]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
CONCURRENT = ["alpha", "bravo charlie", "delta", "echo foxtrot golf", "hotel"]
GREEDY = dict(temperature=0.0)


def write_tokenizer(path: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    assert len(vocab) == 128
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKERS])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "chat_template": TEMPLATE}))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("jaxseek-test")
    save_tiny(path, 0)  # random weights for configs/tiny (vocabulary 128)
    write_tokenizer(path)
    deployment = path.parent / f"{path.name}-deployment.json"
    deployment.write_text(json.dumps(DEPLOYMENT))
    return path, deployment


@pytest.fixture(scope="module")
def llm(checkpoint):
    llm = LLM(checkpoint[0], deployment=checkpoint[1])
    warm_up(llm.engine)  # as the CLI does: serving should then never compile
    return llm


@pytest.fixture(scope="module")
def reference(llm):
    """LLM.generate's greedy outputs, computed before the server's engine thread owns the engine."""
    def run(prompt, **kw):
        return llm.generate([prompt], SamplingParams(**{"max_tokens": 12, **kw}))[0]
    ref = {"text": run(TEXT), "ids": run(IDS), "chat": run(llm.chat_prompt(CHAT)),
           "long": run(TEXT, max_tokens=12, ignore_eos=True),
           "cli": run(IDS, max_tokens=3, ignore_eos=True),
           "concurrent": {p: run(p, max_tokens=8, ignore_eos=True).token_ids for p in CONCURRENT}}
    assert len(ref["long"].text) >= 7  # tokens are characters (or specials, which print nothing): the stop test needs text
    return ref


@pytest.fixture(scope="module")
def server(llm, reference, checkpoint):
    app = create_app(llm, model_name=checkpoint[0].name,
                     options=Options(reasoning_parser="deepseek_v3", tool_parser="deepseek_v3"))
    with serving(app) as running:
        running.compiled_at_start = llm.engine.compilations
        yield running


def test_models_and_health(server, checkpoint):
    assert server.http.get("/health").json() == {"status": "ok"}
    models = server.client.models.list().data
    assert [m.id for m in models] == [checkpoint[0].name]
    assert server.http.get(f"/v1/models/{checkpoint[0].name}").json()["max_model_len"] == 128


def test_completion_matches_generate(server, reference, checkpoint):
    name = checkpoint[0].name
    ref = reference["text"]
    out = server.client.completions.create(model=name, prompt=TEXT, max_tokens=12,
                                           extra_body={"return_token_ids": True}, **GREEDY)
    assert out.object == "text_completion" and out.model == name and out.id.startswith("cmpl-")
    choice = out.choices[0]
    assert choice.text == ref.text and choice.token_ids == ref.token_ids and choice.finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids) == len(TEXT) + 1  # bos + one token per character
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # token ids in, token ids out; several prompts in one request
    ids = server.client.completions.create(model=name, prompt=IDS, max_tokens=12, extra_body={"return_token_ids": True},
                                           **GREEDY)
    assert ids.choices[0].token_ids == reference["ids"].token_ids and ids.choices[0].text == reference["ids"].text
    both = server.client.completions.create(model=name, prompt=[TEXT, IDS], max_tokens=12, **GREEDY)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [ref.text, reference["ids"].text]
    # streamed: the chunks add up to the same text and tokens
    chunks = list(server.client.completions.create(model=name, prompt=TEXT, max_tokens=12, stream=True,
                                                   stream_options={"include_usage": True},
                                                   extra_body={"return_token_ids": True}, **GREEDY))
    pieces = [c for c in chunks if c.choices]
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in pieces) == ref.text
    assert [t for c in pieces for t in c.choices[0].token_ids] == ref.token_ids
    assert [c.choices[0].finish_reason for c in pieces] == [None] * (len(pieces) - 1) + [ref.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and not chunks[-1].choices
    assert len(pieces) > 1  # really streamed


def test_chat_matches_generate(server, reference, checkpoint, llm):
    name = checkpoint[0].name
    ref = reference["chat"]
    assert ref.prompt_token_ids[:3] == [0, 4 + CHARS.index("B"), 4 + CHARS.index("e")]  # bos, then the system text
    out = server.client.chat.completions.create(model=name, messages=CHAT, max_tokens=12, **GREEDY)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids) and out.usage.completion_tokens == len(ref.token_ids)
    chunks = list(server.client.chat.completions.create(model=name, messages=CHAT, max_tokens=12, stream=True,
                                                        **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    # content given as text parts renders the same prompt
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in CHAT]
    again = server.client.chat.completions.create(model=name, messages=parts, max_tokens=12, **GREEDY)
    assert again.choices[0].message.content == ref.text


def test_stop_strings(server, reference, checkpoint):
    """A string stop cuts the text before it (streamed or not) and ends the request."""
    text = reference["long"].text
    stop = text[5:7]
    want = text[:text.find(stop)]
    kw = dict(model=checkpoint[0].name, prompt=TEXT, max_tokens=12, stop=[stop, "\x00never"],
              extra_body={"ignore_eos": True}, **GREEDY)
    out = server.client.completions.create(**kw)
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    chunks = list(server.client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_fifty_concurrent_streams_share_engine_steps(server, reference, checkpoint):
    name = checkpoint[0].name
    before = server.metrics()

    async def one(client, prompt):
        stream = await client.completions.create(model=name, prompt=prompt, max_tokens=8, stream=True,
                                                 extra_body={"ignore_eos": True, "return_token_ids": True}, **GREEDY)
        tokens, finish = [], None
        async for chunk in stream:
            tokens += chunk.choices[0].token_ids
            finish = chunk.choices[0].finish_reason or finish
        return prompt, tokens, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, CONCURRENT[i % len(CONCURRENT)]) for i in range(50)))

    results = asyncio.run(main())
    assert len(results) == 50
    for prompt, tokens, finish in results:
        assert len(tokens) == 8 and finish == "length"
        assert tokens == reference["concurrent"][prompt]  # batching changes no output
    after = server.metrics()
    decode_steps = value(after, "jaxseek_engine_steps_total", kind="decode") - \
        value(before, "jaxseek_engine_steps_total", kind="decode")
    # one at a time would take 50 x 7 decode steps
    assert 7 <= decode_steps <= 50, decode_steps
    assert value(after, "jaxseek_generation_tokens_total") - value(before, "jaxseek_generation_tokens_total") == 400


def test_metrics_count_requests_and_tokens(server, checkpoint):
    name = checkpoint[0].name
    before = server.metrics()
    prompts = [[10 + i] * (3 + i) for i in range(3)]  # 3, 4 and 5 tokens
    for p in prompts:
        server.client.completions.create(model=name, prompt=p, max_tokens=5, extra_body={"ignore_eos": True}, **GREEDY)
    list(server.client.chat.completions.create(model=name, messages=CHAT, max_tokens=4, stream=True,
                                               extra_body={"ignore_eos": True}, **GREEDY))
    server.http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 0})
    after = server.metrics()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    chat_prompt = len(server.app.state.server.llm.chat_prompt(CHAT))
    assert delta("jaxseek_http_requests_total", endpoint="/v1/completions", status="200") == 3
    assert delta("jaxseek_http_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert delta("jaxseek_http_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("jaxseek_http_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    assert delta("jaxseek_generation_tokens_total") == 3 * 5 + 4
    assert delta("jaxseek_prompt_tokens_total") == 3 + 4 + 5 + chat_prompt
    assert delta("jaxseek_prompt_tokens_by_cache_total") == 3 + 4 + 5 + chat_prompt  # hit + miss
    # the chat prompt's first block (16 tokens) is in the prefix cache since the reference run
    assert delta("jaxseek_prompt_tokens_by_cache_total", cache="hit") >= 16
    assert delta("jaxseek_requests_finished_total", reason="length") == 4
    assert delta("jaxseek_time_to_first_token_seconds_count") == 4
    assert delta("jaxseek_time_per_output_token_seconds_count") == 4
    assert delta("jaxseek_e2e_request_latency_seconds_count") == 4
    assert value(after, "jaxseek_requests_running") == value(after, "jaxseek_requests_waiting") == 0
    assert value(after, "jaxseek_kv_blocks_used", dp_rank="0") == 0
    assert value(after, "jaxseek_kv_blocks_total", dp_rank="0") > 100
    # every shape bucket was compiled before the server started: serving compiled nothing
    assert value(after, "jaxseek_compilations_total") == server.compiled_at_start
    assert value(after, "jaxseek_ep_overflow_retries_total") == 0
    assert value(after, "jaxseek_expert_load_imbalance") >= 1.0
    layers = {dict(ls)["layer"] for (n, ls) in after if n == "jaxseek_expert_load_imbalance_per_layer"}
    assert layers == {"1", "2"}  # configs/tiny: layer 0 is dense, 1 and 2 are MoE


def test_client_disconnect_aborts_and_frees_blocks(server, checkpoint):
    engine = server.app.state.server.engine
    before = server.metrics()
    body = {"model": checkpoint[0].name, "prompt": TEXT, "max_tokens": 100, "stream": True, "ignore_eos": True,
            "temperature": 0}
    events = 0
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events += 1
                if events == 2:
                    break  # leave mid-stream: the connection closes
    assert events == 2
    deadline = time.time() + 10
    while True:
        after = server.metrics()
        if value(after, "jaxseek_kv_blocks_used", dp_rank="0") == 0 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert value(after, "jaxseek_kv_blocks_used", dp_rank="0") == 0
    assert value(after, "jaxseek_requests_running") == 0
    assert value(after, "jaxseek_requests_finished_total", reason="abort") - \
        value(before, "jaxseek_requests_finished_total", reason="abort") == 1
    generated = value(after, "jaxseek_generation_tokens_total") - value(before, "jaxseek_generation_tokens_total")
    assert 2 <= generated < 100  # it did not run to the end
    assert engine.scheduler.pools[0].refs.sum() == 0


def test_bad_requests_get_openai_errors(server, checkpoint):
    name = checkpoint[0].name
    engine_requests = server.metrics()[("jaxseek_engine_requests_total", ())]
    cases = [  # (path, body, status, code)
        ("/v1/completions", b"{not json", 400, "invalid_json"),
        ("/v1/completions", b"[1, 2]", 400, "invalid_json"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found"),
        ("/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "hi", "max_tokens": "many"}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "x" * 200}, 400, "context_length_exceeded"),
        ("/v1/completions", {"model": name, "prompt": list(range(4, 200))}, 400, "context_length_exceeded"),
        ("/v1/completions", {"model": name, "prompt": [5, 6, 128]}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": [5, -1]}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": ""}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": []}, 400, "invalid_value"),
        ("/v1/completions", {"model": name}, 400, "missing_required_parameter"),
        ("/v1/completions", {"model": name, "prompt": [{"a": 1}]}, 400, "invalid_type"),
        ("/v1/completions", {"model": name, "prompt": "hi", "n": 17}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "hi", "logprobs": 21}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "hi", "echo": True, "logprobs": 1}, 400, "unsupported"),
        ("/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 126}, 400, "context_length_exceeded"),
        ("/v1/completions", {"model": name, "prompt": "hi", "logit_bias": {"128": 5}}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "hi", "logit_bias": {"7": 101}}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "hi", "stop_token_ids": [128]}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "hi", "presence_penalty": 3}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "hi", "repetition_penalty": 0}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "hi", "temperature": -1}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "hi", "top_p": 0}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "hi", "stop": [""]}, 400, "invalid_value"),
        ("/v1/completions", {"model": name, "prompt": "hi", "best_of": 4}, 400, "unsupported"),
        ("/v1/completions", {"model": name, "prompt": "hi", "stream": "yes"}, 400, "invalid_value"),
        ("/v1/completions", b'{"model": "%s", "prompt": "hi", "temperature": NaN}' % name.encode(), 400,
         "invalid_json"),
        ("/v1/chat/completions", {"model": name, "messages": []}, 400, "invalid_value"),
        ("/v1/chat/completions", {"model": name}, 400, "missing_required_parameter"),
        ("/v1/chat/completions", {"model": name, "messages": [{"content": "no role"}]}, 400, "invalid_value"),
        ("/v1/chat/completions", {"model": name, "messages": CHAT, "top_logprobs": 2}, 400, "invalid_value"),
        ("/v1/chat/completions", {"model": name, "messages": CHAT, "response_format": {"type": "xml"}}, 400,
         "invalid_value"),
        ("/v1/chat/completions", {"model": name, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
         "invalid_value"),
        ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "y" * 300}]}, 400,
         "context_length_exceeded"),
    ]
    for path, body, status, code in cases:
        r = server.http.post(path, content=body) if isinstance(body, bytes) else server.http.post(path, json=body)
        assert r.status_code == status, (body, r.status_code, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert error["code"] == code, (body, error)
    r = server.http.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert server.http.get("/nowhere").json()["error"]["code"] == "404"
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="does not fit the context|maximum context length"):
        server.client.completions.create(model=name, prompt=[5] * 128)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        server.client.chat.completions.create(model=name, messages=CHAT, response_format={"type": "xml"})
    # none of them reached the engine, and it still serves, even values past the engine's 32-bit arrays
    assert server.metrics()[("jaxseek_engine_requests_total", ())] == engine_requests
    out = server.client.completions.create(model=name, prompt="ok", max_tokens=3, seed=2 ** 40 + 7, top_p=0.9,
                                           extra_body={"ignore_eos": True, "top_k": 10 ** 12})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_cli_subprocess_serves(checkpoint, reference):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--model", str(checkpoint[0]), "--deployment",
                             str(checkpoint[1]), "--port", str(port), "--no-warmup", "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "JAXSEEK_API_KEY": "sesame"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:  # open without a key, as vLLM
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        assert httpx.get(f"{base}/v1/models").status_code == 401  # JAXSEEK_API_KEY: /v1/* needs it
        key = {"Authorization": "Bearer sesame"}
        models = httpx.get(f"{base}/v1/models", headers=key).json()
        # vLLM's naming: --model as given (the path), as a client like guidellm sends it back
        assert [m["id"] for m in models["data"]] == [str(checkpoint[0])]
        for model in (str(checkpoint[0]), checkpoint[0].name):  # the directory's name is accepted too
            r = httpx.post(f"{base}/v1/completions", timeout=120, headers=key, json={
                "model": model, "prompt": IDS, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == reference["cli"].token_ids
            assert r.json()["model"] == str(checkpoint[0])
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    output = proc.stdout.read()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in output, output


def test_request_id_header(server, checkpoint):
    """X-Request-Id as vLLM: the client's id comes back in the header and the response id; without
    one, the server makes one up (a different one each time)."""
    body = {"model": checkpoint[0].name, "prompt": IDS, "max_tokens": 2, "temperature": 0}
    r = server.http.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "cmpl-trace-42"
    again = server.http.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-42"})  # reused: fine
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]
    ids = {server.http.post("/v1/completions", json=body).headers["x-request-id"] for _ in range(2)}
    assert len(ids) == 2 and all(len(i) == 32 for i in ids)
    assert server.http.get("/health").headers["x-request-id"]
    bad = server.http.post("/v1/completions", json={**body, "n": 0}, headers={"X-Request-Id": "t-1"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "t-1"


def test_stop_token_text_dropped(server, reference, checkpoint):
    """stop_token_ids end the output on that token, whose text is dropped unless
    include_stop_str_in_output (vLLM); stop_reason names it. The same for a stop string."""
    ref = reference["long"]
    i, stop = next((i, t) for i, t in enumerate(ref.token_ids) if t >= len(SPECIALS) and i >= 2)
    want = ref.token_ids[:ref.token_ids.index(stop) + 1]
    kw = dict(model=checkpoint[0].name, prompt=TEXT, max_tokens=12, **GREEDY)
    for include in (False, True):
        out = server.client.completions.create(**kw, extra_body={"ignore_eos": True, "stop_token_ids": [stop],
                                                                 "include_stop_str_in_output": include,
                                                                 "return_token_ids": True})
        c = out.choices[0]
        assert c.token_ids == want and c.finish_reason == "stop" and c.stop_reason == stop
        shown = "".join(CHARS[t - len(SPECIALS)] for t in (want if include else want[:-1]) if t >= len(SPECIALS))
        assert c.text == shown
        chunks = list(server.client.completions.create(**kw, stream=True, extra_body={
            "ignore_eos": True, "stop_token_ids": [stop], "include_stop_str_in_output": include}))
        assert "".join(ch.choices[0].text for ch in chunks) == shown
    text = ref.text
    s = text[5:7]
    out = server.client.completions.create(**kw, stop=[s], extra_body={"ignore_eos": True,
                                                                       "include_stop_str_in_output": True})
    assert out.choices[0].text == text[:text.find(s)] + s and out.choices[0].stop_reason == s


def test_max_tokens_past_the_context_and_chat_default(server, llm, checkpoint):
    """max_tokens beyond the context is refused (vLLM), not capped; chat without max_tokens
    generates until EOS or the context (vLLM and OpenAI), completions 16 (OpenAI)."""
    name = checkpoint[0].name
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens") as e:
        server.client.completions.create(model=name, prompt="hi", max_tokens=126)
    assert e.value.body["param"] == "max_tokens"
    ok = server.client.completions.create(model=name, prompt="hi", max_tokens=125, extra_body={"ignore_eos": True})
    assert ok.usage.prompt_tokens + ok.usage.completion_tokens == 128 and ok.choices[0].finish_reason == "length"
    chat = server.client.chat.completions.create(model=name, messages=CHAT, extra_body={"ignore_eos": True}, **GREEDY)
    assert chat.usage.completion_tokens == 128 - chat.usage.prompt_tokens > 16
    assert chat.choices[0].finish_reason == "length"
    plain = server.client.completions.create(model=name, prompt="hi", extra_body={"ignore_eos": True})
    assert plain.usage.completion_tokens == 16


def test_developer_and_tool_roles(server, llm, checkpoint):
    """developer messages are system messages (OpenAI's newer name); tool results reach the prompt.
    A template with no place for a tool result refuses it rather than drop it."""
    name = checkpoint[0].name

    def prompt_ids(messages):
        out = server.client.chat.completions.create(model=name, messages=messages, max_tokens=1,
                                                    extra_body={"return_token_ids": True})
        return out.model_extra["prompt_token_ids"][0]
    user = {"role": "user", "content": "Hi there!"}
    assert prompt_ids([{"role": "developer", "content": "Be brief."}, user]) == \
        prompt_ids([{"role": "system", "content": "Be brief."}, user]) == llm.chat_prompt(CHAT)
    tool = [user, {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "forty-two"}]
    ids = prompt_ids(tool)
    text = "".join(CHARS[t - len(SPECIALS)] for t in ids if t >= len(SPECIALS))
    assert "forty-two" in text

    from serving.api import Tokenizer
    from serving.server.protocol import Protocol
    from server_util import TINY_MODEL
    tiny = Protocol(Tokenizer(TINY_MODEL), 256, 101, 0, ["jaxseek-tiny"])  # its template has no tool branch
    body = json.dumps({"messages": [tool[0], tool[2]]}).encode()
    with pytest.raises(Exception, match="no place for role 'tool'"):
        tiny.prepare(body, chat=True)
    ok = tiny.prepare(json.dumps({"messages": [{"role": "developer", "content": "x"}, user]}).encode(), chat=True)
    assert ok.prompts[0] == tiny.prepare(json.dumps({"messages": [{"role": "system", "content": "x"}, user]}).encode(),
                                         chat=True).prompts[0]


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"]}}}
# DeepSeek-V3's tool-call format, made the only output the grammar allows (the random model could not
# produce it otherwise): content, then one call in the model's own tokens
V3_CALL = (f'start: "Checking." "{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\\n```json\\n" ARGS '
           f'"\\n```{CALL_END}{CALLS_END}"\nARGS: "{{\\"city\\": \\"" ("Oslo" | "Rome") "\\"}}"')


def test_auto_tool_calls_parsed_from_deepseek_tokens(server, checkpoint):
    """--tool-call-parser deepseek_v3: V3's tool-call tokens become message.tool_calls (id, name,
    arguments as a JSON string), finish_reason "tool_calls"; streamed, the name comes first, then the
    arguments, and the stream adds up to the non-streamed message."""
    kw = dict(model=checkpoint[0].name, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
              max_tokens=80, temperature=1.0, seed=5, extra_body={"structured_outputs": {"grammar": V3_CALL}})
    out = server.client.chat.completions.create(**kw).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content == "Checking."
    (call,) = out.message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Oslo", "Rome")
    content, calls, order = "", {}, []
    for chunk in server.client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            if d.index not in calls:
                calls[d.index] = [d.id, d.function.name, ""]
                order.append("name")
            calls[d.index][2] += d.function.arguments or ""
            order += ["arguments"] * bool(d.function.arguments)
        finish = chunk.choices[0].finish_reason
    assert content == "Checking." and finish == "tool_calls" and order[0] == "name" and "arguments" in order
    assert [(name, args) for _, name, args in calls.values()] == [("get_weather", call.function.arguments)]
    # tool_choice "none": the same tokens stay plain text
    none = server.client.chat.completions.create(tool_choice="none", **kw).choices[0]
    assert none.finish_reason == "stop" and none.message.tool_calls is None
    assert none.message.content.startswith("Checking." + CALLS_BEGIN)


def test_reasoning_parsed_and_grammar_after_it(server, checkpoint, llm):
    """--reasoning-parser deepseek_v3 with chat_template_kwargs.thinking: the output up to </think> is
    reasoning_content (and reasoning); a grammar applies only after </think> (vLLM's behaviour), so
    here </think> (pushed by logit_bias) passes, then the choice holds. Without thinking it is content."""
    end = 4 + CHARS.index(THINK_END)
    kw = dict(model=checkpoint[0].name, messages=CHAT, max_tokens=10, temperature=1.0, seed=2)
    thinking = {"chat_template_kwargs": {"thinking": True}, "logit_bias": {str(end): 100},
                "structured_outputs": {"choice": ["yes", "no"]}, "return_token_ids": True}
    out = server.client.chat.completions.create(extra_body=thinking, **kw).choices[0]
    assert out.model_extra["token_ids"][0] == end and out.finish_reason == "stop"
    assert out.message.model_extra["reasoning_content"] == out.message.model_extra["reasoning"] == ""
    assert out.message.content in ("yes", "no")
    chunks = list(server.client.chat.completions.create(stream=True, extra_body=thinking, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.message.content
    # no </think> ever (biased away): all of it is reasoning, and there is no content
    never = {"chat_template_kwargs": {"thinking": True}, "logit_bias": {str(end): -100}, "ignore_eos": True,
             "return_token_ids": True}
    out = server.client.chat.completions.create(extra_body=never, **kw).choices[0]
    text = llm.tokenizer.decode(out.model_extra["token_ids"])
    assert len(out.model_extra["token_ids"]) == 10 and out.message.content is None
    assert out.message.model_extra["reasoning_content"] == text.removeprefix(THINK_START)
    # without thinking the reasoning parser leaves everything as content, and the grammar holds from the start
    plain = server.client.chat.completions.create(extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
                                                  **kw).choices[0]
    assert plain.message.content in ("yes", "no") and "reasoning_content" not in plain.message.model_extra
