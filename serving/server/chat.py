"""A chat request's prompt and tools: messages checked and rendered by the chat template (the
checkpoint's or --chat-template's) with `tools`, chat_template_kwargs, add_generation_prompt and
continue_final_message; tool_choice resolved as vLLM does (auto needs --enable-auto-tool-choice and
a --tool-call-parser; "required" and a named function become a grammar built from the tools'
JSON schemas, so they work on any tokenizer that can spell JSON)."""

from __future__ import annotations

import dataclasses
import json

import jinja2

from serving.server.errors import ApiError, bad

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none" | "auto" (parsed by --tool-call-parser) | "required" | "named"
    name: str | None = None  # the named function
    schema: dict | None = None  # the grammar's JSON schema (required, named)


def check_tools(tools) -> list[dict]:
    """OpenAI's tools: [{"type": "function", "function": {"name", "description"?, "parameters"?}}]."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad(f"tools must be a list of function tools, got {type(tools).__name__}", "tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}', f"tools[{i}]")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}].function.name must be a non-empty string", f"tools[{i}].function.name")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}].function.parameters")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad(f"tools name the same function twice: {sorted(n for n in set(names) if names.count(n) > 1)}", "tools")
    return tools


def _parameters(tool: dict) -> dict:
    """The function's parameter schema; one without parameters takes an empty object."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


def resolve_tool_choice(choice, tools: list[dict], auto_parser: str | None, parallel: bool = True) -> ToolChoice:
    """vLLM's rules: no tool_choice means "auto" when tools are given; "auto" needs the server's tool
    parser; "required" (a JSON array of calls; one call without parallel_tool_calls) and a named function
    (its arguments) are grammars."""
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return ToolChoice("none")
    if not tools:
        raise bad(f"tool_choice {choice!r} needs tools", "tool_choice")
    if choice == "auto":
        if auto_parser is None:
            raise bad('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
                      '(or send tool_choice "none", "required" or a named function)', "tool_choice")
        return ToolChoice("auto")
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                   "parameters": _parameters(t)},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        return ToolChoice("required", schema={"type": "array", "minItems": 1, "items": {"anyOf": calls},
                                              **({} if parallel else {"maxItems": 1})})
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        match = [t for t in tools if t["function"]["name"] == name]
        if not match:
            raise bad(f"tool_choice names function {name!r}, which is not in tools "
                      f"({', '.join(t['function']['name'] for t in tools)})", "tool_choice")
        return ToolChoice("named", name, _parameters(match[0]))
    raise bad(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": {{"name": '
              f'...}}}}, got {choice!r}', "tool_choice")


def check_messages(messages) -> list[dict]:
    """The messages as the template sees them: content parts joined, developer -> system."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages",
                  "missing_required_parameter" if messages is None else "invalid_value")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
        if m["role"] not in ROLES:
            raise bad(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content",
                          "unsupported")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        calls = m.get("tool_calls")
        if calls is not None and (not isinstance(calls, list) or any(
                not isinstance(c, dict) or not isinstance(c.get("function"), dict) or
                not isinstance(c["function"].get("name"), str) for c in calls)):
            raise bad(f"messages[{i}].tool_calls must be a list of {{\"function\": {{\"name\", \"arguments\"}}}}",
                      f"messages[{i}].tool_calls")
        if calls is not None:  # DeepSeek's templates concatenate the arguments: a JSON string, as OpenAI sends
            calls = [{**c, "type": c.get("type", "function"), "function": {**c["function"], "arguments": (
                a if isinstance(a := c["function"].get("arguments", "{}"), str) else json.dumps(a))}} for c in calls]
            m = {**m, "tool_calls": calls}
        # OpenAI's developer messages are the system messages of newer models; templates know "system"
        clean.append({**m, "role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return clean


def render(tokenizer, messages: list[dict], tools: list[dict], options: dict, template: str | None,
           callable_tools: bool = True) -> str:
    """The prompt text; a tool message, or a tool the output may call (callable_tools: tool_choice is
    not "none"), that the template has no place for is refused, never dropped."""
    add_generation_prompt, continue_final = options["add_generation_prompt"], options["continue_final_message"]
    if add_generation_prompt and continue_final and options["add_generation_prompt_given"]:
        raise bad("add_generation_prompt and continue_final_message cannot both be true", "continue_final_message")
    if continue_final and messages[-1]["role"] != "assistant":
        raise bad("continue_final_message needs the last message to be the assistant's", "continue_final_message")
    try:
        text = tokenizer.apply_chat_template(messages, tools, add_generation_prompt, continue_final, template,
                                             **options["kwargs"])
    except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:
        raise bad(f"the chat template rejected the messages: {e}", "messages") from None
    for i, m in enumerate(messages):
        if m["role"] == "tool" and m["content"] and m["content"] not in text:
            raise bad(f"messages[{i}]: this model's chat template has no place for role 'tool' messages",
                      f"messages[{i}].role", "unsupported")
    if callable_tools and not all(t["function"]["name"] in text for t in tools):
        raise bad("this model's chat template has no place for tools (serve it with a --chat-template that "
                  "renders them, as vLLM's examples/tool_chat_template_deepseekv3.jinja does, or send "
                  'tool_choice "none")', "tools", "unsupported")
    return text


def template_options(body: dict) -> dict:
    """chat_template_kwargs, add_generation_prompt (default true), continue_final_message (default false)."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad(f"chat_template_kwargs must be an object, got {kwargs!r}", "chat_template_kwargs")
    reserved = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})
    if reserved:
        raise bad(f"chat_template_kwargs may not set {', '.join(reserved)} (they are request fields)",
                  "chat_template_kwargs")
    out = {"kwargs": kwargs, "add_generation_prompt_given": "add_generation_prompt" in body}
    for name, default in (("add_generation_prompt", True), ("continue_final_message", False)):
        value = body.get(name, default)
        if not isinstance(value, bool):
            raise bad(f"{name} must be a boolean, got {value!r}", name)
        out[name] = value
    if body.get("chat_template") is not None:
        raise ApiError(400, "a chat_template in the request is not accepted (a template runs code on the server): "
                       "start the server with --chat-template", "chat_template", "unsupported")
    return out
