"""kvmesh: a gRPC mesh serving code completion and code edits, with prefill and decode split across workers."""

from __future__ import annotations

from pathlib import Path


def default_model_path() -> Path:
    """The checkpoint `kvmesh up` and `kvmesh serve` use when no --model is given.

    NOTE: until the trained default model ships, this is the small random-weight model built (once, a few
    seconds) by kvmesh.checkpoint.ensure_random_model: the mesh runs end to end, but its completions are
    random-weight gibberish.
    """
    # Imported here: it pulls in torch, which `import kvmesh` alone should not.
    from kvmesh.checkpoint import ensure_random_model

    return ensure_random_model()
