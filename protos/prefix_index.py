"""Which cached sequences hold which token prefixes, page by page, least recently used first.

A sequence's tokens are cut into pages of ``page_size``; page i is named by a hash of its
tokens chained with page i-1's name, so equal names mean equal prefixes. The hash is
cryptographic: with Python's own, a client could craft a prompt whose pages collide with
another client's and fork from (and so read out) their K/V. Matching a new prompt walks
its pages until a name is unknown: the longest cached prefix, in whole pages (the pages a
forked sequence shares with its parent). A salt (a request's ``cache_salt``, digested by
the router) starts the chain: prompts under different salts share no page name, so no
cached prefix, and time to first token tells one client nothing of another's prompts.

Workers index their prefix caches with it; the router, fed with what it sent where,
estimates each worker's cache with the same page names. It lives here, beside the wire
contract, because both sides must name pages alike and the router imports no model.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import hashlib
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Match:
    """The longest cached prefix of some tokens: held by ``key`` (a sequence id, or any
    hashable the caller keys entries by), ``tokens`` long; ``key`` is None on a miss."""

    key: object | None
    tokens: int


MISS = Match(None, 0)


class PrefixIndex:
    def __init__(self, page_size: int = 16, max_entries: int | None = None):
        self.page_size = page_size
        self.max_entries = max_entries  # beyond it, ``add`` drops the least recently used
        self._holders: dict[bytes, dict[object, None]] = {}  # page name -> entries (ordered)
        self._entries: collections.OrderedDict[object, tuple[bytes, ...]] = (
            collections.OrderedDict())  # key -> its page names; oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def pages(self, tokens: Sequence[int], salt: bytes = b"") -> tuple[bytes, ...]:
        """The names of the whole pages of ``tokens`` under ``salt``."""
        names, name = [], hashlib.blake2b(salt, digest_size=16).digest() if salt else b""
        for begin in range(0, len(tokens) - self.page_size + 1, self.page_size):
            page = array.array("Q", tokens[begin:begin + self.page_size]).tobytes()
            name = hashlib.blake2b(name + page, digest_size=16).digest()
            names.append(name)
        return tuple(names)

    def match(self, tokens: Sequence[int], touch: bool = True,
              names: Sequence[bytes] | None = None, salt: bytes = b"") -> Match:
        """The longest cached prefix of ``tokens`` under ``salt`` (or of the pages
        ``names``, when given: ``pages(tokens, salt)`` computed once for several indexes);
        the entry holding it becomes the most recently used unless ``touch`` is False."""
        best = MISS
        if names is None:
            names = self.pages(tokens, salt)
        for count, name in enumerate(names, start=1):
            holders = self._holders.get(name)
            if not holders:
                break
            best = Match(next(reversed(holders)), count * self.page_size)
        if touch and best.key is not None:
            self._entries.move_to_end(best.key)
        return best

    def add(self, key: object, tokens: Sequence[int], salt: bytes = b"") -> list[object]:
        """Index ``key`` as holding ``tokens`` under ``salt`` (whole pages only); returns
        the entries it pushed out (``max_entries``), for the caller to free."""
        return self.add_pages(key, self.pages(tokens, salt))

    def add_pages(self, key: object, names: Sequence[bytes]) -> list[object]:
        """``add``, of pages already named (as a worker's KV events name them)."""
        self.remove(key)
        names = tuple(names)
        self._entries[key] = names
        for name in names:
            self._holders.setdefault(name, {})[key] = None
        dropped = []
        while self.max_entries is not None and len(self._entries) > self.max_entries:
            dropped.append(self.pop_oldest())
        return dropped

    def redundant(self, key: object) -> list[object]:
        """Other entries whose every whole page ``key`` holds too."""
        names = self._entries.get(key, ())
        return [other for count, name in enumerate(names, start=1)
                for other in self._holders.get(name, ())
                if other != key and len(self._entries[other]) == count]

    def remove(self, key: object) -> None:
        for name in self._entries.pop(key, ()):
            holders = self._holders.get(name)
            if holders is not None:
                holders.pop(key, None)
                if not holders:
                    del self._holders[name]

    def pop_oldest(self) -> object:
        """Forget the least recently used entry; returns its key."""
        key = next(iter(self._entries))
        self.remove(key)
        return key

    def keys(self) -> list[object]:
        """Every entry, least recently used first."""
        return list(self._entries)

    def names(self, key: object) -> tuple[bytes, ...]:
        """The page names ``key`` holds (none if it is not indexed)."""
        return self._entries.get(key, ())
