"""Metadata filters: one syntax for the engine, the API, the web UI and the REPL.

Text form, clauses joined by `and`:  ``tags contains dog and width >= 1000 and folder prefix "cats"``
Object form (JSON):
    ``{"tags": {"$contains": "dog"}, "width": {"$gte": 1000}, "folder": {"$prefix": "cats"}}``
(a bare value means equality). Operators: = != > >= < <= contains in prefix. `contains` is
membership for list fields (tags) and a substring test for text, both case-insensitive; `in` takes
values separated by `|`; `prefix` is a case-sensitive string prefix (folders). Dates written as
YYYY-MM-DD compare with the `modified`, `indexed` and `taken` time stamps.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?)?$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class FilterError(ValueError):
    """A filter that cannot be understood, with what is wrong in words."""


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: Any

    def matches(self, metadata: dict[str, Any]) -> bool:
        stored = metadata.get(self.field)
        if stored is None:
            return self.op == "$ne"
        return _COMPARE[self.op](stored, self.value)


@dataclass(frozen=True)
class Filter:
    conditions: tuple[Condition, ...]

    def matches(self, metadata: dict[str, Any]) -> bool:
        return all(condition.matches(metadata) for condition in self.conditions)

    @property
    def key(self) -> str:
        return repr(self.conditions)


def parse_filter(spec: str | dict[str, Any] | Filter | None) -> Filter | None:
    """A `Filter` from the text or object form; None or an empty spec means no filter."""
    if spec is None or isinstance(spec, Filter):
        return spec
    if isinstance(spec, str):
        conditions = _parse_text(spec)
    elif isinstance(spec, dict):
        conditions = _parse_object(spec)
    else:
        raise FilterError("a filter is a text like 'tags contains dog' or a JSON object")
    return Filter(tuple(conditions)) if conditions else None


def _parse_text(text: str) -> list[Condition]:
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise FilterError(f"cannot read filter {text!r}: {error}") from None
    clauses: list[list[str]] = [[]]
    for word in words:
        if word.lower() == "and":
            clauses.append([])
        else:
            clauses[-1].append(word)
    return [_parse_clause(clause, text) for clause in clauses if clause]


def _parse_clause(words: list[str], text: str) -> Condition:
    if len(words) == 1:
        match = re.match(r"^([^=!<>]+)(==|!=|>=|<=|=|>|<)(.+)$", words[0])
        if match:
            words = [match.group(1), match.group(2), match.group(3)]
    if len(words) != 3:
        raise FilterError(
            f"cannot read filter clause {' '.join(words)!r} in {text!r}: "
            "write FIELD OPERATOR VALUE, e.g. 'tags contains dog' or 'width >= 800'"
        )
    field, operator, value = words
    op = OPERATORS.get(operator.lower())
    if op is None:
        raise FilterError(f"unknown filter operator {operator!r}; use one of {', '.join(OPERATORS)}")
    if op == "$in":
        return _condition(field, op, [_typed(field, part) for part in value.split("|")])
    return _condition(field, op, _typed(field, value))


def _parse_object(spec: dict[str, Any]) -> list[Condition]:
    conditions = []
    for field, test in spec.items():
        if isinstance(test, dict):
            if not test:
                raise FilterError(f"filter on {field!r} has no operator")
            for op, value in test.items():
                if op not in set(OPERATORS.values()):
                    raise FilterError(
                        f"unknown filter operator {op!r} on {field!r}; "
                        f"use one of {', '.join(sorted(set(OPERATORS.values())))}"
                    )
                conditions.append(_condition(field, op, _typed_json(field, value)))
        else:
            conditions.append(_condition(field, "$eq", _typed_json(field, test)))
    return conditions


def _condition(field: str, op: str, value: Any) -> Condition:
    if not isinstance(field, str) or not _FIELD.match(field):
        raise FilterError(f"invalid filter field name {field!r}")
    if op == "$in" and not isinstance(value, list):
        raise FilterError(f"'in' on {field!r} needs a list of values")
    if op in ("$prefix", "$contains") and not isinstance(value, str):
        value = str(value)
    if op in ("$gt", "$gte", "$lt", "$lte") and not isinstance(value, (int, float, str)):
        raise FilterError(f"a range on {field!r} needs a number, a date or a text")
    return Condition(field, op, value)


def _typed(field: str, word: str) -> Any:
    """A value written in a text filter: a number, a date (for time stamps) or a string."""
    if field in TIMESTAMP_FIELDS and _DATE.match(word):
        return _timestamp(word)
    for kind in (int, float):
        try:
            return kind(word)
        except ValueError:
            pass
    if word.lower() in ("true", "false"):
        return word.lower() == "true"
    return word


def _typed_json(field: str, value: Any) -> Any:
    if isinstance(value, list):
        return [_typed_json(field, item) for item in value]
    if isinstance(value, str) and field in TIMESTAMP_FIELDS and _DATE.match(value):
        return _timestamp(value)
    if value is None or isinstance(value, (dict,)):
        raise FilterError(f"invalid value for filter on {field!r}")
    return value


def _timestamp(text: str) -> float:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _comparable(stored: Any, value: Any) -> bool:
    numbers = (int, float)
    if isinstance(stored, bool) or isinstance(value, bool):
        return isinstance(stored, bool) and isinstance(value, bool)
    return (isinstance(stored, numbers) and isinstance(value, numbers)) or (
        isinstance(stored, str) and isinstance(value, str)
    )


def _equal(stored: Any, value: Any) -> bool:
    if isinstance(stored, list):
        return value in stored
    return _comparable(stored, value) and stored == value


def _contains(stored: Any, value: str) -> bool:
    needle = value.lower()
    if isinstance(stored, list):
        return any(str(item).lower() == needle for item in stored)
    return needle in str(stored).lower()


def _ordered(test: Any) -> Any:
    return lambda stored, value: _comparable(stored, value) and test(stored, value)


_COMPARE = {
    "$eq": _equal,
    "$ne": lambda stored, value: not _equal(stored, value),
    "$gt": _ordered(lambda a, b: a > b),
    "$gte": _ordered(lambda a, b: a >= b),
    "$lt": _ordered(lambda a, b: a < b),
    "$lte": _ordered(lambda a, b: a <= b),
    "$in": lambda stored, values: any(_equal(stored, value) for value in values),
    "$contains": _contains,
    "$prefix": lambda stored, value: isinstance(stored, str) and stored.startswith(value),
}
