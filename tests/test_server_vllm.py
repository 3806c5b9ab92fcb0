"""The server as vLLM users drive it (models/jaxseek-tiny, one server for the module, an API key
required): each request feature checked against a plain reference computed here from the model's
own logits (one full forward, `net(tokens)`), API keys, several served names, and hostile inputs
(lone surrogates, 100,000-deep nesting, 10 MB bodies while a stream is in flight, bodies past the
limit), each answered with OpenAI's error JSON on a connection that stays open. Structured outputs
(every kind, sampled, n > 1, logprobs, streamed, with the tiny model's MTP drafts), grammar-enforced
tool choice, min_p / min_tokens / skip_special_tokens, /tokenize and /detokenize, unknown fields,
and malformed grammars refused while other requests go on, with nothing compiled after warm-up."""

import asyncio
import http.client
import json
import logging
import re
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from serving import LLM
from serving.server import Options, create_app, warm_up
from server_util import TINY_MODEL, serving, value, write_deployment

KEY = "test-key-1234"
NAMES = ["jaxseek-tiny", "tiny-alias"]
LIMIT = 12 * 2 ** 20  # body bytes: a 10 MB body is parsed, a 13 MB one refused
REF_LEN = 64  # reference forwards run on [4, REF_LEN] (one compilation)
GREEDY = dict(temperature=0.0)
PROMPT = "reverse 1122334455="


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    llm = LLM(TINY_MODEL, deployment=write_deployment(tmp_path_factory.mktemp("vllm") / "deployment.json"))
    warm_up(llm.engine)
    return llm


@pytest.fixture(scope="module")
def server(llm):
    options = Options(reasoning_parser="deepseek_v3")
    with serving(create_app(llm, NAMES, api_keys=[KEY], max_body_bytes=LIMIT, options=options), api_key=KEY) as running:
        running.compiled_at_start = llm.engine.compilations
        yield running


def ids_of(llm, text: str) -> list[int]:
    return llm._ids(text)  # the server's own text -> ids rule for completions (BOS, then the text)


def ref_logits(llm, seqs: list[list[int]]) -> list[np.ndarray]:
    """The model's logits over each whole sequence, by the plain full forward (causal: padding after
    a sequence changes none of its positions)."""
    assert len(seqs) <= 4 and all(len(s) <= REF_LEN for s in seqs)
    tokens = np.zeros((4, REF_LEN), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    out = np.asarray(llm.engine.net(tokens), np.float64)
    return [out[i, :len(s)] for i, s in enumerate(seqs)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def penalized(logits, prompt, output, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """vLLM's formulas (vllm/model_executor/layers/utils.py apply_penalties, after logit_bias)."""
    logits = logits.copy()
    for t, b in (bias or {}).items():
        logits[int(t)] += b
    counts = np.bincount(np.asarray(output, int), minlength=logits.shape[-1])
    seen = (counts > 0) | (np.bincount(np.asarray(prompt, int), minlength=logits.shape[-1]) > 0)
    logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - frequency * counts - presence * (counts > 0)


def assert_greedy_under(llm, prompt, output, **penalties):
    """Each output token is the argmax of the reference logits after the penalties (within float noise)."""
    logits = ref_logits(llm, [prompt + output])[0]
    for i, token in enumerate(output):
        step = penalized(logits[len(prompt) - 1 + i], prompt, output[:i], **penalties)
        assert step[token] >= step.max() - 1e-3, (i, token, int(step.argmax()))


def generate(server, prompt, **kw):
    kw = {"max_tokens": 10, **GREEDY, **kw}
    extra = {"ignore_eos": True, "return_token_ids": True, **kw.pop("extra_body", {})}
    return server.client.completions.create(model=NAMES[0], prompt=prompt, extra_body=extra, **kw)


# ---- names and keys ------------------------------------------------------------------------------
def test_api_keys(server):
    plain = httpx.Client(base_url=server.base, timeout=60)
    for path, method in (("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST")):
        for headers in ({}, {"Authorization": "Bearer wrong-key-1234"}, {"Authorization": KEY}):
            r = plain.request(method, path, headers=headers, json={"model": NAMES[0], "prompt": "x"})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["type"] == "authentication_error"
    assert plain.get("/health").status_code == 200 and plain.get("/metrics").status_code == 200  # open, as vLLM
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in server.client.models.list().data] == NAMES
    # the same connection carries a good request after a refused one
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    status, _, sock = _post(conn, json.dumps({"prompt": "x"}).encode(), key="nope")
    assert status == 401
    status, body, again = _post(conn, json.dumps({"model": NAMES[0], "prompt": "x", "max_tokens": 1}).encode())
    assert status == 200 and again is sock, body
    plain.close()


def test_several_served_names(server):
    out = server.client.completions.create(model="tiny-alias", prompt=PROMPT, max_tokens=2, **GREEDY)
    assert out.model == NAMES[0]  # the first name is the one reported
    assert server.http.get("/v1/models/tiny-alias").json()["id"] == "tiny-alias"
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="jaxseek", prompt=PROMPT, max_tokens=2)


# ---- request features against references ---------------------------------------------------------
def test_completion_logprobs_match_the_model(server, llm):
    prompt = ids_of(llm, PROMPT)
    out = generate(server, PROMPT, logprobs=3)
    c = out.choices[0]
    logp = log_softmax(ref_logits(llm, [prompt + c.token_ids])[0])
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(c.token_ids) == 10
    for i, token in enumerate(c.token_ids):
        row = logp[len(prompt) - 1 + i]
        assert lp.tokens[i] == llm.tokenizer.tok.decode([token], skip_special_tokens=False)
        assert abs(lp.token_logprobs[i] - row[token]) < 1e-4
        top = np.argsort(-row)[:3]
        want = {llm.tokenizer.tok.decode([int(t)], skip_special_tokens=False): row[t] for t in top}
        assert set(lp.top_logprobs[i]) == set(want) | {lp.tokens[i]}
        for text, v in want.items():
            assert abs(lp.top_logprobs[i][text] - v) < 1e-4
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    zero = generate(server, PROMPT, logprobs=0).choices[0].logprobs  # logprobs: 0, the sampled token only
    assert zero.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert [list(d) for d in zero.top_logprobs] == [[t] for t in lp.tokens]
    streamed = list(generate(server, PROMPT, logprobs=3, stream=True))
    assert [v for ch in streamed for v in ch.choices[0].logprobs.token_logprobs] == \
        pytest.approx(lp.token_logprobs, abs=1e-5)
    assert generate(server, PROMPT).choices[0].logprobs is None  # not asked: none computed or sent


def test_chat_logprobs_match_the_model(server, llm):
    messages = [{"role": "user", "content": "sort 3141="}]
    out = server.client.chat.completions.create(model=NAMES[0], messages=messages, max_tokens=5, logprobs=True,
                                                top_logprobs=2, extra_body={"ignore_eos": True,
                                                                            "return_token_ids": True}, **GREEDY)
    tokens = out.choices[0].model_extra["token_ids"]
    prompt = llm.chat_prompt(messages)
    logp = log_softmax(ref_logits(llm, [prompt + tokens])[0])
    content = out.choices[0].logprobs.content
    assert len(content) == len(tokens) == 5
    for i, (entry, token) in enumerate(zip(content, tokens)):
        row = logp[len(prompt) - 1 + i]
        assert entry.token == llm.tokenizer.tok.decode([token], skip_special_tokens=False)
        assert abs(entry.logprob - row[token]) < 1e-4 and entry.bytes == list(entry.token.encode())
        assert [abs(t.logprob - row[int(k)]) < 1e-4 for t, k in zip(entry.top_logprobs, np.argsort(-row)[:2])] == \
            [True, True]


@pytest.mark.parametrize("penalties", [dict(repetition=1.6), dict(presence=1.0, frequency=0.9)])
def test_penalties_match_vllm_formulas(server, llm, penalties):
    text = "add 12+34="  # an answer that repeats itself once its EOS is ignored: penalties bite
    prompt = ids_of(llm, text)
    plain = generate(server, text, max_tokens=12).choices[0].token_ids
    names = {"repetition": "repetition_penalty", "presence": "presence_penalty", "frequency": "frequency_penalty"}
    body = {names[k]: v for k, v in penalties.items()}
    out = generate(server, text, max_tokens=12, extra_body=body).choices[0].token_ids
    assert out != plain  # the penalties changed the output
    assert_greedy_under(llm, prompt, out, **penalties)
    # alongside other requests in one batch, and streamed, the same tokens
    again = generate(server, [text, PROMPT], max_tokens=12, n=2, extra_body=body)
    assert again.choices[0].token_ids == again.choices[1].token_ids == out
    assert again.choices[2].token_ids == again.choices[3].token_ids != out


def test_logit_bias_matches_reference(server, llm):
    prompt = ids_of(llm, PROMPT)
    plain = generate(server, PROMPT).choices[0].token_ids
    bias = {str(plain[1]): -100, "90": 3.0}
    out = generate(server, PROMPT, logit_bias=bias).choices[0].token_ids
    assert out != plain and plain[1] not in out
    assert_greedy_under(llm, prompt, out, bias=bias)


def test_n_choices_and_seeds(server):
    kw = dict(max_tokens=6, temperature=1.0, seed=7)
    out = generate(server, PROMPT, n=3, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    tokens = [c.token_ids for c in out.choices]
    assert len({tuple(t) for t in tokens}) > 1  # n samples, not one repeated
    assert [c.token_ids for c in generate(server, PROMPT, n=3, **kw).choices] == tokens  # the seed fixes them
    assert out.usage.prompt_tokens == len(out.model_extra["prompt_token_ids"][0])  # the prompt once
    assert out.usage.completion_tokens == 18
    two = generate(server, [PROMPT, "sort 4321="], n=2, max_tokens=3, **GREEDY)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].token_ids == two.choices[1].token_ids != two.choices[2].token_ids
    chunks = list(generate(server, PROMPT, n=3, stream=True, **kw))
    for i in range(3):
        assert [t for ch in chunks for c in ch.choices if c.index == i for t in c.token_ids] == tokens[i]
    chat = server.client.chat.completions.create(model=NAMES[0], messages=[{"role": "user", "content": "sort 21="}],
                                                 n=2, max_tokens=3, **GREEDY)
    assert [c.index for c in chat.choices] == [0, 1]


def test_echo(server, llm):
    plain = generate(server, PROMPT, max_tokens=5).choices[0].text
    out = generate(server, PROMPT, max_tokens=5, echo=True).choices[0].text
    assert out == PROMPT + plain  # the prompt's text (its BOS prints nothing), then the completion
    streamed = "".join(ch.choices[0].text for ch in generate(server, PROMPT, max_tokens=5, echo=True, stream=True))
    assert streamed == out
    ids = [5, 30, 31]  # token ids are echoed as their text
    assert generate(server, ids, max_tokens=2, echo=True).choices[0].text.startswith(llm.tokenizer.decode(ids))


# ---- hostile input -------------------------------------------------------------------------------
def _post(conn, body: bytes, key: str = KEY, path: str = "/v1/completions"):
    """-> (status, json, socket): the socket tells whether the connection was kept."""
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                   "Authorization": f"Bearer {key}"})
    r = conn.getresponse()
    data = json.loads(r.read())
    assert not r.will_close, "the server closed the keep-alive connection"
    return r.status, data, conn.sock


def _ok(conn, sock):
    status, body, again = _post(conn, json.dumps({"model": NAMES[0], "prompt": "sort 21=", "max_tokens": 2}).encode())
    assert status == 200 and body["choices"][0]["text"] is not None and again is sock


@pytest.mark.parametrize("body", [
    b'{"model": "jaxseek-tiny", "prompt": "abc\\ud800def"}',
    b'{"model": "jaxseek-tiny", "prompt": "x", "stop": ["\\udfff"]}',
    b'{"model": "jaxseek-tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}',
], ids=["prompt", "stop", "chat"])
def test_lone_surrogate(server, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    status, error, sock = _post(conn, body, path=path)
    assert status == 400 and error["error"]["code"] == "invalid_json" and "surrogate" in error["error"]["message"]
    _ok(conn, sock)


@pytest.mark.parametrize("where", ["body", "prompt"])
def test_deep_nesting(server, where):
    deep = b"[" * 100_000 + b"]" * 100_000
    body = deep if where == "body" else b'{"model": "jaxseek-tiny", "prompt": ' + deep + b"}"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    status, error, sock = _post(conn, body)
    assert status == 400 and error["error"]["code"] == "invalid_json", error
    _ok(conn, sock)


def test_big_bodies_while_a_stream_is_in_flight(server):
    """10 MB bodies are parsed and refused off the event loop: a stream in flight keeps getting
    tokens, /health answers within a second; a body past the limit gets 413; connections stay open."""
    arrivals, health, done = [], [], threading.Event()

    def stream():
        with httpx.Client(base_url=server.base, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            body = {"model": NAMES[0], "prompt": "sort 21=", "max_tokens": 110, "ignore_eos": True, "stream": True,
                    "temperature": 0, "return_token_ids": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append((time.perf_counter(), len(json.loads(line[6:])["choices"][0]["token_ids"])))
        done.set()

    def poll():
        with httpx.Client(base_url=server.base, timeout=30) as c:
            while not done.is_set():
                start = time.perf_counter()
                assert c.get("/health").status_code == 200
                health.append(time.perf_counter() - start)
                time.sleep(0.05)

    threads = [threading.Thread(target=stream), threading.Thread(target=poll)]
    for t in threads:
        t.start()
    while not arrivals:
        time.sleep(0.01)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    text = json.dumps({"model": NAMES[0], "prompt": "a" * 10_000_000}).encode()
    ids = json.dumps({"model": NAMES[0], "prompt": [22] * 2_500_000}).encode()
    sent_at = time.perf_counter()
    for body in (text, ids):
        assert len(body) >= 10_000_000
        status, error, sock = _post(conn, body)
        assert status == 400 and error["error"]["code"] == "context_length_exceeded", error
    status, error, sock = _post(conn, b'{"prompt": "' + b"a" * (13 * 2 ** 20) + b'"}')
    assert status == 413 and error["error"]["code"] == "request_too_large"
    finished_at = time.perf_counter()
    _ok(conn, sock)
    for t in threads:
        t.join(120)
    assert sum(n for _, n in arrivals) == 110  # every token came
    assert sum(n for t, n in arrivals if t < sent_at) < 50  # the stream was in flight all along
    end = min(finished_at, arrivals[-1][0])
    gaps = np.diff([sent_at] + [t for t, _ in arrivals if sent_at < t < end] + [end])
    assert gaps.max() < 1.0, gaps.max()  # tokens kept coming while the big bodies were handled
    assert health and max(health) < 1.0, max(health)


# ---- structured outputs, tools, the rest of vLLM's request surface --------------------------------
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "sure": {"type": "boolean"}, "tag": {"enum": ["a", "b", "c"]}},
          "required": ["answer", "sure", "tag"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}, "days": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: an empty object
GRAMMAR = 'start: "sum(" NUM "," NUM ")"\nNUM: /[0-9]{1,3}/'


def valid_answer(v) -> bool:
    return isinstance(v, dict) and set(v) == {"answer", "sure", "tag"} and type(v["answer"]) is int and \
        0 <= v["answer"] <= 999 and type(v["sure"]) is bool and v["tag"] in ("a", "b", "c")


def json_object_prefix(text: str) -> bool:
    """Whether text begins some JSON object: closed by one of a few completions, it parses as one."""
    stack, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return False
        elif ch == '"':
            in_string = True
    closers = "".join(reversed(stack))
    base = text + ("n\"" if in_string and escaped else '"' if in_string else "")
    for extra in ("", "0", ":0", '"":0', "e", "ue", "rue", "se", "lse", "l", "ll", "ull"):
        try:
            if isinstance(json.loads(base + extra + closers), dict):
                return True
        except json.JSONDecodeError:
            pass
    return False


def valid_call(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "now":
        return args == {}
    return name == "weather" and set(args) == {"city", "days"} and args["city"] in ("Oslo", "Rome") and \
        type(args["days"]) is int and 1 <= args["days"] <= 7


def test_structured_outputs_every_kind(server):
    """Each kind, sampled over many seeds (temperature 1, MTP drafts verified against the grammar), in
    one concurrent batch: every output parses and validates; n > 1, logprobs and streaming too; and
    nothing compiles after warm-up."""
    chat = [{"role": "user", "content": "sort 3141="}]

    async def one(client, kind, seed):
        kw = dict(model=NAMES[0], max_tokens=100, temperature=1.0, seed=seed)
        if kind == "json_schema":
            out = await client.chat.completions.create(messages=chat, n=2, response_format={
                "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}, **kw)
            return kind, [(c.message.content, c.finish_reason) for c in out.choices]
        if kind == "stream":
            stream = await client.chat.completions.create(messages=chat, stream=True, extra_body={"guided_json": SCHEMA},
                                                          **kw)
            text, finish = "", None
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            return kind, [(text, finish)]
        if kind == "json_object":
            out = await client.chat.completions.create(messages=chat, response_format={"type": "json_object"}, **kw)
            return kind, [(out.choices[0].message.content, out.choices[0].finish_reason)]
        body = {"regex": {"regex": r"(yes|no)-[0-9]{2,4}"}, "choice": {"choice": ["red", "green", "blue"]},
                "grammar": {"grammar": GRAMMAR}, "gbnf": {"grammar": 'root ::= "up" | "down"'}}[kind]
        out = await client.completions.create(prompt=PROMPT, logprobs=2, extra_body={"structured_outputs": body}, **kw)
        c = out.choices[0]
        assert all(-9999 <= v <= 0 for v in c.logprobs.token_logprobs)
        return kind, [(c.text, c.finish_reason)]

    async def main():
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, kind, seed) for kind in
                                          ("json_schema", "stream", "json_object", "regex", "choice", "grammar", "gbnf")
                                          for seed in range(6)))

    before = server.metrics()
    results = asyncio.run(main())
    checks = {"json_schema": lambda t: valid_answer(json.loads(t)), "stream": lambda t: valid_answer(json.loads(t)),
              "json_object": lambda t: isinstance(json.loads(t), dict),
              "regex": lambda t: re.fullmatch(r"(yes|no)-[0-9]{2,4}", t), "choice": lambda t: t in ("red", "green", "blue"),
              "grammar": lambda t: re.fullmatch(r"sum\([0-9]{1,3},[0-9]{1,3}\)", t), "gbnf": lambda t: t in ("up", "down")}
    outputs = {}
    for kind, pairs in results:
        for text, finish in pairs:
            if kind == "json_object" and finish == "length":  # free keys and strings can outrun max_tokens
                assert json_object_prefix(text), text
                continue
            assert finish == "stop" and checks[kind](text), (kind, text, finish)
            outputs.setdefault(kind, set()).add(text)
    assert all(len(outputs[k]) > 1 for k in ("json_schema", "regex", "grammar"))  # sampled, not one string
    after = server.metrics()
    assert value(after, "jaxseek_compilations_total") == value(before, "jaxseek_compilations_total") == \
        server.compiled_at_start
    assert value(after, "jaxseek_spec_decode_num_drafts_total") > value(before, "jaxseek_spec_decode_num_drafts_total")


def test_tool_choice_required_and_named(server):
    """tool_choice "required" and a named function are grammars from the tools' schemas: valid calls
    from the embedded model (which spells JSON), streamed as vLLM streams them (the name first, then
    argument deltas) and equal to the non-streamed call with the same seed."""
    messages = [{"role": "user", "content": "weather?"}]
    named = {"type": "function", "function": {"name": "weather"}}

    async def one(client, choice, seed):
        # (parallel_tool_calls false: one call, which fits the 128-token context)
        kw = dict(model=NAMES[0], messages=messages, tools=[WEATHER, NOW], tool_choice=choice, max_tokens=100,
                  temperature=0.8, seed=seed, parallel_tool_calls=seed % 2 == 0)
        whole = (await client.chat.completions.create(**kw)).choices[0]
        streamed, firsts, finish = {}, [], None
        async for chunk in await client.chat.completions.create(stream=True, **kw):
            for d in chunk.choices[0].delta.tool_calls or []:
                if d.index not in streamed:
                    firsts.append(d)
                    streamed[d.index] = [d.function.name, ""]
                else:
                    assert d.id is None and not d.function.name  # the name comes once, first
                streamed[d.index][1] += d.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        return choice, whole, [tuple(v) for _, v in sorted(streamed.items())], firsts, finish

    async def main():
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, choice, seed) for choice in ("required", named)
                                          for seed in range(4)))

    for choice, whole, streamed, firsts, finish in asyncio.run(main()):
        want = "tool_calls" if choice == "required" else "stop"
        calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert whole.finish_reason == want and calls and all(valid_call(*c) for c in calls), whole
        assert all(c.id.startswith("chatcmpl-tool-") and c.type == "function" for c in whole.message.tool_calls)
        assert choice == "required" or calls[0][0] == "weather"
        assert streamed == calls and finish == want
        assert all(d.id.startswith("chatcmpl-tool-") and d.function.name for d in firsts)


def test_min_tokens_min_p_skip_special_tokens(server, llm):
    plain = generate(server, "reverse 12=", max_tokens=8, extra_body={"ignore_eos": False}).choices[0]
    assert plain.finish_reason == "stop" and len(plain.token_ids) < 6  # the model ends this one early
    held = generate(server, "reverse 12=", max_tokens=8, extra_body={"ignore_eos": False, "min_tokens": 6})
    assert len(held.choices[0].token_ids) >= 6 and 1 not in held.choices[0].token_ids[:6]  # EOS masked until then
    # min_p 1: only the most likely token survives, so sampling is greedy
    greedy = generate(server, PROMPT, max_tokens=8).choices[0].token_ids
    assert generate(server, PROMPT, max_tokens=8, temperature=1.0, seed=3, extra_body={"min_p": 1.0}).choices[0] \
        .token_ids == greedy
    kw = dict(max_tokens=8, extra_body={"ignore_eos": False, "include_stop_str_in_output": True})
    shown = generate(server, "reverse 12=", **kw).choices[0].text
    kw["extra_body"]["skip_special_tokens"] = False
    assert generate(server, "reverse 12=", **kw).choices[0].text == shown + "<｜end▁of▁sentence｜>"
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        generate(server, PROMPT, max_tokens=4, extra_body={"min_tokens": 5})


def test_tokenize_detokenize_and_chat_template_options(server, llm):
    plain = httpx.Client(base_url=server.base, timeout=60)  # outside /v1: no API key needed, as vLLM's
    out = plain.post("/tokenize", json={"model": NAMES[0], "prompt": PROMPT, "return_token_strs": True}).json()
    assert out["tokens"] == ids_of(llm, PROMPT) and out["count"] == len(out["tokens"]) and out["max_model_len"] == 128
    assert "".join(out["token_strs"][1:]) == PROMPT
    bare = plain.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()["tokens"]
    assert bare == out["tokens"][1:]
    assert plain.post("/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": PROMPT}
    messages = [{"role": "user", "content": "sort 21="}, {"role": "assistant", "content": "12"}]
    chat = plain.post("/tokenize", json={"messages": messages[:1]}).json()["tokens"]
    assert chat == llm.chat_prompt(messages[:1])
    # continue_final_message: the assistant's message left open; add_generation_prompt false: no turn opened
    head = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    opened = plain.post("/tokenize", json={"messages": messages, "continue_final_message": True}).json()["tokens"]
    assert llm.tokenizer.decode(opened, skip_special_tokens=False) + "<｜end▁of▁sentence｜>" == head
    closed = plain.post("/tokenize", json={"messages": messages[:1], "add_generation_prompt": False}).json()["tokens"]
    assert closed == chat[:-1]  # without the final <｜Assistant｜>
    for path, body in (("/detokenize", {"tokens": [5, 101]}), ("/tokenize", {"prompt": 5}),
                       ("/tokenize", {"messages": messages, "add_generation_prompt": True,
                                      "continue_final_message": True})):
        r = plain.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
    # the same options through chat completions
    cont = server.client.chat.completions.create(model=NAMES[0], messages=messages, max_tokens=2, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "return_token_ids": True})
    assert cont.model_extra["prompt_token_ids"][0] == opened
    plain.close()


def test_unknown_fields_are_ignored_with_one_warning(server, caplog):
    with caplog.at_level(logging.WARNING, logger="serving.server"):
        for _ in range(2):
            out = generate(server, PROMPT, max_tokens=2, extra_body={"frobnicate": 1, "beam_width": 4})
            assert out.choices[0].finish_reason == "length"
    warned = [r.getMessage() for r in caplog.records if "is not supported by this server and is ignored" in r.getMessage()]
    assert sorted(warned) == ["request field 'beam_width' is not supported by this server and is ignored",
                              "request field 'frobnicate' is not supported by this server and is ignored"]


def test_hostile_grammars_refused_while_a_stream_goes_on(server):
    """Malformed and huge schemas, regexes that match nothing the vocabulary spells, bad grammars: each a
    400 naming its field, while a constrained stream already running finishes untouched."""
    kw = dict(model=NAMES[0], prompt=PROMPT, max_tokens=60, temperature=0, stream=True,
              extra_body={"structured_outputs": {"regex": "[0-9]{50}"}, "return_token_ids": True})
    stream = server.client.completions.create(**kw)
    first = next(iter(stream))
    huge = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(20_000)},
            "required": [f"k{i}" for i in range(20_000)]}
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
              "response_format"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
             ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
             ({"structured_outputs": {"regex": "[^\\s\\S]"}}, "structured_outputs"),
             ({"structured_outputs": {"regex": "é+"}}, "structured_outputs"),  # no token spells it
             ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
             ({"structured_outputs": {"grammar": "start: missing_rule"}}, "structured_outputs"),
             ({"structured_outputs": {"choice": []}}, "structured_outputs"),
             ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
             ({"guided_json": huge}, "guided_json"),
             ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),  # no --enable-auto-tool-choice here
             ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
             ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name")]
    for extra, param in cases:
        chat = "tools" in extra
        body = {"model": NAMES[0], "max_tokens": 5, **extra,
                **({"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": PROMPT})}
        r = server.http.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
        assert r.status_code == 400, (extra, r.text[:300])
        error = r.json()["error"]
        assert error["param"] == param and error["message"], error
    tokens = first.choices[0].token_ids + [t for chunk in stream for t in chunk.choices[0].token_ids]
    text = server.http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert re.fullmatch("[0-9]{50}", text), text
