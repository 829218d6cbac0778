"""The .proto contract: generated code is fresh, and every element carries a comment."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent

# Paths in SourceCodeInfo locations: field numbers of the descriptor protos that hold each element.
_MESSAGE_TYPE = 4  # FileDescriptorProto.message_type
_ENUM_TYPE = 5  # FileDescriptorProto.enum_type
_SERVICE = 6  # FileDescriptorProto.service
_FIELD = 2  # DescriptorProto.field
_NESTED_TYPE = 3  # DescriptorProto.nested_type
_NESTED_ENUM = 4  # DescriptorProto.enum_type
_ONEOF = 8  # DescriptorProto.oneof_decl
_ENUM_VALUE = 2  # EnumDescriptorProto.value
_METHOD = 2  # ServiceDescriptorProto.method


def _load_gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", REPO_ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_protos", module)
    spec.loader.exec_module(module)
    return module


def _descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    gen_protos = _load_gen_protos()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "protos.pb"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{gen_protos.PROTO_ROOT}",
                f"--descriptor_set_out={out}",
                "--include_source_info",
                *(str(gen_protos.PROTO_ROOT / p) for p in gen_protos.proto_files()),
            ]
        )
        assert code == 0, "protoc failed"
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _elements(
    file: descriptor_pb2.FileDescriptorProto,
) -> list[tuple[tuple[int, ...], str]]:
    """(source path, readable name) of every message, field, oneof, enum, enum value, service, rpc."""
    found: list[tuple[tuple[int, ...], str]] = []

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto, prefix: str) -> None:
        found.append((path, f"enum {prefix}{e.name}"))
        for i, value in enumerate(e.value):
            found.append(((*path, _ENUM_VALUE, i), f"enum value {prefix}{e.name}.{value.name}"))

    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        name = f"{prefix}{m.name}"
        found.append((path, f"message {name}"))
        for i, f in enumerate(m.field):
            found.append(((*path, _FIELD, i), f"field {name}.{f.name}"))
        for i, o in enumerate(m.oneof_decl):
            # proto3 `optional` fields get a synthetic oneof that has no source of its own.
            if not o.name.startswith("_"):
                found.append(((*path, _ONEOF, i), f"oneof {name}.{o.name}"))
        for i, nested in enumerate(m.nested_type):
            message((*path, _NESTED_TYPE, i), nested, f"{name}.")
        for i, e in enumerate(m.enum_type):
            enum((*path, _NESTED_ENUM, i), e, f"{name}.")

    for i, m in enumerate(file.message_type):
        message((_MESSAGE_TYPE, i), m, "")
    for i, e in enumerate(file.enum_type):
        enum((_ENUM_TYPE, i), e, "")
    for i, s in enumerate(file.service):
        found.append(((_SERVICE, i), f"service {s.name}"))
        for j, method in enumerate(s.method):
            found.append(((_SERVICE, i, _METHOD, j), f"rpc {s.name}.{method.name}"))
    return found


def test_generated_code_is_fresh() -> None:
    stale = _load_gen_protos().stale_files()
    assert not stale, f"stale generated code, run `python scripts/gen_protos.py`: {[str(p) for p in stale]}"


def test_every_element_has_a_comment() -> None:
    descriptor_set = _descriptor_set()
    assert {f.name for f in descriptor_set.file} >= {
        f"kvmesh/v1/{name}.proto" for name in ("common", "gateway", "prefill", "decode", "cache_store")
    }
    missing = []
    num_checked = 0
    for file in descriptor_set.file:
        assert file.package == "kvmesh.v1", file.name
        comments = {
            tuple(loc.path): (loc.leading_comments + loc.trailing_comments).strip()
            for loc in file.source_code_info.location
        }
        for path, name in _elements(file):
            num_checked += 1
            if not comments.get(path):
                missing.append(f"{file.name}: {name}")
    assert num_checked > 100
    assert not missing, "add a comment to:\n" + "\n".join(missing)


def test_generated_modules_import_from_our_package() -> None:
    from kvmesh.v1 import cache_store_pb2_grpc, decode_pb2, gateway_pb2_grpc, prefill_pb2_grpc

    assert decode_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["sampling"].message_type.full_name == (
        "kvmesh.v1.SamplingParams"
    )
    for module, stub in (
        (gateway_pb2_grpc, "GatewayStub"),
        (decode_pb2, "GenerateChunk"),
        (prefill_pb2_grpc, "PrefillStub"),
        (cache_store_pb2_grpc, "CacheStoreStub"),
    ):
        assert hasattr(module, stub)
