"""A config dataclass field that carries its own help text: the one place a setting is
described, for ``--help``, the README's reference and the code alike (cluster/settings.py
reads it back)."""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A field with ``default`` and ``help``; ``metadata`` may add ``choices`` or
    ``derived`` (set by the code from other settings, never by a user)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})
