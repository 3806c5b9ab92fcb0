"""The server as vLLM users drive it (models/jaxseek-tiny, one server for the module, an API key
required): each request feature checked against a plain reference computed here from the model's
own logits (one full forward, `net(tokens)`), API keys, several served names, and hostile inputs
(lone surrogates, 100,000-deep nesting, 10 MB bodies while a stream is in flight, bodies past the
limit), each answered with OpenAI's error JSON on a connection that stays open."""

import http.client
import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from serving import LLM
from serving.server import create_app, warm_up
from server_util import TINY_MODEL, serving, write_deployment

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
    with serving(create_app(llm, NAMES, api_keys=[KEY], max_body_bytes=LIMIT), api_key=KEY) as running:
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
