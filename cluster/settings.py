"""Settings as data: each leaf field of a nested config dataclass is one setting, one name.

A setting's YAML key (``router.kv_weight``), its command-line flag (``--router-kv-weight``)
and the attribute the code reads (``config.router.kv_weight``) are all derived from the
field, so none can drift from the others. A field's ``metadata`` may carry ``help`` (for
``--help`` and the README's reference), ``choices``, or ``derived`` (set by the code from
other settings, never by a user).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import os
import types
import typing
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Setting:
    path: tuple[str, ...]        # ("router", "kv_weight")
    kind: type                   # int, float, str, bool, dict or an Enum
    optional: bool               # None is a value
    default: Any
    help: str = ""
    choices: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        return "--" + "-".join(self.path).replace("_", "-")


def settings(kind: type, prefix: tuple[str, ...] = ()) -> list[Setting]:
    """Every setting of config dataclass ``kind``, depth first, in field order."""
    hints = typing.get_type_hints(kind)
    found = []
    for field in dataclasses.fields(kind):
        if field.metadata.get("derived"):
            continue
        base, optional = _unwrap(hints[field.name])
        path = (*prefix, field.name)
        if dataclasses.is_dataclass(base):
            found += settings(base, path)
            continue
        default = (field.default if field.default is not dataclasses.MISSING
                   else field.default_factory())  # type: ignore[misc]
        choices = tuple(m.value for m in base) if _is_enum(base) else ()
        found.append(Setting(path, base, optional, default, field.metadata.get("help", ""),
                             tuple(field.metadata.get("choices", choices))))
    return found


def build(kind: type, raw: Any, where: str = "") -> Any:
    """An instance of config dataclass ``kind`` from a YAML mapping: unknown keys, wrong
    types and failed checks raise ConfigError naming the key (and the closest valid one)."""
    if isinstance(raw, kind):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(kind) if not f.metadata.get("derived")}
    for key in raw:
        if key not in fields:
            raise ConfigError(unknown_key(_join(where, key), kind, where))
    hints = typing.get_type_hints(kind)
    values = {name: value_of(hints[name], fields[name], value, _join(where, name))
              for name, value in raw.items()}
    try:
        return kind(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def unknown_key(key: str, kind: type, where: str) -> str:
    """The refusal of an unknown key, with the closest valid one when there is one."""
    here = [s.key for s in settings(kind, tuple(where.split(".")) if where else ())]
    by_leaf = {}  # each leaf name's first full key, e.g. "kv_weight": "router.kv_weight"
    for full in here:
        by_leaf.setdefault(full.rsplit(".", 1)[-1], full)
    leaf = key.rsplit(".", 1)[-1]
    close = (difflib.get_close_matches(key, here, n=1, cutoff=0.6)
             or difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6))
    close = [by_leaf.get(close[0], close[0])] if close else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def add_flags(parser: argparse.ArgumentParser, kind: type,
              select: Callable[[Setting], bool] = lambda s: True) -> None:
    """One flag per selected setting of ``kind``; a flag left out leaves the setting to
    the config file or its default (argparse.SUPPRESS: absent from the namespace)."""
    for s in settings(kind):
        if not select(s):
            continue
        shown = s.default.value if isinstance(s.default, enum.Enum) else s.default
        text = f"{s.help} (default: {json.dumps(shown)})" if s.help else None
        common = {"dest": s.key, "default": argparse.SUPPRESS, "help": text}
        if s.kind is bool:
            parser.add_argument(s.flag, action=argparse.BooleanOptionalAction, **common)
        else:
            parser.add_argument(s.flag, type=flag_parser(s), choices=s.choices or None,
                                metavar=None if s.choices else s.path[-1].upper(), **common)


def given(args: argparse.Namespace, kind: type) -> dict[str, Any]:
    """The settings of ``kind`` set on the command line, as a nested mapping."""
    keys = {s.key for s in settings(kind)}
    nested: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in keys:
            *sections, leaf = key.split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
    return nested


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s keys laid over it, section by section."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def reference(kind: type) -> str:
    """The markdown table of every setting (README, "Configuration"): key, default, help."""
    rows = ["| key | default | what it sets |", "| --- | --- | --- |"]
    for s in settings(kind):
        default = s.default.value if isinstance(s.default, enum.Enum) else s.default
        rows.append(f"| `{s.key}` | `{json.dumps(default)}` | {s.help} |")
    return "\n".join(rows) + "\n"


def value_of(hint: Any, field: dataclasses.Field, value: Any, key: str) -> Any:
    """``value`` as the field of type ``hint`` holds it (a section built, an enum from its
    name, an int as a float); ConfigError naming ``key`` when it cannot be one."""
    base, optional = _unwrap(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be null")
    if dataclasses.is_dataclass(base):
        return build(base, value, key)
    if _is_enum(base):
        try:
            return base(value)
        except ValueError:
            raise ConfigError(f"{key} must be one of {', '.join(m.value for m in base)}, "
                              f"got {value!r}") from None
    choices = field.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {_article(base)}, got {value!r}")
    return value


def flag_parser(s: Setting) -> Callable[[str], Any]:
    """What turns a flag's text into the setting's value (YAML's null as none)."""
    convert: Callable[[str], Any] = json.loads if s.kind is dict else s.kind
    if _is_enum(s.kind):
        convert = str

    def parse(text: str) -> Any:
        if s.optional and text.lower() in ("null", "none"):
            return None
        return convert(text)

    parse.__name__ = s.kind.__name__  # argparse names it in "invalid int value"
    return parse


def _unwrap(hint: Any) -> tuple[type, bool]:
    """(the type, whether None is allowed) of ``X``, ``X | None`` or ``dict[K, V]``."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    return (typing.get_origin(hint) or hint), optional


def _is_enum(kind: type) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


def _article(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping"}.get(kind, kind.__name__)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
