"""x-postcopy-after: its text, when it is due, and the convergence line it gives."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import ConfigError
from vmferry.migration.params import MigrationParameters
from vmferry.migration.postcopy_policy import (
    MAX_ROUNDS,
    MAX_SECONDS,
    PostcopyAfter,
    parse_postcopy_after,
    postcopy_due,
    postcopy_reason,
)


@pytest.mark.parametrize(
    ("text", "rounds", "seconds"),
    [
        ("", None, None),
        ("  ", None, None),
        ("5", 5, None),
        ("1", 1, None),
        ("30s", None, 30.0),
        ("500ms", None, 0.5),
        ("1.5s", None, 1.5),
        ("5,30s", 5, 30.0),
        ("30s,5", 5, 30.0),  # either order
        (" 5 , 30S ", 5, 30.0),  # spaces around the parts, any case
        (f"{MAX_ROUNDS}", MAX_ROUNDS, None),
        ("86400s", None, MAX_SECONDS),
        ("1ms", None, 0.001),
    ],
)
def test_accepted_forms(text: str, rounds: int | None, seconds: float | None) -> None:
    after = parse_postcopy_after(text)
    assert (after.rounds, after.seconds) == (rounds, seconds)
    assert after.never == (rounds is None and seconds is None)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0", "0 rounds is out of range 1..1000000"),
        (f"{MAX_ROUNDS + 1}", "out of range"),
        ("-1", "cannot read '-1'"),
        ("5,6", "two round counts"),
        ("1s,2s", "two times"),
        ("30", None),  # accepted: rounds (checked below it is not a time)
        ("30 s", "cannot read '30 s'"),
        ("30m", "cannot read '30m'"),
        ("1e3s", "cannot read '1e3s'"),
        ("5,", "an empty part"),
        (",", "an empty part"),
        ("0s", "0s is out of range 1ms..86400s"),
        ("0.5ms", "out of range"),
        ("86401s", "out of range"),
        ("inf s", "cannot read"),
        ("nan", "cannot read 'nan'"),
    ],
)
def test_refused_forms_name_the_parameter_and_the_text(text: str, why: str | None) -> None:
    if why is None:
        assert parse_postcopy_after(text) == PostcopyAfter(rounds=30)
        return
    with pytest.raises(ConfigError) as e:
        parse_postcopy_after(text)
    line = str(e.value)
    assert line.startswith(f"x-postcopy-after = {text!r}: "), line
    assert why in line and "expected N (rounds)" in line, line
    assert "\n" not in line


def test_not_a_string_is_refused() -> None:
    with pytest.raises(ConfigError, match="x-postcopy-after = 5: expected a string"):
        parse_postcopy_after(5)  # type: ignore[arg-type]


def test_parameters_validate_it_on_construction_and_update() -> None:
    assert MigrationParameters(postcopy_after="5,30s").postcopy_after == "5,30s"
    with pytest.raises(ConfigError, match="x-postcopy-after = 'soon'"):
        MigrationParameters(postcopy_after="soon")
    with pytest.raises(ConfigError, match="x-postcopy-after = '0'"):
        MigrationParameters().updated({"x-postcopy-after": "0"})
    with pytest.raises(ConfigError, match="x-postcopy-after = 3: expected a string"):
        MigrationParameters().updated({"x-postcopy-after": 3})


def test_due_by_rounds_by_time_or_whichever_comes_first() -> None:
    never = parse_postcopy_after("")
    assert not postcopy_due(never, 10**6, 1e9)
    rounds = parse_postcopy_after("3")
    assert [postcopy_due(rounds, n, 1e9 if n < 3 else 0.0) for n in range(5)] == [
        False, False, False, True, True,
    ]  # fmt: skip
    timed = parse_postcopy_after("2s")
    assert not postcopy_due(timed, 10**6, 1.999)
    assert postcopy_due(timed, 1, 2.0)
    both = parse_postcopy_after("4,10s")
    assert not postcopy_due(both, 3, 9.9)
    assert postcopy_due(both, 4, 0.1)  # the rounds came first
    assert postcopy_due(both, 1, 10.0)  # the time came first


def test_reason_says_which_limit_fired_or_that_it_was_asked_for() -> None:
    assert postcopy_reason(parse_postcopy_after("5"), 5, 12.34) == (
        "switched to post-copy: not converged after 5 rounds (x-postcopy-after 5)"
    )
    assert postcopy_reason(parse_postcopy_after("30s"), 9, 30.04) == (
        "switched to post-copy: not converged after 30.0 s (x-postcopy-after 30s)"
    )
    assert postcopy_reason(parse_postcopy_after("2,500ms"), 2, 0.75) == (
        "switched to post-copy: not converged after 2 rounds and 0.8 s (x-postcopy-after 2,500ms)"
    )
    # Not due: the switch came from migrate-start-postcopy.
    assert postcopy_reason(parse_postcopy_after(""), 1, 0.42) == (
        "switched to post-copy: asked by migrate-start-postcopy (after 1 round, 0.4 s)"
    )
    assert "asked by migrate-start-postcopy (after 2 rounds" in postcopy_reason(
        parse_postcopy_after("9"), 2, 1.0
    )


_ROUNDS = st.integers(1, MAX_ROUNDS)
_MS = st.integers(1, int(MAX_SECONDS * 1000))


@st.composite
def _texts(draw: st.DrawFn) -> tuple[str, int | None, float | None]:
    rounds = draw(st.none() | _ROUNDS)
    ms = draw(st.none() | _MS)
    parts = []
    if rounds is not None:
        parts.append(str(rounds))
    if ms is not None:
        parts.append(draw(st.sampled_from([f"{ms}ms", f"{ms / 1000}s"])))
    if draw(st.booleans()):
        parts.reverse()
    return ",".join(parts), rounds, None if ms is None else ms / 1000


@given(_texts())
def test_every_written_form_parses_and_prints_back(
    case: tuple[str, int | None, float | None],
) -> None:
    text, rounds, seconds = case
    after = parse_postcopy_after(text)
    assert after.rounds == rounds
    assert (after.seconds is None) == (seconds is None)
    if seconds is not None and after.seconds is not None:
        assert math.isclose(after.seconds, seconds, rel_tol=1e-9)
    again = parse_postcopy_after(str(after))
    assert again.rounds == after.rounds
    if after.seconds is not None and again.seconds is not None:
        assert math.isclose(again.seconds, after.seconds, rel_tol=1e-5)
    else:
        assert again.seconds is after.seconds is None


@given(st.text(max_size=20))
def test_any_text_parses_or_is_one_config_error(text: str) -> None:
    try:
        after = parse_postcopy_after(text)
    except ConfigError as e:
        assert str(e).startswith("x-postcopy-after = ")
        return
    assert after.rounds is None or 1 <= after.rounds <= MAX_ROUNDS
    assert after.seconds is None or 0.001 <= after.seconds <= MAX_SECONDS


@given(st.none() | _ROUNDS, st.none() | _MS, st.integers(0, 2 * MAX_ROUNDS), st.floats(0, 2e5))
def test_due_is_monotonic_and_matches_its_limits(
    rounds: int | None, ms: int | None, done: int, elapsed: float
) -> None:
    after = PostcopyAfter(rounds, None if ms is None else ms / 1000)
    due = postcopy_due(after, done, elapsed)
    expected = (rounds is not None and done >= rounds) or (ms is not None and elapsed >= ms / 1000)
    assert due == expected
    if due:  # more rounds or more time never makes it not due
        assert postcopy_due(after, done + 1, elapsed + 1.0)
        assert postcopy_reason(after, done, elapsed).startswith(
            "switched to post-copy: not converged after "
        )
