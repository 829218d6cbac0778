"""gateway.document: incremental tokens and hashes equal a from-scratch encode and hash_blocks."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.document import HashChain, TokenizedText, split_pieces, splits_at_safe_points
from kvmesh.engine.block_hash import hash_blocks, namespace_hash
from kvmesh.engine.tokenizer import Tokenizer
from tests.factories import TINY_TEXT, make_tokenizer

ALPHABET = "ab xy\n\t()=:._'\"#é"
EDITS = st.lists(
    st.tuples(st.floats(0, 1), st.floats(0, 1), st.text(ALPHABET, max_size=12)), min_size=1, max_size=25
)


@pytest.fixture(scope="module")
def tokenizer(code_tokenizer) -> Tokenizer:
    """The byte-level BPE tokenizer trained on standard library files, as the gateway wraps it."""
    return Tokenizer(code_tokenizer)


def apply_edit(text: str, start_share: float, length_share: float, insert: str) -> str:
    start = int(start_share * len(text))
    end = start + int(length_share * (len(text) - start) * 0.2)
    return text[:start] + insert + text[end:]


def test_pieces_cut_only_at_safe_points_and_join_to_the_text():
    text = "".join(TINY_TEXT) * 10
    pieces = split_pieces(text, 40)
    assert "".join(pieces) == text
    assert len(pieces) > 5
    for before, after in zip(pieces, pieces[1:], strict=False):
        after_a_line = before.endswith("\n") and not before[-2].isspace() and not after[0].isspace()
        in_an_indent = before.endswith("\n ") or before.endswith("  ")
        in_an_indent = in_an_indent and after[0] == " " and not after[1].isspace()
        assert after_a_line or in_an_indent, (before[-8:], after[:8])


def test_the_test_tokenizers_split_at_safe_points(tokenizer):
    assert splits_at_safe_points(tokenizer)
    assert splits_at_safe_points(make_tokenizer())


@settings(max_examples=60, deadline=None)
@given(edits=EDITS, seed=st.integers(0, 3))
def test_incremental_tokens_and_hashes_equal_from_scratch_after_random_edits(tokenizer, edits, seed):
    text = "".join(random.Random(seed).sample(TINY_TEXT * 8, 20))
    namespace = namespace_hash("model", "salt")
    tokenized = TokenizedText(tokenizer, incremental=True)
    chain = HashChain(namespace, block_size=4)
    for start_share, length_share, insert in edits:
        text = apply_edit(text, start_share, length_share, insert)
        tokenized.update(text)
        expected = tokenizer.encode(text)
        assert tokenized.text == text
        assert tokenized.token_ids == expected
        assert chain.update(expected) == hash_blocks(namespace, expected, 4)


def test_a_keystroke_re_encodes_and_re_hashes_only_the_end(tokenizer):
    text = "".join(TINY_TEXT) * 200  # about 20 KB
    tokenized = TokenizedText(tokenizer, incremental=True)
    tokenized.update(text)
    chain = HashChain(namespace_hash("model"), block_size=16)
    chain.update(tokenized.token_ids)
    tokenized.update(text + "    retur")
    assert tokenized.num_chars_encoded < 1000
    chain.update(tokenized.token_ids)
    assert chain.num_blocks_hashed <= 2


@pytest.mark.parametrize("incremental", [True, False])
def test_deleting_everything_and_starting_again(tokenizer, incremental):
    tokenized = TokenizedText(tokenizer, incremental=incremental)
    for text in ["def f():\n    pass\n", "", "x\n", "x\ny\n\n z"]:
        tokenized.update(text)
        assert tokenized.token_ids == tokenizer.encode(text)
