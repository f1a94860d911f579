"""Metadata filters: one syntax for the engine, the API, the web UI and the REPL.

Text form, clauses joined by `and`:  ``tags contains dog and width >= 1000 and folder prefix "cats"``
Object form (JSON):
    ``{"tags": {"$contains": "dog"}, "width": {"$gte": 1000}, "folder": {"$prefix": "cats"}}``
(a bare value means equality). Operators: = != > >= < <= contains in prefix. Text comparisons
ignore case (`format = jpeg` finds JPEG); `contains` is membership for list fields (tags) and a
substring test for text; `in` takes values separated by `|`; `prefix` is a case-sensitive string
prefix (folders). Dates written as YYYY-MM-DD compare with the `modified`, `indexed` and `taken`
time stamps.

Parsing is linear in the filter's length, which is bounded (MAX_FILTER_CHARS), as is the number of
conditions and of `in` values (MAX_FILTER_VALUES); `in` is a set lookup per image, however many
values it has. `check_fields` refuses fields the index does not hold, suggesting the nearest.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from errors import FilterError

OPERATORS = {
    "=": "$eq",
    "==": "$eq",
    "!=": "$ne",
    ">": "$gt",
    ">=": "$gte",
    "<": "$lt",
    "<=": "$lte",
    "contains": "$contains",
    "in": "$in",
    "prefix": "$prefix",
    "startswith": "$prefix",
}
TIMESTAMP_FIELDS = frozenset({"modified", "indexed", "taken"})
MAX_FILTER_CHARS = 10_000
MAX_FILTER_VALUES = 1_000
KNOWN_FIELDS_SHOWN = 40
# Integers up to this size are exactly floats (2**53).
FLOAT_EXACT_INTEGERS = 2**53
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?)?$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# One word of the text form: quoted and unquoted pieces with no space between them.
_WORD = re.compile(r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|\\.|[^\s"'\\])+""", re.DOTALL)
_PIECE = re.compile(r""""((?:[^"\\]|\\.)*)"|'([^']*)'|\\(.)|([^"'\\]+)""", re.DOTALL)
_SPACE = re.compile(r"\s*")
_COMPACT = re.compile(r"^([^=!<>]+)(==|!=|>=|<=|=|>|<)(.+)$", re.DOTALL)


@dataclass(frozen=True)
class FilterLimits:
    chars: int = MAX_FILTER_CHARS
    values: int = MAX_FILTER_VALUES


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: Any
    _members: frozenset[tuple[str, Any]] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.op == "$in":
            object.__setattr__(self, "_members", frozenset(_member(value) for value in self.value))

    def matches(self, metadata: dict[str, Any]) -> bool:
        return self.matches_value(metadata.get(self.field))

    def matches_value(self, stored: Any) -> bool:
        """Whether an image whose field holds `stored` (None: no such field) meets the condition."""
        if stored is None:
            return self.op == "$ne"
        if self.op == "$in":
            items = stored if isinstance(stored, list) else [stored]
            return any(_member(item) in self._members for item in items)
        return _COMPARE[self.op](stored, self.value)

    def matches_values(self, values: Sequence[Any], numbers: np.ndarray | None) -> np.ndarray:
        """`matches_value` of each of `values`; `numbers` holds them as exact floats (NaN where not a
        number), which an order comparison with a number tests all at once."""
        if numbers is not None and self.op in _ORDERED_ARRAYS and exact_float(self.value) is not None:
            return _ORDERED_ARRAYS[self.op](numbers, self.value)
        return np.fromiter((self.matches_value(value) for value in values), dtype=bool, count=len(values))


@dataclass(frozen=True)
class Filter:
    conditions: tuple[Condition, ...]

    def matches(self, metadata: dict[str, Any]) -> bool:
        return all(condition.matches(metadata) for condition in self.conditions)

    @property
    def key(self) -> str:
        return repr(self.conditions)

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(condition.field for condition in self.conditions)


def parse_filter(
    spec: str | dict[str, Any] | Filter | None, limits: FilterLimits | None = None
) -> Filter | None:
    """A `Filter` from the text or object form; None or an empty spec means no filter."""
    limits = limits or FilterLimits()
    if spec is None or isinstance(spec, Filter):
        return spec
    if isinstance(spec, str):
        conditions = _parse_text(spec, limits)
    elif isinstance(spec, dict):
        conditions = _parse_object(spec, limits)
    else:
        raise FilterError("a filter is a text like 'tags contains dog' or a JSON object")
    if len(conditions) > limits.values:
        raise FilterError(f"a filter has at most MAX_FILTER_VALUES={limits.values} conditions")
    return Filter(tuple(conditions)) if conditions else None


def check_fields(image_filter: Filter | None, known: set[str] | frozenset[str]) -> None:
    """Refuse a filter on a field that no indexed image has, naming the known fields."""
    if image_filter is None:
        return
    for name in sorted(image_filter.fields - known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        close = close or [field for field in known if field.lower() == name.lower()]
        hint = f"did you mean {close[0]}? " if close else ""
        shown = sorted(known)
        listed = ", ".join(shown[:KNOWN_FIELDS_SHOWN]) + (", ..." if len(shown) > KNOWN_FIELDS_SHOWN else "")
        raise FilterError(f"unknown filter field {name!r}: {hint}The indexed images have: {listed}")


# -- the text form -------------------------------------------------------------------------------


def _parse_text(text: str, limits: FilterLimits) -> list[Condition]:
    if len(text) > limits.chars:
        raise FilterError(f"the filter is {len(text)} characters long, over MAX_FILTER_CHARS={limits.chars}")
    clauses: list[list[str]] = [[]]
    for word, quoted in _words(text):
        if not quoted and word.lower() == "and":
            clauses.append([])
        else:
            clauses[-1].append(word)
    return [_parse_clause(clause, text, limits) for clause in clauses if clause]


def _words(text: str) -> list[tuple[str, bool]]:
    """The words of `text` as a shell would split them, and whether each had quotes; linear time."""
    words = []
    position = _SPACE.match(text).end()
    while position < len(text):
        match = _WORD.match(text, position)
        if match is None:
            raise FilterError(
                f"cannot read filter {_excerpt(text)}: a quote at character {position + 1} is not closed"
            )
        pieces = [_unquoted(piece) for piece in _PIECE.finditer(match.group())]
        words.append(("".join(piece for piece, _ in pieces), any(quoted for _, quoted in pieces)))
        position = _SPACE.match(text, match.end()).end()
    return words


def _unquoted(piece: re.Match[str]) -> tuple[str, bool]:
    double, single, escaped, plain = piece.groups()
    if double is not None:
        return re.sub(r"\\(.)", r"\1", double, flags=re.DOTALL), True
    if single is not None:
        return single, True
    return (escaped if escaped is not None else plain), False


def _parse_clause(words: list[str], text: str, limits: FilterLimits) -> Condition:
    if len(words) == 1:
        match = _COMPACT.match(words[0])
        if match:
            words = [match.group(1), match.group(2), match.group(3)]
    if len(words) != 3:
        raise FilterError(
            f"cannot read filter clause {_excerpt(' '.join(words))} in {_excerpt(text)}: "
            "write FIELD OPERATOR VALUE, e.g. 'tags contains dog' or 'width >= 800'"
        )
    name, operator, value = words
    op = OPERATORS.get(operator.lower())
    if op is None:
        raise FilterError(f"unknown filter operator {_excerpt(operator)}; use one of {', '.join(OPERATORS)}")
    if op == "$in":
        values = value.split("|")
        _check_count(name, values, limits)
        return _condition(name, op, [_typed(name, part) for part in values])
    return _condition(name, op, _typed(name, value))


def _typed(name: str, word: str) -> Any:
    """A value written in a text filter: a number, a date (for time stamps) or a string."""
    if name in TIMESTAMP_FIELDS and _DATE.match(word):
        return _timestamp(name, word)
    for kind in (int, float):
        try:
            return kind(word)
        except ValueError:
            pass
    if word.lower() in ("true", "false"):
        return word.lower() == "true"
    return word


# -- the object form -----------------------------------------------------------------------------


def _parse_object(spec: dict[str, Any], limits: FilterLimits) -> list[Condition]:
    conditions = []
    for name, test in spec.items():
        if isinstance(test, dict):
            if not test:
                raise FilterError(f"filter on {_excerpt(name)} has no operator")
            for op, value in test.items():
                if op not in set(OPERATORS.values()):
                    raise FilterError(
                        f"unknown filter operator {_excerpt(op)} on {_excerpt(name)}; "
                        f"use one of {', '.join(sorted(set(OPERATORS.values())))}"
                    )
                conditions.append(_condition(name, op, _typed_json(name, value, limits)))
        else:
            conditions.append(_condition(name, "$eq", _typed_json(name, test, limits)))
    return conditions


def _typed_json(name: Any, value: Any, limits: FilterLimits) -> Any:
    if isinstance(value, list):
        _check_count(name, value, limits)
        return [_typed_scalar(name, item) for item in value]
    return _typed_scalar(name, value)


def _typed_scalar(name: Any, value: Any) -> Any:
    if isinstance(value, str) and name in TIMESTAMP_FIELDS and _DATE.match(value):
        return _timestamp(name, value)
    if not isinstance(value, str | int | float | bool):
        raise FilterError(
            f"invalid value for filter on {_excerpt(name)}: give a text, a number or true/false "
            "(a list only for 'in', of such values)"
        )
    return value


# -- building and comparing ----------------------------------------------------------------------


def _condition(name: Any, op: str, value: Any) -> Condition:
    if not isinstance(name, str) or not _FIELD.match(name):
        raise FilterError(f"invalid filter field name {_excerpt(name)}")
    if op == "$in" and not isinstance(value, list):
        raise FilterError(f"'in' on {name!r} needs a list of values")
    if op != "$in" and isinstance(value, list):
        raise FilterError(f"only 'in' takes a list of values, not {op} on {name!r}")
    if op in ("$prefix", "$contains") and not isinstance(value, str):
        value = str(value)
    if name in TIMESTAMP_FIELDS and op in ("$gt", "$gte", "$lt", "$lte") and isinstance(value, str):
        raise FilterError(f"{name} compares with a date (YYYY-MM-DD) or a number, not {_excerpt(value)}")
    return Condition(name, op, value)


def _check_count(name: Any, values: list[Any], limits: FilterLimits) -> None:
    if len(values) > limits.values:
        raise FilterError(
            f"'in' on {_excerpt(name)} has {len(values)} values, over MAX_FILTER_VALUES={limits.values}"
        )


def _timestamp(name: str, text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(f"{text!r} is not a valid date for {name} (YYYY-MM-DD, optionally HH:MM)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _excerpt(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "text" if isinstance(value, str) else "other"


def _key(value: Any) -> Any:
    """How a value compares: texts without regard to case."""
    return value.casefold() if isinstance(value, str) else value


def _member(value: Any) -> tuple[str, Any]:
    return _kind(value), _key(value)


def _equal(stored: Any, value: Any) -> bool:
    if isinstance(stored, list):
        return any(_equal(item, value) for item in stored)
    return _member(stored) == _member(value)


def _contains(stored: Any, value: str) -> bool:
    needle = value.casefold()
    if isinstance(stored, list):
        return any(str(item).casefold() == needle for item in stored)
    return needle in str(stored).casefold()


def _ordered(test: Any) -> Any:
    def compare(stored: Any, value: Any) -> bool:
        kind = _kind(stored)
        return kind in ("number", "text") and kind == _kind(value) and test(_key(stored), _key(value))

    return compare


def exact_float(value: Any) -> float | None:
    """A number as the float that equals it exactly; None for what is not a number (booleans
    included) or an integer a float cannot hold."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and abs(value) > FLOAT_EXACT_INTEGERS:
        return None
    return float(value)


_ORDERED_ARRAYS = {"$gt": np.greater, "$gte": np.greater_equal, "$lt": np.less, "$lte": np.less_equal}
_COMPARE = {
    "$eq": _equal,
    "$ne": lambda stored, value: not _equal(stored, value),
    "$gt": _ordered(lambda a, b: a > b),
    "$gte": _ordered(lambda a, b: a >= b),
    "$lt": _ordered(lambda a, b: a < b),
    "$lte": _ordered(lambda a, b: a <= b),
    "$contains": _contains,
    "$prefix": lambda stored, value: isinstance(stored, str) and stored.startswith(value),
}
