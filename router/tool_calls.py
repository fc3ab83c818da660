"""Tool calling on the chat API, for a model whose chat template takes tools: the request's
``tools`` and ``tool_choice`` checked, and the model's calls parsed out of its text into
OpenAI's ``tool_calls``.

OLMo 3's instruct models write calls as Python-style calls, one per line, inside
``<function_calls>`` tags (vLLM's ``olmo3`` parser reads the same), with JSON's
null/true/false allowed as values. The server parses the calls a model makes
(``tool_choice`` auto); it does not force one (``required`` or a named function).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import uuid

from .validation import invalid

OPEN, CLOSE = "<function_calls>", "</function_calls>"
MAX_TOOLS = 64
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
JSON_NAMES = {"null": None, "true": True, "false": False}
TOOL_CHOICES = ("auto", "none")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's API carries them

    def to_openai(self) -> dict:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class AskedTools:
    """What the template renders (``tools``) and whether the answer is parsed for calls."""

    tools: list[dict]
    parse: bool


def asked_tools(body: dict, template_takes_tools: bool) -> AskedTools | None:
    """The request's tools and tool choice, checked; None when it gives none."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none"):
            raise invalid("tool_choice needs tools", "tool_choice")
        return None
    if not template_takes_tools:
        raise invalid("this model's chat template does not take tools", "tools")
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise invalid(f"tools must be a list of at most {MAX_TOOLS} functions", "tools")
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if (tool.get("type") if isinstance(tool, dict) else None) != "function" or not (
                isinstance(function, dict) and isinstance(function.get("name"), str)
                and NAME.fullmatch(function["name"])
                and isinstance(function.get("parameters", {}), dict)
                and isinstance(function.get("description", ""), str)):
            raise invalid('each tool is {"type": "function", "function": {"name": ..., '
                          '"description": ..., "parameters": {...}}}, with a name of '
                          "letters, digits and _", "tools")
    if choice is not None and choice not in TOOL_CHOICES:
        raise invalid("tool_choice must be auto or none: this server parses the calls a "
                      "model makes, it does not force one", "tool_choice")
    return AskedTools(tools, parse=choice != "none")


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]] | None:
    """(the text before the calls, or None; the calls) when ``text`` holds a well-formed
    ``<function_calls>`` block; None when it holds none (it is plain content)."""
    start = text.find(OPEN)
    if start < 0:
        return None
    end = text.find(CLOSE, start)
    block = text[start + len(OPEN):end if end >= 0 else len(text)]
    calls = []
    for line in filter(None, map(str.strip, block.splitlines())):
        call = _call(line)
        if call is None:
            return None
        calls.append(call)
    if not calls:
        return None
    return text[:start].strip() or None, calls


def _call(line: str) -> ToolCall | None:
    """``name(key=value, ...)`` with literal values, as a ToolCall; None if it is not."""
    try:
        node = ast.parse(line, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args
            and all(k.arg for k in node.keywords)):
        return None
    try:
        arguments = {k.arg: _value(k.value) for k in node.keywords}
        return ToolCall(node.func.id, json.dumps(arguments, ensure_ascii=False))
    except (ValueError, TypeError, RecursionError):
        return None


def _value(node: ast.expr):
    if isinstance(node, ast.Name) and node.id in JSON_NAMES:
        return JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_value(v) for v in node.elts]
    if isinstance(node, ast.Dict):
        return {ast.literal_eval(k): _value(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


class ToolCallStream:
    """A streamed answer's text, held back from where a ``<function_calls>`` block may
    begin, so that its calls go out whole (in the last chunk) and nothing of them as
    content."""

    def __init__(self):
        self.held = ""
        self.in_block = False

    def feed(self, text: str) -> str:
        """The part of ``text`` that is surely content, to send now."""
        if self.in_block:
            self.held += text
            return ""
        text = self.held + text
        start = text.find(OPEN)
        if start >= 0:
            self.in_block, self.held = True, text[start:]
            return text[:start]
        keep = _partial_open(text)  # the text may end in the tag's beginning
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still held, the calls) at the end of the answer."""
        parsed = parse_tool_calls(self.held) if self.in_block else None
        if parsed is None:
            return self.held, []
        return "", parsed[1]


def _partial_open(text: str) -> int:
    """How many characters at the end of ``text`` begin OPEN."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
