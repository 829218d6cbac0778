"""Typing traces: a person retyping a region of a real file, for replays against a gateway
(kvmesh.client_replay, `kvmesh replay`, bench/typing.py).

The model, kept simple on purpose:

- The region: `num_lines` whole lines starting at `start_line` (default: the first non-blank line in the
  middle of the file) are taken out of the file; the typist types them back, character by character,
  with the cursor at the region's start and the rest of the file around it.
- Delays: before each character, `char_ms` times a factor drawn uniformly from [1 - jitter, 1 + jitter];
  after a word ends (the character typed is a space, a newline or punctuation), `word_pause_ms` more;
  after a newline, `line_pause_ms` more.
- Deletions: before a character, with probability `typo_rate`, a wrong character (the next letter of the
  alphabet) is typed, then deleted with a backspace `char_ms` later.
- Accepts: where a word ends (a "look" step), the typist looks at the suggestion for the current version:
  waits for it (at most `look_ms`) and, when the file says it next (all of it, or its first
  `accept_min_chars` characters at least), reads it for `accept_ms` and presses Tab; the characters
  that matched are then skipped, and a wrong rest is deleted with one keystroke (select, delete) after
  the next character's delay. A suggestion that does not match is ignored.

A trace holds the seeded draws (delays, typos, look points), not the suggestions: replays against two
gateways (or through sessions and through stateless requests) type the same characters at the same times
and apply the same accept rule; where they accept may differ only if their suggestions differ.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

WORD_ENDS = frozenset(" \n\t.,:;()[]{}=")


@dataclass(frozen=True)
class TraceConfig:
    """How a trace is drawn from a file."""

    num_lines: int = 4
    """Lines of the region retyped."""
    start_line: int | None = None
    """First line of the region, 0-based; None: the first non-blank line from the middle of the file."""
    char_ms: float = 60.0
    """Mean delay before a character, in milliseconds."""
    jitter: float = 0.5
    """Each delay is char_ms times a factor in [1 - jitter, 1 + jitter]."""
    word_pause_ms: float = 200.0
    """Extra pause after a word ends, in milliseconds."""
    line_pause_ms: float = 500.0
    """Extra pause after a newline, in milliseconds."""
    typo_rate: float = 0.03
    """Chance, per character, of a wrong character typed and deleted first."""
    look_ms: float = 2000.0
    """How long the typist waits, at a look step, for the suggestion to finish, in milliseconds."""
    accept_ms: float = 300.0
    """How long the typist reads a matching suggestion before pressing Tab, in milliseconds."""
    accept_min_chars: int = 4
    """A suggestion whose first this many characters (or all, if shorter) match is accepted."""
    seed: int = 0


@dataclass(frozen=True)
class Step:
    """What happens before and after one character of the region is typed."""

    delay_ms: float
    """Pause before the character (or before its typo), in milliseconds."""
    typo: str
    """A wrong character typed and deleted first; "" for none."""
    look: bool
    """After this character the typist looks at the suggestion (accepts it when the file says it next)."""


@dataclass(frozen=True)
class Trace:
    """A file, the region retyped (text[start:end]) and one step per character of it."""

    name: str
    text: str
    start: int
    end: int
    steps: list[Step]
    look_ms: float
    accept_ms: float
    accept_min_chars: int

    @property
    def region(self) -> str:
        return self.text[self.start : self.end]

    @property
    def document(self) -> str:
        """The file with the region taken out: what the typist starts from (the cursor at start)."""
        return self.text[: self.start] + self.text[self.end :]

    def save(self, path: Path) -> None:
        data = {**asdict(self), "steps": [[s.delay_ms, s.typo, s.look] for s in self.steps]}
        path.write_text(json.dumps(data), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Trace:
        """Raises OSError, ValueError (not JSON) or KeyError (a field missing)."""
        data = json.loads(path.read_text(encoding="utf-8"))
        steps = [Step(float(delay), str(typo), bool(look)) for delay, typo, look in data["steps"]]
        return cls(
            data["name"],
            data["text"],
            data["start"],
            data["end"],
            steps,
            data["look_ms"],
            data["accept_ms"],
            data["accept_min_chars"],
        )


def make_trace(name: str, text: str, config: TraceConfig = TraceConfig()) -> Trace:
    """Draws a trace for retyping config.num_lines lines of text. Raises ValueError when the file has no
    such region."""
    lines = text.split("\n")
    start_line = config.start_line
    if start_line is None:
        start_line = next((i for i in range(len(lines) // 2, len(lines)) if lines[i].strip()), 0)
    if not 0 <= start_line < len(lines) or config.num_lines < 1:
        raise ValueError(f"{name} has {len(lines)} lines: no region of {config.num_lines} at {start_line}")
    start = sum(len(line) + 1 for line in lines[:start_line])
    end = min(
        len(text), start + sum(len(line) + 1 for line in lines[start_line : start_line + config.num_lines])
    )
    rng = random.Random(config.seed)
    steps = []
    for char in text[start:end]:
        delay = config.char_ms * rng.uniform(1 - config.jitter, 1 + config.jitter)
        typo = ""
        if char.isalpha() and rng.random() < config.typo_rate:
            typo = "a" if char.lower() == "z" else chr(ord(char.lower()) + 1)
        steps.append(Step(delay, typo, look=char in WORD_ENDS))
    for i, char in enumerate(text[start:end][:-1]):
        # The pause after a word or line comes before the next character.
        extra = config.word_pause_ms if char in WORD_ENDS else 0.0
        extra += config.line_pause_ms if char == "\n" else 0.0
        if extra:
            steps[i + 1] = Step(steps[i + 1].delay_ms + extra, steps[i + 1].typo, steps[i + 1].look)
    return Trace(name, text, start, end, steps, config.look_ms, config.accept_ms, config.accept_min_chars)
