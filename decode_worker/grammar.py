"""Structured output on the decode worker: grammars compiled with xgrammar for the model's
vocabulary, and each sequence's place in its grammar (which tokens it may take next).

xgrammar, and the torch and transformers it imports (a quarter of a gigabyte, two
seconds), is optional (``pip install 'olmo-disagg[structured]'``) and loaded on the first
request with a grammar; without it such requests are refused, the others are served.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import grpc
import numpy as np

from pipeline.ops import OutputGrammar
from protos.errors import ServingError
from protos.vocabulary import GrammarKind

# A grammar compiles within this, or its request is refused (the router's Reserve call,
# which waits for it, allows 10 s). The first one also loads xgrammar and the vocabulary.
COMPILE_WAIT_S = 4.0
LOAD_WAIT_S = 4.0
# Compiled grammars kept for reuse, in xgrammar's measure of their size.
CACHE_BYTES = 128 * 2**20
# A row whose mask allows tokens in at most this many of its 64-token words is held to
# them by id; one that allows more is masked in a pass over the vocabulary. Most rows
# under a JSON grammar allow a handful of tokens.
SPARSE_WORDS = 32
# A greedy row under a grammar that allows many tokens tries the model's next likeliest
# this many times (a pass over the vocabulary each) before it masks the whole row.
GREEDY_TRIES = 3
_BIT = np.arange(64)
# Any JSON object, as OpenAI's json_object asks.
ANY_OBJECT = '{"type": "object"}'
# xgrammar's errors begin with where in its C++ they were raised.
_ERROR_ORIGIN = re.compile(r"^\[[^\]]*\] \S+:\d+: ")


def refused(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


class GrammarState:
    """One sequence's place in its grammar."""

    def __init__(self, matcher):
        self.matcher = matcher
        self._taken: int | None = None  # a token moved past ahead of its acceptance

    def take_if_allowed(self, token: int) -> bool:
        """Move past ``token`` now if the grammar allows it: a greedy pick that the grammar
        allows costs no mask. Its ``accept`` follows."""
        if self.matcher.accept_token(token):
            self._taken = token
            return True
        return False

    def accept(self, token: int) -> bool:
        """Move past ``token``; False (and no move) if the grammar does not allow it."""
        if self._taken is not None:
            taken, self._taken = self._taken, None
            return token == taken
        return self.matcher.accept_token(token)


def constrain(logits: np.ndarray, states: Mapping[int, GrammarState],
              greedy: Mapping[int, int]) -> dict[int, int]:
    """Hold each row of ``[batch, vocab]`` logits to its grammar (``states``, by row).
    A plain greedy row (``greedy``: its pick from the raw logits) is answered with the
    likeliest token its grammar allows, in the returned dict (its logits are of no more
    use, and may have been changed); every other row has the tokens its grammar does not
    allow set to -inf, in place."""
    vocab = logits.shape[1]
    # A bit per token, set where allowed, in words of 64 (xgrammar fills int32s).
    bits = np.zeros((len(states), -(-vocab // 64) * 2), np.int32)
    words = bits.view(np.uint64)
    picks = {}
    for k, (row, state) in enumerate(states.items()):
        pick = greedy.get(row)
        if pick is not None and state.take_if_allowed(pick):
            continue  # the model's own pick is allowed: it stands
        if not state.matcher.fill_next_token_bitmask(bits, k):
            continue  # every token allowed
        some = np.flatnonzero(words[k])
        if len(some) <= SPARSE_WORDS:  # few allowed (most of JSON's structure): by id
            allowed = np.unpackbits(words[k, some].view(np.uint8), bitorder="little")
            ids = (some[:, None] * 64 + _BIT).ravel()[allowed.view(bool)]
            ids = ids[ids < vocab]
            if pick is not None:
                picks[row] = int(ids[np.argmax(logits[row, ids])])
            else:
                kept = logits[row, ids]
                logits[row] = -np.inf
                logits[row, ids] = kept
            continue
        if pick is not None:  # many allowed (inside a string): the next likeliest may be
            for _ in range(GREEDY_TRIES):
                logits[row, pick] = -np.inf
                pick = int(np.argmax(logits[row]))
                if (bits[k, pick >> 5] >> (pick & 31)) & 1:
                    picks[row] = pick
                    break
            if row in picks:
                continue
        # Many allowed: deny the rest, in a pass over the vocabulary.
        denied = np.unpackbits(~bits[k].view(np.uint8), bitorder="little",
                               count=vocab).view(bool)
        np.putmask(logits[row], denied, -np.inf)
        if pick is not None:
            picks[row] = int(np.argmax(logits[row]))
    return picks


class GrammarCompiler:
    """Compiles one model's grammars on a thread of its own, one at a time, at the lowest
    CPU priority (a decode step never waits for a compile), keeps the compiled ones (least
    recently used go first), and starts sequences in them.

    A compile cannot be interrupted. One that takes longer than its wait is refused and
    runs on to its end (a grammar's bounds bound it too); until then the compiler refuses
    new grammars at once (UNAVAILABLE: another worker may take them) rather than queue
    them behind it. Grammars it holds are served all the same."""

    def __init__(self, model_dir: Path | None, vocab_size: int, eos_ids: Iterable[int]):
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile",
                                            initializer=_lowest_priority)
        self._xgr = None  # the xgrammar module and its compiler, once loaded
        self._compiler = None
        self._compiled: collections.OrderedDict[OutputGrammar, object] = (
            collections.OrderedDict())
        self._compiled_bytes = 0
        self._overdue: Future | None = None  # a compile still running past its wait
        self._lock = threading.Lock()

    def compile(self, grammar: OutputGrammar):
        """The compiled grammar (xgrammar's), or ServingError: INVALID_ARGUMENT (no
        xgrammar, no tokenizer, a grammar that does not compile or not in time),
        UNAVAILABLE (an earlier grammar's compile is running past its time)."""
        problem = grammar.problem()
        if problem:
            raise refused(problem)
        with self._lock:
            if grammar in self._compiled:
                self._compiled.move_to_end(grammar)
                return self._compiled[grammar]
            if self._overdue is not None and not self._overdue.done():
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "this worker is still "
                                   "compiling an earlier grammar that ran past its time")
            wait = COMPILE_WAIT_S + (0.0 if self._compiler is not None else LOAD_WAIT_S)
            future = self._executor.submit(self._compile, grammar)
        try:
            compiled = future.result(timeout=wait)
        except FutureTimeout:
            with self._lock:
                if not future.cancel():  # running: it holds the compile thread till done
                    self._overdue = future
            raise refused(f"the {grammar.kind} did not compile within {wait:g} s; "
                          "simplify it") from None
        self._keep(grammar, compiled)
        return compiled

    def _keep(self, grammar: OutputGrammar, compiled) -> None:
        with self._lock:
            if grammar in self._compiled:
                return
            self._compiled[grammar] = compiled
            self._compiled_bytes += compiled.memory_size_bytes
            while self._compiled_bytes > CACHE_BYTES and len(self._compiled) > 1:
                _, dropped = self._compiled.popitem(last=False)
                self._compiled_bytes -= dropped.memory_size_bytes

    def start(self, compiled, stop_ids: Iterable[int], accepted: Iterable[int] = ()
              ) -> GrammarState:
        """A sequence at the start of ``compiled``, past the ``accepted`` tokens (its output
        before a resume); it ends on one of ``stop_ids``."""
        state = GrammarState(self._xgr.GrammarMatcher(
            compiled, override_stop_tokens=sorted(set(stop_ids))))
        for token in accepted:
            if not state.accept(token):
                raise refused(f"the output so far (token {token}) does not follow the "
                              "grammar")
        return state

    def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- on the compile thread --------------------------------------------------------

    def _compile(self, grammar: OutputGrammar):
        compiler = self._loaded()
        try:
            match grammar.kind:
                case GrammarKind.JSON_SCHEMA | GrammarKind.JSON_OBJECT:
                    # Compact JSON: free whitespace would let a model pad it without end.
                    return compiler.compile_json_schema(
                        grammar.source or ANY_OBJECT, any_whitespace=False, strict_mode=True)
                case GrammarKind.REGEX:
                    return compiler.compile_regex(grammar.source)
                case GrammarKind.CHOICE:
                    return compiler.compile_grammar("root ::= " + " | ".join(
                        json.dumps(option, ensure_ascii=False) for option in grammar.choices))
                case GrammarKind.EBNF:
                    return compiler.compile_grammar(grammar.source)
        except RuntimeError as exc:  # how xgrammar says a grammar is wrong
            why = _ERROR_ORIGIN.sub("", str(exc).strip().splitlines()[0])
            raise refused(f"the {grammar.kind} does not compile: {why}") from None
        raise AssertionError(grammar.kind)

    def _loaded(self):
        """xgrammar's compiler for this model's vocabulary, made on first use (on the
        compile thread, the only one that calls this)."""
        if self._compiler is None:
            self._compiler = self._load()
        return self._compiler

    def _load(self):
        try:
            import xgrammar
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise refused("structured output needs xgrammar on the decode workers: "
                          "pip install 'olmo-disagg[structured]'") from None
        tokenizer = self.model_dir / "tokenizer.json" if self.model_dir else None
        if tokenizer is None or not tokenizer.is_file():
            raise refused("structured output needs the model's tokenizer.json")
        info = xgrammar.TokenizerInfo.from_huggingface(
            PreTrainedTokenizerFast(tokenizer_file=str(tokenizer)), vocab_size=self.vocab_size,
            stop_token_ids=self.eos_ids)
        self._xgr = xgrammar
        # Compiled grammars are kept here (``compile``): xgrammar's cache would hold each
        # twice.
        return xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)


def _lowest_priority() -> None:
    """Run this thread (the compile thread) at nice 19, where the OS allows it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: compile all the same
        pass
