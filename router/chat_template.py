"""A model's chat template (``tokenizer_config.json``), rendered as transformers renders it:
Jinja in a sandbox, blocks trimmed, with ``raise_exception`` and the special tokens."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from protos.errors import ServingError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent)
        env.globals["raise_exception"] = _raise
        self.source = source
        self.template = env.from_string(source)
        self.special_tokens = special_tokens
        # A template that reads ``tools`` renders them (a tool-calling model's).
        self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))

    @classmethod
    def of_model(cls, model_dir: Path) -> ChatTemplate | None:
        """The template in the model folder's tokenizer_config.json, or None."""
        path = Path(model_dir) / "tokenizer_config.json"
        if not path.is_file():
            return None
        config = json.loads(path.read_text())
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            return None
        tokens = {name: _token_text(config.get(name)) for name in SPECIAL_TOKENS}
        return cls(source, tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        """The prompt for ``messages`` (and ``tools``, for a template that takes them);
        ServingError(INVALID_ARGUMENT) if the template refuses them."""
        try:
            return self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        tools=tools, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the chat template refused the messages: {exc}") from exc


def _token_text(token) -> str:
    """A special token as tokenizer_config.json gives it: a string or {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content", "")
    return token or ""


def _raise(message: str):
    raise jinja2.TemplateError(message)
