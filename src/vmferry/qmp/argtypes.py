"""Argument types of the QMP schema and their checks, with QEMU's error texts.

Each type checks one JSON value (already decoded) and returns it; `path` is the
parameter's full name as QEMU reports it (`capabilities[0].state`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

from vmferry.qmp.backend import QmpError

# QEMU's JSON numbers are int64 or uint64; anything wider arrives as a double there, which
# an integer parameter refuses as a type error, so this does too.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def _type_error(path: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{path}', expected: {expected}")


class ArgType(ABC):
    """One kind of JSON value a parameter accepts."""

    #: The word QEMU uses after "expected:" for this type.
    name: str

    @abstractmethod
    def check(self, value: object, path: str) -> object:
        """Return `value` if it is acceptable, else raise `QmpError` naming `path`."""


@dataclass(frozen=True)
class Str(ArgType):
    """A string, optionally one of a fixed set (a QAPI enum)."""

    values: tuple[str, ...] | None = None
    #: Text for a value outside `values`; `{path}` and `{value}` are filled in.
    rejected: str = "Parameter '{path}' does not accept value '{value}'"
    name: str = field(default="string", init=False)

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, str):
            raise _type_error(path, self.name)
        if self.values is not None and value not in self.values:
            raise QmpError(self.rejected.format(path=path, value=value))
        return value


@dataclass(frozen=True)
class Int(ArgType):
    """An integer (never a boolean or a float), optionally within [low, high]."""

    low: int | None = None
    high: int | None = None
    #: What the number counts, for the range message ("milliseconds").
    unit: str = ""
    name: str = field(default="integer", init=False)

    def check(self, value: object, path: str) -> object:
        # bool is an int in Python but not in JSON.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, self.name)
        if not _INT_MIN <= value <= _INT_MAX:
            raise _type_error(path, self.name)
        too_low = self.low is not None and value < self.low
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise QmpError(f"Parameter '{path}' must be {self.describe_range()}")
        return value

    def describe_range(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"an integer from {self.low} to {self.high}"
        elif self.low is not None:
            text = f"an integer of at least {self.low}"
        elif self.high is not None:
            text = f"an integer of at most {self.high}"
        else:
            text = "an integer"
        return f"{text} ({self.unit})" if self.unit else text


@dataclass(frozen=True)
class Bool(ArgType):
    name: str = field(default="boolean", init=False)

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, bool):
            raise _type_error(path, self.name)
        return value


@dataclass(frozen=True)
class Number(ArgType):
    """Any JSON number, integer or not."""

    name: str = field(default="number", init=False)

    def check(self, value: object, path: str) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(path, self.name)
        return value


@dataclass(frozen=True)
class Array(ArgType):
    item: ArgType
    name: str = field(default="array", init=False)

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, list):
            raise _type_error(path, self.name)
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class Arg:
    """One named parameter: its type and whether it must be given."""

    type: ArgType
    required: bool = False


@dataclass(frozen=True)
class Struct(ArgType):
    """A JSON object with named members; also a command's whole argument list."""

    members: Mapping[str, Arg]
    name: str = field(default="object", init=False)

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, dict):
            raise _type_error(path, self.name)
        return self.check_members(value, path)

    def check_members(self, given: Mapping[str, object], path: str = "") -> dict[str, object]:
        """Check `given` member by member, then refuse leftovers, in QEMU's order."""
        prefix = f"{path}." if path else ""
        checked: dict[str, object] = {}
        for key, arg in self.members.items():
            full = prefix + key
            if key not in given:
                if arg.required:
                    raise QmpError(f"Parameter '{full}' is missing")
                continue
            checked[key] = arg.type.check(given[key], full)
        for key in given:
            if key not in self.members:
                raise QmpError(f"Parameter '{prefix}{key}' is unexpected")
        return checked
