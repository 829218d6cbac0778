from kvmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TextDocument(_message.Message):
    __slots__ = ("text", "line", "column")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    text: str
    line: int
    column: int
    def __init__(self, text: _Optional[str] = ..., line: _Optional[int] = ..., column: _Optional[int] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("prefix", "suffix", "context", "document", "sampling", "prompt_lookup")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOOKUP_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    suffix: str
    context: str
    document: TextDocument
    sampling: _common_pb2.SamplingParams
    prompt_lookup: bool
    def __init__(self, prefix: _Optional[str] = ..., suffix: _Optional[str] = ..., context: _Optional[str] = ..., document: _Optional[_Union[TextDocument, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., prompt_lookup: _Optional[bool] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("original", "snippet", "speculative", "sampling")
    ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    SNIPPET_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    original: str
    snippet: str
    speculative: bool
    sampling: _common_pb2.SamplingParams
    def __init__(self, original: _Optional[str] = ..., snippet: _Optional[str] = ..., speculative: _Optional[bool] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class CompletionChunk(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "usage")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "change", "complete", "accept")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    open: SessionOpen
    change: DocumentChange
    complete: SessionComplete
    accept: SessionAccept
    def __init__(self, open: _Optional[_Union[SessionOpen, _Mapping]] = ..., change: _Optional[_Union[DocumentChange, _Mapping]] = ..., complete: _Optional[_Union[SessionComplete, _Mapping]] = ..., accept: _Optional[_Union[SessionAccept, _Mapping]] = ...) -> None: ...

class SessionOpen(_message.Message):
    __slots__ = ("text", "context", "predict_ahead")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PREDICT_AHEAD_FIELD_NUMBER: _ClassVar[int]
    text: str
    context: str
    predict_ahead: bool
    def __init__(self, text: _Optional[str] = ..., context: _Optional[str] = ..., predict_ahead: _Optional[bool] = ...) -> None: ...

class TextRange(_message.Message):
    __slots__ = ("start_line", "start_column", "end_line", "end_column")
    START_LINE_FIELD_NUMBER: _ClassVar[int]
    START_COLUMN_FIELD_NUMBER: _ClassVar[int]
    END_LINE_FIELD_NUMBER: _ClassVar[int]
    END_COLUMN_FIELD_NUMBER: _ClassVar[int]
    start_line: int
    start_column: int
    end_line: int
    end_column: int
    def __init__(self, start_line: _Optional[int] = ..., start_column: _Optional[int] = ..., end_line: _Optional[int] = ..., end_column: _Optional[int] = ...) -> None: ...

class DocumentChange(_message.Message):
    __slots__ = ("version", "range", "text")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    version: int
    range: TextRange
    text: str
    def __init__(self, version: _Optional[int] = ..., range: _Optional[_Union[TextRange, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class SessionComplete(_message.Message):
    __slots__ = ("version", "line", "column", "sampling", "completion_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    line: int
    column: int
    sampling: _common_pb2.SamplingParams
    completion_id: int
    def __init__(self, version: _Optional[int] = ..., line: _Optional[int] = ..., column: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., completion_id: _Optional[int] = ...) -> None: ...

class SessionAccept(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("version", "completion_id", "chunk", "superseded")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    version: int
    completion_id: int
    chunk: CompletionChunk
    superseded: bool
    def __init__(self, version: _Optional[int] = ..., completion_id: _Optional[int] = ..., chunk: _Optional[_Union[CompletionChunk, _Mapping]] = ..., superseded: _Optional[bool] = ...) -> None: ...
