"""What a Generate request must satisfy before any worker sees it, checked against the
model's facts as its workers report them."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import grpc

from protos import generation_pb2, worker_pb2
from protos.errors import ServingError
from protos.sampling import MAX_TOP_LOGPROBS, controls_problem, grammar_parts, grammar_problem
from protos.setting import setting

DEFAULT_MAX_TOKENS = 16
MAX_CACHE_SALT_CHARS = 256


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """Bounds checked before any expensive work (tokenizing, scheduling)."""

    max_prompt_bytes: int = setting(256 * 1024, "a text prompt's UTF-8 bytes, checked before "
                                                "tokenizing")
    max_stop_strings: int = setting(16, "stop strings one request may give")
    max_stop_chars: int = setting(256, "characters in each stop string")
    # Every decode step compares each new token with them: many would slow the streams
    # beside the request on its worker.
    max_stop_token_ids: int = setting(64, "stop token ids one request may give")
    max_request_id_chars: int = setting(256, "characters in a client's request id")
    # Each entry is a logit to move at every step of the request.
    max_logit_bias: int = setting(300, "logit_bias entries one request may give")


def within_model(limits: RequestLimits, tokenizer, context_window: int) -> RequestLimits:
    """``limits`` with ``max_prompt_bytes`` no more than a prompt that fits the context
    window can have: a token stands for at most the bytes of the vocabulary's longest,
    and twice that, as a normalizer may compose characters (leaving fewer bytes to
    tokenize). A longer prompt is refused by its size, without tokenizing it."""
    if tokenizer is None:
        return limits
    ids = [[i] for i in range(tokenizer.get_vocab_size(with_added_tokens=True))]
    longest = max(len(text.encode()) for text in
                  tokenizer.decode_batch(ids, skip_special_tokens=False))
    bound = 2 * context_window * max(1, longest)
    if bound >= limits.max_prompt_bytes:
        return limits
    return dataclasses.replace(limits, max_prompt_bytes=bound)


def max_request_bytes(limits: RequestLimits, context_window: int) -> int:
    """The largest GenerateRequest on the wire: a prompt at the byte limit or of a context
    window of token ids (5 bytes each at most), and room for the other fields."""
    return max(limits.max_prompt_bytes, 5 * context_window) + 64 * 1024


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    vocab_size: int
    context_window: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def of(cls, layout: worker_pb2.ModelLayout) -> ModelFacts:
        return cls(layout.vocab_size, layout.context_window, tuple(layout.eos_token_ids))


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # the word OpenAI's clients look for


def invalid(message: str, param: str | None = None, reason: str | None = None
            ) -> ServingError:
    """INVALID_ARGUMENT, naming the field (as the OpenAI API calls it)."""
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message, param, reason)


def too_long(context_window: int, prompt_tokens: int, max_tokens: int | None = None
             ) -> ServingError:
    """A request the context window cannot hold, in the words clients' fallbacks (shorten,
    summarize) look for."""
    asked = (f"the prompt has {prompt_tokens} tokens" if max_tokens is None else
             f"{prompt_tokens + max_tokens} tokens were asked for ({prompt_tokens} in the "
             f"prompt, max_tokens {max_tokens})")
    return invalid(f"This model's maximum context length is {context_window} tokens; "
                   f"{asked}", "prompt", CONTEXT_LENGTH_EXCEEDED)


def check_limits(request: generation_pb2.GenerateRequest, limits: RequestLimits,
                 facts: ModelFacts) -> None:
    """Refuse what is too large to look at further, before tokenizing anything."""
    kind = request.WhichOneof("prompt")
    if kind == "text":
        check_prompt_text(request.text, limits)
    if kind == "token_ids" and len(request.token_ids.ids) > facts.context_window:
        raise too_long(facts.context_window, len(request.token_ids.ids))
    if len(request.request_id) > limits.max_request_id_chars:
        raise invalid(f"request_id has more than {limits.max_request_id_chars} characters",
                      "request_id")
    stops = request.sampling.stop
    if len(stops) > limits.max_stop_strings:
        raise invalid(f"{len(stops)} stop strings; at most {limits.max_stop_strings}", "stop")
    if any(len(stop) > limits.max_stop_chars for stop in stops):
        raise invalid(f"a stop string has more than {limits.max_stop_chars} characters",
                      "stop")
    stop_ids = len(request.sampling.stop_token_ids)
    if stop_ids > limits.max_stop_token_ids:
        raise invalid(f"{stop_ids} stop token ids; at most {limits.max_stop_token_ids}",
                      "stop_token_ids")
    if len(request.sampling.logit_bias) > limits.max_logit_bias:
        raise invalid(f"{len(request.sampling.logit_bias)} logit_bias entries; at most "
                      f"{limits.max_logit_bias}", "logit_bias")
    if len(request.cache_salt) > MAX_CACHE_SALT_CHARS:
        raise invalid(f"cache_salt has more than {MAX_CACHE_SALT_CHARS} characters",
                      "cache_salt")
    check_grammar(request.sampling.structured_output)


def check_grammar(grammar: generation_pb2.StructuredOutput,
                  param: str = "structured_output") -> None:
    """A structured output's grammar within the bounds every decode worker holds it to."""
    parts = grammar_parts(grammar)
    problem = parts and grammar_problem(*parts)
    if problem:
        raise invalid(problem, param)


def check_prompt_text(text: str, limits: RequestLimits) -> None:
    """A text prompt no larger than ``limits.max_prompt_bytes``: characters first (never
    more than bytes), so that a huge one is refused without encoding it."""
    limit = limits.max_prompt_bytes
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise invalid(f"the prompt has more than {limit} bytes, more than the context "
                      "window can hold", "prompt", CONTEXT_LENGTH_EXCEEDED)


def cache_salt_digest(salt: str) -> bytes:
    """What workers get of a request's ``cache_salt``: a fixed-size digest (never the
    client's text), or nothing for the shared cache."""
    return hashlib.blake2b(salt.encode(), digest_size=16).digest() if salt else b""


def validate(request: generation_pb2.GenerateRequest, prompt_ids: list[int],
             facts: ModelFacts) -> worker_pb2.Sampling:
    """Check a request against the model; returns the sampling to send to the decode worker.

    Raises ServingError(INVALID_ARGUMENT) naming the first thing wrong.
    """
    s = request.sampling
    if not prompt_ids:
        raise invalid("the prompt is empty", "prompt")
    bad = [t for t in prompt_ids if t >= facts.vocab_size]
    if bad:
        raise invalid(f"token id {bad[0]} is outside the vocabulary of {facts.vocab_size}",
                      "prompt")
    max_tokens = s.max_tokens or DEFAULT_MAX_TOKENS
    if len(prompt_ids) + max_tokens > facts.context_window:
        raise too_long(facts.context_window, len(prompt_ids), max_tokens)
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise invalid(f"temperature must be >= 0, got {s.temperature}", "temperature")
    if not math.isfinite(s.top_p) or not 0 <= s.top_p <= 1:
        raise invalid(f"top_p must be in [0, 1], got {s.top_p}", "top_p")
    if any(not stop for stop in s.stop):
        raise invalid("stop strings must not be empty", "stop")
    bad = [t for t in s.stop_token_ids if t >= facts.vocab_size]
    if bad:
        raise invalid(f"stop token id {bad[0]} is outside the vocabulary", "stop_token_ids")
    if s.top_logprobs > MAX_TOP_LOGPROBS:
        raise invalid(f"top_logprobs must be at most {MAX_TOP_LOGPROBS}, got "
                      f"{s.top_logprobs}", "top_logprobs")
    problem = controls_problem(s.presence_penalty, s.frequency_penalty, s.repetition_penalty,
                               s.logit_bias, s.min_tokens, max_tokens, facts.vocab_size)
    if problem is not None:
        raise invalid(problem[1], problem[0])
    if s.ignore_eos and s.HasField("structured_output"):
        raise invalid("ignore_eos cannot be used with a structured output (its end is EOS)",
                      "ignore_eos")
    return worker_pb2.Sampling(
        max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        has_seed=s.HasField("seed"), seed=s.seed, stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos, logprobs=s.logprobs or s.top_logprobs > 0,
        top_logprobs=s.top_logprobs, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=0.0 if s.repetition_penalty == 1.0 else s.repetition_penalty,
        logit_bias=dict(s.logit_bias), min_tokens=s.min_tokens,
        prompt_logprobs=s.prompt_logprobs, structured_output=s.structured_output,
        no_speculation=s.no_speculation)
