"""The special tokens of kvmesh's prompt formats: fill-in-the-middle and edits.

The gateway lays prompts out with them; the default model's tokenizer was trained with them.
"""

from __future__ import annotations

END_OF_TEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
EDIT_ORIGINAL = "<|edit_original|>"
EDIT_SNIPPET = "<|edit_snippet|>"
EDIT_OUTPUT = "<|edit_output|>"
# NOTE: the order fixes the ids: <|endoftext|> is 0, the others follow in this order.
SPECIAL_TOKENS: tuple[str, ...] = (
    END_OF_TEXT,
    FIM_PREFIX,
    FIM_SUFFIX,
    FIM_MIDDLE,
    EDIT_ORIGINAL,
    EDIT_SNIPPET,
    EDIT_OUTPUT,
)
