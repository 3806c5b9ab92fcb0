"""The chat output parsers (serving/server/parsers.py) on DeepSeek-format strings: R1's reasoning
(with and without the opening <think>, never closed), V3's tool-call tokens (several calls, content
before them, arguments with newlines and backticks, truncated outputs) and tool_choice "required"'s
JSON array: each streamed in arbitrary chunkings equals the non-streamed parse, which equals what
was written."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from serving.server.parsers import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP, Message

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
NAME = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=3), max_leaves=6)


def run(message_args, text: str, cuts: list[int]) -> tuple[str, str, list]:
    """Streams text cut at `cuts`, then finishes; -> (reasoning, content, calls [(id, name, args)])."""
    parser = Message(*message_args)
    reasoning, content, calls = "", "", {}
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        d = parser.feed(text[a:b], final=i == len(bounds) - 2)
        reasoning += d.reasoning
        content += d.content
        for index, cid, name, args in d.calls:
            if cid is not None:
                assert index not in calls  # a call's name comes once, first
                calls[index] = [cid, name, ""]
            calls[index][2] += args
    return reasoning, content, [(name, args) for _, name, args in (calls[i] for i in sorted(calls))]


def same_streamed(message_args, text, cuts):
    whole = run(message_args, text, [])
    assert run(message_args, text, cuts) == whole
    return whole


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT, st.booleans(), st.booleans(), st.lists(st.integers(0, 200), max_size=12))
def test_reasoning_streamed_equals_whole(thought, answer, opened, closed, cuts):
    thought, answer = thought.replace("</think>", ""), answer
    text = ("<think>" if opened else "") + thought + ("</think>" + answer if closed else "")
    reasoning, content, calls = same_streamed((True, None), text, cuts)
    assert reasoning == thought and calls == []
    assert content == (answer if closed else "")


def v3_call(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{args}\n```{CALL_END}"


@settings(max_examples=300, deadline=None)
@given(TEXT, st.lists(st.tuples(NAME, JSON_VALUE), min_size=1, max_size=3), st.booleans(),
       st.lists(st.integers(0, 400), max_size=12), st.sampled_from([None, 0.3, 0.7]))
def test_deepseek_v3_calls_streamed_equal_whole(before, calls, thinking, cuts, truncate):
    before = before.replace("<｜", "")
    wanted = [(name, json.dumps(value, indent=1)) for name, value in calls]  # multi-line arguments
    text = before + CALLS_BEGIN + "\n".join(v3_call(n, a) for n, a in wanted) + CALLS_END
    if thinking:
        text = "<think>\nweigh the tools</think>" + text
    if truncate is not None:  # an output cut short by max_tokens: still the same parse streamed or not
        same_streamed((thinking, "auto"), text[:int(len(text) * truncate)], cuts)
        return
    reasoning, content, got = same_streamed((thinking, "auto"), text, cuts)
    assert content == before and got == wanted
    assert reasoning == ("\nweigh the tools" if thinking else "")


def test_deepseek_v3_plain_text_and_backticks():
    text = "no tools here, but ``` and <｜tool▁call is text"
    assert run((False, "auto"), text, [3, 9, 20]) == ("", text, [])
    args = '{"code": "print(1)\\n```"}'  # backticks inside the arguments do not end them
    assert run((False, "auto"), CALLS_BEGIN + v3_call("run", args) + CALLS_END, [5, 50]) == ("", "", [("run", args)])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAME, st.dictionaries(st.text(max_size=6), JSON_VALUE, max_size=3)), min_size=1,
                max_size=3), st.sampled_from([None, 1, 2]), st.lists(st.integers(0, 300), max_size=12))
def test_required_calls_streamed_equal_whole(calls, indent, cuts):
    text = json.dumps([{"name": n, "parameters": p} for n, p in calls], indent=indent)
    reasoning, content, got = same_streamed((False, "required"), text, cuts)
    assert content == "" and [n for n, _ in got] == [n for n, _ in calls]
    assert [json.loads(a) for _, a in got] == [p for _, p in calls]


@given(JSON_VALUE, st.lists(st.integers(0, 100), max_size=8))
def test_named_call_streamed_equals_whole(value, cuts):
    text = json.dumps({"x": value})
    assert same_streamed((False, "named", "get_it"), text, cuts) == ("", "", [("get_it", text)])
