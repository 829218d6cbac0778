"""StopChecker: stop strings are found in the output, at a cost bounded by the longest stop string."""

from __future__ import annotations

from kvmesh.engine.sampling import SamplingParams
from kvmesh.engine.sequence import FinishReason, Sequence, StopChecker
from tests.engine.test_tokenizer import CountingTokenizer
from tests.factories import make_tokenizer


def test_stop_check_decodes_the_tail_only_however_long_the_output() -> None:
    tokenizer = CountingTokenizer(make_tokenizer())
    output = tokenizer._inner.encode("x = [1, 2, 3]\n" * 200 + "END")
    stops = ("END", "never " * 10)
    seq = Sequence([1, 2, 3], SamplingParams(max_new_tokens=10_000, stop_strings=stops))
    checker = StopChecker(tokenizer, eos_token_ids=(0,), max_context_tokens=100_000)  # type: ignore[arg-type]
    reasons = []
    for token in output:
        seq.token_ids.append(token)
        reasons.append(checker.check(seq))
    assert reasons[-1] == FinishReason.STOP and not any(reasons[:-1])
    longest = max(len(s.encode()) for s in stops)
    assert max(tokenizer.decoded) == longest + 1  # never the whole output (thousands of tokens)


def test_the_prompt_is_never_searched_for_stop_strings() -> None:
    tokenizer = make_tokenizer()
    prompt = tokenizer.encode("END here")
    seq = Sequence(prompt, SamplingParams(stop_strings=("END",)))
    seq.token_ids.extend(tokenizer.encode(" x"))
    assert StopChecker(tokenizer, (0,), 1000).check(seq) is None
