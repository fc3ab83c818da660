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
    """Cuts the output at the first stop string to complete, holding back text that may
    begin one.

    Each stop string has a Knuth-Morris-Pratt matcher that follows the text one character
    at a time, so a delta costs time linear in its length (times the number of stop
    strings), however long the stop strings or the output.
    """

    def __init__(self, stops: Sequence[str]):
        self.matchers = [_Matcher(s) for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Returns text safe to show now; sets ``stopped`` once a stop string appears."""
        if self.stopped:
            return ""
        text = self.pending + delta
        for i, char in enumerate(delta, start=len(self.pending)):
            for matcher in self.matchers:
                if matcher.step(char):
                    self.stopped, self.pending = True, ""
                    return text[:i + 1 - len(matcher.stop)]
        hold = max((m.matched for m in self.matchers), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        """Held-back text, released when generation ends without a stop string."""
        text, self.pending = self.pending, ""
        return text


class _Matcher:
    """How much of one stop string the text seen so far ends with."""

    def __init__(self, stop: str):
        self.stop = stop
        self.matched = 0
        # fallback[k]: the longest proper prefix of stop[:k + 1] that is also its suffix.
        self.fallback = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fallback[i] = k

    def step(self, char: str) -> bool:
        """Follow one more character; True when the stop string is complete."""
        k = self.matched
        while k and self.stop[k] != char:
            k = self.fallback[k - 1]
        if self.stop[k] == char:
            k += 1
        if k == len(self.stop):
            self.matched = 0
            return True
        self.matched = k
        return False
