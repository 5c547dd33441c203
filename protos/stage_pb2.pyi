from splitllm.protos import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogitsRequest(_message.Message):
    __slots__ = ("top_k", "rows")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    rows: int
    def __init__(self, top_k: _Optional[int] = ..., rows: _Optional[int] = ...) -> None: ...

class ForwardEntry(_message.Message):
    __slots__ = ("session_id", "position", "num_tokens", "input", "logits", "release")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    num_tokens: int
    input: _tensor_pb2.Tensor
    logits: LogitsRequest
    release: bool
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., num_tokens: _Optional[int] = ..., input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., logits: _Optional[_Union[LogitsRequest, _Mapping]] = ..., release: bool = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("entries", "route", "step_id", "reply_to")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ForwardEntry]
    route: _containers.RepeatedScalarFieldContainer[str]
    step_id: int
    reply_to: str
    def __init__(self, entries: _Optional[_Iterable[_Union[ForwardEntry, _Mapping]]] = ..., route: _Optional[_Iterable[str]] = ..., step_id: _Optional[int] = ..., reply_to: _Optional[str] = ...) -> None: ...

class EntryResult(_message.Message):
    __slots__ = ("session_id", "logits", "token_ids", "code", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    logits: _tensor_pb2.Tensor
    token_ids: _tensor_pb2.Tensor
    code: int
    message: str
    def __init__(self, session_id: _Optional[str] = ..., logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("results", "step_id", "code", "message")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EntryResult]
    step_id: int
    code: int
    message: str
    def __init__(self, results: _Optional[_Iterable[_Union[EntryResult, _Mapping]]] = ..., step_id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("subscriber_id",)
    SUBSCRIBER_ID_FIELD_NUMBER: _ClassVar[int]
    subscriber_id: str
    def __init__(self, subscriber_id: _Optional[str] = ...) -> None: ...

class ForwardStreamSummary(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    def __init__(self, steps: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("session_id", "route")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    route: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., route: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: bool = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("stage_index", "num_stages", "first_layer", "last_layer", "manifest_sha256", "backend", "kv_capacity_sessions", "sessions_in_use", "kv_bytes_capacity", "kv_bytes_in_use", "context_length", "prefill_length", "hidden_size")
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAST_LAYER_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_IN_USE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PREFILL_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    stage_index: int
    num_stages: int
    first_layer: int
    last_layer: int
    manifest_sha256: str
    backend: str
    kv_capacity_sessions: int
    sessions_in_use: int
    kv_bytes_capacity: int
    kv_bytes_in_use: int
    context_length: int
    prefill_length: int
    hidden_size: int
    def __init__(self, stage_index: _Optional[int] = ..., num_stages: _Optional[int] = ..., first_layer: _Optional[int] = ..., last_layer: _Optional[int] = ..., manifest_sha256: _Optional[str] = ..., backend: _Optional[str] = ..., kv_capacity_sessions: _Optional[int] = ..., sessions_in_use: _Optional[int] = ..., kv_bytes_capacity: _Optional[int] = ..., kv_bytes_in_use: _Optional[int] = ..., context_length: _Optional[int] = ..., prefill_length: _Optional[int] = ..., hidden_size: _Optional[int] = ...) -> None: ...
