"""When pre-copy gives way to post-copy by itself: vmferry's ``x-postcopy-after``.

QEMU switches to post-copy only when told (``migrate-start-postcopy``); vmferry can also
switch when pre-copy has not converged after N rounds, S seconds, or whichever comes
first. Pure functions of the round count and the elapsed time (no clocks, no I/O), so
every case is tested without a VM; the engine asks at the end of each round.

The parameter's text: ``""`` (only when migrate-start-postcopy says so), ``"5"`` (rounds),
``"30s"`` or ``"500ms"`` (a time), or both, comma-separated in either order (``"5,30s"``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

from vmferry.errors import ConfigError

PARAM: Final = "x-postcopy-after"
# A round count past a million, or a wait past a day, is a typo, not a plan (the same
# bound as x-switchover-timeout's).
MAX_ROUNDS: Final = 1_000_000
MAX_SECONDS: Final = 86_400.0
MIN_SECONDS: Final = 0.001  # a round takes longer than that: finer means nothing
_ROUNDS_RE: Final = re.compile(r"^\d+$")
_TIME_RE: Final = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)$")
_FORMS: Final = 'N (rounds), a time such as "30s" or "500ms", both as "N,30s", or ""'


@dataclass(frozen=True)
class PostcopyAfter:
    """The parsed ``x-postcopy-after``: a round count, a time, either, or neither."""

    rounds: int | None = None  # switch once this many rounds are done without converging
    seconds: float | None = None  # switch once the migration has run this long

    @property
    def never(self) -> bool:
        """Neither is set: post-copy starts only when migrate-start-postcopy asks."""
        return self.rounds is None and self.seconds is None

    def __str__(self) -> str:
        """The canonical text (what parse_postcopy_after reads back to the same value)."""
        parts = []
        if self.rounds is not None:
            parts.append(str(self.rounds))
        if self.seconds is not None:
            parts.append(_seconds_text(self.seconds))
        return ",".join(parts)


def _seconds_text(seconds: float) -> str:
    # Six significant digits: within MIN_SECONDS..MAX_SECONDS that never needs an exponent.
    ms = seconds * 1000
    if seconds < 1 and ms == int(ms):
        return f"{int(ms)}ms"
    return f"{seconds:g}s"


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"{PARAM} = {text!r}: {why}; expected {_FORMS}")


def parse_postcopy_after(text: str) -> PostcopyAfter:
    """``"5"`` → 5 rounds, ``"30s"``/``"500ms"`` → a time, ``"5,30s"`` → both, ``""`` →
    neither; anything else is a ConfigError naming the parameter and the text."""
    if not isinstance(text, str):
        raise ConfigError(f"{PARAM} = {text!r}: expected a string ({_FORMS})")
    if not text.strip():
        return PostcopyAfter()
    rounds: int | None = None
    seconds: float | None = None
    for raw in text.split(","):
        part = raw.strip().lower()
        if _ROUNDS_RE.match(part):
            if rounds is not None:
                raise _bad(text, "two round counts")
            rounds = int(part)
            if not 1 <= rounds <= MAX_ROUNDS:
                raise _bad(
                    text,
                    f"{rounds} rounds is out of range 1..{MAX_ROUNDS} (post-copy starts "
                    "at a round's end: 1 = when the first round ends)",
                )
            continue
        m = _TIME_RE.match(part)
        if m is None:
            raise _bad(text, f"cannot read {raw.strip()!r}" if raw.strip() else "an empty part")
        if seconds is not None:
            raise _bad(text, "two times")
        value = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        if not (math.isfinite(value) and MIN_SECONDS <= value <= MAX_SECONDS):
            raise _bad(text, f"{raw.strip()} is out of range 1ms..{MAX_SECONDS:g}s")
        seconds = value
    return PostcopyAfter(rounds, seconds)


def _rounds_due(after: PostcopyAfter, rounds_done: int) -> bool:
    return after.rounds is not None and rounds_done >= after.rounds


def _time_due(after: PostcopyAfter, elapsed_s: float) -> bool:
    return after.seconds is not None and elapsed_s >= after.seconds


def postcopy_due(after: PostcopyAfter, rounds_done: int, elapsed_s: float) -> bool:
    """At a round's end, with pre-copy not converged: is it time to switch by itself?
    ``rounds_done`` counts the rounds finished (round 0 included), ``elapsed_s`` the
    seconds since the migration started."""
    return _rounds_due(after, rounds_done) or _time_due(after, elapsed_s)


def _rounds(n: int) -> str:
    return f"{n} round" if n == 1 else f"{n} rounds"


def postcopy_reason(after: PostcopyAfter, rounds_done: int, elapsed_s: float) -> str:
    """The convergence line for a switch to post-copy: why x-postcopy-after fired when it
    is due, else (the switch was asked for) that migrate-start-postcopy asked."""
    when = f"{_rounds(rounds_done)}, {elapsed_s:.1f} s"
    if not postcopy_due(after, rounds_done, elapsed_s):
        return f"switched to post-copy: asked by migrate-start-postcopy (after {when})"
    reached = []
    if _rounds_due(after, rounds_done):
        reached.append(_rounds(rounds_done))
    if _time_due(after, elapsed_s):
        reached.append(f"{elapsed_s:.1f} s")
    return f"switched to post-copy: not converged after {' and '.join(reached)} ({PARAM} {after})"
