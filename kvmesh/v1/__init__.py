"""Generated protobuf and gRPC code for the kvmesh.v1 API (scripts/gen_protos.py; do not edit)."""
