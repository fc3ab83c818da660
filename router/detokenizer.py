"""Incremental detokenization with stop strings: text deltas that never split a character
and never show any part of a stop string."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

_INCOMPLETE = "\ufffd"  # what a byte-level decoder shows for a partial UTF-8 sequence


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window (the previous delta's tokens plus the new ones) rather than
    everything so far, and holds a delta back while it ends in a partial character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.skip_ids = frozenset(skip_ids)
        self.ids: list[int] = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        if token_id in self.skip_ids:
            return ""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if full.endswith(_INCOMPLETE) or len(full) <= len(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


class StopStringFilter:
    """Cuts the output at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Returns text safe to show now; sets ``stopped`` once a stop string appears."""
        if self.stopped:
            return ""
        text = self.pending + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.pending = True, ""
            return text[:cut]
        hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])),
                   default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        """Held-back text, released when generation ends without a stop string."""
        text, self.pending = self.pending, ""
        return text
