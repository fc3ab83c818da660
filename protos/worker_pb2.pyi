from protos import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelLayout(_message.Message):
    __slots__ = ("model_fingerprint", "dtype", "page_size", "num_layers", "layer_begin", "layer_end", "num_kv_heads", "head_dim", "hidden_size", "context_window", "vocab_size", "eos_token_ids")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_BEGIN_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    dtype: str
    page_size: int
    num_layers: int
    layer_begin: int
    layer_end: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    context_window: int
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., page_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., layer_begin: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., hidden_size: _Optional[int] = ..., context_window: _Optional[int] = ..., vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("kv_events", "kv_epoch", "kv_after")
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    KV_EPOCH_FIELD_NUMBER: _ClassVar[int]
    KV_AFTER_FIELD_NUMBER: _ClassVar[int]
    kv_events: bool
    kv_epoch: bytes
    kv_after: int
    def __init__(self, kv_events: _Optional[bool] = ..., kv_epoch: _Optional[bytes] = ..., kv_after: _Optional[int] = ...) -> None: ...

class KVEvents(_message.Message):
    __slots__ = ("epoch", "last", "snapshot", "stored", "removed")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    epoch: bytes
    last: int
    snapshot: bool
    stored: _containers.RepeatedCompositeFieldContainer[CachedPrefix]
    removed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, epoch: _Optional[bytes] = ..., last: _Optional[int] = ..., snapshot: _Optional[bool] = ..., stored: _Optional[_Iterable[_Union[CachedPrefix, _Mapping]]] = ..., removed: _Optional[_Iterable[int]] = ...) -> None: ...

class CachedPrefix(_message.Message):
    __slots__ = ("key", "pages")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    key: int
    pages: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, key: _Optional[int] = ..., pages: _Optional[_Iterable[bytes]] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("role", "layout", "queued_requests", "queued_tokens", "running_sequences", "total_pages", "free_pages", "reservations", "kv_bytes_received", "kv_bytes_sent", "pushes_refused", "transport", "used_pages", "pushes", "kv_transfer_ms", "stages", "transports", "transport_note", "cached_sequences", "cached_pages", "prefix_query_tokens", "prefix_hit_tokens", "prefilled_tokens", "kv_export_ms", "kv_encode_ms", "kv_assemble_ms", "kv_install_ms", "shared_memory_pushes", "shared_memory_bytes", "shared_memory_ms", "step_loop_age_ms", "spec_draft_tokens", "spec_accepted_tokens", "kv_events")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    PUSHES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    USED_PAGES_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_NOTE_FIELD_NUMBER: _ClassVar[int]
    CACHED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    CACHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_EXPORT_MS_FIELD_NUMBER: _ClassVar[int]
    KV_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    KV_ASSEMBLE_MS_FIELD_NUMBER: _ClassVar[int]
    KV_INSTALL_MS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_PUSHES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_LOOP_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    SPEC_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEC_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    role: str
    layout: ModelLayout
    queued_requests: int
    queued_tokens: int
    running_sequences: int
    total_pages: int
    free_pages: int
    reservations: int
    kv_bytes_received: int
    kv_bytes_sent: int
    pushes_refused: int
    transport: str
    used_pages: int
    pushes: int
    kv_transfer_ms: float
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    transports: _containers.RepeatedScalarFieldContainer[str]
    transport_note: str
    cached_sequences: int
    cached_pages: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    prefilled_tokens: int
    kv_export_ms: float
    kv_encode_ms: float
    kv_assemble_ms: float
    kv_install_ms: float
    shared_memory_pushes: int
    shared_memory_bytes: int
    shared_memory_ms: float
    step_loop_age_ms: float
    spec_draft_tokens: int
    spec_accepted_tokens: int
    kv_events: KVEvents
    def __init__(self, role: _Optional[str] = ..., layout: _Optional[_Union[ModelLayout, _Mapping]] = ..., queued_requests: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., running_sequences: _Optional[int] = ..., total_pages: _Optional[int] = ..., free_pages: _Optional[int] = ..., reservations: _Optional[int] = ..., kv_bytes_received: _Optional[int] = ..., kv_bytes_sent: _Optional[int] = ..., pushes_refused: _Optional[int] = ..., transport: _Optional[str] = ..., used_pages: _Optional[int] = ..., pushes: _Optional[int] = ..., kv_transfer_ms: _Optional[float] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., transports: _Optional[_Iterable[str]] = ..., transport_note: _Optional[str] = ..., cached_sequences: _Optional[int] = ..., cached_pages: _Optional[int] = ..., prefix_query_tokens: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., prefilled_tokens: _Optional[int] = ..., kv_export_ms: _Optional[float] = ..., kv_encode_ms: _Optional[float] = ..., kv_assemble_ms: _Optional[float] = ..., kv_install_ms: _Optional[float] = ..., shared_memory_pushes: _Optional[int] = ..., shared_memory_bytes: _Optional[int] = ..., shared_memory_ms: _Optional[float] = ..., step_loop_age_ms: _Optional[float] = ..., spec_draft_tokens: _Optional[int] = ..., spec_accepted_tokens: _Optional[int] = ..., kv_events: _Optional[_Union[KVEvents, _Mapping]] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("address", "layer_begin", "layer_end")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYER_BEGIN_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    address: str
    layer_begin: int
    layer_end: int
    def __init__(self, address: _Optional[str] = ..., layer_begin: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "has_seed", "seed", "stop_token_ids", "ignore_eos", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "prompt_ids", "prior_output_ids", "prompt_logprobs", "structured_output", "no_speculation")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PRIOR_OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    NO_SPECULATION_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    has_seed: bool
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: bool
    top_logprobs: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: _containers.ScalarMap[int, float]
    min_tokens: int
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    prior_output_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_logprobs: bool
    structured_output: _generation_pb2.StructuredOutput
    no_speculation: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., has_seed: _Optional[bool] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., min_tokens: _Optional[int] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., prior_output_ids: _Optional[_Iterable[int]] = ..., prompt_logprobs: _Optional[bool] = ..., structured_output: _Optional[_Union[_generation_pb2.StructuredOutput, _Mapping]] = ..., no_speculation: _Optional[bool] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "prompt_tokens", "sampling", "lease_ms", "prompt_token_ids", "prefill_locally", "local_prefill_below", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LOCALLY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_BELOW_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_tokens: int
    sampling: Sampling
    lease_ms: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prefill_locally: bool
    local_prefill_below: int
    cache_salt: bytes
    def __init__(self, request_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., lease_ms: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., prefill_locally: _Optional[bool] = ..., local_prefill_below: _Optional[int] = ..., cache_salt: _Optional[bytes] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reserved_pages", "layout", "cached_tokens", "prefill_locally", "push_token")
    RESERVED_PAGES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LOCALLY_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    reserved_pages: int
    layout: ModelLayout
    cached_tokens: int
    prefill_locally: bool
    push_token: bytes
    def __init__(self, reserved_pages: _Optional[int] = ..., layout: _Optional[_Union[ModelLayout, _Mapping]] = ..., cached_tokens: _Optional[int] = ..., prefill_locally: _Optional[bool] = ..., push_token: _Optional[bytes] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "decode_stages", "skip_tokens", "attempt", "push_token", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STAGES_FIELD_NUMBER: _ClassVar[int]
    SKIP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    decode_stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    skip_tokens: int
    attempt: int
    push_token: bytes
    cache_salt: bytes
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., decode_stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., skip_tokens: _Optional[int] = ..., attempt: _Optional[int] = ..., push_token: _Optional[bytes] = ..., cache_salt: _Optional[bytes] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("kv_bytes", "prefill_ms", "kv_transfer_ms", "cached_tokens")
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    kv_bytes: int
    prefill_ms: float
    kv_transfer_ms: float
    cached_tokens: int
    def __init__(self, kv_bytes: _Optional[int] = ..., prefill_ms: _Optional[float] = ..., kv_transfer_ms: _Optional[float] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("request_id", "layout", "num_tokens", "num_blocks", "token_begin", "attempt", "push_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BEGIN_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layout: ModelLayout
    num_tokens: int
    num_blocks: int
    token_begin: int
    attempt: int
    push_token: bytes
    def __init__(self, request_id: _Optional[str] = ..., layout: _Optional[_Union[ModelLayout, _Mapping]] = ..., num_tokens: _Optional[int] = ..., num_blocks: _Optional[int] = ..., token_begin: _Optional[int] = ..., attempt: _Optional[int] = ..., push_token: _Optional[bytes] = ...) -> None: ...

class KVBlock(_message.Message):
    __slots__ = ("layer", "token_begin", "num_tokens", "keys", "values")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BEGIN_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    token_begin: int
    num_tokens: int
    keys: bytes
    values: bytes
    def __init__(self, layer: _Optional[int] = ..., token_begin: _Optional[int] = ..., num_tokens: _Optional[int] = ..., keys: _Optional[bytes] = ..., values: _Optional[bytes] = ...) -> None: ...

class HiddenState(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class SharedKV(_message.Message):
    __slots__ = ("pid", "fd", "keys_offset", "values_offset", "layer_stride")
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    KEYS_OFFSET_FIELD_NUMBER: _ClassVar[int]
    VALUES_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAYER_STRIDE_FIELD_NUMBER: _ClassVar[int]
    pid: int
    fd: int
    keys_offset: int
    values_offset: int
    layer_stride: int
    def __init__(self, pid: _Optional[int] = ..., fd: _Optional[int] = ..., keys_offset: _Optional[int] = ..., values_offset: _Optional[int] = ..., layer_stride: _Optional[int] = ...) -> None: ...

class KVTrailer(_message.Message):
    __slots__ = ("crc32",)
    CRC32_FIELD_NUMBER: _ClassVar[int]
    crc32: int
    def __init__(self, crc32: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "block", "hidden", "trailer", "shared")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    block: KVBlock
    hidden: HiddenState
    trailer: KVTrailer
    shared: SharedKV
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., block: _Optional[_Union[KVBlock, _Mapping]] = ..., hidden: _Optional[_Union[HiddenState, _Mapping]] = ..., trailer: _Optional[_Union[KVTrailer, _Mapping]] = ..., shared: _Optional[_Union[SharedKV, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("bytes", "shared_memory_host", "handled_us")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_HOST_FIELD_NUMBER: _ClassVar[int]
    HANDLED_US_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    shared_memory_host: str
    handled_us: int
    def __init__(self, bytes: _Optional[int] = ..., shared_memory_host: _Optional[str] = ..., handled_us: _Optional[int] = ...) -> None: ...

class StreamTokensRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("token_id", "has_token", "finish_reason", "error", "code", "logprobs", "prompt_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    has_token: bool
    finish_reason: _generation_pb2.FinishReason
    error: str
    code: int
    logprobs: _generation_pb2.TokenLogprobs
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_generation_pb2.TokenLogprobs]
    def __init__(self, token_id: _Optional[int] = ..., has_token: _Optional[bool] = ..., finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ..., error: _Optional[str] = ..., code: _Optional[int] = ..., logprobs: _Optional[_Union[_generation_pb2.TokenLogprobs, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_generation_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
