"""Requests that are not valid protobuf: told apart from handler errors, and described for the client.

grpc deserializes a request before any handler or interceptor code runs, and a DecodeError there becomes
UNKNOWN with an ERROR traceback in the log. The error interceptor (kvmesh.mesh.server) instead wraps each
method's deserializer with `tolerant_deserializer`: a request that does not decode becomes an
UndecodableRequest, which the guarded handler answers with INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request message that did not decode; `message` is what to tell the client."""

    message: str


def request_type_name(method: str) -> str | None:
    """'/kvmesh.v1.Gateway/Complete' -> 'kvmesh.v1.CompleteRequest'; None when the method is not known."""
    service, _, name = method.lstrip("/").partition("/")
    try:
        return descriptor_pool.Default().FindServiceByName(service).methods_by_name[name].input_type.full_name
    except KeyError:
        return None


def tolerant_deserializer(deserializer: Deserializer | None, method: str) -> Deserializer | None:
    """deserializer, returning an UndecodableRequest instead of raising DecodeError."""
    if deserializer is None:
        return None
    type_name = request_type_name(method)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return UndecodableRequest(_describe(type_name, data, error))

    return deserialize


def _describe(type_name: str | None, data: bytes, error: DecodeError) -> str:
    # The library's message ("Error parsing message with type 'X': String field had bad UTF-8") quotes
    # no bytes of the request; keep its reason, and name the field when a string is what broke.
    reason = str(error).rpartition(": ")[2] or "it does not parse"
    what = f"a valid {type_name}" if type_name else "a valid protobuf message"
    message = f"the request is not {what}: {reason}"
    if type_name is not None:
        field = _bad_utf8_field(descriptor_pool.Default().FindMessageTypeByName(type_name), data)
        if field is not None:
            message += f" (field {field}); string fields must hold UTF-8 text, send bytes fields for binary"
    return message


# ---- wire format, just enough to find a string field that is not UTF-8 -----------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _bad_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The dotted path of the first string field in data (a message of this type) that is not UTF-8."""
    counts: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
                continue
            if wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:
                return None  # groups (3, 4) are not in our protos; the wire format is broken anyway
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            index = counts.get(number, 0)
            counts[number] = index + 1
            path = f"{prefix}{field.name}" + (f"[{index}]" if field.is_repeated else "")
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    return path
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = _bad_utf8_field(field.message_type, value, f"{path}.")
                if found is not None:
                    return found
    except ValueError:
        return None
    return None
