"""An editor session over Gateway.Session, synchronous: Client.session() returns one.

    with Client("localhost:50051") as client, client.session(predict_ahead=True) as session:
        session.open(text)                                # the document, version 1
        for chunk in session.complete(line, column):      # streams like Client.complete
            ...
        session.edit(line, column, end_line, end_column, "new text")   # a change, version += 1
        session.accept()                                  # the last suggestion goes into the document
        for chunk in session.complete(line, column):      # after accept: served from predict-ahead
            ...

The last chunk's usage.source says where a suggestion came from: "MODEL", "REUSED" (the rest of one the
user typed into) or "PREDICTED". Errors surface as grpc.RpcError and end the session (INVALID_ARGUMENT
names the field: a range outside the document, a stale version).
"""

from __future__ import annotations

import queue
from collections.abc import Generator, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import grpc

from kvmesh.v1 import gateway_pb2, gateway_pb2_grpc

if TYPE_CHECKING:
    from kvmesh.client import Chunk

_END = None


class ClientSession:
    """One Gateway.Session stream; use as a context manager (closing it frees everything it held)."""

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayStub,
        metadata: Sequence[tuple[str, str]] | None,
        predict_ahead: bool,
        timeout_s: float | None,
    ) -> None:
        self._requests: queue.Queue[gateway_pb2.SessionRequest | None] = queue.Queue()
        self._call = stub.Session(self._request_stream(), metadata=metadata, timeout=timeout_s)
        self._replies: Iterator[gateway_pb2.SessionReply] = iter(self._call)
        self._predict_ahead = predict_ahead
        self.version = 0
        """The document's version as the gateway holds it (0 before open)."""
        self._completion_id = 0

    def __enter__(self) -> ClientSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._requests.put(_END)
        self._call.cancel()

    def open(self, text: str, context: str = "") -> None:
        """Sends the document (version 1)."""
        self._send(
            gateway_pb2.SessionRequest(
                open=gateway_pb2.SessionOpen(text=text, context=context, predict_ahead=self._predict_ahead)
            )
        )
        self.version = 1

    def edit(self, line: int, column: int, end_line: int, end_column: int, text: str) -> None:
        """Replaces the range (0-based lines, columns in characters; end exclusive) with text."""
        self.version += 1
        change = gateway_pb2.DocumentChange(version=self.version, text=text)
        change.range.start_line, change.range.start_column = line, column
        change.range.end_line, change.range.end_column = end_line, end_column
        self._send(gateway_pb2.SessionRequest(change=change))

    def accept(self) -> None:
        """The last suggestion (the part not typed yet) is inserted at its cursor."""
        self.version += 1
        self._send(gateway_pb2.SessionRequest(accept=gateway_pb2.SessionAccept(version=self.version)))

    def complete(
        self, line: int, column: int, *, max_tokens: int = 0, stop: Sequence[str] = ()
    ) -> Generator[Chunk, None, None]:
        """Streams a suggestion at the cursor of the current version (greedy). A newer complete() made
        before this one is drained supersedes it: this one then simply ends."""
        from kvmesh.client import Chunk, _sampling

        self._completion_id += 1
        completion_id = self._completion_id
        request = gateway_pb2.SessionComplete(
            version=self.version,
            line=line,
            column=column,
            completion_id=completion_id,
            sampling=_sampling(max_tokens, 0.0, None, 0, None, stop),
        )
        self._send(gateway_pb2.SessionRequest(complete=request))
        return self._chunks(completion_id, Chunk)

    def _chunks(self, completion_id: int, chunk_type: type[Chunk]) -> Generator[Chunk, None, None]:
        for reply in self._replies:
            if reply.completion_id != completion_id:
                continue  # the rest of a superseded suggestion
            if reply.superseded:
                return
            chunk = chunk_type.from_proto(reply.chunk)
            yield chunk
            if chunk.usage is not None:
                return
        raise grpc.RpcError("the session stream ended")  # pragma: no cover - the call raises its status first

    def _send(self, request: gateway_pb2.SessionRequest) -> None:
        self._requests.put(request)

    def _request_stream(self) -> Iterator[gateway_pb2.SessionRequest]:
        while (request := self._requests.get()) is not _END:
            yield request
