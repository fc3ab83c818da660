from protos import generation_pb2 as _generation_pb2
from protos import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SequenceSlice(_message.Message):
    __slots__ = ("request_id", "seq_id", "length", "total_tokens", "ends_prompt", "kv_targets", "fork_from", "fork_pos", "push_from", "push_attempt", "prompt_tokens", "push_token", "draft", "trim", "traceparent")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENDS_PROMPT_FIELD_NUMBER: _ClassVar[int]
    KV_TARGETS_FIELD_NUMBER: _ClassVar[int]
    FORK_FROM_FIELD_NUMBER: _ClassVar[int]
    FORK_POS_FIELD_NUMBER: _ClassVar[int]
    PUSH_FROM_FIELD_NUMBER: _ClassVar[int]
    PUSH_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    TRIM_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    seq_id: int
    length: int
    total_tokens: int
    ends_prompt: bool
    kv_targets: _containers.RepeatedCompositeFieldContainer[_worker_pb2.StageInfo]
    fork_from: int
    fork_pos: int
    push_from: int
    push_attempt: int
    prompt_tokens: int
    push_token: bytes
    draft: _containers.RepeatedScalarFieldContainer[int]
    trim: bool
    traceparent: str
    def __init__(self, request_id: _Optional[str] = ..., seq_id: _Optional[int] = ..., length: _Optional[int] = ..., total_tokens: _Optional[int] = ..., ends_prompt: _Optional[bool] = ..., kv_targets: _Optional[_Iterable[_Union[_worker_pb2.StageInfo, _Mapping]]] = ..., fork_from: _Optional[int] = ..., fork_pos: _Optional[int] = ..., push_from: _Optional[int] = ..., push_attempt: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., push_token: _Optional[bytes] = ..., draft: _Optional[_Iterable[int]] = ..., trim: _Optional[bool] = ..., traceparent: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("slices", "decode", "hidden")
    SLICES_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    slices: _containers.RepeatedCompositeFieldContainer[SequenceSlice]
    decode: bool
    hidden: bytes
    def __init__(self, slices: _Optional[_Iterable[_Union[SequenceSlice, _Mapping]]] = ..., decode: _Optional[bool] = ..., hidden: _Optional[bytes] = ...) -> None: ...

class PushFailure(_message.Message):
    __slots__ = ("request_id", "code", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden", "tokens", "push_failures", "failed", "logprobs", "more_tokens", "more_logprobs")
    class FailedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    class LogprobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: _generation_pb2.TokenLogprobs
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[_generation_pb2.TokenLogprobs, _Mapping]] = ...) -> None: ...
    class MoreTokensEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: _generation_pb2.TokenIds
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[_generation_pb2.TokenIds, _Mapping]] = ...) -> None: ...
    class MoreLogprobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: TokenLogprobsList
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[TokenLogprobsList, _Mapping]] = ...) -> None: ...
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PUSH_FAILURES_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MORE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MORE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    hidden: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    push_failures: _containers.RepeatedCompositeFieldContainer[PushFailure]
    failed: _containers.ScalarMap[int, str]
    logprobs: _containers.MessageMap[int, _generation_pb2.TokenLogprobs]
    more_tokens: _containers.MessageMap[int, _generation_pb2.TokenIds]
    more_logprobs: _containers.MessageMap[int, TokenLogprobsList]
    def __init__(self, hidden: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ..., push_failures: _Optional[_Iterable[_Union[PushFailure, _Mapping]]] = ..., failed: _Optional[_Mapping[int, str]] = ..., logprobs: _Optional[_Mapping[int, _generation_pb2.TokenLogprobs]] = ..., more_tokens: _Optional[_Mapping[int, _generation_pb2.TokenIds]] = ..., more_logprobs: _Optional[_Mapping[int, TokenLogprobsList]] = ...) -> None: ...

class TokenLogprobsList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_generation_pb2.TokenLogprobs]
    def __init__(self, items: _Optional[_Iterable[_Union[_generation_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("seq_ids", "request_ids", "reset")
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    reset: bool
    def __init__(self, seq_ids: _Optional[_Iterable[int]] = ..., request_ids: _Optional[_Iterable[str]] = ..., reset: _Optional[bool] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Expectation(_message.Message):
    __slots__ = ("request_id", "prompt_tokens", "sampling", "local", "seq_id", "fork_from", "fork_pos", "push_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    FORK_FROM_FIELD_NUMBER: _ClassVar[int]
    FORK_POS_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_tokens: int
    sampling: _worker_pb2.Sampling
    local: bool
    seq_id: int
    fork_from: int
    fork_pos: int
    push_token: bytes
    def __init__(self, request_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_worker_pb2.Sampling, _Mapping]] = ..., local: _Optional[bool] = ..., seq_id: _Optional[int] = ..., fork_from: _Optional[int] = ..., fork_pos: _Optional[int] = ..., push_token: _Optional[bytes] = ...) -> None: ...

class ExpectRequest(_message.Message):
    __slots__ = ("expectations",)
    EXPECTATIONS_FIELD_NUMBER: _ClassVar[int]
    expectations: _containers.RepeatedCompositeFieldContainer[Expectation]
    def __init__(self, expectations: _Optional[_Iterable[_Union[Expectation, _Mapping]]] = ...) -> None: ...

class ExpectResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadyRequest(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadyResponse(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Admission(_message.Message):
    __slots__ = ("request_id", "seq_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    seq_id: int
    def __init__(self, request_id: _Optional[str] = ..., seq_id: _Optional[int] = ...) -> None: ...

class InstallRequest(_message.Message):
    __slots__ = ("admissions",)
    ADMISSIONS_FIELD_NUMBER: _ClassVar[int]
    admissions: _containers.RepeatedCompositeFieldContainer[Admission]
    def __init__(self, admissions: _Optional[_Iterable[_Union[Admission, _Mapping]]] = ...) -> None: ...

class InstallResponse(_message.Message):
    __slots__ = ("tokens", "failed", "logprobs")
    class FailedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    class LogprobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: _generation_pb2.TokenLogprobs
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[_generation_pb2.TokenLogprobs, _Mapping]] = ...) -> None: ...
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    failed: _containers.ScalarMap[int, str]
    logprobs: _containers.MessageMap[int, _generation_pb2.TokenLogprobs]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., failed: _Optional[_Mapping[int, str]] = ..., logprobs: _Optional[_Mapping[int, _generation_pb2.TokenLogprobs]] = ...) -> None: ...
