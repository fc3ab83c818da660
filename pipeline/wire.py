"""Stage operations to and from their protobuf messages (stage.proto, worker.proto)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protos import generation_pb2, stage_pb2, worker_pb2
from protos.errors import ServingError, status_code, status_number
from protos.sampling import grammar_parts
from protos.vocabulary import GrammarKind

from .chain import StageChain
from .ops import (
    Admission,
    Expectation,
    ForwardBatch,
    ForwardResult,
    OutputGrammar,
    Release,
    SamplingConfig,
    SequenceSlice,
    StageAddress,
    TokenLogprobs,
)


def sampling_from_proto(s: worker_pb2.Sampling) -> SamplingConfig:
    return SamplingConfig(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p or 1.0,
        top_k=s.top_k, seed=s.seed if s.has_seed else None,
        stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
        logprobs=s.logprobs, top_logprobs=s.top_logprobs,
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty or 1.0,
        logit_bias=tuple(sorted(s.logit_bias.items())), min_tokens=s.min_tokens,
        prompt_ids=tuple(s.prompt_ids),
        prior_output_ids=tuple(s.prior_output_ids), prompt_logprobs=s.prompt_logprobs,
        grammar=grammar_from_proto(s.structured_output), no_speculation=s.no_speculation)


def grammar_from_proto(g: generation_pb2.StructuredOutput) -> OutputGrammar | None:
    parts = grammar_parts(g)
    return OutputGrammar(*parts) if parts else None


def grammar_to_proto(g: OutputGrammar | None) -> generation_pb2.StructuredOutput | None:
    if g is None:
        return None
    if g.kind is GrammarKind.CHOICE:
        return generation_pb2.StructuredOutput(
            choice=generation_pb2.Choices(options=list(g.choices)))
    message = generation_pb2.StructuredOutput()
    setattr(message, g.kind.value, True if g.kind is GrammarKind.JSON_OBJECT else g.source)
    return message


def sampling_to_proto(c: SamplingConfig) -> worker_pb2.Sampling:
    return worker_pb2.Sampling(
        max_tokens=c.max_tokens, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
        has_seed=c.seed is not None, seed=c.seed or 0, stop_token_ids=list(c.stop_token_ids),
        ignore_eos=c.ignore_eos, logprobs=c.logprobs, top_logprobs=c.top_logprobs,
        presence_penalty=c.presence_penalty, frequency_penalty=c.frequency_penalty,
        repetition_penalty=c.repetition_penalty, logit_bias=dict(c.logit_bias),
        min_tokens=c.min_tokens, prompt_ids=list(c.prompt_ids),
        prior_output_ids=list(c.prior_output_ids), prompt_logprobs=c.prompt_logprobs,
        structured_output=grammar_to_proto(c.grammar), no_speculation=c.no_speculation)


def logprobs_to_proto(lp: TokenLogprobs) -> generation_pb2.TokenLogprobs:
    return generation_pb2.TokenLogprobs(
        token_id=lp.token, logprob=lp.logprob, rank=lp.rank,
        top=[generation_pb2.TopLogprob(token_id=t, logprob=p) for t, p in lp.top])


def logprobs_from_proto(lp: generation_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top),
                         lp.rank)


def sampled_to_proto(result: ForwardResult, message):
    """The last stage's sampling outcome (tokens, failures, log-probabilities) into a
    ForwardResponse or InstallResponse."""
    message.tokens.extend(result.tokens)
    message.failed.update(result.failed)
    for seq_id, lp in result.logprobs.items():
        message.logprobs[seq_id].CopyFrom(logprobs_to_proto(lp))
    return message


def sampled_from_proto(message, result: ForwardResult) -> ForwardResult:
    result.tokens = list(message.tokens)
    result.failed = dict(message.failed)
    result.logprobs = {seq_id: logprobs_from_proto(lp) for seq_id, lp in message.logprobs.items()}
    return result


def address_from_proto(info: worker_pb2.StageInfo) -> StageAddress:
    return StageAddress(info.address, info.layer_begin, info.layer_end)


def address_to_proto(a: StageAddress) -> worker_pb2.StageInfo:
    return worker_pb2.StageInfo(address=a.address, layer_begin=a.layer_begin,
                                layer_end=a.layer_end)


def stage_infos(chain: StageChain | None) -> list[worker_pb2.StageInfo]:
    """An instance's stages as a worker reports them (none while it leads no instance)."""
    return [address_to_proto(a) for a in chain.addresses] if chain else []


def forward_to_proto(batch: ForwardBatch, inputs: np.ndarray) -> stage_pb2.ForwardRequest:
    return stage_pb2.ForwardRequest(
        decode=batch.decode, hidden=np.ascontiguousarray(inputs).tobytes(),
        slices=[stage_pb2.SequenceSlice(
            request_id=s.request_id, seq_id=s.seq_id, length=s.length,
            total_tokens=s.total_tokens, ends_prompt=s.ends_prompt,
            kv_targets=[address_to_proto(t) for t in s.kv_targets],
            fork_from=s.fork_from or 0, fork_pos=s.fork_pos, push_from=s.push_from,
            push_attempt=s.push_attempt, push_token=s.push_token,
            prompt_tokens=s.prompt_tokens, draft=list(s.draft), trim=s.trim,
            traceparent=s.traceparent)
            for s in batch.slices])


def forward_from_proto(request: stage_pb2.ForwardRequest) -> ForwardBatch:
    return ForwardBatch(
        decode=request.decode,
        slices=tuple(SequenceSlice(
            seq_id=s.seq_id, length=s.length, total_tokens=s.total_tokens,
            ends_prompt=s.ends_prompt, request_id=s.request_id,
            kv_targets=tuple(address_from_proto(t) for t in s.kv_targets),
            fork_from=s.fork_from or None, fork_pos=s.fork_pos, push_from=s.push_from,
            push_attempt=s.push_attempt, push_token=s.push_token,
            prompt_tokens=s.prompt_tokens, draft=tuple(s.draft), trim=s.trim,
            traceparent=s.traceparent)
            for s in request.slices))


def result_to_proto(result: ForwardResult) -> stage_pb2.ForwardResponse:
    hidden = b"" if result.hidden is None else np.ascontiguousarray(result.hidden).tobytes()
    response = sampled_to_proto(result, stage_pb2.ForwardResponse(
        hidden=hidden,
        push_failures=[stage_pb2.PushFailure(request_id=request_id,
                                             code=status_number(error.code),
                                             message=error.message)
                       for request_id, error in result.push_failures.items()]))
    for seq_id, tokens in result.more.items():
        response.more_tokens[seq_id].ids.extend(tokens)
    for seq_id, scores in result.more_logprobs.items():
        response.more_logprobs[seq_id].items.extend(map(logprobs_to_proto, scores))
    return response


def result_from_proto(response: stage_pb2.ForwardResponse, dtype: str, hidden_size: int
                      ) -> ForwardResult:
    hidden = None
    if response.hidden:
        hidden = np.frombuffer(response.hidden, dtype).reshape(-1, hidden_size)
    return sampled_from_proto(response, ForwardResult(
        hidden=hidden,
        push_failures={f.request_id: ServingError(status_code(f.code), f.message)
                       for f in response.push_failures},
        more={seq_id: list(t.ids) for seq_id, t in response.more_tokens.items()},
        more_logprobs={seq_id: [logprobs_from_proto(lp) for lp in scores.items]
                       for seq_id, scores in response.more_logprobs.items()}))


def expectations_to_proto(expectations: Sequence[Expectation]) -> stage_pb2.ExpectRequest:
    return stage_pb2.ExpectRequest(expectations=[
        stage_pb2.Expectation(request_id=e.request_id, prompt_tokens=e.prompt_tokens,
                              sampling=sampling_to_proto(e.sampling), local=e.local,
                              seq_id=e.seq_id, fork_from=e.fork_from or 0,
                              fork_pos=e.fork_pos, push_token=e.push_token)
        for e in expectations])


def expectations_from_proto(request: stage_pb2.ExpectRequest) -> list[Expectation]:
    return [Expectation(e.request_id, e.prompt_tokens, sampling_from_proto(e.sampling),
                        e.local, e.seq_id, e.fork_from or None, e.fork_pos, e.push_token)
            for e in request.expectations]


def admissions_to_proto(admissions: Sequence[Admission]) -> stage_pb2.InstallRequest:
    return stage_pb2.InstallRequest(admissions=[
        stage_pb2.Admission(request_id=a.request_id, seq_id=a.seq_id) for a in admissions])


def admissions_from_proto(request: stage_pb2.InstallRequest) -> list[Admission]:
    return [Admission(a.request_id, a.seq_id) for a in request.admissions]


def release_to_proto(release: Release) -> stage_pb2.ReleaseRequest:
    return stage_pb2.ReleaseRequest(seq_ids=release.seq_ids, request_ids=release.request_ids,
                                    reset=release.reset)


def release_from_proto(request: stage_pb2.ReleaseRequest) -> Release:
    return Release(tuple(request.seq_ids), tuple(request.request_ids), request.reset)
