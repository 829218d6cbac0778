from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.engine.tokenizer import Detokenizer
from tests.factories import make_tokenizer


@settings(max_examples=40, deadline=None)
@given(text=st.text(min_size=0, max_size=60), cuts=st.lists(st.integers(1, 4), max_size=30))
def test_incremental_deltas_add_up_to_the_whole_decode(text, cuts):
    tokenizer = make_tokenizer()
    ids = tokenizer.encode(text)
    detok = Detokenizer(tokenizer)
    out, i = "", 0
    for n in cuts + [len(ids)]:
        out += detok.add(ids[i : i + n])
        assert "\ufffd" not in out or "\ufffd" in text
        i += n
    out += detok.flush()
    assert out == tokenizer.decode(ids)


def test_stop_string_is_held_back_and_cut():
    tokenizer = make_tokenizer()
    ids = tokenizer.encode("x = 1\n\ny = 2")
    detok = Detokenizer(tokenizer, stop_strings=("\n\n",))
    sent = "".join(detok.add([t]) for t in ids) + detok.flush()
    assert sent == "x = 1"


def test_partial_stop_string_that_does_not_complete_is_released():
    tokenizer = make_tokenizer()
    detok = Detokenizer(tokenizer, stop_strings=("END",))
    sent = "".join(detok.add([t]) for t in tokenizer.encode("a = EN"))
    assert sent == "a = "
    assert detok.flush() == "EN"


class CountingTokenizer:
    """A tokenizer that records how many tokens each decode call is given."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.decoded: list[int] = []

    def decode(self, token_ids):
        self.decoded.append(len(token_ids))
        return self._inner.decode(token_ids)


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet="ab\n =é€", min_size=0, max_size=80),
    stops=st.lists(st.text(alphabet="ab\n =é€", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(1, 3), max_size=40),
)
def test_streamed_text_is_the_whole_text_cut_at_the_first_stop_string(text, stops, cuts):
    tokenizer = make_tokenizer()
    ids = tokenizer.encode(text)
    detok = Detokenizer(tokenizer, stop_strings=tuple(stops))
    out, i = "", 0
    for n in cuts + [len(ids)]:
        out += detok.add(ids[i : i + n])
        i += n
    out += detok.flush()
    whole = tokenizer.decode(ids)
    cut = min((j for j in (whole.find(s) for s in stops) if j >= 0), default=len(whole))
    assert out == whole[:cut]


def test_each_add_costs_the_new_tokens_and_the_longest_stop_string_not_the_output():
    tokenizer = CountingTokenizer(make_tokenizer())
    stops = tuple(f"never-{i}-" + "z" * 200 for i in range(16))
    detok = Detokenizer(tokenizer, stop_strings=stops)  # type: ignore[arg-type]
    ids = tokenizer._inner.encode("never-1-zz x = [never-2-z] é€ " * 300)
    for t in ids:
        detok.add([t])
        # Unsent text: at most the longest stop string's length (what could still start one).
        assert len(detok._unsent) < max(len(s) for s in stops)
    assert max(tokenizer.decoded) <= 8 + 1


def test_invalid_bytes_do_not_pile_up_undecoded():
    tokenizer = CountingTokenizer(make_tokenizer())
    detok = Detokenizer(tokenizer)  # type: ignore[arg-type]
    lone = [t for t in range(tokenizer._inner.vocab_size) if tokenizer._inner.decode([t]) == "\ufffd"]
    if not lone:
        return  # this tokenizer has no token that is a lone non-UTF-8 byte
    for _ in range(100):
        detok.add([lone[0]])
    assert max(tokenizer.decoded) <= 8 + 1
