"""OpenAI tool calling on `/v1/chat/completions`: `tools`, `tool_choice`, `message.tool_calls`.

The model sees the tools through its chat template (`apply_chat_template(tools=...)`) when the
template reads them; a template that does not (SmolLM2's, for one) gets them in a system
message of ours, which asks for calls in the Hermes form the parser below reads:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

`tool_choice`:
- "none": the tools are left out of the prompt and the answer is plain text;
- "auto" (the default with tools): the answer is free; the calls in it (Hermes `<tool_call>`
  blocks, Mistral's `[TOOL_CALLS]` list or a bare Llama-3 JSON call, `parse_tool_calls`) become
  `tool_calls`, the text around them `content`;
- "required": the answer is constrained (a JSON schema) to a list of one or more calls of the
  given tools, each `{"name", "arguments"}` with the function's own parameter schema (one call
  only with `parallel_tool_calls: false`);
- a named function: the answer is constrained to that function's arguments.

Earlier turns travel back as OpenAI sends them: assistant messages with `tool_calls` and `tool`
messages with the results; for a template without tool support they are written as Hermes
`<tool_call>` / `<tool_response>` text.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

from lightserve.httpserver.errors import validation_error
from lightserve.httpserver.structured import checked_grammar
from lightserve.io_struct import Grammar

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: ToolFunction


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def openai(self, index: Optional[int] = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        return body if index is None else {"index": index, **body}


@dataclass
class ToolPlan:
    """What a chat request does with its tools."""

    tools: list[Tool]
    mode: str  # "none" | "auto" | "required" | "named"
    named: Optional[str] = None
    grammar: Optional[Grammar] = None  # the constraint of "required" and "named"

    @property
    def in_prompt(self) -> bool:
        return bool(self.tools) and self.mode != "none"

    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """(content, calls) of an answer; without calls, the text is the content."""
        if self.mode == "named":
            return None, [ToolCall(self.named, _compact(text))]
        if self.mode == "required":
            try:
                calls = json.loads(text)
            except ValueError:  # cut short by max_tokens: no calls, the text as it is
                return text, []
            return None, [ToolCall(c["name"], json.dumps(c["arguments"])) for c in calls]
        if self.mode == "auto":
            return parse_tool_calls(text)
        return text, []

    @property
    def holds_text(self) -> bool:
        """Whether a stream keeps the answer until it ends (constrained calls are not content)."""
        return self.mode in ("required", "named")


def plan_tools(tools: Optional[list[Tool]], choice: Optional[ToolChoice], parallel: Optional[bool]) -> ToolPlan:
    """Check `tools` / `tool_choice` / `parallel_tool_calls` and build the request's plan."""
    tools = tools or []
    if len(tools) > MAX_TOOLS:
        raise validation_error(f"`tools`: at most {MAX_TOOLS} tools", "tools")
    names = [t.function.name for t in tools]
    for i, name in enumerate(names):
        if not _NAME.match(name):
            raise validation_error(f"`tools[{i}].function.name` must be 1-64 letters, digits, `_`, `.` or `-`",
                                   f"tools[{i}].function.name")
    if len(set(names)) != len(names):
        raise validation_error("`tools`: function names must be unique", "tools")
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools and choice != "none":
        raise validation_error("`tool_choice` needs `tools`", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise validation_error(f"`tool_choice`: no tool is named `{choice.function.name}`", "tool_choice")
        tool = tools[names.index(choice.function.name)]
        grammar = checked_grammar("json_schema", json.dumps(_parameters(tool)), "tools")
        return ToolPlan(tools, "named", choice.function.name, grammar)
    if choice == "required":
        call = {"anyOf": [{"type": "object",
                           "properties": {"name": {"const": t.function.name}, "arguments": _parameters(t)},
                           "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
        schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
        if parallel is False:
            schema["maxItems"] = 1
        return ToolPlan(tools, "required", grammar=checked_grammar("json_schema", json.dumps(schema), "tools"))
    for i, tool in enumerate(tools):  # "auto" and "none" compile nothing: check the schemas anyway
        checked_grammar("json_schema", json.dumps(_parameters(tool)), f"tools[{i}].function.parameters")
    return ToolPlan(tools, choice)


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object", "properties": {}}


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text))
    except ValueError:  # cut short by max_tokens: the text as it is
        return text


# ---- the prompt --------------------------------------------------------------------------------


def template_reads_tools(chat_template: Optional[str]) -> bool:
    return bool(chat_template) and "tools" in chat_template


def tools_system_prompt(tools: list[Tool]) -> str:
    """The tools as a system message, for templates that do not render `tools` themselves."""
    lines = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
    return ("You have access to the functions below, each given as a JSON object with the JSON schema of its "
            "parameters.\n<tools>\n" + lines + "\n</tools>\n"
            "To call functions, answer with one block per call and nothing else, each of the form\n"
            '<tool_call>\n{"name": "function name", "arguments": {"parameter": "value"}}\n</tool_call>')


def hermes_call_text(calls: list[dict[str, Any]]) -> str:
    """An assistant turn's `tool_calls` written as the Hermes blocks the model is asked to produce."""
    blocks = []
    for call in calls:
        function = call.get("function", {})
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass
        blocks.append("<tool_call>\n" + json.dumps({"name": function.get("name"), "arguments": arguments}) + "\n</tool_call>")
    return "\n".join(blocks)


# ---- parsing an answer -------------------------------------------------------------------------

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
OPEN_TAG = "<tool_call>"


MISTRAL_TAG = "[TOOL_CALLS]"


def parse_tool_calls(text: str) -> tuple[Optional[str], list[ToolCall]]:
    """The calls in a free answer, in the forms the supported families' models write them:
    Hermes `<tool_call>` blocks (Qwen2, and what our system message asks for), Mistral's
    `[TOOL_CALLS] [{...}, ...]`, or an answer that is nothing but one JSON call object or a
    list of them (Llama 3's `{"name": ..., "parameters": ...}`). Anything else is content."""
    stripped = text.strip()
    if stripped.startswith(MISTRAL_TAG):
        stripped = stripped[len(MISTRAL_TAG):].strip()
    if stripped[:1] in ("{", "["):
        try:
            value = json.loads(stripped)
        except ValueError:
            value = None
        items = value if isinstance(value, list) else [value]
        calls = [_call_of(json.dumps(item)) for item in items] if items and value is not None else []
        if calls and all(calls):
            return None, calls  # type: ignore[return-value]
    return parse_hermes(text)


def parse_hermes(text: str) -> tuple[Optional[str], list[ToolCall]]:
    """`<tool_call>{json}</tool_call>` blocks (a last one may lack its closing tag) as calls;
    the text outside them is the content (None when only whitespace). A block that is not a
    JSON object with a string `name` stays in the content."""
    calls: list[ToolCall] = []
    content: list[str] = []
    pos = 0
    blocks = list(_HERMES.finditer(text))
    tail_start = text.find(OPEN_TAG, blocks[-1].end() if blocks else 0)
    spans = [(m.start(), m.end(), m.group(1)) for m in blocks]
    if tail_start >= 0:
        spans.append((tail_start, len(text), text[tail_start + len(OPEN_TAG):].strip()))
    for start, end, body in spans:
        call = _call_of(body)
        if call is None:
            continue
        content.append(text[pos:start])
        calls.append(call)
        pos = end
    content.append(text[pos:])
    rest = "".join(content)
    return (rest if rest.strip() else None), calls


def _call_of(body: str) -> Optional[ToolCall]:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return ToolCall(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


class ContentStream:
    """Streams the content of an "auto" answer while holding back whatever might be the start
    of a call; everything from the first call on waits for the end. With `hold_all` (a forced
    call: the answer is the call) nothing goes out before the end."""

    def __init__(self, hold_all: bool = False) -> None:
        self.text = ""
        self.sent = 0
        self.in_call = hold_all

    def feed(self, piece: str) -> str:
        """The content that can go out now."""
        self.text += piece
        if self.in_call:
            return ""
        head = self.text.lstrip()
        if self.sent == 0 and (not head or head[0] in "{["):
            # Nothing sent yet, and the answer may be a whole call (Mistral's `[TOOL_CALLS]` list,
            # a bare JSON call): all of it waits for the end, where `parse_tool_calls` decides.
            self.in_call = bool(head)
            return ""
        at = self.text.find(OPEN_TAG, self.sent)
        if at >= 0:
            self.in_call = True
            out, self.sent = self.text[self.sent:at], at
            return out
        # Keep back a tail that could still grow into the opening tag.
        keep = next((k for k in range(min(len(OPEN_TAG) - 1, len(self.text) - self.sent), 0, -1)
                     if OPEN_TAG.startswith(self.text[-k:])), 0)
        out, self.sent = self.text[self.sent:len(self.text) - keep], len(self.text) - keep
        return out
