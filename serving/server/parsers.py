"""Output parsers of a chat choice, as vLLM's `--reasoning-parser` and `--tool-call-parser`: the
reasoning between <think> and </think> (deepseek_r1; deepseek_v3 when chat_template_kwargs.thinking),
DeepSeek-V3's tool-call tokens (deepseek_v3), and the JSON that tool_choice "required" or a named
function constrains the output to.

Each parser is one incremental state machine over the text: `feed` takes the next piece and returns
what is settled (text that might still begin a marker is held back), `finish` the rest. A
non-streamed response is `feed(whole text)` + `finish()`, so a stream's deltas add up to exactly the
non-streamed parse however the text was chunked, and each character is looked at a bounded number
of times (a 30,000-token reasoning costs no more per token than a short one).
"""

from __future__ import annotations

import dataclasses
import json
import uuid

REASONING_PARSERS = ("deepseek_r1", "deepseek_v3")
TOOL_CALL_PARSERS = ("deepseek_v3",)
THINK_START, THINK_END = "<think>", "</think>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
FENCE = "```json\n"
ARGS_END = ("\n```" + CALL_END, "```" + CALL_END)


@dataclasses.dataclass
class Delta:
    """What a piece of output settled: reasoning text, content text, tool-call events
    (index, id, name) for a new call and (index, None, None, arguments) for more of its arguments."""
    reasoning: str = ""
    content: str = ""
    calls: list = dataclasses.field(default_factory=list)  # [(index, id | None, name | None, arguments)]

    def __iadd__(self, other: "Delta") -> "Delta":
        self.reasoning += other.reasoning
        self.content += other.content
        self.calls += other.calls
        return self


def held_back(text: str, markers) -> int:
    """How many trailing characters of text may begin one of the markers (they wait for more text)."""
    for k in range(min(len(text), max(len(m) for m in markers) - 1), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


def first(text: str, markers) -> tuple[int, str | None]:
    """The earliest occurrence of any marker: (index, marker), (-1, None) if none."""
    found = [(i, m) for m in markers if (i := text.find(m)) >= 0]
    return min(found) if found else (-1, None)


class Reasoning:
    """deepseek_r1: the output is reasoning until </think>, content after it; an opening <think> at the
    start is dropped, and an output without one (R1's template opens it in the prompt) is reasoning
    from its first character. An output that never closes is all reasoning (vLLM's rule)."""

    def __init__(self):
        self.state, self.buf = "start", ""

    def feed(self, text: str, final: bool = False) -> Delta:
        self.buf += text
        out = Delta()
        if self.state == "start":
            if self.buf.startswith(THINK_START):
                self.buf = self.buf[len(THINK_START):]
            elif THINK_START.startswith(self.buf) and not final:
                return out
            self.state = "reasoning"
        if self.state == "reasoning":
            at = self.buf.find(THINK_END)
            if at < 0:
                keep = 0 if final else held_back(self.buf, (THINK_END,))
                out.reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return out
            out.reasoning, self.buf, self.state = self.buf[:at], self.buf[at + len(THINK_END):], "content"
        out.content, self.buf = self.buf, ""
        return out

    def finish(self) -> Delta:
        return self.feed("", final=True)


class NoReasoning:
    """deepseek_v3 without thinking (and no --reasoning-parser): everything is content."""

    def feed(self, text: str, final: bool = False) -> Delta:
        return Delta(content=text)

    def finish(self) -> Delta:
        return Delta()


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class DeepSeekV3Calls:
    """deepseek_v3: content, then <｜tool▁calls▁begin｜> and calls of the form
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```<｜tool▁call▁end｜>, then
    <｜tool▁calls▁end｜> (what follows it is dropped, as vLLM does). A call's name is emitted once its
    line is complete, its arguments as they arrive."""

    def __init__(self):
        self.state, self.buf, self.calls = "content", "", 0

    def feed(self, text: str, final: bool = False) -> Delta:
        self.buf += text
        out = Delta()
        while True:
            state, buf = self.state, self.buf
            if state == "content":
                at = buf.find(CALLS_BEGIN)
                if at < 0:
                    keep = 0 if final else held_back(buf, (CALLS_BEGIN,))
                    out.content += buf[:len(buf) - keep]
                    self.buf = buf[len(buf) - keep:]
                    return out
                out.content += buf[:at]
                self.buf, self.state = buf[at + len(CALLS_BEGIN):], "calls"
            elif state == "calls":  # between calls: text other than the markers is dropped
                at, marker = first(buf, (CALL_BEGIN, CALLS_END))
                if marker is None:
                    self.buf = buf[len(buf) - held_back(buf, (CALL_BEGIN, CALLS_END)):] if not final else ""
                    return out
                self.buf, self.state = buf[at + len(marker):], "type" if marker == CALL_BEGIN else "done"
            elif state == "type":
                at = buf.find(TOOL_SEP)
                if at < 0:
                    self.buf = "" if final else buf
                    return out
                self.buf, self.state = buf[at + len(TOOL_SEP):], "name"
            elif state == "name":
                at = buf.find("\n")
                if at < 0 and not final:
                    return out
                name = buf if at < 0 else buf[:at]
                out.calls.append((self.calls, call_id(), name.strip(), ""))
                self.buf, self.state = ("" if at < 0 else buf[at + 1:]), "fence"
            elif state == "fence":
                if buf.startswith(FENCE):
                    self.buf, self.state = buf[len(FENCE):], "arguments"
                elif FENCE.startswith(buf) and not final:
                    return out
                else:
                    self.state = "arguments"  # no fence: the arguments start here
            elif state == "arguments":
                at, marker = first(buf, ARGS_END)
                if marker is None:
                    keep = 0 if final else held_back(buf, ARGS_END)
                    if buf[:len(buf) - keep]:
                        out.calls.append((self.calls, None, None, buf[:len(buf) - keep]))
                    self.buf = buf[len(buf) - keep:]
                    if final:
                        self.calls += 1
                    return out
                if buf[:at]:
                    out.calls.append((self.calls, None, None, buf[:at]))
                self.buf, self.state, self.calls = buf[at + len(marker):], "calls", self.calls + 1
            else:  # done
                self.buf = ""
                return out

    def finish(self) -> Delta:
        return self.feed("", final=True)


class NamedCall:
    """tool_choice naming a function: the output is its arguments (the grammar made it JSON)."""

    def __init__(self, name: str):
        self.name, self.started = name, False

    def feed(self, text: str, final: bool = False) -> Delta:
        out = Delta()
        if not self.started and (text or final):
            out.calls.append((0, call_id(), self.name, ""))
            self.started = True
        if text:
            out.calls.append((0, None, None, text))
        return out

    def finish(self) -> Delta:
        return self.feed("", final=True)


class RequiredCalls:
    """tool_choice "required": the output is a JSON array of {"name": ..., "parameters": {...}} (vLLM's
    form, enforced by the grammar). A call is emitted when its name's string closes; its arguments are
    the text of "parameters" as generated, streamed as they arrive."""

    def __init__(self):
        self.state, self.calls = "array", -1
        self.key = self.raw = ""  # the key being read / the raw JSON string of a name
        self.depth, self.in_string, self.escaped = 0, False, False  # inside a value being copied
        self.named, self.pending = False, ""  # the current call's name is out; arguments held until it is

    def feed(self, text: str, final: bool = False) -> Delta:
        out = Delta()
        for ch in text:
            self._char(ch, out)
        return out

    def finish(self) -> Delta:
        return Delta()

    def _arguments(self, text: str, out: Delta) -> None:
        if self.key != "parameters":
            return
        if self.named:
            out.calls.append((self.calls, None, None, text))
        else:
            self.pending += text

    def _char(self, ch: str, out: Delta) -> None:
        s = self.state
        if s == "array":
            if ch == "{":
                self.calls, self.named, self.pending, self.state = self.calls + 1, False, "", "object"
            elif ch == "]":
                self.state = "done"
        elif s == "object":
            if ch == '"':
                self.key, self.state = "", "key"
            elif ch == "}":
                self.state = "array"
        elif s == "key":
            if self.escaped:
                self.key, self.escaped = self.key + ch, False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.key = json.loads(f'"{self.key}"')
                self.state = "colon"
            else:
                self.key += ch
        elif s == "colon":
            if ch == ":":
                self.state = "value"
        elif s == "value":
            if ch.isspace():
                return
            if self.key == "name" and ch == '"':
                self.raw, self.state = ch, "name"
                return
            self.depth, self.in_string, self.escaped, self.state = 0, False, False, "copy"
            self._copy(ch, out)
        elif s == "name":
            self.raw += ch
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                out.calls.append((self.calls, call_id(), json.loads(self.raw), ""))
                self.named, self.state = True, "object"
                if self.pending:
                    out.calls.append((self.calls, None, None, self.pending))
                    self.pending = ""
        elif s == "copy":
            self._copy(ch, out)

    def _copy(self, ch: str, out: Delta) -> None:
        """One character of a value (any JSON value) being copied; its end returns to the object."""
        if self.in_string:
            self._arguments(ch, out)
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
                if self.depth == 0:
                    self.state = "object"
            return
        if self.depth == 0 and (ch in ",}" or ch.isspace()):  # the end of a number or literal
            self.state = "object"
            if ch == "}":
                self.state = "array"
            return
        self._arguments(ch, out)
        if ch == '"':
            self.in_string = True
        elif ch in "[{":
            self.depth += 1
        elif ch in "]}":
            self.depth -= 1
            if self.depth == 0:
                self.state = "object"


class Message:
    """A chat choice's output as the server's parsers read it: the reasoning parser first, then the
    tool-call parser over the content (auto: --tool-call-parser; required; a named function)."""

    def __init__(self, reasoning: bool, tools: str | None, tool_name: str | None = None):
        self.reasoning = Reasoning() if reasoning else NoReasoning()
        self.tools = {"auto": DeepSeekV3Calls, "required": RequiredCalls}.get(tools, lambda: None)() \
            if tools != "named" else NamedCall(tool_name)

    def feed(self, text: str, final: bool = False) -> Delta:
        """The next piece of the choice's text (final: it is the last) -> what it settled."""
        out = self.reasoning.feed(text)
        if final:
            out += self.reasoning.finish()
        if self.tools is None:
            return out
        calls = self.tools.feed(out.content)
        if final:
            calls += self.tools.finish()
        return Delta(out.reasoning, calls.content, calls.calls)
