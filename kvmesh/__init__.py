"""kvmesh: a gRPC mesh serving code completion and code edits, with prefill and decode split across workers."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"


def default_model_path() -> Path:
    """The checkpoint `kvmesh up` and `kvmesh serve` use when no --model is given: kvmesh's own small code
    model, shipped inside the package (a Hugging Face Llama checkpoint; its model card is the README.md
    beside it; trained by scripts/train_default_model.py)."""
    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the default model is missing from {DEFAULT_MODEL_DIR}: reinstall kvmesh, or pass --model PATH "
            "(python scripts/train_default_model.py rebuilds it)"
        )
    return DEFAULT_MODEL_DIR
