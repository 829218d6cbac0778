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
